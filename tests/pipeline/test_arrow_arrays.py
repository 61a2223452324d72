"""``pipeline.arrow_arrays`` builds what ``pyarrow.array`` would, for every output type."""

from __future__ import annotations

import math
import sys

import polars as pl
import pyarrow as pa
import pytest

from pipeline import arrow_arrays
from pipeline.library import INDEX_SCHEMA
from pipeline.output_manifest import FIXED_SCHEMA

_SAMPLES: dict[pa.DataType, list[object]] = {
    pa.int64(): [1, None, -(2**62), 0],
    pa.float64(): [1.5, None, math.nan, -0.0],
    pa.string(): ["a", None, "", "ünïcode ✓"],
    pa.list_(pa.string()): [["a", "b"], None, [], [None, "x"]],
    pa.timestamp("us", tz="UTC"): [1_765_000_000_000_000, None, 0, 1],
}


@pytest.mark.parametrize("field", [*FIXED_SCHEMA, *INDEX_SCHEMA], ids=lambda field: str(field.name))
def test_every_output_column_comes_out_as_pyarrow_would_make_it(field: pa.Field) -> None:
    values = _SAMPLES[field.type]
    made = arrow_arrays.array(values, field.type)
    assert made.type == field.type
    # Compared as text: NaN equals nothing, not even itself, in Array.equals.
    assert repr(made.to_pylist()) == repr(pa.array(values, type=field.type).to_pylist())
    assert made.is_null().to_pylist() == [v is None for v in values]  # NaN is not null


@pytest.mark.parametrize("values", [[], [None, None]])
def test_empty_and_all_null_columns(values: list[object]) -> None:
    for type in _SAMPLES:
        assert arrow_arrays.array(values, type).equals(pa.array(values, type=type))


def test_a_value_of_the_wrong_type_is_refused_not_turned_into_null() -> None:
    with pytest.raises(TypeError):
        arrow_arrays.array(["7"], pa.int64())


_TIMESTAMPS = [pa.timestamp(unit, tz=zone) for unit in ("ms", "us", "ns") for zone in (None, "UTC")]


@pytest.mark.parametrize("type", [*arrow_arrays._POLARS_TYPES, *_TIMESTAMPS], ids=str)
def test_the_named_polars_types_are_those_polars_itself_gives(type: pa.DataType) -> None:
    assert repr(arrow_arrays._polars_type(type)) == repr(pl.from_arrow(pa.nulls(0, type)).dtype)


def test_strings_are_cast_the_public_way_when_the_kernel_module_is_not_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pyarrow.compute  # noqa: F401  (the public way, loaded while it still can be)

    monkeypatch.setitem(sys.modules, "pyarrow._compute", None)  # its import now fails
    values = _SAMPLES[pa.string()]
    assert arrow_arrays.array(values, pa.string()).equals(pa.array(values, type=pa.string()))
