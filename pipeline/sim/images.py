"""The simulator's images: real JPEG/PNG files, deterministic, distinct, and cheap.

The simulator has to answer like the real API with real image files of exactly the promised
size, and it must never be the bottleneck of a benchmark (200+ 1k JPEGs per second on one
core, HTTP included). So an image is a flat-shaded "product shot" rather than anything
expensive: a two-part gradient (backdrop and floor), a soft glow, a few anti-aliased shapes
with soft shadows, and a small caption with the first words of the prompt. Everything that
varies comes from a digest of (prompt, seed, references), so the same inputs give the same
bytes in any process, while two prompts or seeds give images a person tells apart on a
contact sheet. Reference images lend their dominant colours, which is how a caller can see
that its references were used.

Costs are kept down by caching what repeats (shape masks, reference palettes, the verdict on
a reference) and by leaving the encoder smooth areas it compresses quickly.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import random
import struct
import threading
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.contract import OUTPUT_FORMATS

RGB = tuple[int, int, int]

#: Fixed encoder settings: part of the determinism promise, so change them deliberately.
JPEG_QUALITY = 85
JPEG_SUBSAMPLING = 2  # 4:2:0, what cameras and the real API deliver
PNG_ZLIB_LEVEL = 1

#: Sides outside this range are a caller bug, not a request the API could accept.
MIN_SIDE = 16
MAX_SIDE = 8192

_SUPERSAMPLE = 4  # shape masks are drawn this much larger, then box-filtered down
_MASK_STEP = 8  # shape sizes snap to this many pixels so masks are reused across images
_CACHE_ENTRIES = 4096

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


# --- reference images ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reference:
    """What the simulator needs to know about one reference: is it usable, and its colours."""

    reason: str | None
    palette: tuple[RGB, ...]


class _LruCache:
    """A small thread-safe LRU: the server may render in worker threads."""

    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._data: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key: Hashable, make: Callable[[], object]) -> object:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = make()
        with self._lock:
            self._data[key] = value
            if len(self._data) > self._entries:
                self._data.popitem(last=False)
        return value


_references = _LruCache(_CACHE_ENTRIES)


def _sniff(data: bytes) -> str:
    """Name the container from its magic bytes, so a rejection says what was actually sent."""
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
            return "HEIC"
        return "an ISO media file"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.lstrip().startswith((b"<svg", b"<?xml")):
        return "SVG/XML"
    return ""


def _dominant_colours(image: Image.Image, count: int = 4) -> tuple[RGB, ...]:
    """The few colours that cover most of the image, most frequent first."""
    rgb = image.convert("RGB")
    rgb.thumbnail((48, 48), Image.Resampling.BOX)
    quantized = rgb.quantize(colors=count, method=Image.Quantize.MEDIANCUT)
    flat = quantized.getpalette() or []
    counts = sorted(quantized.getcolors() or [], key=lambda item: (-item[0], item[1]))
    colours: list[RGB] = []
    for _, index in counts:
        colour = (flat[3 * index], flat[3 * index + 1], flat[3 * index + 2])
        if colour not in colours:
            colours.append(colour)
    return tuple(colours)


def _analyse(data: bytes) -> _Reference:
    """Decode once (at reduced scale where the format allows) to judge and to sample colours."""
    kind = _sniff(data)
    if kind not in ("JPEG", "PNG"):
        looks = f" (looks like {kind})" if kind else ""
        return _Reference(f"not a JPEG or PNG image{looks}", ())
    broken = _Reference(f"truncated or corrupt {kind}", ())
    if kind == "JPEG" and data.rfind(b"\xff\xd9") == -1:
        return broken
    if kind == "PNG" and data.rfind(_PNG_IEND) == -1:
        return broken
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format != kind:
                return broken
            if image.width < 1 or image.height < 1:
                return broken
            # JPEG decodes at 1/8 scale here (libjpeg skips most of the IDCT) yet still reads
            # every entropy-coded byte, so truncation is still caught.
            image.draft("RGB", (64, 64))
            image.load()
            palette = _dominant_colours(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _Reference(f"{kind} image has too many pixels to decode safely", ())
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError):
        return broken
    return _Reference(None, palette)


def _reference(data: bytes) -> _Reference:
    digest = hashlib.blake2b(data, digest_size=20).digest()
    result = _references.get_or_make(digest, lambda: _analyse(data))
    assert isinstance(result, _Reference)
    return result


def check_reference(data: bytes) -> str | None:
    """None when ``data`` is a complete JPEG or PNG the API would accept, else a short reason.

    Runs on every submit that carries references, so verdicts are cached by content digest:
    a batch that reuses one product photo decodes it once.
    """
    return _reference(bytes(data)).reason


# --- colour ----------------------------------------------------------------------------------


def _hls(hue: float, lightness: float, saturation: float) -> RGB:
    r, g, b = colorsys.hls_to_rgb(hue % 1.0, lightness, saturation)
    return (round(r * 255), round(g * 255), round(b * 255))


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def _shade(colour: RGB, lightness: float) -> RGB:
    """The same hue and saturation at another lightness (0 black .. 1 white)."""
    hue, _, saturation = colorsys.rgb_to_hls(*(c / 255 for c in colour))
    return _hls(hue, lightness, saturation)


def _palette(rng: random.Random, references: Sequence[tuple[RGB, ...]]) -> list[RGB]:
    """Five or more colours: backdrop first, then accents for the shapes."""
    borrowed: list[RGB] = []
    for rank in range(max((len(p) for p in references), default=0)):
        for palette in references:
            if rank < len(palette) and palette[rank] not in borrowed:
                borrowed.append(palette[rank])
    if borrowed:
        while len(borrowed) < 5:
            base = borrowed[len(borrowed) % len(borrowed)]
            borrowed.append(_shade(base, 0.25 + 0.5 * rng.random()))
        return borrowed
    hue = rng.random()
    scheme = (0.0, 0.5, 0.08, 0.58, 0.33) if rng.random() < 0.5 else (0.0, 0.33, 0.66, 0.1, 0.45)
    saturation = 0.45 + 0.4 * rng.random()
    return [
        _hls(hue + offset, 0.35 + 0.3 * rng.random(), saturation)
        if i
        else _hls(hue, 0.5, 0.35 + 0.3 * rng.random())
        for i, offset in enumerate(scheme)
    ]


# --- drawing ---------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def _shape_mask(kind: str, width: int, height: int, alpha: int) -> Image.Image:
    """An anti-aliased coverage mask, drawn large and box-filtered down, reused across images."""
    big = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    w, h = big.size
    box = (0, 0, w - 1, h - 1)
    if kind == "circle":
        draw.ellipse(box, fill=alpha)
    elif kind == "ring":
        draw.ellipse(box, outline=alpha, width=max(_SUPERSAMPLE, min(w, h) // 6))
    elif kind == "tile":
        draw.rounded_rectangle(box, radius=min(w, h) // 5, fill=alpha)
    elif kind == "pill":
        draw.rounded_rectangle(box, radius=min(w, h) // 2, fill=alpha)
    elif kind == "triangle":
        draw.polygon([(w / 2, 0), (w - 1, h - 1), (0, h - 1)], fill=alpha)
    elif kind == "diamond":
        draw.polygon([(w / 2, 0), (w - 1, h / 2), (w / 2, h - 1), (0, h / 2)], fill=alpha)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return big.reduce(_SUPERSAMPLE)


@lru_cache(maxsize=64)
def _glow_mask(width: int, height: int, alpha: int) -> Image.Image:
    """A soft radial falloff: light pooling behind the subject, computed once per size."""
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    falloff = np.clip(1.0 - (x * x + y * y), 0.0, 1.0) ** 2
    return Image.fromarray((falloff * alpha).astype(np.uint8), "L")


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font: no font files on disk, identical glyphs on every machine."""
    return ImageFont.load_default(size=size)


SHAPES = ("circle", "ring", "tile", "pill", "triangle", "diamond")


def _snap(value: float) -> int:
    return max(_MASK_STEP, round(value / _MASK_STEP) * _MASK_STEP)


def _backdrop(
    width: int, height: int, top: RGB, middle: RGB, floor_top: RGB, floor: RGB, horizon: int
) -> Image.Image:
    """A wall-and-floor gradient: one column computed, stretched sideways by the resampler."""
    wall = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None]
    ground = np.linspace(0.0, 1.0, height - horizon, dtype=np.float32)[:, None]
    column = np.concatenate(
        [
            np.array(top, np.float32) * (1 - wall) + np.array(middle, np.float32) * wall,
            np.array(floor_top, np.float32) * (1 - ground) + np.array(floor, np.float32) * ground,
        ]
    )
    strip = Image.frombuffer("RGB", (1, height), np.rint(column).astype(np.uint8).tobytes())
    return strip.resize((width, height), Image.Resampling.NEAREST)


def _caption(prompt: str, seed: int) -> str:
    words = " ".join(prompt.split()[:6])
    if len(words) > 48:
        words = words[:47].rstrip() + "…"
    return f"{words}  ·  seed {seed}" if words else f"seed {seed}"


def _compose(
    prompt: str, seed: int, width: int, height: int, references: Sequence[bytes]
) -> Image.Image:
    key = hashlib.blake2b(digest_size=32, person=b"klein-sim-img")
    key.update(struct.pack(">Q", seed))
    key.update(prompt.encode("utf-8", "surrogatepass"))
    palettes = []
    for data in references:
        ref = _reference(bytes(data))
        key.update(b"\x00ref" + hashlib.blake2b(bytes(data), digest_size=20).digest())
        if ref.palette:
            palettes.append(ref.palette)
    rng = random.Random(int.from_bytes(key.digest(), "big"))

    colours = _palette(rng, palettes)
    base = colours[0]
    short = min(width, height)
    horizon = round(height * (0.58 + 0.14 * rng.random()))
    image = _backdrop(
        width,
        height,
        _shade(base, 0.78 + 0.1 * rng.random()),
        _shade(base, 0.55 + 0.1 * rng.random()),
        _shade(base, 0.42),
        _shade(base, 0.22 + 0.1 * rng.random()),
        horizon,
    )

    pool_w, pool_h = _snap(width * (0.5 + 0.3 * rng.random())), _snap((height - horizon) * 0.5)
    pool_x = round(width * (0.3 + 0.4 * rng.random()) - pool_w / 2)
    image.paste((255, 255, 255), (pool_x, horizon), _shape_mask("circle", pool_w, pool_h, 40))

    count = 3 + int(rng.random() * 3)
    placed = []
    for index in range(count):
        kind = SHAPES[int(rng.random() * len(SHAPES))]
        size = short * (0.14 + 0.2 * rng.random())
        aspect = 1.0 if kind in ("circle", "ring") else 0.6 + 0.9 * rng.random()
        sw, sh = _snap(size * aspect**0.5), _snap(size / aspect**0.5)
        cx = width * (0.12 + 0.76 * rng.random())
        # Larger shapes rest lower, on the floor; the rest float on the wall.
        resting = rng.random() < 0.6
        bottom = (
            horizon + (0.02 + 0.2 * rng.random()) * (height - horizon)
            if resting
            else horizon * (0.25 + 0.6 * rng.random())
        )
        placed.append((bottom, kind, sw, sh, cx, colours[1 + index % (len(colours) - 1)], resting))
    for bottom, kind, sw, sh, cx, colour, resting in sorted(placed):
        left, top = round(cx - sw / 2), max(round(bottom - sh), short // 24)
        if resting:
            shadow = _shape_mask("circle", sw, _snap(sh * 0.18), 70)
            image.paste((0, 0, 0), (left + sw // 10, round(bottom - shadow.height / 2)), shadow)
        image.paste(colour, (left, top), _shape_mask(kind, sw, sh, 255))
        highlight = _shade(
            colour, min(0.92, colorsys.rgb_to_hls(*(c / 255 for c in colour))[1] + 0.18)
        )
        inset_w, inset_h = _snap(sw * 0.45), _snap(sh * 0.45)
        if kind in ("circle", "tile", "pill"):
            image.paste(
                highlight, (left + sw // 8, top + sh // 8), _shape_mask(kind, inset_w, inset_h, 110)
            )

    font = _font(max(10, short // 42))
    text = _caption(prompt, seed)
    draw = ImageDraw.Draw(image)
    margin = max(6, short // 48)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    pad = margin // 2
    box_w = min(width - 2 * margin, _snap(x1 - x0 + 2 * pad + _MASK_STEP / 2))
    box_h = _snap(y1 - y0 + 2 * pad + _MASK_STEP / 2)
    if box_w > 0 and box_h < height // 3:
        plate = _shape_mask("tile", box_w, box_h, 120)
        image.paste((0, 0, 0), (margin, height - margin - box_h), plate)
        draw.text(
            (margin + pad - x0, height - margin - box_h + pad - y0),
            text,
            fill=(255, 255, 255),
            font=font,
        )
    return image


# --- encoding --------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    """PNG with the Up filter and a fast zlib level: gradients become runs of zeros."""
    pixels = np.asarray(image, dtype=np.uint8)
    height, width, _ = pixels.shape
    rows = np.empty((height, width * 3 + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up
    flat = pixels.reshape(height, width * 3)
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_ZLIB_LEVEL)),
            chunk(b"IEND", b""),
        )
    )


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING, optimize=False)
    return out.getvalue()


def render_image(
    *,
    prompt: str,
    seed: int,
    width: int,
    height: int,
    fmt: str,
    references: Sequence[bytes] = (),
) -> bytes:
    """A real ``fmt`` ("png" or "jpeg") file of exactly ``width`` x ``height`` pixels.

    Same arguments, same bytes, in any process. References that are not usable images add
    nothing to the palette; the simulator rejects them at submit with ``check_reference``.
    """
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(OUTPUT_FORMATS)}, not {fmt!r}")
    for name, side in (("width", width), ("height", height)):
        if not isinstance(side, int) or not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(
                f"{name} must be an integer from {MIN_SIDE} to {MAX_SIDE}, not {side!r}"
            )
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    image = _compose(prompt, seed, width, height, references)
    return _png(image) if fmt == "png" else _jpeg(image)
