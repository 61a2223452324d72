"""report.html is built from ``manifest.parquet`` a batch of rows at a time (its memory
does not grow with the manifest): the page must not depend on where the batches split."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from pipeline import html_report
from pipeline.html_report import _row_ranges, render_report, write_html_report
from pipeline.output_manifest import FIXED_SCHEMA
from pipeline.storage import LocalSink
from pipeline.summary import RunSummary

STARTED = 1_700_000_000.0
_STATUSES = ["succeeded", "failed", "rejected", "succeeded", "merged", "skipped", "moderated"]


def _summary() -> RunSummary:
    return RunSummary(
        run_id="run-1",
        manifest="catalog.csv",
        output="out",
        dialect="klein",
        tier="standard",
        max_active=24,
        submits_per_minute=3600,
        total_rows=0,
        started_at=STARTED,
        finished_at=STARTED + 90.0,
        latency_p50_s=2.0,
        latency_p95_s=5.0,
    )


def _manifest(rows: int, *, variations: bool = False) -> pl.DataFrame:
    records = []
    for i in range(rows):
        status = _STATUSES[i % len(_STATUSES)]
        # A rerun's rows (finished before this run started) stay out of the charts.
        finished = STARTED + (i % 80) - (100 if i % 11 == 0 else 0)
        records.append(
            {
                "row": i // 3 + 1 if variations else i + 1,
                "key": f"sku-{i}",
                "status": status,
                "reason": None
                if status in ("succeeded", "merged")
                else f"catalog.csv row {i + 1}, column prompt: {status} because {i % 3}",
                "prompt": f"mug {i}" + (" <b>sale</b>" if i % 5 == 0 else ""),
                "seed": i,
                "width": 1024,
                "height": 768,
                "format": "jpeg",
                "finished_at": datetime.fromtimestamp(finished, UTC)
                if status != "skipped"
                else None,
                "latency_s": 0.5 + (i % 13) if status == "succeeded" else None,
                "cost_credits": 1.25 if status == "succeeded" else None,
            }
        )
    # The output manifest's own column types (timestamps in UTC microseconds, ...).
    schema = pa.schema([FIXED_SCHEMA.field(name) for name in records[0]])
    table = pl.from_arrow(pa.Table.from_pylist(records, schema=schema))
    assert isinstance(table, pl.DataFrame)
    if variations:
        table = table.with_columns(
            (pl.int_range(pl.len()) % 3).cast(pl.String).alias("variation"),
            pl.lit("Mug").alias("title"),
        )
    return table


def test_row_ranges_in_any_order() -> None:
    assert _row_ranges([9, 2, 3, 5, 4, 12, 13, 2]) == "2-5, 9, 12-13"
    assert _row_ranges([7, 1, 3, 5, 2, 6, 4]) == "1-7"
    assert _row_ranges(list(range(1, 200, 2)), limit=2) == "1, 3, ... (98 more ranges)"


@pytest.mark.parametrize("variations", [False, True])
@pytest.mark.parametrize("max_tiles", [5, 10_000])
def test_the_page_does_not_depend_on_the_batches(variations: bool, max_tiles: int) -> None:
    manifest = _manifest(300, variations=variations)
    whole = render_report(manifest, _summary(), {}, max_tiles=max_tiles, max_credits=50.0)
    for batch_rows in (1, 7, 64):
        assert (
            render_report(
                manifest,
                _summary(),
                {},
                max_tiles=max_tiles,
                max_credits=50.0,
                batch_rows=batch_rows,
            )
            == whole
        )
    # What the batches must add up to, counted here from the table itself.
    status = manifest["status"]
    problems = int((~status.is_in(["succeeded", "merged"])).sum())
    images = int((status != "merged").sum())
    sent = manifest.filter(status == "succeeded")["prompt"]
    markup = int(sent.str.contains("<b>").sum())
    assert f"Problems: {problems} images not made, 12 reasons" in whole
    assert f"{markup} prompts still contain markup (e.g. &lt;b&gt;)" in whole
    if max_tiles == 5:
        assert f"Showing the first 5 of {images} images" in whole
    assert whole.count('<figure class="tile') == min(max_tiles, images)


async def test_the_written_page_reads_the_file_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(200, variations=True)
    sink = LocalSink(tmp_path / "dest")
    manifest.write_parquet(tmp_path / "dest" / "manifest.parquet", row_group_size=30)
    monkeypatch.setattr(html_report, "BATCH_ROWS", 9)
    uri = await write_html_report(sink, _summary(), max_tiles=40)
    assert uri is not None
    written = (tmp_path / "dest" / "report.html").read_text()
    assert written == render_report(manifest, _summary(), {}, max_tiles=40)


def test_reading_the_file_holds_one_row_group_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow's pre-buffering read ahead up to tens of megabytes of the file and held
    them (at a million rows it added about 30 MB to the end of a run); the report reads a
    row group at a time."""
    groups, per_group = 12, 2_000
    prompts = [base64.b64encode(os.urandom(1_500)).decode() for _ in range(groups * per_group)]
    manifest = _manifest(groups * per_group).with_columns(
        pl.Series("prompt", prompts), pl.lit("succeeded").alias("status")
    )
    path = tmp_path / "manifest.parquet"
    manifest.write_parquet(path, row_group_size=per_group, compression="zstd")
    one_group = len(prompts[0]) * per_group  # 4 MB of prompts, 3 MB compressed
    allocated: list[int] = []
    gather = html_report._gather

    def measured(batches: Callable[[], Iterator[pl.DataFrame]], *args: Any, **kw: Any) -> Any:
        def counted() -> Iterator[pl.DataFrame]:
            for batch in batches():
                allocated.append(pa.total_allocated_bytes())
                yield batch

        return gather(counted, *args, **kw)

    monkeypatch.setattr(html_report, "_gather", measured)
    monkeypatch.setattr(html_report, "BATCH_ROWS", per_group)
    del manifest, prompts
    before = pa.total_allocated_bytes()
    found = html_report._gather_file(path, _summary(), max_tiles=10)
    assert found.height == groups * per_group
    assert len(allocated) == 2 * groups  # two passes, a row group a batch
    # One group decoded is about four times its prompts (compressed pages, decompressed
    # pages, the batch): 16 MB here; with pre-buffering 48 MB.
    most = max(allocated) - before
    assert most < 6 * one_group, f"{most / 2**20:.0f} MB of Arrow memory held at once"
