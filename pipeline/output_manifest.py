"""The output manifest: exactly one Parquet row per input row, whatever happened to it.

It is built at the end of a run by reading the input manifest again, batch by batch, and
joining each batch with the ledger's outcomes for that index range. One row group is
written per batch, so memory stays flat from ten rows to a million: no step holds more
than one batch of input and its outcomes.

Schema (fixed, in this order; data teams rely on it):

=====================  ==========================  ===============================================
column                 type                        meaning
=====================  ==========================  ===============================================
row                    int64                       1-based data row of the input manifest
key                    string                      the row's stable key (null if never keyed)
status                 string                      succeeded, moderated, failed, rejected, skipped
reason                 string                      why the row did not succeed (null if it did)
prompt                 string                      prompt as sent (as given, for rejected rows)
aspect_ratio           string                      preset sent
resolution             string                      ``1k`` or ``2k``
seed                   int64                       seed sent (always set for sent rows)
safety_tolerance       int64                       0 (strict) .. 5 (lenient)
output_format          string                      ``png`` or ``jpeg`` as requested
reference_digests      list<string>                sha256 of each reference image, in order
output_uri             string                      where the image is stored
sha256                 string                      hex sha256 of the stored image bytes
width                  int64                       pixel width of the stored image
height                 int64                       pixel height of the stored image
format                 string                      format of the stored image
bytes                  int64                       size of the stored image
task_id                string                      the provider's task id
attempts               int64                       submit attempts
queued_at              timestamp[us, UTC]          when the row was queued
submitted_at           timestamp[us, UTC]          when its task was acknowledged
finished_at            timestamp[us, UTC]          when it reached its final status
latency_s              float64                     queue-to-done seconds
cost_credits           float64                     credits charged (0 when not charged)
reused_from            string                      the library object the image was copied from
                                                   (``--library``; null when this run made it)
=====================  ==========================  ===============================================

Then every column of the input as it came (its name as the input spelled it, its original
type: a Parquet file's or Arrow table's own Arrow type, not polars' reading of it; a
column of nulls with no type of its own gets the one it had in earlier runs into the same
output, kept in the ledger, else text), ``id`` and reference columns included, so a
data team can join the output back to its catalog on its own id. An input column whose
name is one of the above (``prompt``, ``seed``...), in any case (``Status``, ``Row``), is
written as ``input_<name>``: ``prompt`` is what was sent, ``input_prompt`` what the input
said; ``status`` is ours, ``input_Status`` a Shopify export's.

An input line that makes no image of its own (a Shopify image-only line, a variant under
``--per product``: ``pipeline/product_exports.py``) is listed with status ``merged`` and a
reason naming the line whose image it belongs to.

Rows the run never reached (it stopped early) are ``skipped`` with a reason saying so, so
that "one row per input row" holds even after a crash; a rerun resumes them.

With a variation matrix (``pipeline/variations.py``) the rule is one row per (input row,
variation): ``row`` repeats for each variation of that input row, and a ``variation``
column (the slug in the key) and one column per axis that is not a request parameter
(``style``) come first among the extra columns.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import arrow_arrays
from pipeline.contract import MERGED_STATUS, RowStatus
from pipeline.errors import KleinError
from pipeline.keys import key_shard
from pipeline.ledger import Ledger
from pipeline.reserved import (
    INDEX_COLUMN,
    MERGED_COLUMN,
    PRODUCT_INDEX_COLUMN,
    RENAME_PREFIX,
    WORKING_COLUMNS,
    renamed,
)
from pipeline.rows import Outcome
from pipeline.storage import Sink

OUTPUT_MANIFEST_SCHEMA_VERSION = "1"
#: Where the output manifest lives in DEST.
OUTPUT_MANIFEST_RELPATH = "manifest.parquet"
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"

_TS = pa.timestamp("us", tz="UTC")

FIXED_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("prompt", pa.string()),
        ("aspect_ratio", pa.string()),
        ("resolution", pa.string()),
        ("seed", pa.int64()),
        ("safety_tolerance", pa.int64()),
        ("output_format", pa.string()),
        ("reference_digests", pa.list_(pa.string())),
        ("output_uri", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("format", pa.string()),
        ("bytes", pa.int64()),
        ("task_id", pa.string()),
        ("attempts", pa.int64()),
        ("queued_at", _TS),
        ("submitted_at", _TS),
        ("finished_at", _TS),
        ("latency_s", pa.float64()),
        ("cost_credits", pa.float64()),
        ("reused_from", pa.string()),
    ]
)
FIXED_COLUMNS: tuple[str, ...] = tuple(FIXED_SCHEMA.names)

_NOT_REACHED = "not processed: the run stopped before reaching this row; run again to resume"


class RowExpander(Protocol):
    """Turns input rows into the rows that were planned (``variations.Catalog``)."""

    def output_columns(self, extra_columns: Sequence[str]) -> list[str]: ...

    def expand_output(self, batch: pl.DataFrame) -> pl.DataFrame: ...


class ManifestSource(Protocol):
    """What this module needs from ``pipeline.manifest.ManifestReader``."""

    @property
    def input_columns(self) -> Sequence[tuple[str, str]]: ...

    @property
    def arrow_types(self) -> Mapping[str, pa.DataType]: ...

    def batches(self) -> Iterator[pl.DataFrame]: ...


def output_column_names(extra_columns: Sequence[str]) -> list[str]:
    """Names the input's extra columns get in the output: ``input_`` prefixed on collision
    with a name the output uses for itself (``pipeline/reserved.py``), ignoring case.

    Case counts too: a Shopify export's ``Status`` beside our ``status`` (or a CSV's
    ``Row``/``Key``) made a Parquet file that DuckDB, Spark, BigQuery and Power Query,
    which compare column names without case, refuse or read as one column. So a column
    whose name is one of ours in any case is written as ``input_Status``, as ``prompt`` is
    as ``input_prompt``. Two input columns differing only in case are the input's own
    and keep their names.
    """
    used = set(FIXED_COLUMNS) | WORKING_COLUMNS
    ours = {name.casefold() for name in used}
    names: list[str] = []
    for name in extra_columns:
        out = renamed(name, used)
        while out.casefold() in ours:
            out = renamed(RENAME_PREFIX + out, used)
        used.add(out)
        names.append(out)
    return names


def _micros(value: float | None) -> int | None:
    return None if value is None else round(value * 1_000_000)


def _fixed_columns(
    indices: list[int],
    outcomes: dict[int, Outcome],
    raw_prompts: list[Any] | None,
    rows: list[int] | None = None,
    merged: list[str | None] | None = None,
) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {name: [] for name in FIXED_COLUMNS}
    for pos, idx in enumerate(indices):
        outcome = outcomes.get(idx)
        raw_prompt = raw_prompts[pos] if raw_prompts is not None else None
        merged_into = merged[pos] if merged is not None else None
        if merged_into is not None:
            outcome = Outcome(index=idx, key="", status=MERGED_STATUS, reason=merged_into)  # type: ignore[arg-type]
        elif outcome is None:
            outcome = Outcome(index=idx, key="", status=RowStatus.SKIPPED, reason=_NOT_REACHED)
        request = outcome.request
        prompt: Any = request.prompt if request is not None else outcome.extra.get("prompt")
        if prompt is None and raw_prompt is not None:
            prompt = raw_prompt
        cols["row"].append((rows[pos] if rows is not None else idx) + 1)
        cols["key"].append(outcome.key or None)
        cols["status"].append(str(outcome.status))
        cols["reason"].append(outcome.reason)
        cols["prompt"].append(None if prompt is None else str(prompt))
        cols["aspect_ratio"].append(request.aspect_ratio if request else None)
        cols["resolution"].append(request.resolution if request else None)
        cols["seed"].append(request.seed if request else None)
        cols["safety_tolerance"].append(request.safety_tolerance if request else None)
        cols["output_format"].append(request.output_format if request else None)
        cols["reference_digests"].append(list(outcome.reference_digests))
        cols["output_uri"].append(outcome.output_uri)
        cols["sha256"].append(outcome.sha256)
        cols["width"].append(outcome.width)
        cols["height"].append(outcome.height)
        cols["format"].append(outcome.format)
        cols["bytes"].append(outcome.bytes)
        cols["task_id"].append(outcome.task_id)
        cols["attempts"].append(outcome.attempts)
        cols["queued_at"].append(_micros(outcome.queued_at))
        cols["submitted_at"].append(_micros(outcome.submitted_at))
        cols["finished_at"].append(_micros(outcome.finished_at))
        cols["latency_s"].append(outcome.latency_s)
        cols["cost_credits"].append(float(outcome.cost_credits or 0.0))
        cols["reused_from"].append(outcome.reused_from)
    return cols


def outcomes_table(outcomes: Sequence[Outcome]) -> pa.Table:
    """Outcomes as the fixed columns of the output manifest (no input columns).

    For records written while a run goes (partial manifests of remote outputs): the same
    columns and types as the final manifest, so both read back the same way.
    """
    indices = [outcome.index for outcome in outcomes]
    fixed = _fixed_columns(indices, {o.index: o for o in outcomes}, None)
    return arrow_arrays.table(fixed, FIXED_SCHEMA)


def _extra_arrays(batch: pl.DataFrame, extra_columns: Sequence[str]) -> list[pa.Array]:
    if not extra_columns:
        return []
    table = batch.select(list(extra_columns)).to_arrow(compat_level=pl.CompatLevel.oldest())
    return [table.column(i).combine_chunks() for i in range(table.num_columns)]


def _castable(array: pa.Array, target: pa.DataType) -> bool:
    try:
        array.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False
    return True


def _output_type(
    array: pa.Array,
    source: pa.DataType | None,
    earlier: pa.DataType | None,
    text: pa.DataType,
) -> pa.DataType:
    """The type an input column is written with: its type in the input's Parquet file or
    Arrow table (polars reads ``string`` as ``large_string``, ``list<string>`` as
    ``large_list<large_string>``, a dictionary's int32 indices as uint32, a ``+02:00`` zone
    as ``Etc/GMT-2``; written so, the output no longer joins or concatenates with the
    input in pyarrow), else polars' own.

    A column of nulls (polars' ``Null``: a frame built from Python ``None`` s) says nothing
    about its type: it gets the type the same column had in ``earlier`` runs into this
    output, so a warehouse appending each night's manifest does not see ``discount`` turn
    from double into text on a night without discounts; ``text`` on a first run."""
    known = source is not None and not pa.types.is_null(source)
    if known and (array.type == source or _castable(array, source)):
        return source  # else not losslessly: polars' type (an extension polars rewrapped)
    if not pa.types.is_null(array.type):
        return array.type
    if earlier is not None and not pa.types.is_null(earlier) and _castable(array, earlier):
        return earlier
    return text


def _conform(
    array: pa.Array, target: pa.DataType, name: str, source_name: str, first_row: int
) -> pa.Array:
    if array.type == target:
        return array
    try:
        return array.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise KleinError(
            f"{source_name}: column {name!r} changes type at row {first_row}: it holds "
            f"{array.type} there but {target} in earlier rows; give the column one type"
        ) from exc


def _build_parquet(
    reader: ManifestSource,
    ledger: Ledger,
    path: Path,
    expander: RowExpander | None = None,
    shard: tuple[int, int] | None = None,
    earlier: Mapping[str, pa.DataType] | None = None,
) -> int:
    """Write the joined manifest to ``path``; returns the number of rows written.

    ``shard`` (index, count) leaves out rows the run did not plan (another shard's).
    ``earlier``: the types input columns had in earlier runs into this output (by output
    name), for columns that hold only nulls now (``_output_type``)."""
    earlier = earlier or {}
    inputs = [
        (column, name) for column, name in reader.input_columns if column not in WORKING_COLUMNS
    ]
    input_batch_names = [column for column, _ in inputs]
    added: list[str] = []
    if expander is not None:
        added = [
            column
            for column in expander.output_columns(input_batch_names)
            if column not in input_batch_names
        ]
    extra_columns = [*added, *input_batch_names]
    out_names = output_column_names([*added, *(name for _, name in inputs)])
    source_name = str(getattr(reader, "name", "manifest"))
    source_types = reader.arrow_types
    # Text a column of nulls is written as, when no earlier run says better: as polars
    # writes text (large_string), unless the input has Arrow types of its own.
    text = pa.string() if source_types else pa.large_string()
    writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None
    extra_types: list[pa.DataType] = []
    written = 0
    try:
        for batch in reader.batches():
            if batch.height == 0:
                continue
            if expander is not None:
                batch = expander.expand_output(batch)
            indices = batch.get_column(INDEX_COLUMN).cast(pl.Int64).to_list()
            rows = (
                batch.get_column(PRODUCT_INDEX_COLUMN).to_list()
                if PRODUCT_INDEX_COLUMN in batch.columns
                else None
            )
            outcomes = {
                outcome.index: outcome
                for outcome in ledger.outcomes_for(min(indices), max(indices) + 1)
            }
            if shard is not None:
                # This shard's rows, and its part of the lines that make no image (merged
                # lines of a product export), so that every line is in exactly one shard.
                lines = (
                    batch.get_column(MERGED_COLUMN).is_not_null().to_list()
                    if MERGED_COLUMN in batch.columns
                    else [False] * batch.height
                )
                mine, count = shard
                keep = [
                    index in outcomes or (line and key_shard(f"line-{index}", count) == mine)
                    for index, line in zip(indices, lines, strict=True)
                ]
                batch = batch.filter(pl.Series(keep))
                if batch.height == 0:
                    continue
                indices = batch.get_column("__index").cast(pl.Int64).to_list()
                rows = batch.get_column("__row").to_list() if "__row" in batch.columns else None
            raw_prompts = (
                batch.get_column("prompt").to_list() if "prompt" in batch.columns else None
            )
            merged = (
                batch.get_column(MERGED_COLUMN).to_list()
                if MERGED_COLUMN in batch.columns
                else None
            )
            fixed = _fixed_columns(indices, outcomes, raw_prompts, rows, merged)
            arrays = _extra_arrays(batch, extra_columns)
            if schema is None:
                # An all-null first batch says nothing about a column's type: text is safest.
                extra_types = [
                    _output_type(array, source_types.get(name), earlier.get(out), text)
                    for array, name, out in zip(arrays, extra_columns, out_names, strict=True)
                ]
                schema = pa.schema(
                    list(FIXED_SCHEMA)
                    + [pa.field(n, t) for n, t in zip(out_names, extra_types, strict=True)],
                    metadata={"klein_batch.schema_version": OUTPUT_MANIFEST_SCHEMA_VERSION},
                )
                writer = pq.ParquetWriter(path, schema, compression="zstd")
            columns = [arrow_arrays.array(fixed[f.name], f.type) for f in FIXED_SCHEMA]
            columns += [
                _conform(array, target, name, source_name, indices[0] + 1)
                for array, target, name in zip(arrays, extra_types, extra_columns, strict=True)
            ]
            table = pa.Table.from_arrays(columns, schema=schema)
            assert writer is not None
            writer.write_table(table, row_group_size=table.num_rows)
            written += table.num_rows
            del batch, outcomes, fixed, arrays, columns, table
            # Arrow's pool (mimalloc) keeps what a batch freed, in pieces the next batch does
            # not fit: unless handed back here, a million-row join peaks 20 MB above a
            # one-batch join (benchmarks/notes.md, memory at the end of a million-row run).
            pa.default_memory_pool().release_unused()
        if writer is None:
            schema = pa.schema(
                list(FIXED_SCHEMA)
                + [
                    pa.field(n, source_types.get(c) or earlier.get(n) or text)
                    for n, c in zip(out_names, extra_columns, strict=True)
                ],
                metadata={"klein_batch.schema_version": OUTPUT_MANIFEST_SCHEMA_VERSION},
            )
            writer = pq.ParquetWriter(path, schema, compression="zstd")
    finally:
        if writer is not None:
            writer.close()
    return written


def _build_with_own_connection(
    reader: ManifestSource,
    ledger_path: Path,
    tmp: Path,
    expander: RowExpander | None = None,
    shard: tuple[int, int] | None = None,
    earlier: Mapping[str, pa.DataType] | None = None,
) -> int:
    # SQLite connections belong to their thread; a read-only one sees every committed row.
    with Ledger.open(ledger_path, readonly=True) as own:
        return _build_parquet(reader, own, tmp, expander, shard, earlier)


def _earlier_types(ledger: Ledger) -> dict[str, pa.DataType]:
    """The input columns' types in the manifests written to this output before."""
    text = ledger.output_types()
    if not text:
        return {}
    try:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))
    except (ValueError, pa.ArrowException):
        return {}
    return dict(zip(schema.names, schema.types, strict=True))


def _kept_types(earlier: Mapping[str, pa.DataType], written: pa.Schema) -> str:
    """``earlier`` updated with the input columns' types just written, for the next run."""
    types = dict(earlier)
    for field in written:
        if field.name not in FIXED_COLUMNS and not pa.types.is_null(field.type):
            types[field.name] = field.type
    schema = pa.schema(list(types.items()))
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


async def write_output_manifest(
    reader: ManifestSource,
    ledger: Ledger,
    sink: Sink,
    *,
    relpath: str = OUTPUT_MANIFEST_RELPATH,
    expander: RowExpander | None = None,
    shard: tuple[int, int] | None = None,
) -> str:
    """Join the input manifest with the ledger and store the Parquet file; returns its URI.

    ``shard``: only the rows this run planned (a flow shard's own rows).

    The file is built in a temporary file (beside the destination when the sink is local,
    so no second disk is needed) and then stored atomically: a reader never sees a
    half-written manifest. The join runs in a worker thread with its own read-only ledger
    connection, so a million-row manifest does not stall the event loop.
    """
    local = sink.local_path(relpath)
    tmp_dir = local.parent if local is not None else None
    if tmp_dir is not None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".manifest-", suffix=".parquet.tmp", dir=tmp_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        ledger.flush()
        earlier = _earlier_types(ledger)
        await asyncio.to_thread(
            _build_with_own_connection, reader, ledger.path, tmp, expander, shard, earlier
        )
        kept = _kept_types(earlier, pq.read_schema(tmp))
        uri = await sink.put_file(relpath, tmp, PARQUET_CONTENT_TYPE)
        ledger.record_output_types(kept)
        return uri
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def refuse_own_output_as_input(source: object, sink: Sink, destination: str) -> None:
    """Stop a run whose input manifest is the output manifest it is about to write.

    ``DEST/manifest.parquet`` given as the input would be overwritten by the output, and
    the rerun would then read that output as its input: new keys, every row paid again.
    Compared after resolving symlinks (and hard links, for files that exist).
    """
    if not isinstance(source, str | Path):
        return
    text = str(source)
    if text[:5].lower() == "s3://":
        same = sink.local_path(OUTPUT_MANIFEST_RELPATH) is None and (
            text.rstrip("/") == sink.uri(OUTPUT_MANIFEST_RELPATH)
        )
    else:
        target = sink.local_path(OUTPUT_MANIFEST_RELPATH)
        if target is None:
            return
        path = Path(text).expanduser()
        same = path.resolve() == target
        if not same and path.is_file() and target.is_file():
            same = os.path.samefile(path, target)
    if same:
        raise KleinError(
            f"manifest {text} is the output manifest this run writes ({destination}/"
            f"{OUTPUT_MANIFEST_RELPATH}): the run would overwrite its own input and a rerun "
            "would read its output as input and pay again; copy the manifest out of the "
            "output folder, or choose another --out"
        )


async def output_manifest_file(sink: Sink, relpath: str = "manifest.parquet") -> Path | io.BytesIO:
    """An output's ``manifest.parquet`` to read from: its path, or its bytes from a remote
    sink (compressed: a fraction of the table it holds)."""
    local = sink.local_path(relpath)
    if local is not None:
        if not local.is_file():
            raise KleinError(f"{sink.uri(relpath)}: no output manifest; has a run written here?")
        return local
    data = await sink.get(relpath)
    if data is None:
        raise KleinError(f"{sink.uri(relpath)}: no output manifest; has a run written here?")
    return io.BytesIO(data)


async def read_output_manifest(sink: Sink, relpath: str = "manifest.parquet") -> pl.DataFrame:
    """An output's ``manifest.parquet`` as a DataFrame (``klein-batch export``)."""
    source = await output_manifest_file(sink, relpath)
    table = await asyncio.to_thread(pq.read_table, source)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame
