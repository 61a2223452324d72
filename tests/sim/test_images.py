"""The simulator's images: real files of the promised size, deterministic, distinct, cheap to
check, and coloured by their references."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import contract
from pipeline.sim import images
from pipeline.sim.images import check_reference, render_image

REPO = Path(__file__).resolve().parents[2]
FORMAT_NAME = {"png": "PNG", "jpeg": "JPEG"}


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # a complete decode: a truncated or corrupt stream raises here
    return image


def pixels(data: bytes, size: int = 64) -> np.ndarray:
    """A small float RGB array, enough to compare pictures as a person would."""
    image = decode(data).convert("RGB").resize((size, size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def noisy(
    colour: tuple[int, int, int], size: tuple[int, int] = (96, 64), seed: int = 0
) -> Image.Image:
    """A photo-like reference: one dominant colour with some texture."""
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.int16)
    noise = rng.integers(-25, 26, size=(size[1], size[0], 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


# --- size and format ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", contract.OUTPUT_FORMATS)
@pytest.mark.parametrize("preset", sorted(contract.ASPECT_RATIOS))
def test_every_preset_at_1k_is_a_real_file_of_the_promised_size(preset: str, fmt: str) -> None:
    width, height = contract.output_size(preset, "1k")
    data = render_image(prompt=f"a {preset} shot", seed=7, width=width, height=height, fmt=fmt)
    image = decode(data)
    assert image.format == FORMAT_NAME[fmt]
    assert image.size == (width, height)
    assert image.mode == "RGB"


@pytest.mark.parametrize("preset", sorted(contract.ASPECT_RATIOS))
def test_every_preset_at_2k_jpeg_is_a_real_file_of_the_promised_size(preset: str) -> None:
    width, height = contract.output_size(preset, "2k")
    data = render_image(prompt="large", seed=3, width=width, height=height, fmt="jpeg")
    image = decode(data)
    assert (image.format, image.size) == ("JPEG", (width, height))


@pytest.mark.parametrize("preset", ["square_1_1", "widescreen_16_9", "portrait_2_3"])
def test_2k_png_is_a_real_file_of_the_promised_size(preset: str) -> None:
    width, height = contract.output_size(preset, "2k")
    image = decode(render_image(prompt="large", seed=3, width=width, height=height, fmt="png"))
    assert (image.format, image.size) == ("PNG", (width, height))


def test_bfl_sizes_and_sizes_off_the_16_pixel_grid_work() -> None:
    for width, height in [contract.bfl_size("square_1_1", "2k"), (1000, 700), (17, 31)]:
        for fmt in contract.OUTPUT_FORMATS:
            image = decode(render_image(prompt="odd", seed=1, width=width, height=height, fmt=fmt))
            assert image.size == (width, height)


def test_jpeg_shows_the_same_picture_as_png() -> None:
    # The JPEG is assembled from separately encoded blocks: a block in the wrong place, or a
    # row shifted, would show up as a large difference from the losslessly stored picture.
    for preset in ("square_1_1", "widescreen_16_9", "vertical_1_2"):
        width, height = contract.output_size(preset, "1k")
        args = {"prompt": "a teapot on a table", "seed": 11, "width": width, "height": height}
        jpeg = np.asarray(decode(render_image(**args, fmt="jpeg")), dtype=np.float64)
        png = np.asarray(decode(render_image(**args, fmt="png")), dtype=np.float64)
        assert np.abs(jpeg - png).mean() < 2.0
        assert np.percentile(np.abs(jpeg - png).max(axis=2), 99.9) < 48


def test_spliced_jpeg_is_byte_identical_to_encoding_the_whole_picture() -> None:
    for width, height in [(1024, 1024), (1408, 704), (1168, 2048)]:
        scene = images._scene("a lamp", 5, width, height, ())
        whole = images._jpeg(images._paint(scene, (0, 0, width, height)))
        assert images._spliced_jpeg(scene) == whole


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.text(max_size=300),
    seed=st.integers(min_value=0, max_value=2**64 - 1),
    size=st.tuples(st.integers(16, 320), st.integers(16, 320)),
    fmt=st.sampled_from(contract.OUTPUT_FORMATS),
)
def test_any_prompt_and_seed_give_a_valid_image(
    prompt: str, seed: int, size: tuple[int, int], fmt: str
) -> None:
    data = render_image(prompt=prompt, seed=seed, width=size[0], height=size[1], fmt=fmt)
    assert decode(data).size == size


def test_bad_arguments_are_refused_with_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"fmt must be one of png, jpeg, not 'gif'"):
        render_image(prompt="x", seed=1, width=64, height=64, fmt="gif")
    with pytest.raises(ValueError, match=r"width must be an integer from 16 to 8192, not 0"):
        render_image(prompt="x", seed=1, width=0, height=64, fmt="png")
    with pytest.raises(ValueError, match=r"height must be an integer"):
        render_image(prompt="x", seed=1, width=64, height=64.0, fmt="png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 2\*\*64 - 1, not -1"):
        render_image(prompt="x", seed=-1, width=64, height=64, fmt="jpeg")
    with pytest.raises(ValueError, match=r"seed must be an integer"):
        render_image(prompt="x", seed=2**64, width=64, height=64, fmt="jpeg")


# --- determinism and variety ----------------------------------------------------------------

CASES = [
    ("a red leather handbag on white marble", 1, 1024, 1024, "jpeg"),
    ("a red leather handbag on white marble", 1, 1344, 768, "png"),
    ("ceramic mug, soft morning light, 35mm", 4_294_967_295, 832, 1216, "jpeg"),
    ("ünïcödé prompt ✓ 日本語", 0, 704, 1408, "png"),
    ("", 12, 1024, 1024, "jpeg"),
]


def digests() -> list[str]:
    return [
        hashlib.sha256(
            render_image(prompt=p, seed=s, width=w, height=h, fmt=f, references=())
        ).hexdigest()
        for p, s, w, h, f in CASES
    ]


def test_same_inputs_give_the_same_bytes_in_this_process() -> None:
    assert digests() == digests()
    ref = encoded(noisy((200, 30, 30)), "JPEG", quality=90)
    one = render_image(prompt="x", seed=2, width=768, height=1344, fmt="jpeg", references=[ref])
    two = render_image(prompt="x", seed=2, width=768, height=1344, fmt="jpeg", references=[ref])
    assert one == two


def test_same_inputs_give_the_same_bytes_in_another_process() -> None:
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from tests.sim.test_images import digests; print(json.dumps(digests()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(REPO)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert out.stdout.strip() == str(digests()).replace("'", '"')


def test_rendering_from_many_threads_gives_the_same_bytes_as_one_at_a_time() -> None:
    # The server renders in worker threads; the shared mask, glyph and reference caches
    # must not let one image leak into another.
    ref = encoded(noisy((20, 160, 160)), "PNG")
    jobs = [
        {
            "prompt": f"thread job {i}",
            "seed": i,
            "width": (1024, 1344, 704)[i % 3],
            "height": (1024, 768, 1408)[i % 3],
            "fmt": ("jpeg", "png")[i % 2],
            "references": [ref] if i % 4 == 0 else [],
        }
        for i in range(24)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda job: render_image(**job), jobs))
    assert parallel == [render_image(**job) for job in jobs]


def test_different_prompts_and_seeds_give_visibly_different_pictures() -> None:
    variants = [("a red handbag", seed) for seed in range(6)]
    variants += [(prompt, 1) for prompt in ("a blue kettle", "running shoes", "a desk lamp")]
    pictures = [
        pixels(render_image(prompt=p, seed=s, width=1024, height=1024, fmt="jpeg"))
        for p, s in variants
    ]
    for (i, a), (j, b) in itertools.combinations(enumerate(pictures), 2):
        # Mean absolute difference per channel on a 64x64 thumbnail: clearly different
        # composition or colours, not just a changed caption.
        assert np.abs(a - b).mean() > 8, (variants[i], variants[j])


def test_prompts_that_differ_after_the_captioned_words_still_look_different() -> None:
    head = "a studio photo of a leather bag on a plinth with"
    a = render_image(prompt=f"{head} palms", seed=1, width=512, height=512, fmt="png")
    b = render_image(prompt=f"{head} cacti", seed=1, width=512, height=512, fmt="png")
    assert np.abs(pixels(a) - pixels(b)).mean() > 8


# --- references -----------------------------------------------------------------------------


def redness(data: bytes) -> float:
    rgb = pixels(data)
    return float((rgb[..., 0] - rgb[..., 2]).mean())


def test_a_red_reference_makes_a_redder_picture_than_a_blue_one() -> None:
    red = encoded(noisy((210, 35, 30)), "JPEG", quality=90)
    blue = encoded(noisy((30, 60, 215), seed=1), "PNG")
    for seed in range(5):
        args = {"prompt": "a product on a stage", "seed": seed, "width": 1024, "height": 1024}
        with_red = render_image(**args, fmt="jpeg", references=[red])
        with_blue = render_image(**args, fmt="jpeg", references=[blue])
        assert redness(with_red) > redness(with_blue) + 60
        assert redness(with_red) > 30
        assert redness(with_blue) < -30


def test_a_transparent_cut_out_lends_its_product_colour_not_its_hidden_pixels() -> None:
    # Fully transparent pixels keep whatever colour the editor left there: here red.
    cut_out = Image.new("RGBA", (200, 200), (255, 0, 0, 0))
    cut_out.paste(noisy((40, 70, 220), size=(90, 90)), (55, 55))
    data = encoded(cut_out, "PNG")
    args = {"prompt": "a product", "seed": 4, "width": 512, "height": 512, "fmt": "png"}
    # A blue product on white: no trace of the hidden red.
    assert redness(render_image(**args, references=[data])) < -5


def test_several_references_all_lend_colours() -> None:
    red = encoded(noisy((210, 35, 30)), "JPEG", quality=90)
    green = encoded(noisy((30, 200, 40), seed=2), "PNG")
    args = {"prompt": "a product", "seed": 9, "width": 1024, "height": 1024, "fmt": "png"}
    only_red = pixels(render_image(**args, references=[red]))
    both = pixels(render_image(**args, references=[red, green]))
    # Some shapes take the second reference's colour: more green than with red alone.
    assert (both[..., 1] - both[..., 0]).max() > (only_red[..., 1] - only_red[..., 0]).max() + 60


def test_references_change_the_bytes_and_unusable_ones_change_nothing_else() -> None:
    ref = encoded(noisy((90, 160, 40)), "PNG")
    args = {"prompt": "p", "seed": 1, "width": 256, "height": 256, "fmt": "jpeg"}
    assert render_image(**args, references=[ref]) != render_image(**args)
    # An unusable reference is refused at submit (check_reference); if one gets here anyway
    # it lends no colour, but the picture is still a deterministic function of the inputs.
    junk = b"not an image"
    assert render_image(**args, references=[junk]) == render_image(**args, references=[junk])


@pytest.mark.parametrize(
    "make",
    [
        lambda: encoded(noisy((10, 200, 10)), "JPEG", quality=80),
        lambda: encoded(noisy((10, 200, 10)), "JPEG", quality=95, progressive=True),
        lambda: encoded(noisy((10, 200, 10)).convert("L"), "JPEG"),
        lambda: encoded(noisy((10, 200, 10)).convert("CMYK"), "JPEG"),
        lambda: encoded(noisy((10, 200, 10)), "PNG"),
        lambda: encoded(noisy((10, 200, 10)).convert("RGBA"), "PNG"),
        lambda: encoded(noisy((10, 200, 10)).convert("P"), "PNG"),
        lambda: encoded(noisy((10, 200, 10)).convert("L"), "PNG", optimize=True),
        lambda: encoded(noisy((10, 200, 10), size=(1, 1)), "PNG"),
    ],
    ids=["jpeg", "progressive", "gray-jpeg", "cmyk-jpeg", "png", "rgba", "palette", "gray", "1px"],
)
def test_complete_jpeg_and_png_references_are_accepted(make) -> None:  # type: ignore[no-untyped-def]
    data = make()
    assert check_reference(data) is None
    assert check_reference(bytearray(data)) is None


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def corrupt_idat(png: bytes) -> bytes:
    start = png.index(b"IDAT") + 4
    return png[:start] + bytes(b ^ 0x5A for b in png[start : start + 40]) + png[start + 40 :]


def huge_jpeg(jpeg: bytes) -> bytes:
    """A small JPEG whose frame header claims 9000 x 8000 pixels (72 MP)."""
    sof = jpeg.index(b"\xff\xc0") + 5
    return jpeg[:sof] + struct.pack(">HH", 8000, 9000) + jpeg[sof + 4 :]


def test_other_formats_garbage_and_broken_files_are_refused_with_a_reason() -> None:
    jpeg = encoded(noisy((200, 40, 40), size=(256, 256)), "JPEG", quality=90)
    png = encoded(noisy((200, 40, 40), size=(256, 256)), "PNG")
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0))
        + png_chunk(b"IEND", b"")
    )
    cases = {
        "gif": (encoded(noisy((1, 2, 3)), "GIF"), "not a JPEG or PNG image (looks like GIF)"),
        "webp": (b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(32), "(looks like WebP)"),
        "bmp": (encoded(noisy((1, 2, 3)), "BMP"), "(looks like BMP)"),
        "tiff": (encoded(noisy((1, 2, 3)), "TIFF"), "(looks like TIFF)"),
        "heic": (b"\x00\x00\x00\x18ftypheic" + bytes(32), "(looks like HEIC)"),
        "text": (b"hello, world", "not a JPEG or PNG image"),
        "empty": (b"", "not a JPEG or PNG image"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], "truncated or corrupt JPEG"),
        "jpeg without end": (jpeg[:-2], "truncated or corrupt JPEG"),
        "header only jpeg": (jpeg[:300], "truncated or corrupt JPEG"),
        "truncated png": (png[: len(png) // 2], "truncated or corrupt PNG"),
        "png without end": (png[:-12], "truncated or corrupt PNG"),
        "corrupt png": (corrupt_idat(png), "truncated or corrupt PNG"),
        "png too large": (bomb, "PNG image has too many pixels to decode safely"),
        "jpeg too large": (huge_jpeg(jpeg), "JPEG image has too many pixels to decode safely"),
    }
    for name, (data, reason) in cases.items():
        got = check_reference(data)
        assert got is not None, name
        assert reason in got, (name, got)
        assert len(got) < 80, got


def test_an_unknown_format_is_named_as_unknown() -> None:
    assert check_reference(b"\x00\x01\x02\x03" * 10) == "not a JPEG or PNG image"


def test_checking_the_same_reference_again_does_not_decode_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = encoded(noisy((5, 6, 7), seed=42), "PNG")
    calls: list[int] = []
    analyse = images._analyse

    def counting(blob: bytes) -> images._Reference:
        calls.append(len(blob))
        return analyse(blob)

    monkeypatch.setattr(images, "_analyse", counting)
    for _ in range(5):
        assert check_reference(data) is None
    render_image(prompt="x", seed=1, width=64, height=64, fmt="png", references=[data])
    assert calls == [len(data)]
