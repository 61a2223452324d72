"""A data team's tables through a run and back: their types, their joins, their nights.

Tables shaped like a warehouse export (Spark, BigQuery, DuckDB write ``string``, not
``large_string``; dictionary-encoded text; lists; zoned timestamps; decimals), run against
the simulator over real HTTP, then read back and joined with pyarrow as a pipeline task
does.
"""

from __future__ import annotations

import datetime as dt
import decimal
from pathlib import Path

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import key_stats, run_against

from pipeline.errors import ManifestError
from pipeline.sim import SimServer


def _warehouse_export(n: int) -> pa.Table:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    return pa.table(
        {
            "id": pa.array([f"sku-{i}" for i in range(n)], pa.string()),
            "prompt": pa.array([f"a mug, shade {i}" for i in range(n)], pa.string()),
            "title": pa.array([f"Mug {i}" if i % 2 else None for i in range(n)], pa.string()),
            "category": pa.array(["kitchen", "garden"] * (n // 2)).dictionary_encode(),
            "tags": pa.array([["a", f"t{i}"] for i in range(n)], pa.list_(pa.string())),
            "updated at": pa.array([when] * n, pa.timestamp("us", tz="+02:00")),
            "price.eur": pa.array([decimal.Decimal("12.30")] * n, pa.decimal128(10, 2)),
            "shelf time": pa.array([3600] * n, pa.duration("s")),
            "opens": pa.array([dt.time(9, 30)] * n, pa.time64("us")),
        }
    )


def test_parquet_input_columns_come_back_with_their_own_arrow_types(
    sim: SimServer, tmp_path: Path
) -> None:
    """The input's columns are written back with the input's types, so the output joins
    with (and concatenates to) the data team's own table in pyarrow: a ``string`` id read
    back as ``large_string`` made ``Table.join`` refuse ('Incompatible data types for
    corresponding join field keys')."""
    table = _warehouse_export(4)
    source = tmp_path / "export.parquet"
    pq.write_table(table, source)

    summary = run_against(sim, source, tmp_path / "out")

    assert summary.counts["succeeded"] == 4
    result = pq.read_table(tmp_path / "out" / "manifest.parquet")
    for field in table.schema:
        name = "input_prompt" if field.name == "prompt" else field.name
        assert result.schema.field(name).type == field.type, name
        assert result.column(name).to_pylist() == table.column(field.name).to_pylist(), name
    joined = table.select(["id", "title"]).join(result.select(["id", "status"]), keys="id")
    assert joined.num_rows == 4 and set(joined.column("status").to_pylist()) == {"succeeded"}
    assert pa.concat_tables([table.select(["id"]), result.select(["id"])]).num_rows == 8
    # An Arrow table passed from Python keeps its types the same way.
    summary = run_against(sim, table, tmp_path / "out-table")
    again = pq.read_table(tmp_path / "out-table" / "manifest.parquet")
    assert again.schema.field("id").type == pa.string()
    assert again.schema.field("category").type == table.schema.field("category").type


def test_a_column_of_nulls_keeps_its_type_from_night_to_night(
    sim: SimServer, tmp_path: Path
) -> None:
    """A frame built from Python values types a column with no value tonight as ``Null``.
    Written as text, the nightly manifest's ``discount`` flipped from double to string
    and ``note`` from large_string to string, and a warehouse appending each night's
    manifest (or ``pa.concat_tables``) refused the second night."""
    out = tmp_path / "out"
    night1 = pl.DataFrame(
        {
            "id": [1, 2, 3],
            "prompt": ["a mug", "a jar", "a vase"],
            "discount": [0.1, None, 0.3],
            "note": ["new", None, None],
            "tags": [["a"], [], None],
        }
    )
    night2 = pl.DataFrame(
        {
            "id": [1, 3, 4],
            "prompt": ["a mug", "a vase", "a bowl"],
            "discount": [None, None, None],
            "note": [None, None, None],
            "tags": [None, None, None],
        }
    )
    assert night2.schema["discount"] == pl.Null

    run_against(sim, night1, out)
    first = pq.read_table(out / "manifest.parquet")
    summary = run_against(sim, night2, out)

    assert summary.counts["succeeded"] == 3
    second = pq.read_table(out / "manifest.parquet")
    assert second.schema.equals(first.schema)
    assert first.schema.field("discount").type == pa.float64()
    assert second.column("discount").to_pylist() == [None, None, None]
    assert pa.concat_tables([first, second]).num_rows == 6
    # A first run with a column of nulls writes it as text, as polars writes text.
    fresh = tmp_path / "fresh"
    run_against(sim, night2, fresh)
    assert pq.read_schema(fresh / "manifest.parquet").field("note").type == pa.large_string()


def test_a_column_polars_cannot_hold_is_refused_by_name_before_anything_is_sent(
    sim: SimServer, tmp_path: Path
) -> None:
    """A BigQuery export's BIGNUMERIC (``decimal256``) in a column carried through: polars
    read the file's schema and then panicked on its data, a Rust ``PanicException`` (a
    ``BaseException``: a task's ``except Exception`` missed it) with a backtrace. The
    manifest is now refused as a ``ManifestError`` naming the column and what to do."""
    table = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "prompt": ["a mug", "a jar"],
            "lifetime value": pa.array([decimal.Decimal("12.30")] * 2, pa.decimal256(76, 38)),
        }
    )
    source = tmp_path / "bq.parquet"
    pq.write_table(table, source)
    for manifest in (source, table):
        with pytest.raises(ManifestError) as refused:
            run_against(sim, manifest, tmp_path / "out")
        message = str(refused.value)
        assert "column 'lifetime value' has type decimal256(76, 38)" in message
        assert "decimal128" in message and "float64 or string" in message
    assert key_stats(sim)["submits_accepted"] == 0


def test_a_pandas_nan_id_is_a_missing_id_and_a_nan_seed_is_refused(
    sim: SimServer, tmp_path: Path
) -> None:
    """pandas writes a missing number as NaN in a float column (an int column with a gap
    becomes float64). A NaN id was the key ``NaN``: the second row without an id was then
    rejected as a repeat of the first. It is a missing id now, as an empty cell is (the
    row keyed by its request). A NaN seed stays refused, naming the cell: in a seed it is
    as often 0/0 as a gap."""
    table = pa.table(
        {
            "id": pa.array([1.0, float("nan"), 3.0, float("nan")], pa.float64()),
            "prompt": ["a mug", "a cup", "a pot", "a pan"],
            "seed": pa.array([5.0, 6.0, float("nan"), 8.0], pa.float64()),
        }
    )
    source = tmp_path / "from_pandas.parquet"
    pq.write_table(table, source)

    summary = run_against(sim, source, tmp_path / "out")

    assert summary.counts["succeeded"] == 3 and summary.counts["rejected"] == 1
    result = pl.read_parquet(tmp_path / "out" / "manifest.parquet").sort("row")
    keys = result["key"].to_list()
    assert keys[0] == "1" and keys[2] == "3"
    assert "NaN" not in keys and len(set(keys)) == 4
    (reason,) = result.filter(pl.col("status") == "rejected")["reason"].to_list()
    assert reason.startswith("from_pandas.parquet row 3, column seed: 'NaN' is not allowed")


def test_a_pandas_frame_runs_as_it_is(sim: SimServer, tmp_path: Path) -> None:
    """A data team's pandas DataFrame is a manifest as a polars one is: an int id with a gap
    (float64 with NaN, as pandas stores it), a named index that is not a column, a zoned
    timestamp and a category come back without an ``__index_level_0__`` column."""
    frame = pd.DataFrame(
        {
            "id": [1, None, 3],
            "prompt": ["a mug", "a cup", "a pot"],
            "updated": pd.to_datetime(["2026-01-02"] * 3).tz_localize("Europe/Paris"),
            "aisle": pd.Categorical(["kitchen", "kitchen", "garden"]),
        }
    ).set_index(pd.Index(["x", "y", "z"], name="sku"))

    summary = run_against(sim, frame, tmp_path / "out")

    assert summary.counts["succeeded"] == 3
    result = pq.read_table(tmp_path / "out" / "manifest.parquet")
    assert "__index_level_0__" not in result.column_names and "sku" not in result.column_names
    assert result.column("key").to_pylist()[0::2] == ["1", "3"]
    assert result.schema.field("updated").type == pa.timestamp("us", tz="Europe/Paris")
    assert result.column("aisle").to_pylist() == ["kitchen", "kitchen", "garden"]


def test_a_pandas_column_arrow_cannot_read_is_named(sim: SimServer, tmp_path: Path) -> None:
    frame = pd.DataFrame({"prompt": ["a mug", "a cup"], "weight": [1.5, "heavy"]})
    with pytest.raises(ManifestError, match=r"<dataframe>: cannot be read as a table: .*weight"):
        run_against(sim, frame, tmp_path / "out")
    assert key_stats(sim)["submits_accepted"] == 0
