"""The output manifest from a real manifest reader, a real ledger and a real local sink."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.contract import RowStatus
from pipeline.ledger import Action, Ledger
from pipeline.manifest import Defaults, ManifestReader, validate_batch
from pipeline.output_manifest import (
    FIXED_COLUMNS,
    FIXED_SCHEMA,
    output_column_names,
    write_output_manifest,
)
from pipeline.rows import Outcome, Rejection, Row
from pipeline.storage import LocalSink

CSV = """id,prompt,aspect_ratio,seed,sku,category,status
mug-1,a red mug,square_1_1,,SKU-001,mugs,active
mug-2,a blue mug,widescreen_16_9,7,00123,mugs,active
bad,a bad one,square_9_9,,SKU-003,mugs,retired
mug-1,duplicate mug,square_1_1,,SKU-004,mugs,active
mug-5,a green mug,,,SKU-005,,draft
"""


def _plan_all(reader: ManifestReader, ledger: Ledger) -> dict[str, Row]:
    """What the run does before sending: plan, and reject invalid and duplicate rows."""
    by_key: dict[str, Row] = {}
    for batch in reader.batches():
        rows, rejections = validate_batch(batch, source_name=reader.name, defaults=Defaults())
        rejected = list(rejections)
        for planned in ledger.plan(rows):
            if planned.action is Action.DUPLICATE:
                rejected.append(
                    Rejection(
                        planned.row.index,
                        f"{reader.name} row {planned.row.index + 1}: key {planned.row.key!r} "
                        f"repeats row {planned.duplicate_of + 1}",  # type: ignore[operator]
                        "id",
                        planned.row.key,
                        planned.row.request.prompt,
                    )
                )
            else:
                by_key[planned.row.key] = planned.row
        ledger.record_rejections(rejected)
    return by_key


def _finish(ledger: Ledger, row: Row, status: RowStatus, **fields: object) -> None:
    ledger.record_intent(row.key)
    ledger.record_ack(row.key, f"task-{row.key}", "http://127.0.0.1:9/p", 1_700_000_001.5, 1.05)
    ledger.record_outcome(
        Outcome(
            index=row.index,
            key=row.key,
            status=status,
            request=row.request,
            task_id=f"task-{row.key}",
            attempts=1,
            queued_at=1_700_000_000.0,
            submitted_at=1_700_000_001.5,
            finished_at=1_700_000_004.25,
            **fields,  # type: ignore[arg-type]
        )
    )
    ledger.flush()


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.csv"
    path.write_text(CSV)
    return path


async def test_one_row_per_input_row_with_the_documented_schema(
    catalog: Path, tmp_path: Path
) -> None:
    sink = LocalSink(tmp_path / "dest")
    with Ledger.open(tmp_path / "dest" / ".klein" / "ledger.sqlite") as ledger:
        ledger.start_run("run-1", {"manifest": catalog.name})
        by_key = _plan_all(ManifestReader(catalog, batch_size=2), ledger)
        assert set(by_key) == {"mug-1", "mug-2", "mug-5"}
        _finish(
            ledger,
            by_key["mug-1"],
            RowStatus.SUCCEEDED,
            output_uri=sink.uri("images/mug-1.jpg"),
            sha256="e" * 64,
            width=1024,
            height=1024,
            format="jpeg",
            bytes=2048,
            reference_digests=("d" * 64,),
            cost_credits=1.05,
        )
        _finish(ledger, by_key["mug-5"], RowStatus.FAILED, reason="the provider said FAILED")
        ledger.record_intent("mug-2")
        ledger.record_ack("mug-2", "task-mug-2", "http://127.0.0.1:9/p", 1.0, None)
        uri = await write_output_manifest(ManifestReader(catalog, batch_size=2), ledger, sink)

    assert uri == str((tmp_path / "dest" / "manifest.parquet").resolve())
    parquet = pq.ParquetFile(uri)
    schema = parquet.schema_arrow
    # Every input column as it came, id included; names the fixed columns use get input_.
    assert schema.names == [
        *FIXED_COLUMNS,
        "id",
        "input_prompt",
        "input_aspect_ratio",
        "input_seed",
        "sku",
        "category",
        "input_status",
    ]
    for field in FIXED_SCHEMA:
        assert schema.field(field.name).type == field.type, field.name
    assert parquet.metadata.num_row_groups == 3  # batches of 2, 2 and 1 rows
    assert schema.metadata[b"klein_batch.schema_version"] == b"1"

    out = pl.read_parquet(uri)
    assert out["row"].to_list() == [1, 2, 3, 4, 5]
    assert out["status"].to_list() == ["succeeded", "skipped", "rejected", "rejected", "failed"]
    assert out["key"].to_list() == ["mug-1", "mug-2", "bad", "mug-1", "mug-5"]
    assert out["prompt"].to_list() == [
        "a red mug",
        "a blue mug",
        "a bad one",
        "duplicate mug",
        "a green mug",
    ]
    assert out["sku"].to_list() == ["SKU-001", "00123", "SKU-003", "SKU-004", "SKU-005"]
    assert out["input_status"].to_list() == ["active", "active", "retired", "active", "draft"]
    # The catalog's own id joins back; cells are as the input had them (seed empty: null).
    assert out["id"].to_list() == ["mug-1", "mug-2", "bad", "mug-1", "mug-5"]
    assert out["input_aspect_ratio"].to_list()[2] == "square_9_9"
    assert out["input_seed"].to_list()[:2] == ["", "7"]

    first, flying, bad, dup, failed = out.iter_rows(named=True)
    assert first["seed"] is not None and first["aspect_ratio"] == "square_1_1"
    assert first["reference_digests"] == ["d" * 64]
    assert (first["width"], first["height"], first["bytes"]) == (1024, 1024, 2048)
    assert first["output_uri"].endswith("images/mug-1.jpg")
    assert first["reason"] is None
    assert first["queued_at"] == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC)
    assert first["latency_s"] == pytest.approx(4.25)
    assert first["cost_credits"] == pytest.approx(1.05)
    assert flying["task_id"] == "task-mug-2" and flying["seed"] == 7
    assert "still running" in flying["reason"]
    assert "aspect_ratio" in bad["reason"] and bad["seed"] is None
    assert "repeats row 1" in dup["reason"]
    assert failed["reason"] == "the provider said FAILED"
    assert failed["aspect_ratio"] == "square_1_1"  # the default, as sent


async def test_rows_the_run_never_reached_are_skipped_not_lost(
    catalog: Path, tmp_path: Path
) -> None:
    sink = LocalSink(tmp_path / "dest")
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.start_run("run-1", {})
        first = next(ManifestReader(catalog, batch_size=2).batches())
        rows, _ = validate_batch(first, source_name="catalog.csv", defaults=Defaults())
        ledger.plan(rows)  # stopped after the first batch
        # Recorded but not yet flushed: the writer flushes before it reads.
        ledger.record_outcome(Outcome(0, rows[0].key, RowStatus.SUCCEEDED, request=rows[0].request))
        uri = await write_output_manifest(ManifestReader(catalog), ledger, sink, relpath="m.pq")
    out = pl.read_parquet(uri)
    assert out.height == 5
    assert out["status"].to_list() == ["succeeded"] + ["skipped"] * 4
    assert out["prompt"].to_list()[2] == "a bad one"
    assert out["reason"].str.contains("stopped before reaching this row").to_list() == [
        None,
        False,
        True,
        True,
        True,
    ]


async def test_typed_extra_columns_keep_their_types(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "prompt": ["a lamp", "a chair", "a desk"],
            "price": [9.5, None, 120.0],
            "qty": pl.Series([1, 2, 3], dtype=pl.Int32),
            "tags": [["home"], [], ["office", "wood"]],
            "launched": [dt.date(2024, 1, 2), None, dt.date(2025, 3, 4)],
            "row": [10, 20, 30],
        }
    )
    sink = LocalSink(tmp_path / "dest")
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.start_run("run-1", {})
        _plan_all(ManifestReader(frame, batch_size=2), ledger)
        uri = await write_output_manifest(ManifestReader(frame, batch_size=2), ledger, sink)
    out = pl.read_parquet(uri)
    assert out.columns[len(FIXED_COLUMNS) :] == [
        "input_prompt",
        "price",
        "qty",
        "tags",
        "launched",
        "input_row",
    ]
    for name, out_name in [("price", "price"), ("qty", "qty"), ("tags", "tags")]:
        assert out[out_name].dtype == frame[name].dtype
        assert out[out_name].to_list() == frame[name].to_list()
    assert out["launched"].dtype == pl.Date
    assert out["input_row"].to_list() == [10, 20, 30]
    assert out["row"].to_list() == [1, 2, 3]


def test_collision_prefix_never_collides_again() -> None:
    assert output_column_names(["sku", "status", "input_status", "row"]) == [
        "sku",
        "input_status",
        "input_input_status",
        "input_row",
    ]


async def test_a_large_manifest_is_joined_batch_by_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten batches whose edges fall inside the source's row groups (2.5 batches a group):
    what the join does batch by batch does not depend on the rows' count (a million-row
    run's memory is measured in benchmarks/, on demand)."""
    total, batch = 40_000, 4_000
    source = tmp_path / "big.parquet"
    pl.DataFrame(
        {
            "id": [f"sku-{i}" for i in range(total)],
            "prompt": [f"product shot {i}" for i in range(total)],
            "sku": pl.Series(range(total), dtype=pl.Int64),
        }
    ).write_parquet(source, row_group_size=10_000)
    sink = LocalSink(tmp_path / "dest")
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.start_run("run-1", {})
        for frame in ManifestReader(source, batch_size=batch).batches():
            rows, rejections = validate_batch(frame, source_name="big", defaults=Defaults())
            assert not rejections
            ledger.plan(rows)
            for row in rows[::2]:
                ledger.record_outcome(
                    Outcome(row.index, row.key, RowStatus.SUCCEEDED, request=row.request)
                )
            ledger.flush()
        ranges: list[tuple[int, int]] = []
        real = Ledger.outcomes_for

        def spy(self: Ledger, start_idx: int, end_idx: int) -> list[Outcome]:
            # This ledger's reads only (the writer reads it on a connection of its own):
            # tests/pipeline/minute_storm.py's three 11-row runs may be going on in the
            # background, and one ending during this test adds its own (0, 11).
            if self.path == ledger.path:
                ranges.append((start_idx, end_idx))
            return real(self, start_idx, end_idx)

        monkeypatch.setattr(Ledger, "outcomes_for", spy)
        uri = await write_output_manifest(ManifestReader(source, batch_size=batch), ledger, sink)
    assert all(end - start <= batch for start, end in ranges)
    assert len(ranges) == total // batch
    parquet = pq.ParquetFile(uri)
    assert parquet.metadata.num_rows == total
    assert parquet.metadata.num_row_groups == total // batch
    assert (
        max(parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups))
        == batch
    )
    table = pq.read_table(uri, columns=["row", "status", "sku"])
    assert table.column("row").to_pylist() == list(range(1, total + 1))
    assert table.column("sku").type == pa.int64()
    statuses = table.column("status").to_pylist()
    assert statuses.count("succeeded") == statuses.count("skipped") == total // 2
