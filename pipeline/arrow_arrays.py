"""Arrow arrays from Python lists, built through polars so that pandas stays unimported.

``pyarrow.array`` (and ``Table.from_pylist``) of a Python list asks pandas whether the
list is one of its objects, importing it to do so whenever it is installed: 0.5 s of CPU
and 30 MB on every run of a data team's machine (benchmarks/notes.md, session 20), for a
library the pipeline never uses. polars builds the same column in Rust and hands it over
through the Arrow C interface, which asks nothing of pandas.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
import pyarrow as pa


def array(values: Sequence[Any], type: pa.DataType) -> pa.Array:
    """``values`` as an Arrow array of exactly ``type`` (None is null, NaN stays NaN)."""
    if pa.types.is_list(type):
        return _list_array(values, type)
    series = pl.Series(values=values, dtype=_polars_type(type), strict=True)
    out = series.to_arrow()
    return out if out.type == type else out.cast(type)


def table(columns: Mapping[str, Sequence[Any]], schema: pa.Schema) -> pa.Table:
    """The table of ``schema`` whose columns are ``columns[name]``."""
    return pa.Table.from_arrays(
        [array(columns[field.name], field.type) for field in schema], schema=schema
    )


def _list_array(values: Sequence[Any], type: pa.ListType) -> pa.Array:
    # polars builds a list column from Python lists a hundred times slower than a flat one.
    offsets = [0]
    flat: list[Any] = []
    nulls: list[bool] = []
    for value in values:
        nulls.append(value is None)
        if value is not None:
            flat.extend(value)
        offsets.append(len(flat))
    mask = array(nulls, pa.bool_()) if any(nulls) else None
    return pa.ListArray.from_arrays(
        array(offsets, pa.int32()), array(flat, type.value_type), type=type, mask=mask
    )


@functools.cache
def _polars_type(type: pa.DataType) -> pl.DataType:
    # pa.nulls makes no Python list: the one way into a polars type that imports nothing.
    return pl.from_arrow(pa.nulls(0, type)).dtype  # type: ignore[union-attr]
