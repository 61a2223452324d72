"""The simulator's images: real JPEG/PNG files, deterministic, distinct, and cheap.

The simulator has to answer like the real API with real image files of exactly the promised
size, and it must never be the bottleneck of a benchmark (200+ 1k JPEGs per second on one
core, HTTP included). So an image is a flat-shaded "product shot" rather than anything
expensive: a wall-and-floor gradient, a few anti-aliased shapes with soft shadows, and a
small caption with the first words of the prompt and the seed. The composition comes from a
digest of (prompt, seed) and the colours also from the references' dominant colours, so the
same inputs give the same bytes in any process, two prompts or seeds give pictures a person
tells apart on a contact sheet, and a reference visibly recolours the picture.

Where the time goes, and how little of it is left:

- The backdrop is constant along each row. With a restart marker after every 16x16 block
  (MCU), each block's bytes are independent of its neighbours, so a backdrop row is one
  encoded block repeated; only the blocks under shapes and the caption (about a fifth of
  the picture) are painted and encoded, then spliced in. The result is byte for byte what
  encoding the whole picture with the same settings gives.
- Shape masks are drawn once per size and cut into a plain inside (a fill, or nothing for a
  ring's hole) and thin bands, so little is alpha-blended per image.
- References are judged and sampled once per content digest.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import random
import re
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont, JpegImagePlugin, PngImagePlugin

from pipeline.contract import OUTPUT_FORMATS

RGB = tuple[int, int, int]
_T = TypeVar("_T")

#: Fixed encoder settings: part of the determinism promise, so change them deliberately.
JPEG_QUALITY = 85
JPEG_SUBSAMPLING = 2  # 4:2:0, what cameras and the real API deliver
PNG_ZLIB_LEVEL = 1

#: Sides outside this range are a caller bug, not a request the API could accept.
MIN_SIDE = 16
MAX_SIDE = 8192
#: Larger references are refused rather than decoded (Pillow's own bomb limit is ~89 MP).
MAX_REFERENCE_PIXELS = 64_000_000

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
    #: Width x height as sent (what dialect B charges input megapixels on).
    pixels: int = 0


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
    small = image.copy()
    small.thumbnail((48, 48), Image.Resampling.BOX)
    if small.mode in ("RGBA", "LA", "PA") or "transparency" in small.info:
        # Cut-out product shots are mostly transparent; their hidden pixels are often black.
        # Seen on white, as a person would see them, the product's colours dominate.
        rgba = small.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        rgb = rgb.convert("RGB")
    else:
        rgb = small.convert("RGB")
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
        # The format's own opener rather than Image.open: Image.open's decompression-bomb
        # check warns through the process-wide warnings machinery, which the server's
        # worker threads share; the limit is applied here instead, before any decoding.
        opener = JpegImagePlugin.JpegImageFile if kind == "JPEG" else PngImagePlugin.PngImageFile
        image = opener(io.BytesIO(data))
        if image.width < 1 or image.height < 1:
            return broken
        if image.width * image.height > MAX_REFERENCE_PIXELS:
            return _Reference(f"{kind} image has too many pixels to decode safely", ())
        # JPEG decodes at 1/8 scale here (libjpeg skips most of the IDCT) yet still reads
        # every entropy-coded byte, so truncation is still caught.
        pixels = image.width * image.height
        image.draft("RGB", (64, 64))
        image.load()
        palette = _dominant_colours(image)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError):
        return broken
    return _Reference(None, palette, pixels)


def _digest(data: bytes) -> bytes:
    """A reference's identity. SHA-256: CPUs hash it in hardware, about twice BLAKE2's speed
    here, and references are hashed on every submit and every render that carries them."""
    return hashlib.sha256(data).digest()


def _reference(data: bytes, digest: bytes | None = None) -> _Reference:
    key = digest if digest is not None else _digest(data)
    result = _references.get_or_make(key, lambda: _analyse(data))
    assert isinstance(result, _Reference)
    return result


def check_reference(data: bytes) -> str | None:
    """None when ``data`` is a complete JPEG or PNG the API would accept, else a short reason.

    Runs on every submit that carries references, so verdicts are cached by content digest:
    a batch that reuses one product photo decodes it once.
    """
    return _reference(bytes(data)).reason


def reference_pixels(data: bytes) -> int:
    """Width x height of a reference ``check_reference`` accepted (0 if it did not)."""
    return _reference(bytes(data)).pixels


# --- colour ----------------------------------------------------------------------------------


def _hls(hue: float, lightness: float, saturation: float) -> RGB:
    r, g, b = colorsys.hls_to_rgb(hue % 1.0, lightness, saturation)
    return (round(r * 255), round(g * 255), round(b * 255))


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


Box = tuple[int, int, int, int]
_BLOCK = 8  # granularity of the solid/empty analysis of a mask
_PLAN_DEPTH = 3


@dataclass(frozen=True, slots=True)
class _Mask:
    """A coverage mask and a plan to apply it cheaply.

    Blending through a mask costs a few nanoseconds per pixel of its bounding box, which is
    most of the drawing time. Shapes have a large inside that is fully opaque (a plain fill)
    or fully clear (nothing to do, as in a ring's hole), so each mask is cut once into that
    inside and the bands around it, and only the bands are blended.
    """

    image: Image.Image
    #: (box within the mask, mask crop for that box, or None for a plain fill)
    pieces: tuple[tuple[Box, Any], ...]

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def _largest_rectangle(grid: np.ndarray) -> tuple[int, Box | None]:
    """The largest all-true axis-aligned rectangle of a small boolean grid (stack method)."""
    best_area, best = 0, None
    heights = [0] * grid.shape[1]
    for row, cells in enumerate(grid.tolist()):
        heights = [h + 1 if cell else 0 for h, cell in zip(heights, cells, strict=True)]
        stack: list[tuple[int, int]] = []
        for col, h in enumerate([*heights, 0]):
            start = col
            while stack and stack[-1][1] >= h:
                start, top = stack.pop()
                area = top * (col - start)
                if area > best_area:
                    best_area, best = area, (start, row - top + 1, col, row + 1)
            stack.append((start, h))
    return best_area, best


def _pieces(image: Image.Image, depth: int) -> list[tuple[Box, Any]]:
    """Cut a mask into a plain inside (filled, or skipped when clear) and bands around it,
    and the bands again, a few levels deep: each level halves what is left to blend."""
    width, height = image.size
    cols, rows = width // _BLOCK, height // _BLOCK
    whole: list[tuple[Box, Any]] = [((0, 0, width, height), image.im)]
    if depth == 0 or cols < 2 or rows < 2:
        return whole
    blocks = np.asarray(image)[: rows * _BLOCK, : cols * _BLOCK].reshape(rows, _BLOCK, cols, _BLOCK)
    solid_area, solid = _largest_rectangle(blocks.min(axis=(1, 3)) == 255)
    clear_area, clear = _largest_rectangle(blocks.max(axis=(1, 3)) == 0)
    inside = solid if solid_area >= clear_area else clear
    if inside is None:
        return whole
    x0, y0, x1, y1 = (side * _BLOCK for side in inside)
    pieces: list[tuple[Box, Any]] = [((x0, y0, x1, y1), None)] if solid_area >= clear_area else []
    for bx0, by0, bx1, by1 in (
        (0, 0, width, y0),
        (0, y1, width, height),
        (0, y0, x0, y1),
        (x1, y0, width, y1),
    ):
        if bx0 < bx1 and by0 < by1:
            for (px0, py0, px1, py1), piece in _pieces(image.crop((bx0, by0, bx1, by1)), depth - 1):
                pieces.append(((bx0 + px0, by0 + py0, bx0 + px1, by0 + py1), piece))
    return pieces


def _plan(image: Image.Image) -> _Mask:
    return _Mask(image, tuple(_pieces(image, _PLAN_DEPTH)))


@lru_cache(maxsize=2048)
def _shape_mask(kind: str, width: int, height: int, alpha: int) -> _Mask:
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
    return _plan(big.reduce(_SUPERSAMPLE))


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font with basic layout: the same glyph positions on every machine,
    whether or not libraqm happens to be installed."""
    try:
        return ImageFont.load_default(size=size).font_variant(layout_engine=ImageFont.Layout.BASIC)
    except (AttributeError, OSError):  # Pillow built without FreeType: the bitmap font
        return ImageFont.load_default()


SHAPES = ("circle", "ring", "tile", "pill", "triangle", "diamond")
_SIZES = (0.12, 0.15, 0.18, 0.21, 0.24, 0.28)  # of the shorter side; discrete so masks repeat
_ASPECTS = (0.6, 0.8, 1.0, 1.25, 1.6)


def _unit(short: int) -> int:
    """The length shape sizes are fractions of: the shorter side, rounded to 256 pixels, so
    the ten presets share a handful of mask sizes instead of each drawing its own."""
    return max(256, round(short / 256) * 256)


def _snap(value: float) -> int:
    return max(_MASK_STEP, round(value / _MASK_STEP) * _MASK_STEP)


def _pick(rng: random.Random, options: Sequence[_T]) -> _T:
    return options[int(rng.random() * len(options))]


@dataclass(frozen=True, slots=True)
class _Stamp:
    """One layer of the picture: a colour poured through a mask at a position."""

    colour: RGB
    x: int
    y: int
    mask: _Mask

    @property
    def box(self) -> Box:
        return (self.x, self.y, self.x + self.mask.width, self.y + self.mask.height)


@dataclass(frozen=True, slots=True)
class _Scene:
    """A picture as data: a backdrop that is constant along each row, and stamps over it.

    Keeping the backdrop row-constant is what makes the JPEG path cheap: every untouched
    16x16 block of a row encodes to the same bytes, so only the stamps' blocks are encoded.
    """

    width: int
    height: int
    column: bytes  # RGB of the backdrop, one pixel per row
    stamps: tuple[_Stamp, ...]


def _backdrop_column(
    height: int, horizon: int, top: RGB, middle: RGB, floor_top: RGB, floor: RGB
) -> bytes:
    """A wall-and-floor gradient, one pixel per row."""
    wall = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None]
    ground = np.linspace(0.0, 1.0, height - horizon, dtype=np.float32)[:, None]
    column = np.concatenate(
        [
            np.array(top, np.float32) * (1 - wall) + np.array(middle, np.float32) * wall,
            np.array(floor_top, np.float32) * (1 - ground) + np.array(floor, np.float32) * ground,
        ]
    )
    return np.rint(column).astype(np.uint8).tobytes()


def _caption(prompt: str, seed: int) -> str:
    words = " ".join(prompt.split()[:6])
    if len(words) > 40:
        words = words[:39].rstrip() + "…"
    return f"{words}  ·  seed {seed}" if words else f"seed {seed}"


@lru_cache(maxsize=8192)
def _glyph(size: int, char: str) -> tuple[np.ndarray, int, float]:
    """One character's coverage (line-box tall), its left bearing and its advance.

    FreeType rasterises on every call; captions reuse a few dozen characters, so caching
    glyphs makes a caption a handful of array maxima instead of a text render.
    """
    font = _font(size)
    line = font.getbbox("Ag")[3]
    left, _, right, _ = font.getbbox(char)
    tile = Image.new("L", (max(1, right - left), line), 0)
    ImageDraw.Draw(tile).text((-left, 0), char, fill=255, font=font)
    return np.asarray(tile), left, font.getlength(char)


def _text_mask(text: str, size: int) -> Image.Image:
    tiles = [_glyph(size, char) for char in text]
    width = round(sum(advance for _, _, advance in tiles)) + size
    height = tiles[0][0].shape[0] if tiles else size
    canvas = np.zeros((height, width), dtype=np.uint8)
    pen = 0.0
    for tile, left, advance in tiles:
        x = max(0, round(pen) + left)
        region = canvas[:, x : x + tile.shape[1]]
        np.maximum(region, tile[:, : region.shape[1]], out=region)
        pen += advance
    return Image.fromarray(canvas, "L")


def _caption_stamps(text: str, width: int, height: int) -> list[_Stamp]:
    """A small dark plate with the caption, bottom left, like a contact-sheet label."""
    short = min(width, height)
    size = max(10, _unit(short) // 44)
    margin = max(6, short // 48)
    pad = margin // 2
    glyphs = _text_mask(text, size)
    plate_w = min(width - 2 * margin, -(-(glyphs.width - size + 2 * pad) // 32) * 32)
    plate_h = _snap(glyphs.height + 2 * pad)
    if plate_w <= 2 * pad or plate_h >= height // 3:
        return []
    glyphs = glyphs.crop((0, 0, plate_w - 2 * pad, glyphs.height))
    top = height - margin - plate_h
    return [
        _Stamp((0, 0, 0), margin, top, _shape_mask("tile", plate_w, plate_h, 120)),
        _Stamp(
            (255, 255, 255),
            margin + pad,
            top + (plate_h - glyphs.height) // 2,
            _Mask(glyphs, (((0, 0, glyphs.width, glyphs.height), glyphs.im),)),
        ),
    ]


def _scene(prompt: str, seed: int, width: int, height: int, references: Sequence[bytes]) -> _Scene:
    """Everything about the picture that the inputs decide; the size only scales it."""
    # Composition comes from the prompt and seed alone, colours also from the references, so
    # the same prompt with another reference is recognisably the same picture recoloured.
    key = hashlib.blake2b(digest_size=32, person=b"klein-sim-img")
    key.update(struct.pack(">Q", seed))
    key.update(prompt.encode("utf-8", "surrogatepass"))
    tint = key.copy()
    palettes = []
    for data in references:
        blob = bytes(data)
        digest = _digest(blob)
        tint.update(b"\x00ref" + digest)
        ref = _reference(blob, digest)
        if ref.palette:
            palettes.append(ref.palette)
    # random.Random's random() sequence for an int seed is stable across Python versions.
    rng = random.Random(int.from_bytes(key.digest(), "big"))
    colours = _palette(random.Random(int.from_bytes(tint.digest(), "big")), palettes)
    base = colours[0]
    short = min(width, height)
    horizon = round(height * (0.58 + 0.14 * rng.random()))
    column = _backdrop_column(
        height,
        horizon,
        _shade(base, 0.78 + 0.1 * rng.random()),
        _shade(base, 0.55 + 0.1 * rng.random()),
        _shade(base, 0.42),
        _shade(base, 0.22 + 0.1 * rng.random()),
    )
    stamps: list[_Stamp] = []
    placed = []
    for index in range(3 + int(rng.random() * 3)):
        kind = _pick(rng, SHAPES)
        size = _unit(short) * _pick(rng, _SIZES)
        aspect = 1.0 if kind in ("circle", "ring") else _pick(rng, _ASPECTS)
        shape_w, shape_h = _snap(size * aspect**0.5), _snap(size / aspect**0.5)
        centre = width * (0.12 + 0.76 * rng.random())
        # Most shapes stand on the floor; the others hang on the wall behind them.
        standing = rng.random() < 0.6
        bottom = (
            horizon + (0.02 + 0.2 * rng.random()) * (height - horizon)
            if standing
            else horizon * (0.25 + 0.6 * rng.random())
        )
        colour = colours[1 + index % (len(colours) - 1)]
        placed.append((bottom, index, kind, shape_w, shape_h, centre, colour, standing))
    for bottom, _, kind, shape_w, shape_h, centre, colour, standing in sorted(placed):
        # Kept inside the frame, as a product photographer would.
        inset = short // 24
        left = max(inset, min(round(centre - shape_w / 2), width - inset - shape_w))
        top = max(round(bottom - shape_h), inset)
        if standing:
            shadow = _shape_mask("circle", shape_w, _snap(shape_h * 0.18), 70)
            stamps.append(
                _Stamp((0, 0, 0), left + shape_w // 10, round(bottom - shadow.height / 2), shadow)
            )
        stamps.append(_Stamp(colour, left, top, _shape_mask(kind, shape_w, shape_h, 255)))
        if kind in ("circle", "tile", "pill"):
            lightness = colorsys.rgb_to_hls(*(c / 255 for c in colour))[1]
            sheen = _shape_mask(kind, _snap(shape_w * 0.4), _snap(shape_h * 0.4), 110)
            stamps.append(
                _Stamp(
                    _shade(colour, min(0.92, lightness + 0.18)),
                    left + shape_w // 8,
                    top + shape_h // 8,
                    sheen,
                )
            )
    stamps.extend(_caption_stamps(_caption(prompt, seed), width, height))
    return _Scene(width, height, column, tuple(stamps))


def _paint(scene: _Scene, box: Box) -> Image.Image:
    """The pixels of ``box`` (left, top, right, bottom) of the scene."""
    x0, y0, x1, y1 = box
    strip = Image.frombuffer("RGB", (1, y1 - y0), scene.column[3 * y0 : 3 * y1], "raw", "RGB", 0, 1)
    canvas = strip.resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST)
    # The imaging core directly: Image.paste re-validates its arguments on every call, which
    # costs more than blending a small band. The core clips boxes that cross the canvas edge.
    core = canvas.im
    for stamp in scene.stamps:
        sx0, sy0, sx1, sy1 = stamp.box
        if sx0 >= x1 or sx1 <= x0 or sy0 >= y1 or sy1 <= y0:
            continue
        dx, dy = stamp.x - x0, stamp.y - y0
        for (px0, py0, px1, py1), piece in stamp.mask.pieces:
            target = (dx + px0, dy + py0, dx + px1, dy + py1)
            if piece is None:
                core.paste(stamp.colour, target)
            else:
                core.paste(stamp.colour, target, piece)
    return canvas


# --- encoding --------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    """PNG with the Up filter and a fast zlib level: gradients become runs of zeros."""
    width, height = image.size
    # tobytes() then frombuffer: several times faster than numpy's array interface on Pillow.
    flat = np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(height, width * 3)
    rows = np.empty((height, width * 3 + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up
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


_MCU = 16  # 4:2:0 subsampling codes 16x16 pixels per minimum coded unit
_RESTART = re.compile(rb"\xff[\xd0-\xd7]")
_EOI = b"\xff\xd9"


def _jpeg(image: Image.Image) -> bytes:
    """Baseline JPEG with a restart marker after every MCU, so MCUs can be spliced."""
    out = io.BytesIO()
    image.save(
        out,
        "JPEG",
        quality=JPEG_QUALITY,
        subsampling=JPEG_SUBSAMPLING,
        optimize=False,
        restart_marker_blocks=1,
    )
    return out.getvalue()


def _split_jpeg(data: bytes) -> tuple[bytes, int, list[bytes]]:
    """(header through SOS, offset of the SOF payload, entropy-coded segment of each MCU)."""
    offset, sof = 2, -1
    while True:
        marker = data[offset + 1]
        (length,) = struct.unpack_from(">H", data, offset + 2)
        if marker == 0xC0:
            sof = offset + 4
        offset += 2 + length
        if marker == 0xDA:
            break
    if sof < 0 or not data.endswith(_EOI):
        raise RuntimeError("the JPEG encoder wrote an unexpected stream")
    return data[:offset], sof, _RESTART.split(data[offset:-2])


_RST = tuple(bytes((0xFF, 0xD0 + i)) for i in range(8))


@lru_cache(maxsize=1024)
def _marker_run(phase: int, count: int) -> tuple[bytes, ...]:
    """The restart markers that follow ``count`` MCUs, the first being MCU number ``phase``."""
    return tuple(_RST[(phase + k) % 8] for k in range(count))


@lru_cache(maxsize=64)
def _separators(phase: int, count: int) -> tuple[bytes, ...]:
    """``segment.join`` of these is the segment ``count`` times, each followed by its marker."""
    return (b"", *_marker_run(phase, count))


def _repeat(segment: bytes, phase: int, count: int) -> bytes:
    """``count`` copies of one MCU's bytes, each followed by its restart marker."""
    cycle = segment.join(_separators(phase % 8, min(count, 8)))
    if count <= 8:
        return cycle
    full, rest = divmod(count, 8)
    return cycle * full + cycle[: rest * (len(segment) + 2)]


def _dirty_regions(scene: _Scene) -> list[tuple[int, int, int, int]]:
    """MCU-aligned boxes covering every stamp, merged until none overlap."""
    cols, rows = -(-scene.width // _MCU), -(-scene.height // _MCU)
    boxes: list[tuple[int, int, int, int]] = []
    for stamp in scene.stamps:
        x0, y0, x1, y1 = stamp.box
        box = (
            max(0, x0 // _MCU),
            max(0, y0 // _MCU),
            min(cols, -(-x1 // _MCU)),
            min(rows, -(-y1 // _MCU)),
        )
        if box[0] < box[2] and box[1] < box[3]:
            boxes.append(box)
    merged = True
    while merged:
        merged = False
        for i, a in enumerate(boxes):
            for j in range(i + 1, len(boxes)):
                b = boxes[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    boxes[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes


def _backdrop_blocks(column: bytes) -> Image.Image:
    """One 16x16 block per MCU row of the backdrop, side by side in a single row.

    A wide, one-block-tall image encodes faster than the same blocks stacked up.
    """
    rows = len(column) // (3 * _MCU)
    blocks = np.frombuffer(column, dtype=np.uint8).reshape(rows, _MCU, 1, 3)
    blocks = np.broadcast_to(blocks, (rows, _MCU, _MCU, 3)).transpose(1, 0, 2, 3)
    return Image.fromarray(np.ascontiguousarray(blocks).reshape(_MCU, rows * _MCU, 3), "RGB")


def _spliced_jpeg(scene: _Scene) -> bytes:
    """Encode only the blocks the stamps touch; every other block repeats its row's backdrop.

    The result is byte for byte what encoding the whole painted image with the same settings
    gives (baseline, standard Huffman tables, a restart interval of one MCU), for a fraction
    of the work.
    """
    width, height = scene.width, scene.height
    cols = -(-width // _MCU)
    header, sof, row_segments = _split_jpeg(_jpeg(_backdrop_blocks(scene.column)))
    patches: dict[int, list[tuple[int, int, list[bytes]]]] = {}
    for c0, r0, c1, r1 in _dirty_regions(scene):
        box = (c0 * _MCU, r0 * _MCU, min(width, c1 * _MCU), min(height, r1 * _MCU))
        _, _, patch = _split_jpeg(_jpeg(_paint(scene, box)))
        span = c1 - c0
        for row in range(r1 - r0):
            patches.setdefault(r0 + row, []).append((c0, c1, patch[row * span : (row + 1) * span]))
    parts: list[bytes] = [header[:sof], struct.pack(">BHH", 8, height, width), header[sof + 5 :]]
    for row, backdrop in enumerate(row_segments):
        first, col = row * cols, 0
        for c0, c1, segments in sorted(patches.get(row, ())):
            if c0 > col:
                parts.append(_repeat(backdrop, first + col, c0 - col))
            markers = _marker_run((first + c0) % 8, c1 - c0)
            parts.extend(chain.from_iterable(zip(segments, markers, strict=True)))
            col = c1
        if col < cols:
            parts.append(_repeat(backdrop, first + col, cols - col))
    # The last MCU is followed by the end-of-image marker, not a restart marker.
    parts[-1] = parts[-1][:-2] + _EOI
    return b"".join(parts)


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
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, not {seed!r}")
    scene = _scene(prompt, seed, width, height, references)
    if fmt == "png":
        return _png(_paint(scene, (0, 0, width, height)))
    if width % _MCU or height % _MCU:
        # Partial edge blocks are padded by the encoder from the whole image; splicing would
        # need to reproduce that. Every size the API produces is a multiple of 16 anyway.
        return _jpeg(_paint(scene, (0, 0, width, height)))
    return _spliced_jpeg(scene)
