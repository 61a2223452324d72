"""The happy path over real HTTP: every row succeeds and the output says so exactly."""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from pipeline_helpers import check_output, key_stats, run_against, statuses, write_catalog

from pipeline.contract import ASPECT_RATIOS
from pipeline.sim import SimServer


def test_csv_catalog_every_row_succeeds(sim: SimServer, tmp_path: Path) -> None:
    n = 60
    presets = list(ASPECT_RATIOS)
    manifest = write_catalog(
        tmp_path / "in",
        n,
        extra={
            "aspect_ratio": [presets[i % len(presets)] for i in range(n)],
            "resolution": ["2k" if i % 15 == 0 else "1k" for i in range(n)],
            "seed": [str(i * 7) for i in range(n)],
            "category": ["kitchen" if i % 2 else "garden" for i in range(n)],
        },
    )
    out = tmp_path / "out"
    summary = run_against(sim, manifest, out)

    table = check_output(out, n, summary)
    assert statuses(table) == {"succeeded": n}
    assert table["key"].to_list() == [f"item-{i:04d}" for i in range(n)]
    assert table["seed"].to_list() == [i * 7 for i in range(n)]
    # Extra CSV columns come back as the text they were (SKU zeros kept).
    assert table["sku"].to_list() == [f"SKU{i:05d}" for i in range(n)]
    assert table["category"].dtype == pl.String
    stats = key_stats(sim)
    assert stats["submits_accepted"] == n
    assert stats["duplicate_submits"] == 0
    report = json.loads((out / "run.json").read_text())
    assert report["exit_code"] == 0
    assert report["credits"] == pytest.approx(stats["credits_charged"])
    assert report["credits"] == pytest.approx(table["cost_credits"].sum())
    assert report["latency_p50_s"] is not None
    assert summary.exit_code == 0


def test_parquet_input_keeps_extra_column_types(sim: SimServer, tmp_path: Path) -> None:
    n = 12
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    table = pa.table(
        {
            "prompt": [f"garden chair {i}" for i in range(n)],
            "sku": pa.array(list(range(1000, 1000 + n)), pa.int32()),
            "price": pa.array([9.5 + i for i in range(n)], pa.float64()),
            "in_stock": pa.array([i % 3 != 0 for i in range(n)], pa.bool_()),
            "tags": pa.array([["outdoor", f"t{i}"] for i in range(n)], pa.list_(pa.string())),
            "listed": pa.array([when] * n, pa.timestamp("ms", tz="UTC")),
            "output_format": ["png" if i % 2 else "jpeg" for i in range(n)],
        }
    )
    source = tmp_path / "chairs.parquet"
    import pyarrow.parquet as pq

    pq.write_table(table, source)
    out = tmp_path / "out"
    summary = run_against(sim, source, out)

    result = check_output(out, n, summary)
    assert statuses(result) == {"succeeded": n}
    schema = pq.read_schema(out / "manifest.parquet")
    assert schema.field("sku").type == pa.int32()
    assert schema.field("price").type == pa.float64()
    assert schema.field("in_stock").type == pa.bool_()
    # The input's own Arrow types, not polars' (large_list<large_string>).
    assert schema.field("tags").type == pa.list_(pa.string())
    assert pa.types.is_timestamp(schema.field("listed").type)
    assert result["sku"].to_list() == list(range(1000, 1000 + n))
    assert result["tags"].to_list()[5] == ["outdoor", "t5"]
    assert result["format"].to_list() == ["png" if i % 2 else "jpeg" for i in range(n)]
    # Rows without an id get a stable key and a derived seed, recorded for reruns.
    assert result["key"].n_unique() == n
    assert result["seed"].null_count() == 0


def test_rerun_of_a_finished_run_sends_nothing(sim: SimServer, tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path / "in", 20)
    out = tmp_path / "out"
    run_against(sim, manifest, out)
    before = key_stats(sim)
    first = pl.read_parquet(out / "manifest.parquet")

    again = run_against(sim, manifest, out)

    after = key_stats(sim)
    assert after["submits_accepted"] == before["submits_accepted"]
    assert after["polls"] == before["polls"]
    second = check_output(out, 20, again)
    assert again.resumed_rows == 20 and again.changed_rows == 0
    assert second.select("key", "sha256", "task_id").equals(
        first.select("key", "sha256", "task_id")
    )


def test_a_rerun_with_edited_rows_keeps_them_and_says_so(sim: SimServer, tmp_path: Path) -> None:
    """An edited prompt or aspect ratio under a done key: the image in DEST is the old
    request's. The rerun pays for nothing (a key is never paid twice), and says which rows
    no longer match, in its summary and run.json, rather than reporting plain success."""
    manifest = write_catalog(tmp_path / "in", 12)
    out = tmp_path / "out"
    run_against(sim, manifest, out)
    before = key_stats(sim)
    edited = pl.read_csv(manifest, infer_schema=False)
    edited = edited.with_columns(
        pl.when(pl.col("id").is_in(["item-0003", "item-0007"]))
        .then(pl.lit("a green mug on marble"))
        .otherwise(pl.col("prompt"))
        .alias("prompt")
    )
    edited.write_csv(manifest)

    again = run_against(sim, manifest, out)

    assert key_stats(sim)["submits_accepted"] == before["submits_accepted"]
    assert (again.resumed_rows, again.changed_rows) == (12, 2)
    assert again.changed_examples == ["item-0003", "item-0007"]
    assert "2 rows ask for another prompt" in again.changed_warning()
    assert json.loads((out / "run.json").read_text())["changed_rows"] == 2
    assert "2 rows ask for another prompt" in (out / "report.html").read_text()
    rows = check_output(out, 12, again)
    kept = rows.filter(pl.col("key") == "item-0003")
    assert kept["prompt"].to_list() != ["a green mug on marble"]  # the image's own request


def test_a_spreadsheets_column_names_and_ratios_are_understood(
    sim: SimServer, tmp_path: Path
) -> None:
    """`Aspect Ratio` with `16:9` makes a widescreen image (it made a square one, the column
    carried through unread); `Width`/`Height`, which the API does not take, are named in a
    note in the summary and run.json, and kept in the output manifest."""
    from pipeline.report import format_summary

    manifest = tmp_path / "sheet.csv"
    manifest.write_text(
        "SKU,Prompt,Aspect Ratio,Width,Height\n"
        "a1,red mug on white,16:9,1600,900\n"
        "a2,blue mug on white,9:16,900,1600\n"
    )
    summary = run_against(sim, manifest, tmp_path / "out")
    table = check_output(tmp_path / "out", 2, summary)
    assert table["status"].to_list() == ["succeeded", "succeeded"]
    assert table["aspect_ratio"].to_list() == ["widescreen_16_9", "social_story_9_16"]
    assert [(w > h) for w, h in zip(table["width"], table["height"], strict=True)] == [
        True,
        False,
    ]
    # The input's, carried through; renamed since the output has a width of its own
    # (case-insensitive tools would read Width and width as one column).
    assert table["input_Width"].to_list() == ["1600", "900"]
    text = format_summary(summary)
    assert "note: sheet.csv: columns 'Width', 'Height' not read" in text
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["notices"] == summary.notices and len(summary.notices) == 2
    assert "column 'SKU' looks like an id" in summary.notices[1]  # no id column: keyed by request
    report = html.unescape((tmp_path / "out" / "report.html").read_text())
    assert "note: sheet.csv: columns 'Width', 'Height' not read" in report
