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
    return out if out.type == type else _cast(out, type)


def table(columns: Mapping[str, Sequence[Any]], schema: pa.Schema) -> pa.Table:
    """The table of ``schema`` whose columns are ``columns[name]``."""
    return pa.Table.from_arrays(
        [array(columns[field.name], field.type) for field in schema], schema=schema
    )


def _cast(array: pa.Array, type: pa.DataType) -> pa.Array:
    """``array.cast(type)`` (polars hands strings over as ``large_string``), through the
    compute kernel's own module: ``Array.cast`` imports ``pyarrow.compute``, which builds
    a Python wrapper and docstring for each of its hundreds of functions: 0.02-0.03
    CPU-s of every run that writes an output manifest (25 alternating imports each,
    benchmarks/notes.md, "Session 29"), where ``pyarrow._compute`` alone adds nothing
    measurable. The same call ``pyarrow.compute.cast`` makes, with the same safe options."""
    try:
        from pyarrow._compute import CastOptions, call_function
    except ImportError:  # a pyarrow laid out otherwise: the public way
        return array.cast(type)
    return call_function("cast", [array], CastOptions.safe(type))


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


#: The polars type of each flat Arrow type the outputs use (and their close kin), named
#: here: asking polars (``pl.from_arrow``) imports ``pyarrow.compute`` (``_cast`` says why
#: that is worth avoiding). Any other type is asked of polars.
_POLARS_TYPES: dict[pa.DataType, pl.DataType] = {
    pa.string(): pl.String(),
    pa.large_string(): pl.String(),
    pa.bool_(): pl.Boolean(),
    pa.int8(): pl.Int8(),
    pa.int16(): pl.Int16(),
    pa.int32(): pl.Int32(),
    pa.int64(): pl.Int64(),
    pa.uint8(): pl.UInt8(),
    pa.uint16(): pl.UInt16(),
    pa.uint32(): pl.UInt32(),
    pa.uint64(): pl.UInt64(),
    pa.float32(): pl.Float32(),
    pa.float64(): pl.Float64(),
    pa.date32(): pl.Date(),
    pa.binary(): pl.Binary(),
    pa.large_binary(): pl.Binary(),
}


@functools.cache
def _polars_type(type: pa.DataType) -> pl.DataType:
    known = _POLARS_TYPES.get(type)
    if known is not None:
        return known
    if pa.types.is_timestamp(type) and type.unit in ("ms", "us", "ns"):
        return pl.Datetime(type.unit, type.tz)
    # pa.nulls makes no Python list: the one way into a polars type that imports no pandas.
    return pl.from_arrow(pa.nulls(0, type)).dtype  # type: ignore[union-attr]
