"""``DEST/report.html``: the page a catalog team opens after a run instead of a Parquet file.

One self-contained file, written for the merchandisers who check the images: a contact
sheet of every image (grouped by product under its title and id, with the catalog columns
chosen for the report, e.g. SKU and price; one tile per variation), each tile linking to
the full-size image (a relative link: ``images/<key>.jpg`` beside the page, so it works
from disk and from a copied folder) with its prompt on hover and its seed and status below;
the problems grouped by reason, each group with its rows sorted and counted; whether the
budget stopped the run and how much of the catalog it made; prompts that still hold
markup; throughput over time, a latency histogram and credits, drawn as inline SVG. No
script, no external CSS, fonts or images.

The first ``INLINE_THUMBS`` tiles carry inline thumbnails (``data:`` JPEG, 128 px on the
longer side, 1-3 KB each) rather than files in a ``thumbs/`` folder: a page downloaded
alone from S3 (the console's Download, ``aws s3 cp``, a presigned link, an e-mail
attachment) then still shows them, where relative links break the moment the page leaves
its folder. The later tiles (up to ``MAX_TILES``, then the rest are counted) show the image
file itself by its relative link, loaded by the browser as the tile scrolls into view: a
thumbnail needs the whole JPEG decoded (at 1/8 scale), and one for every image was about
40% of the client's CPU per image (issue 16's profile); the page says so above the sheet.
``loading="lazy"`` and ``content-visibility`` keep the browser from decoding and laying
out what is off screen. Thumbnails of a local output are cached in ``.klein/thumbs/`` so a
rerun only makes the new ones; the engine writes them there as it verifies the first
rows' JPEGs (from the same 1/8-scale decode), so the page does not decode them a second
time at the end of the run.

The page is built from ``manifest.parquet`` (the run's record of every row), so it shows
exactly what the data team sees, and from the run summary for the figures of this run. The
file is read a batch of rows at a time, twice (the charts' bins need the run's longest
latency and last finish first), keeping only what the page shows: counts, sums, histogram
bins, the first ``MAX_TILES`` tiles, the first ``MAX_PROBLEMS`` problems and the row
ranges of each reason. Reading it whole made the end of a run the peak of its memory,
growing with the manifest (a million rows: hundreds of MB; issue 16).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import html
import io
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.contract import MERGED_STATUS, RowStatus
from pipeline.manifest import KNOWN_COLUMNS
from pipeline.output_manifest import FIXED_COLUMNS, output_manifest_file
from pipeline.report import outage_warning
from pipeline.storage import Sink
from pipeline.summary import RunSummary, budget_made, stop_advice
from pipeline.templates import markup_in
from pipeline.verify import small_jpeg
from pipeline.whole_file import write_whole

log = logging.getLogger(__name__)

REPORT_RELPATH: Final = "report.html"
THUMBS_RELDIR: Final = ".klein/thumbs"
#: Longest side of a thumbnail, in pixels.
THUMB_PX: Final = 128
THUMB_QUALITY: Final = 72
#: Images shown on the contact sheet at most; the rest are counted, not drawn.
MAX_TILES: Final = 10_000
#: Tiles that carry an inline thumbnail, the first ones; the others show the image file
#: beside the page. A thumbnail needs every entropy-coded block of its JPEG decoded (the
#: engine does it as it verifies): for every image, about 40% of the client's CPU per image
#: (issue 16), for a first look at a batch, a screenful or two is enough.
INLINE_THUMBS: Final = 200
#: Rows listed in the table of problems at most (grouped counts cover all of them).
MAX_PROBLEMS: Final = 2_000
#: Rows of ``manifest.parquet`` read at a time (on this thread: arrow's reader threads and
#: 50,000-row batches kept 60-100 MB more in its allocator's caches at 100,000 rows).
BATCH_ROWS: Final = 10_000
#: Bars of the throughput chart and of the latency histogram.
_THROUGHPUT_BINS: Final = 48
_LATENCY_BINS: Final = 30

_STATUS_COLOURS: Final = {
    RowStatus.SUCCEEDED: "#2e7d32",
    RowStatus.MODERATED: "#ef6c00",
    RowStatus.FAILED: "#c62828",
    RowStatus.REJECTED: "#6a1b9a",
    RowStatus.SKIPPED: "#616161",
}
#: Input columns taken as a product's title and id for its heading, first found first.
TITLE_COLUMNS: Final = ("title", "Title", "name", "Name", "product_title", "Product Name")
ID_COLUMNS: Final = ("id", "Handle", "SKU", "sku", "Variant SKU", "ID")
#: A rejection's "<file> row N[, variation V]" prefix: problems are grouped without it.
_WHERE = re.compile(r"^.*? row \d+(?:, variation [^,:]+)?(?: \(line \d+\))?(?=[,:])[,:]?\s*")
_COLUMNS: Final = (
    "row",
    "key",
    "status",
    "reason",
    "prompt",
    "seed",
    "aspect_ratio",
    "resolution",
    "output_uri",
    "format",
    "width",
    "height",
    "finished_at",
    "latency_s",
    "cost_credits",
)


@dataclass(slots=True)
class _Image:
    """What a tile needs: where the image is and what it is called."""

    key: str
    relpath: str
    local: Path | None


async def write_html_report(
    sink: Sink,
    summary: RunSummary,
    *,
    axes: Sequence[str] = (),
    max_credits: float | None = None,
    relpath: str = REPORT_RELPATH,
    max_tiles: int = MAX_TILES,
    columns: Sequence[str] = (),
) -> str | None:
    """Build the report from ``manifest.parquet`` and store it; returns its URI.

    ``columns`` are the catalog columns shown under each product (``--report-columns``).
    A report is a view: any failure is logged and swallowed (returns None), never allowed
    to fail a run that has already spent its credits.
    """
    try:
        source = await output_manifest_file(sink)
        gathered = await asyncio.to_thread(
            _gather_file, source, summary, axes=axes, max_tiles=max_tiles, columns=columns
        )
        thumbs = await _thumbnails(sink, gathered.shown)
        page = await asyncio.to_thread(
            _render, gathered, summary, thumbs, max_credits=max_credits, max_tiles=max_tiles
        )
        return await sink.put(relpath, page.encode("utf-8"), "text/html; charset=utf-8")
    except Exception as exc:  # a view must never take the run down with it
        log.warning("report.html not written: %s: %s", type(exc).__name__, exc)
        return None


def _relpath(key: str, fmt: str | None) -> str:
    return f"images/{key}.{'png' if fmt == 'png' else 'jpg'}"


async def _thumbnails(sink: Sink, shown: pl.DataFrame) -> dict[str, str]:
    """``key -> base64 JPEG`` for the first succeeded tiles drawn (``INLINE_THUMBS``)."""
    done = shown.filter(pl.col("status") == RowStatus.SUCCEEDED).head(INLINE_THUMBS)
    images = [
        _Image(key, _relpath(key, fmt), sink.local_path(_relpath(key, fmt)))
        for key, fmt in zip(done["key"].to_list(), done["format"].to_list(), strict=True)
        if key
    ]
    cache = sink.local_path(THUMBS_RELDIR)
    remote: dict[str, bytes] = {}
    missing = [image for image in images if image.local is None]
    if missing:
        gate = asyncio.Semaphore(16)

        async def fetch(image: _Image) -> None:
            async with gate:
                data = await sink.get(image.relpath)
            if data is not None:
                remote[image.key] = data

        await asyncio.gather(*(fetch(image) for image in missing))
    return await asyncio.to_thread(_make_thumbnails, images, remote, cache)


def _make_thumbnails(
    images: list[_Image], remote: dict[str, bytes], cache: Path | None
) -> dict[str, str]:
    def one(image: _Image) -> tuple[str, bytes | None]:
        cached = cache / f"{image.key}.jpg" if cache is not None else None
        if cached is not None and image.local is not None:
            try:
                if cached.stat().st_mtime >= image.local.stat().st_mtime:
                    return image.key, cached.read_bytes()
            except OSError:
                pass
        try:
            if image.local is not None:
                data = image.local.read_bytes()
            elif image.key in remote:
                data = remote[image.key]
            else:
                return image.key, None
            thumb = thumbnail(data)
        except (OSError, ValueError, Image.DecompressionBombError):
            return image.key, None
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_whole(cached, thumb)
            except OSError:
                pass
        return image.key, thumb

    workers = max(2, min(8, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        made = list(pool.map(one, images))
    return {key: base64.b64encode(data).decode("ascii") for key, data in made if data}


def thumbnail(data: bytes, size: int = THUMB_PX) -> bytes:
    """A small JPEG of an image; JPEGs are decoded at reduced scale (draft mode), fast."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # decodes at 1/8 scale for a 1k image
        return small_jpeg(image, size, THUMB_QUALITY)


# --- rendering ------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _product_key(key: str | None, variation: str | None) -> str:
    if key and variation and key.endswith(f"--{variation}"):
        return key[: -len(variation) - 2]
    return key or ""


class _Ranges:
    """Row numbers as sorted runs (``2-5, 9``): one pair per run of consecutive rows, not
    one entry per row, so a million rows failing for one reason cost one pair."""

    __slots__ = ("_runs",)

    def __init__(self) -> None:
        self._runs: list[list[int]] = []

    def add(self, row: int) -> None:
        runs = self._runs
        if runs and runs[-1][0] <= row:  # the usual case: rows arrive in order
            if row <= runs[-1][1] + 1:
                runs[-1][1] = max(row, runs[-1][1])
            else:
                runs.append([row, row])
            return
        at = bisect.bisect_right(runs, [row, row])
        if at and row <= runs[at - 1][1] + 1:
            at -= 1
            runs[at][1] = max(row, runs[at][1])
        else:
            runs.insert(at, [row, row])
        while at + 1 < len(runs) and runs[at + 1][0] <= runs[at][1] + 1:
            runs[at][1] = max(runs[at][1], runs.pop(at + 1)[1])

    def text(self, limit: int = 60) -> str:
        """``2-5, 9, 12-13``, cut after ``limit`` runs."""
        runs = self._runs
        text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:limit])
        if len(runs) > limit:
            text += f", ... ({len(runs) - limit} more ranges)"
        return text


def _row_ranges(rows: Sequence[int], limit: int = 60) -> str:
    """``2-5, 9, 12-13``: rows, consecutive ones as ranges, cut after ``limit`` runs."""
    ranges = _Ranges()
    for row in rows:
        ranges.add(row)
    return ranges.text(limit)


@dataclass(slots=True)
class _Group:
    """Problems sharing a status and a reason (the row taken out of it)."""

    count: int = 0
    rows: _Ranges = field(default_factory=_Ranges)


@dataclass(slots=True)
class _Gathered:
    """What the page shows of ``manifest.parquet``, gathered a batch of rows at a time:
    its size does not depend on the number of rows (apart from one pair per range of
    problem rows, and one entry per distinct problem reason)."""

    names: list[str]
    has_variations: bool
    label_columns: list[str]
    height: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    output_credits: float = 0.0
    reused: int = 0
    #: Rows that are images (not merged lines), and the first ``max_tiles`` of them.
    images: int = 0
    shown: pl.DataFrame = field(default_factory=pl.DataFrame)
    #: This run's rows: how many finished, the last finish, the longest succeeded latency.
    finished: int = 0
    last_end: float | None = None
    top_latency: float | None = None
    done_bins: np.ndarray = field(default_factory=lambda: np.zeros(_THROUGHPUT_BINS))
    credit_bins: np.ndarray = field(default_factory=lambda: np.zeros(_THROUGHPUT_BINS))
    latency_bins: np.ndarray = field(default_factory=lambda: np.zeros(_LATENCY_BINS))
    markup: int = 0
    markup_first: str | None = None
    markup_rows: _Ranges = field(default_factory=_Ranges)
    problems: int = 0
    groups: dict[tuple[str, str], _Group] = field(default_factory=dict)
    #: The first ``MAX_PROBLEMS`` problems by row: (row, position in the file, cells).
    listed: list[tuple[int, int, tuple[Any, ...]]] = field(default_factory=list)


def _tile_columns(names: Sequence[str], label_columns: Sequence[str]) -> list[str]:
    wanted = [*_COLUMNS, "variation", *label_columns, *TITLE_COLUMNS, *ID_COLUMNS]
    return list(dict.fromkeys(c for c in wanted if c in names))


def _problem_cells(has_variations: bool) -> list[str]:
    return ["row", *(("variation",) if has_variations else ()), "key", "status", "reason"]


def _this_run(batch: pl.DataFrame, summary: RunSummary) -> pl.DataFrame:
    """The batch's rows that finished in this run, with ``end`` in epoch seconds."""
    return batch.filter(
        pl.col("finished_at").is_not_null()
        & (pl.col("finished_at").dt.epoch("ms") >= int(summary.started_at * 1000) - 1)
    ).select(
        "status",
        "cost_credits",
        "latency_s",
        (pl.col("finished_at").dt.epoch("us") / 1e6).alias("end"),
    )


def _gather(
    batches: Callable[[], Iterator[pl.DataFrame]],
    names: list[str],
    summary: RunSummary,
    *,
    axes: Sequence[str] = (),
    max_tiles: int = MAX_TILES,
    columns: Sequence[str] = (),
) -> _Gathered:
    """Two passes over the rows ``batches()`` yields (the charts' bins need the first)."""
    axis_columns = [a for a in axes if a in names]
    chosen = [c for c in columns if c in names]
    has_variations = "variation" in names
    found = _Gathered(
        names=names,
        has_variations=has_variations,
        label_columns=chosen if columns else _label_columns(names, axis_columns),
    )
    tile_columns = _tile_columns(names, found.label_columns)
    cells = _problem_cells(has_variations)
    shown: list[pl.DataFrame] = []
    held = 0
    for batch in batches():
        position = found.height
        found.height += batch.height
        statuses = batch["status"]
        found.counts.update(dict(statuses.value_counts().iter_rows()))
        found.output_credits += float(batch["cost_credits"].fill_null(0).sum())
        if "reused_from" in names:
            found.reused += batch.height - batch["reused_from"].null_count()
        images = batch.filter(pl.col("status") != MERGED_STATUS)
        found.images += images.height
        if held < max_tiles and images.height:
            part = images.head(max_tiles - held).select(tile_columns)
            shown.append(part)
            held += part.height
        mine = _this_run(batch, summary)
        if mine.height:
            found.finished += mine.height
            last = float(mine["end"].max())  # type: ignore[arg-type]
            found.last_end = last if found.last_end is None else max(found.last_end, last)
            latencies = _succeeded_latencies(mine)
            if len(latencies):
                top = float(latencies.max())  # type: ignore[arg-type]
                found.top_latency = max(found.top_latency or top, top)
        _gather_markup(found, batch)
        _gather_problems(found, batch, cells, position)
        del batch, statuses, images, mine
    found.shown = (
        pl.concat(shown, how="vertical_relaxed")
        if shown
        else pl.DataFrame(schema={name: pl.String for name in tile_columns})
    )
    titles = [c for c in TITLE_COLUMNS if c in found.shown.columns]
    if "Handle" in found.shown.columns and titles:
        # manifest.parquet gives a Shopify export's cells as they were: the Title is on a
        # product's first line only. Its variants' tiles are headed by it all the same.
        found.shown = found.shown.with_columns(
            pl.when(pl.col(c).cast(pl.String).str.strip_chars() != "")
            .then(pl.col(c))
            .forward_fill()
            .over("Handle")
            .alias(c)
            for c in titles
        )
    if found.finished:
        _gather_bins(found, batches, summary)
    return found


def _succeeded_latencies(rows: pl.DataFrame) -> pl.Series:
    return rows.filter(
        (pl.col("status") == RowStatus.SUCCEEDED) & pl.col("latency_s").is_not_null()
    )["latency_s"]


def _gather_markup(found: _Gathered, batch: pl.DataFrame) -> None:
    """Prompts that still hold markup: sent (and paid for) as text."""
    sent = batch.filter(pl.col("status") == RowStatus.SUCCEEDED).select("row", "prompt")
    for row, prompt in sent.iter_rows():
        tag = markup_in(prompt)
        if tag is None:
            continue
        found.markup += 1
        if found.markup_first is None:
            found.markup_first = tag
        found.markup_rows.add(row)


def _gather_problems(
    found: _Gathered, batch: pl.DataFrame, cells: list[str], position: int
) -> None:
    problems = batch.with_row_index("__at").filter(
        (pl.col("status") != RowStatus.SUCCEEDED) & (pl.col("status") != MERGED_STATUS)
    )
    if problems.height == 0:
        return
    found.problems += problems.height
    # One group per reason, the row (and variation) taken out of it: 42 rows whose Title is
    # empty are one line with 42 rows, not 42 lines.
    for status, row, reason in problems.select("status", "row", "reason").iter_rows():
        why = _WHERE.sub("", reason or "", count=1)
        group = found.groups.get((status, why))
        if group is None:
            group = found.groups[(status, why)] = _Group()
        group.count += 1
        group.rows.add(row)
    full = len(found.listed) >= MAX_PROBLEMS
    if full and problems["row"].min() > found.listed[-1][0]:  # type: ignore[operator]
        return
    for at, *values in problems.select("__at", *cells).iter_rows():
        found.listed.append((values[0], position + at, tuple(values)))
    found.listed.sort(key=lambda item: (item[0], item[1]))
    del found.listed[MAX_PROBLEMS:]


def _gather_bins(
    found: _Gathered, batches: Callable[[], Iterator[pl.DataFrame]], summary: RunSummary
) -> None:
    """The charts' bins: a second pass over this run's rows, now that their span is known."""
    start = summary.started_at
    span = max(max(found.last_end or 0.0, summary.finished_at or 0.0) - start, 1.0)
    width = span / _THROUGHPUT_BINS
    top = found.top_latency or 1.0
    latency_width = top / _LATENCY_BINS
    for batch in batches():
        mine = _this_run(batch, summary)
        if mine.height == 0:
            continue
        ends = mine["end"].to_numpy()
        slots = np.clip(((ends - start) / width).astype(np.int64), 0, _THROUGHPUT_BINS - 1)
        succeeded = (mine["status"] == RowStatus.SUCCEEDED).to_numpy()
        found.done_bins += np.bincount(slots, weights=succeeded, minlength=_THROUGHPUT_BINS)
        costs = mine["cost_credits"].fill_null(0.0).cast(pl.Float64).to_numpy()
        found.credit_bins += np.bincount(slots, weights=costs, minlength=_THROUGHPUT_BINS)
        latencies = _succeeded_latencies(mine).to_numpy()
        if len(latencies):
            at = np.clip((latencies / latency_width).astype(np.int64), 0, _LATENCY_BINS - 1)
            found.latency_bins += np.bincount(at, minlength=_LATENCY_BINS)


def _gather_file(
    source: Path | io.BytesIO,
    summary: RunSummary,
    *,
    axes: Sequence[str] = (),
    max_tiles: int = MAX_TILES,
    columns: Sequence[str] = (),
) -> _Gathered:
    """``_gather`` over a Parquet file, ``BATCH_ROWS`` rows and only the used columns at a
    time (the prompt, reason and catalog columns of a million rows never meet)."""
    names = pq.read_schema(source).names
    if isinstance(source, io.BytesIO):
        source.seek(0)
    label = columns if columns else _label_columns(names, [a for a in axes if a in names])
    wanted = {
        *_tile_columns(names, label),
        *_problem_cells("variation" in names),
        "finished_at",
        "reused_from",
    }
    used = [name for name in names if name in wanted]

    def batches() -> Iterator[pl.DataFrame]:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        # No pre-buffering: with it pyarrow reads ahead in coalesced ranges of up to tens
        # of megabytes and holds them (reading a million-row manifest: 21 MB of Arrow
        # memory at the end, under 2 MB without); one row group at a time is enough.
        with pq.ParquetFile(source, pre_buffer=False) as parquet:
            for batch in parquet.iter_batches(
                batch_size=BATCH_ROWS, columns=used, use_threads=False
            ):
                frame = pl.from_arrow(batch)
                del batch
                assert isinstance(frame, pl.DataFrame)
                yield frame
                del frame
                pa.default_memory_pool().release_unused()  # as the join does: see there

    return _gather(batches, names, summary, axes=axes, max_tiles=max_tiles, columns=columns)


def render_report(
    manifest: pl.DataFrame,
    summary: RunSummary,
    thumbs: dict[str, str],
    *,
    axes: Sequence[str] = (),
    max_credits: float | None = None,
    max_tiles: int = MAX_TILES,
    columns: Sequence[str] = (),
    batch_rows: int = BATCH_ROWS,
) -> str:
    """The whole page as text (pure: tests render it without a run), from a table read
    ``batch_rows`` at a time as the run's own report reads ``manifest.parquet``."""
    gathered = _gather(
        lambda: manifest.iter_slices(batch_rows),
        manifest.columns,
        summary,
        axes=axes,
        max_tiles=max_tiles,
        columns=columns,
    )
    return _render(gathered, summary, thumbs, max_credits=max_credits, max_tiles=max_tiles)


def _render(
    found: _Gathered,
    summary: RunSummary,
    thumbs: dict[str, str],
    *,
    max_credits: float | None = None,
    max_tiles: int = MAX_TILES,
) -> str:
    body = [
        _header(summary, found, max_credits),
        _charts(found, summary),
        _contact_sheet(found, thumbs, max_tiles),
        _markup(found),
        _problems(found),
    ]
    title = f"klein-batch report: {summary.manifest} ({summary.run_id})"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>\n"
    )


#: Columns that tell one variant from another, best first, by lower-cased name: a shop
#: export's option values and SKU, then what generic manifests call them.
_TELLING = (
    re.compile(r"option\d value|attribute \d+ value\(s\)"),
    re.compile(r"(variant )?sku"),
    re.compile(r"(variant |regular |sale )?price"),
    re.compile(r"colou?r|size|title|name"),
)
#: A shop export's variant columns (``_TELLING``'s first rule): with them, a tile shows
#: only telling columns, never padded with the export's bookkeeping (WooCommerce's
#: ``Type variation``, ``Published 1``) up to the four.
_SHOP_VARIANT = _TELLING[0]
#: Columns never shown under a tile: long text and markup (a product description's HTML),
#: addresses, and what a heading already shows.
_NOT_A_LABEL = re.compile(r"html|description|seo |image src|image alt|url|body")


def _label_columns(names: Sequence[str], axes: Sequence[str]) -> list[str]:
    """Up to four input columns that say what a product is: the option values and SKU of a
    shop export's variant (tiles of one product's variants are otherwise alike), a title,
    a colour; never its description's markup."""
    names = list(names)
    present = [names.index(c) for c in FIXED_COLUMNS if c in names]
    fixed_end = max(present) + 1
    # Not the columns a heading already shows (title, id), nor request columns given back
    # as the input had them (``input_prompt``, ``seed``...).
    # Of the id columns, the one a heading shows (the first present): a Shopify tile's
    # heading shows the Handle, so its Variant SKU is worth a label.
    heading_id = next((c for c in ID_COLUMNS if c in names), None)
    skip = {"variation", *axes, *TITLE_COLUMNS, heading_id, *KNOWN_COLUMNS}
    chosen = [
        c
        for c in names[fixed_end:]
        if c not in skip and not c.startswith("input_") and not _NOT_A_LABEL.search(c.lower())
    ]
    preferred = [c for rule in _TELLING for c in chosen if rule.fullmatch(c.lower())]
    preferred = list(dict.fromkeys(preferred))
    if any(_SHOP_VARIANT.fullmatch(c.lower()) for c in preferred):
        # Option values first, but a product has at most two or so: keep room for the
        # price after them (Option3 Value is empty on most shops' lines).
        options = [c for c in preferred if _SHOP_VARIANT.fullmatch(c.lower())]
        others = [c for c in preferred if c not in options]
        return (options[:2] + others + options[2:])[:4]
    rest = [c for c in chosen if c not in preferred]
    return (preferred + rest)[:4]


def _header(summary: RunSummary, found: _Gathered, max_credits: float | None) -> str:
    counts = found.counts
    tiles = [
        f'<div class="stat"><b style="color:{_STATUS_COLOURS[status]}">'
        f"{counts.get(status, 0):,}</b>{_e(status)}</div>"
        for status in RowStatus
    ]
    if counts.get(MERGED_STATUS):
        tiles.append(
            f'<div class="stat" title="input lines that make no image of their own (image-only '
            f'lines, variants of a product made once)"><b>{counts[MERGED_STATUS]:,}</b>'
            "merged lines</div>"
        )
    figures = [
        ("images/s", f"{summary.images_per_s:.2f}"),
        ("latency p50", _seconds(summary.latency_p50_s)),
        ("latency p95", _seconds(summary.latency_p95_s)),
        ("credits this run", f"{summary.credits:,.2f}"),
        ("credits, all rows", f"{found.output_credits:,.2f}"),
        ("elapsed", _seconds(summary.elapsed_s)),
    ]
    if max_credits is not None:
        figures.append(("budget", f"{max_credits:,.2f}"))
    if found.reused:  # copied from the image library (--library): not sent, not paid
        figures.append(("from the library", f"{found.reused:,}"))
    tiles += [f'<div class="stat"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in figures]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(summary.started_at))
    asked = found.height - counts.get(MERGED_STATUS, 0)
    made = counts.get(RowStatus.SUCCEEDED, 0)
    share = 100.0 * made / asked if asked else 100.0
    if summary.stopped:
        made_text = budget_made(made, asked, counts.get(RowStatus.REJECTED, 0))
        banner = (
            f'<p class="state stopped" id="state">stopped: {_e(summary.stopped)} · '
            f"{_e(made_text)} · {_e(stop_advice(summary.stopped))}; the rest are "
            "listed under problems as skipped</p>"
        )
    else:
        banner = (
            f'<p class="state" id="state">finished · {made:,} of {asked:,} images made '
            f"({share:.0f}%)</p>"
        )
    banner += "".join(f'<p class="warn">{_e(note)}</p>' for note in _notes(summary))
    return (
        f"<header><h1>{_e(summary.manifest)}</h1>{banner}<p>run {_e(summary.run_id)} · started "
        f"{started} · {asked:,} "
        f"{'images (rows x variations)' if found.has_variations else 'images'} · "
        f"tier {_e(summary.tier)} "
        f"({summary.max_active} active, {summary.submits_per_minute}/min) · "
        f'<a href="#problems">problems</a></p><div class="stats">{"".join(tiles)}</div></header>'
    )


def _notes(summary: RunSummary) -> list[str]:
    """What the summary's closing lines warn about, where a merchandiser reads the run: an
    API that stopped answering, rows kept though their prompt changed, columns not read."""
    notes: list[str] = []
    if summary.api_outages:
        notes.append(outage_warning(summary).removeprefix("warning: "))
    if summary.changed_rows:
        notes.append(summary.changed_warning().removeprefix("warning: "))
    notes += [f"note: {notice}" for notice in summary.notices]
    return notes


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 100:
        return f"{value:.2f} s"
    minutes, seconds = divmod(round(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


# --- charts ---------------------------------------------------------------------------------

_W: Final = 520
_H: Final = 200
_PAD_L: Final = 46
_PAD_B: Final = 26
_PAD_T: Final = 24
_PAD_R: Final = 46


def _charts(found: _Gathered, summary: RunSummary) -> str:
    return (
        '<section class="charts">'
        f"<figure><figcaption>Throughput and credits over this run</figcaption>"
        f"{_throughput_svg(found, summary)}</figure>"
        f"<figure><figcaption>Latency, queue to done (succeeded in this run)</figcaption>"
        f"{_latency_svg(found, summary)}</figure>"
        "</section>"
    )


def _axes(y_max: float, y_label: str, x_labels: list[tuple[float, str]]) -> list[str]:
    parts = [
        f'<line x1="{_PAD_L}" y1="{_H - _PAD_B}" x2="{_W - _PAD_R}" y2="{_H - _PAD_B}" '
        'class="ax"/>',
        f'<line x1="{_PAD_L}" y1="{_PAD_T}" x2="{_PAD_L}" y2="{_H - _PAD_B}" class="ax"/>',
        f'<text x="4" y="12" class="lbl">{_e(y_label)}</text>',
    ]
    for fraction in (0.5, 1.0):
        y = _H - _PAD_B - fraction * (_H - _PAD_B - _PAD_T)
        parts.append(
            f'<text x="{_PAD_L - 4}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
            f"{_short(y_max * fraction)}</text>"
            f'<line x1="{_PAD_L}" y1="{y:.1f}" x2="{_W - _PAD_R}" y2="{y:.1f}" class="grid"/>'
        )
    for x, text in x_labels:
        parts.append(
            f'<text x="{x:.1f}" y="{_H - 8}" class="tick" text-anchor="middle">{_e(text)}</text>'
        )
    return parts


def _short(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _svg(parts: list[str], label: str) -> str:
    return (
        f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        f'aria-label="{_e(label)}">' + "".join(parts) + "</svg>"
    )


def _empty_svg(text: str) -> str:
    return _svg(
        [f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" class="lbl">{_e(text)}</text>'],
        text,
    )


def _throughput_svg(found: _Gathered, summary: RunSummary) -> str:
    if not found.finished:
        return _empty_svg("nothing finished in this run (all rows were done earlier)")
    start = summary.started_at
    span = max(max(found.last_end or 0.0, summary.finished_at or 0.0) - start, 1.0)
    # About 48 bars whatever the length: seconds for a demo, minutes for a night's run.
    bins = _THROUGHPUT_BINS
    width = span / bins
    rates = [float(count) / width for count in found.done_bins]
    y_max = max(rates) or 1.0
    cumulative: list[float] = []
    running = 0.0
    for value in found.credit_bins:
        running += float(value)
        cumulative.append(running)
    c_max = cumulative[-1] or 1.0
    plot_w = _W - _PAD_L - _PAD_R
    plot_h = _H - _PAD_B - _PAD_T
    bar_w = plot_w / bins
    parts = _axes(
        y_max,
        "images/s",
        [(_PAD_L, "0 s"), (_PAD_L + plot_w, _seconds(span))],
    )
    for i, rate in enumerate(rates):
        h = plot_h * rate / y_max
        parts.append(
            f'<rect x="{_PAD_L + i * bar_w + 0.5:.1f}" y="{_H - _PAD_B - h:.1f}" '
            f'width="{max(bar_w - 1, 0.5):.1f}" height="{h:.1f}" class="bar"/>'
        )
    points = " ".join(
        f"{_PAD_L + (i + 1) * bar_w:.1f},{_H - _PAD_B - plot_h * value / c_max:.1f}"
        for i, value in enumerate(cumulative)
    )
    parts.append(f'<polyline points="{_PAD_L:.1f},{_H - _PAD_B} {points}" class="line"/>')
    parts.append(
        f'<text x="{_W - 4}" y="12" class="lbl credits" text-anchor="end">'
        f"credits {_short(c_max)}</text>"
    )
    return _svg(parts, "throughput over time")


def _latency_svg(found: _Gathered, summary: RunSummary) -> str:
    counts = [int(count) for count in found.latency_bins]
    if found.top_latency is None:
        return _empty_svg("no image succeeded in this run")
    top = found.top_latency or 1.0
    bins = _LATENCY_BINS
    y_max = max(counts)
    plot_w = _W - _PAD_L - _PAD_R
    plot_h = _H - _PAD_B - _PAD_T
    bar_w = plot_w / bins
    parts = _axes(float(y_max), "images", [(_PAD_L, "0 s"), (_PAD_L + plot_w, _seconds(top))])
    for i, count in enumerate(counts):
        h = plot_h * count / y_max
        parts.append(
            f'<rect x="{_PAD_L + i * bar_w + 0.5:.1f}" y="{_H - _PAD_B - h:.1f}" '
            f'width="{max(bar_w - 1, 0.5):.1f}" height="{h:.1f}" class="bar"/>'
        )
    for name, value in (("p50", summary.latency_p50_s), ("p95", summary.latency_p95_s)):
        if value is None:
            continue
        x = _PAD_L + plot_w * min(value, top) / top
        parts.append(
            f'<line x1="{x:.1f}" y1="{_PAD_T}" x2="{x:.1f}" y2="{_H - _PAD_B}" class="mark"/>'
            f'<text x="{x + 3:.1f}" y="{_PAD_T - 4 + (10 if name == "p95" else 0)}" '
            f'class="tick">{name} '
            f"{_seconds(value)}</text>"
        )
    return _svg(parts, "latency histogram")


# --- contact sheet --------------------------------------------------------------------------


def _tile(
    row: dict[str, Any], thumbs: dict[str, str], caption: str, extra_lines: Sequence[str] = ()
) -> str:
    status = row["status"]
    key = row["key"] or ""
    seed = row["seed"]
    hover = row["prompt"] or ""
    if status != RowStatus.SUCCEEDED and row["reason"]:
        hover = f"{hover}\n\n{status}: {row['reason']}" if hover else f"{status}: {row['reason']}"
    data = thumbs.get(key) if status == RowStatus.SUCCEEDED else None
    if status == RowStatus.SUCCEEDED and key:
        width, height = row["width"] or 1, row["height"] or 1
        scale = THUMB_PX / max(width, height)
        # Past the inline thumbnails (or when one could not be made), the image file beside
        # the page: the browser loads it when the tile scrolls into view.
        source = (
            f"data:image/jpeg;base64,{data}"
            if data is not None
            else _e(_relpath(key, row.get("format")))
        )
        visual = (
            f'<img loading="lazy" decoding="async" alt="{_e(key)}" '
            f'width="{max(1, round(width * scale))}" height="{max(1, round(height * scale))}" '
            f'src="{source}">'
        )
    else:
        visual = f'<div class="ph">{_e(status)}</div>'
    if status == RowStatus.SUCCEEDED and key:
        # Relative: the image sits beside the page, on disk, in a copied folder or bucket.
        target = _relpath(key, row.get("format"))
        visual = f'<a class="full" href="{_e(target)}" title="open the full image">{visual}</a>'
    visual = f'<div class="vis">{visual}</div>'
    seed_text = f"seed {seed}" if seed is not None else "no seed"
    details = "".join(f'<span class="col">{_e(text)}</span>' for text in extra_lines)
    return (
        f'<figure class="tile st-{_e(status)}" title="{_e(hover)}">{visual}'
        f'<figcaption><span class="cap">{_e(caption)}</span>{details}'
        f'<span class="meta">{_e(seed_text)} · <i>{_e(status)}</i></span></figcaption></figure>'
    )


def _first(row: dict[str, Any], names: Sequence[str]) -> str | None:
    for name in names:
        value = row.get(name)
        if value not in (None, ""):
            return str(value)
    return None


def _cells(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    return [f"{c} {row[c]}" for c in columns if row.get(c) not in (None, "")]


def _contact_sheet(found: _Gathered, thumbs: dict[str, str], max_tiles: int) -> str:
    shown = found.shown
    label_columns = found.label_columns
    has_variations = found.has_variations
    groups: list[str] = []
    current_row: int | None = None
    tiles: list[str] = []
    heading = ""

    def close() -> None:
        if tiles:
            groups.append(
                f'<section class="product"><h3>{heading}</h3>'
                f'<div class="tiles">{"".join(tiles)}</div></section>'
            )

    if has_variations:
        for row in shown.iter_rows(named=True):
            if row["row"] != current_row:
                close()
                tiles = []
                current_row = row["row"]
                title = _first(row, TITLE_COLUMNS)
                ident = _first(row, ID_COLUMNS) or _product_key(row["key"], row["variation"])
                labels = " · ".join(_e(cell) for cell in _cells(row, label_columns))
                named = f"{_e(title)} · {_e(ident)}" if title else _e(ident)
                heading = (
                    f"{named} <small>row {row['row']}{' · ' + labels if labels else ''}</small>"
                )
            tiles.append(_tile(row, thumbs, row["variation"] or ""))
        close()
        body = "".join(groups)
    else:
        parts: list[str] = []
        for row in shown.iter_rows(named=True):
            title = _first(row, TITLE_COLUMNS)
            ident = _first(row, ID_COLUMNS) or row["key"] or ""
            caption = f"{title} · {ident}" if title else f"row {row['row']} · {ident}"
            parts.append(_tile(row, thumbs, caption, _cells(row, label_columns)))
        body = '<div class="tiles">' + "".join(parts) + "</div>"
    more = ""
    if found.images > max_tiles:
        more = (
            f'<p class="note">Showing the first {max_tiles:,} of {found.images:,} images; '
            "every row is in manifest.parquet.</p>"
        )
    if found.images > INLINE_THUMBS:
        more += (
            f'<p class="note">The first {INLINE_THUMBS:,} tiles carry their thumbnails; the '
            "others show the image files beside this page (blank where the page is opened "
            "away from its folder).</p>"
        )
    return f'<section id="sheet"><h2>Contact sheet</h2>{more}{body}</section>'


def _markup(found: _Gathered) -> str:
    """Prompts that still hold markup: sent (and paid for) as text."""
    if not found.markup:
        return ""
    return (
        '<section id="markup"><h2>Prompts with markup</h2>'
        f'<p class="warn">{found.markup:,} prompts still contain markup (e.g. '
        f"{_e(found.markup_first)}), sent and paid for as text: fill such holes with "
        f"{{COLUMN|text}}. Rows: {_e(found.markup_rows.text())}</p></section>"
    )


def _problems(found: _Gathered) -> str:
    if found.problems == 0:
        return (
            '<section id="problems"><h2>Problems</h2>'
            '<p class="ok">Every row succeeded.</p></section>'
        )
    grouped = sorted(
        found.groups.items(), key=lambda item: (-item[1].count, item[0][0], item[0][1])
    )
    summary_rows = "".join(
        f'<tr><td class="st-{_e(status)}">{_e(status)}</td><td>{group.count:,}</td>'
        f"<td>{_e(why)}</td><td>{_e(group.rows.text())}</td></tr>"
        for (status, why), group in grouped
    )
    cells = _problem_cells(found.has_variations)
    lines = "".join(
        "<tr>"
        + "".join(
            f'<td class="st-{_e(value)}">{_e(value)}</td>'
            if name == "status"
            else f"<td>{_e(value)}</td>"
            for name, value in zip(cells, values, strict=True)
        )
        + "</tr>"
        for _, _, values in found.listed
    )
    count = found.problems
    more = (
        f'<p class="note">Listing {MAX_PROBLEMS:,} of {count:,}; filter '
        "manifest.parquet on status for the rest.</p>"
        if count > MAX_PROBLEMS
        else ""
    )
    head = "".join(f"<th>{_e(c)}</th>" for c in cells)
    noun = "image" if count == 1 else "images"
    return (
        f'<section id="problems"><h2>Problems: {count:,} {noun} not made, '
        f"{len(grouped):,} {'reason' if len(grouped) == 1 else 'reasons'}</h2>"
        '<table id="reasons" class="groups"><tr><th>status</th><th>count</th><th>reason</th>'
        f"<th>rows</th></tr>{summary_rows}</table>"
        f"<details><summary>Every row ({count:,})</summary>{more}"
        f'<table id="failures" class="list"><tr>{head}</tr>{lines}</table></details></section>'
    )


_CSS: Final = """
:root{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;background:#fafafa}
body{margin:0 auto;padding:16px 24px;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px}
h3{font-size:14px;margin:14px 0 6px}h3 small{color:#666;font-weight:400;margin-left:8px}
header p{color:#555;margin:0 0 12px;font-size:13px}
.stats{display:flex;flex-wrap:wrap;gap:8px}
.stat{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:6px 12px;
font-size:12px;color:#555;min-width:86px}
.stat b{display:block;font-size:18px;color:#222}
.charts{display:flex;flex-wrap:wrap;gap:16px;margin-top:16px}
.charts figure{margin:0;background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px}
.charts figcaption{font-size:13px;color:#444;margin-bottom:4px}
svg .ax{stroke:#888}svg .grid{stroke:#eee}svg .bar{fill:#5c6bc0}
svg .line{fill:none;stroke:#ef6c00;stroke-width:2}svg .mark{stroke:#c62828;stroke-dasharray:4 3}
svg .lbl{font-size:11px;fill:#555}svg .tick{font-size:10px;fill:#666}svg .credits{fill:#ef6c00}
.product{content-visibility:auto;contain-intrinsic-size:auto 190px}
.tiles{display:flex;flex-wrap:wrap;gap:8px}
.tile{margin:0;width:136px;background:#fff;border:1px solid #e0e0e0;border-radius:4px;
padding:4px;font-size:11px;border-top:3px solid #2e7d32}
.tile img{display:block;margin:0 auto;max-width:128px;max-height:128px;height:auto}
.tile .vis{height:128px;display:flex;align-items:center;justify-content:center}
.tile .ph{height:96px;width:100%;display:flex;align-items:center;justify-content:center;color:#fff;
font-weight:600;border-radius:3px;background:#9e9e9e}
.tile figcaption{margin-top:3px;line-height:1.3}
.tile .cap{display:block;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.tile .meta{color:#666}
.tile:hover{outline:2px solid #5c6bc0}
.st-moderated{border-top-color:#ef6c00}.st-moderated .ph{background:#ef6c00}
.st-failed{border-top-color:#c62828}.st-failed .ph{background:#c62828}
.st-rejected{border-top-color:#6a1b9a}.st-rejected .ph{background:#6a1b9a}
.st-skipped{border-top-color:#616161}.st-skipped .ph{background:#616161}
table{border-collapse:collapse;font-size:12px;background:#fff;margin-bottom:12px}
th,td{border:1px solid #e0e0e0;padding:4px 8px;text-align:left;vertical-align:top}
td.st-failed{color:#c62828}td.st-moderated{color:#ef6c00}td.st-rejected{color:#6a1b9a}
td.st-skipped{color:#616161}
.note{color:#666;font-size:13px}.ok{color:#2e7d32}
.state{font-size:15px;font-weight:600;color:#2e7d32;margin:4px 0 8px}
.state.stopped{color:#fff;background:#ef6c00;padding:6px 10px;border-radius:4px;
display:inline-block}
.tile .col{display:block;color:#333;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.tile a.full{display:block}
.warn{color:#8d4b00;background:#fff3e0;padding:6px 10px;border-radius:4px}
details summary{cursor:pointer;font-size:13px;color:#444;margin:6px 0}
"""
