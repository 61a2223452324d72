"""Contact-sheet thumbnails come from the verification decode, not a second decode."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pipeline_helpers import check_output, run_against, write_catalog

import pipeline.engine as engine
import pipeline.html_report as html_report
from pipeline.html_report import THUMB_PX, THUMBS_RELDIR
from pipeline.sim import SimServer
from pipeline.sim.images import render_image
from pipeline.verify import ImageInfo, inspect_image


def test_inspect_image_makes_a_thumbnail_of_a_jpeg_only_when_asked() -> None:
    jpeg = render_image(prompt="mug", seed=1, width=1024, height=768, fmt="jpeg")
    plain = inspect_image(jpeg, expected_format="jpeg", expected_size=(1024, 768))
    assert plain.thumbnail is None
    info = inspect_image(
        jpeg, expected_format="jpeg", expected_size=(1024, 768), thumbnail_px=THUMB_PX
    )
    # The full size is still what the image is, whatever the decode scale.
    assert (info.width, info.height) == (1024, 768)
    assert info.thumbnail is not None
    with Image.open(io.BytesIO(info.thumbnail)) as thumb:
        assert thumb.format == "JPEG"
        assert thumb.size == (128, 96)
    png = render_image(prompt="mug", seed=1, width=1024, height=768, fmt="png")
    assert (
        inspect_image(
            png, expected_format="png", expected_size=(1024, 768), thumbnail_px=THUMB_PX
        ).thumbnail
        is None
    )


def _count_report_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the images report.html decodes itself for a thumbnail (a list to read)."""
    made: list[int] = []
    real_thumbnail = html_report.thumbnail

    def counting(data: bytes, size: int = THUMB_PX) -> bytes:
        made.append(len(data))
        return real_thumbnail(data, size)

    monkeypatch.setattr(html_report, "thumbnail", counting)
    return made


def test_run_leaves_thumbnails_the_report_uses_without_decoding_again(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 8
    manifest = write_catalog(tmp_path / "in", n)
    out = tmp_path / "out"
    made_at_report_time = _count_report_decodes(monkeypatch)
    summary = run_against(sim, manifest, out)

    check_output(out, n, summary)
    page = (out / "report.html").read_text()
    for i in range(n):
        key = f"item-{i:04d}"
        image = out / "images" / f"{key}.jpg"
        cached = out / THUMBS_RELDIR / f"{key}.jpg"
        assert cached.stat().st_mtime >= image.stat().st_mtime
        with Image.open(cached) as thumb:
            assert thumb.format == "JPEG"
            assert max(thumb.size) == THUMB_PX
        assert base64.b64encode(cached.read_bytes()).decode() in page
    assert made_at_report_time == []


def test_png_rows_get_their_thumbnails_from_the_report(sim: SimServer, tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path / "in", 3, output_format="png")
    out = tmp_path / "out"
    summary = run_against(sim, manifest, out)

    check_output(out, 3, summary)
    page = (out / "report.html").read_text()
    for i in range(3):
        cached = out / THUMBS_RELDIR / f"item-{i:04d}.jpg"
        assert base64.b64encode(cached.read_bytes()).decode() in page


def test_only_the_first_rows_get_thumbnails_and_later_tiles_show_their_image_file(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``INLINE_THUMBS`` an image is verified by its structure, not decoded, and its
    tile links the stored file instead of carrying a thumbnail; the page never decodes."""
    n, inline = 5, 2
    monkeypatch.setattr(html_report, "INLINE_THUMBS", inline)
    monkeypatch.setattr(engine, "INLINE_THUMBS", inline)
    made_at_report_time = _count_report_decodes(monkeypatch)
    decoded: list[bool] = []
    real_inspect = engine.inspect_image

    def watching(data: bytes, **kwargs: Any) -> ImageInfo:
        decoded.append(kwargs.get("thumbnail_px") is not None)
        return real_inspect(data, **kwargs)

    monkeypatch.setattr(engine, "inspect_image", watching)
    manifest = write_catalog(tmp_path / "in", n)
    out = tmp_path / "out"
    summary = run_against(sim, manifest, out)

    check_output(out, n, summary)
    assert sorted(decoded) == [False] * (n - inline) + [True] * inline
    page = (out / "report.html").read_text()
    cached = sorted(path.name for path in (out / THUMBS_RELDIR).iterdir())
    assert cached == [f"item-{i:04d}.jpg" for i in range(inline)]
    for name in cached:
        assert base64.b64encode((out / THUMBS_RELDIR / name).read_bytes()).decode() in page
    for i in range(inline, n):
        assert f'src="images/item-{i:04d}.jpg"' in page
        assert (out / "images" / f"item-{i:04d}.jpg").is_file()
    assert f"The first {inline:,} tiles carry their thumbnails" in page
    assert made_at_report_time == []
