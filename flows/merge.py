"""One output manifest and one ``run.json`` from the shards' own.

Each shard's manifest holds its own rows (a shard is the rows whose key hashes to it) in
input row order, so the merge interleaves them: it takes, window after window of input
rows, every shard's rows of that window, orders them by row and writes them. Memory is a
window plus one row group per shard, whatever the catalog's size. Extra input columns
may come out with different types in different shards (a column that is empty in one shard
is text there); those are unified before writing, and text is the fallback.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.contract import RowStatus
from pipeline.errors import KleinError
from pipeline.output_manifest import PARQUET_CONTENT_TYPE
from pipeline.report import latency_percentiles
from pipeline.storage import Sink
from pipeline.summary import CHANGED_EXAMPLES, RunSummary

MANIFEST_RELPATH = "manifest.parquet"
RUN_JSON_RELPATH = "run.json"


@dataclass(slots=True)
class MergeStats:
    rows: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    #: Latencies of rows that succeeded since ``fresh_after`` (this flow run's own work).
    latencies: list[float] = field(default_factory=list)
    fresh_succeeded: int = 0
    #: Credits of the rows whose task ended since ``fresh_after``, whichever run of a shard
    #: ended it: a shard lost with its worker and resumed elsewhere reports only what its
    #: last run ended, so the shards' own sums miss what the lost run had finished.
    fresh_credits: float = 0.0


def _unified_schema(schemas: list[pa.Schema]) -> pa.Schema:
    first = schemas[0]
    fields: list[pa.Field] = []
    for position, base in enumerate(first):
        types = {schema.field(position).type for schema in schemas}
        if len(types) == 1:
            fields.append(base)
            continue
        concrete = [t for t in types if not pa.types.is_null(t)]
        try:
            unified = pa.unify_schemas(
                [pa.schema([pa.field(base.name, t)]) for t in concrete],
                promote_options="permissive",
            ).field(0)
            fields.append(unified)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            fields.append(pa.field(base.name, pa.string()))
    return pa.schema(fields, metadata=first.metadata)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    if table.schema.equals(schema, check_metadata=False):
        return table.replace_schema_metadata(schema.metadata)
    columns = []
    for position, target in enumerate(schema):
        column = table.column(position)
        columns.append(column if column.type == target.type else column.cast(target.type))
    return pa.Table.from_arrays(columns, schema=schema)


#: Input rows merged at a time.
MERGE_WINDOW = 20_000


class _ShardRows:
    """One shard manifest's rows, read a row group at a time, taken in windows of rows."""

    def __init__(self, parquet: pq.ParquetFile, schema: pa.Schema) -> None:
        self.parquet = parquet
        self.schema = schema
        self.next_group = 0
        self.buffer: pa.Table | None = None

    def take_below(self, stop_row: int) -> pa.Table | None:
        """Every remaining row numbered below ``stop_row`` (rows come in ascending order)."""
        pieces: list[pa.Table] = []
        while True:
            if self.buffer is None or self.buffer.num_rows == 0:
                if self.next_group >= self.parquet.num_row_groups:
                    break
                self.buffer = _conform(self.parquet.read_row_group(self.next_group), self.schema)
                self.next_group += 1
                continue
            rows = self.buffer.column("row")
            below = int(pc.sum(pc.cast(pc.less(rows, stop_row), pa.int64())).as_py() or 0)
            pieces.append(self.buffer.slice(0, below))
            self.buffer = self.buffer.slice(below)
            if self.buffer.num_rows:
                break
        pieces = [piece for piece in pieces if piece.num_rows]
        return pa.concat_tables(pieces) if pieces else None

    @property
    def exhausted(self) -> bool:
        empty = self.buffer is None or self.buffer.num_rows == 0
        return empty and self.next_group >= self.parquet.num_row_groups


def merge_files(
    parts: list[Path], target: Path, *, total_rows: int, fresh_after: float
) -> MergeStats:
    """Interleave shard manifests into ``target`` in input row order, checking that
    together they hold every input row from 1 to ``total_rows``, each in one shard."""
    if not parts:
        raise KleinError("no shard manifests to merge")
    files = [pq.ParquetFile(path) for path in parts]
    names = [tuple(f.schema_arrow.names) for f in files]
    if len(set(names)) != 1:
        raise KleinError(
            "shard manifests have different columns; was the manifest changed while the "
            "catalog ran? Run the flow again into a new output"
        )
    schema = _unified_schema([f.schema_arrow for f in files])
    shards = [_ShardRows(parquet, schema) for parquet in files]
    stats = MergeStats()
    fresh_us = int(fresh_after * 1_000_000)
    last_row = 0
    with pq.ParquetWriter(target, schema, compression="zstd") as writer:
        stop = 1
        while not all(shard.exhausted for shard in shards):
            stop += MERGE_WINDOW
            pieces = [piece for shard in shards if (piece := shard.take_below(stop)) is not None]
            if not pieces:
                continue
            table = pa.concat_tables(pieces)
            # A stable sort: a product's variations (one shard) keep their order.
            table = table.take(pc.sort_indices(table, sort_keys=[("row", "ascending")]))
            rows = table.column("row").to_pylist()
            for row in rows:
                if row not in (last_row, last_row + 1):
                    raise KleinError(
                        f"the shards' manifests hold row {row} after row {last_row}; a row is "
                        "missing or in two shards. Run the flow again to finish its shards"
                    )
                last_row = row
            writer.write_table(table, row_group_size=table.num_rows)
            stats.rows += table.num_rows
            for status, count in zip(*_value_counts(table.column("status")), strict=True):
                stats.counts[status] += count
            _fresh(table, fresh_us, stats)
    if last_row != total_rows:
        raise KleinError(
            f"the shards' manifests hold rows 1..{last_row} of {total_rows}; run the flow "
            "again to finish its shards"
        )
    return stats


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counts = pc.value_counts(column).to_pylist()
    return [str(item["values"]) for item in counts], [int(item["counts"]) for item in counts]


def _fresh(table: pa.Table, fresh_us: int, stats: MergeStats) -> None:
    finished = pc.cast(table.column("finished_at"), pa.int64())
    ended = pc.fill_null(pc.greater_equal(finished, fresh_us), False)
    charged = pc.sum(pc.filter(table.column("cost_credits"), ended)).as_py()
    stats.fresh_credits += float(charged or 0.0)
    mask = pc.and_(pc.equal(table.column("status"), RowStatus.SUCCEEDED.value), ended)
    mask = pc.fill_null(mask, False)
    stats.fresh_succeeded += int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)
    latencies = pc.filter(table.column("latency_s"), mask).to_pylist()
    stats.latencies.extend(float(v) for v in latencies if v is not None)


async def _local_copy(sink: Sink, relpath: str, scratch: Path) -> Path:
    local = sink.local_path(relpath)
    if local is not None:
        if not local.is_file():
            raise KleinError(f"{sink.uri(relpath)}: shard manifest missing")
        return local
    data = await sink.get(relpath)
    if data is None:
        raise KleinError(f"{sink.uri(relpath)}: shard manifest missing")
    path = scratch / relpath.replace("/", "_")
    path.write_bytes(data)
    return path


async def merge_manifests(
    sink: Sink, parts: list[str], *, total_rows: int, fresh_after: float
) -> tuple[str, MergeStats]:
    """Merge shard manifests (by relpath in ``sink``) into ``manifest.parquet``; atomic."""
    import asyncio

    local_target = sink.local_path(MANIFEST_RELPATH)
    tmp_dir = local_target.parent if local_target is not None else None
    with tempfile.TemporaryDirectory(prefix="klein-merge-") as scratch:
        files = [await _local_copy(sink, relpath, Path(scratch)) for relpath in parts]
        fd, tmp_name = tempfile.mkstemp(prefix=".manifest-", suffix=".parquet.tmp", dir=tmp_dir)
        os.close(fd)
        try:
            stats = await asyncio.to_thread(
                merge_files,
                files,
                Path(tmp_name),
                total_rows=total_rows,
                fresh_after=fresh_after,
            )
            uri = await sink.put_file(MANIFEST_RELPATH, Path(tmp_name), PARQUET_CONTENT_TYPE)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    return uri, stats


def combine(
    *,
    run_id: str,
    manifest: str,
    output: str,
    dialect: str,
    tier: str,
    max_active: int,
    submits_per_minute: int,
    started_at: float,
    finished_at: float,
    stats: MergeStats,
    shard_summaries: list[dict[str, Any]],
) -> RunSummary:
    """The catalog's ``RunSummary``: counts from the merged manifest, the rest summed."""
    summary = RunSummary(
        run_id=run_id,
        manifest=manifest,
        output=output,
        dialect=dialect,
        tier=tier,
        max_active=max_active,
        submits_per_minute=submits_per_minute,
        total_rows=stats.rows,
        started_at=started_at,
        finished_at=finished_at,
    )
    summary.counts = {str(status): stats.counts.get(str(status), 0) for status in RowStatus}
    elapsed = summary.elapsed_s
    summary.images_per_s = round(stats.fresh_succeeded / elapsed, 3) if elapsed else 0.0
    summary.latency_p50_s, summary.latency_p95_s = latency_percentiles(stats.latencies)
    errors: Counter[str] = Counter()
    for shard in shard_summaries:
        summary.credits += float(shard.get("credits", 0.0))
        summary.committed_credits += float(shard.get("committed_credits", 0.0))
        summary.credits_acked_earlier += float(shard.get("credits_acked_earlier", 0.0))
        summary.stopped = summary.stopped or shard.get("stopped")
        summary.notices = summary.notices or list(shard.get("notices") or [])
        summary.submits += int(shard.get("submits", 0))
        summary.retries += int(shard.get("retries", 0))
        summary.rate_limited += int(shard.get("rate_limited", 0))
        summary.polls += int(shard.get("polls", 0))
        summary.task_lists += int(shard.get("task_lists", 0))
        summary.ambiguous_submits += int(shard.get("ambiguous_submits", 0))
        summary.resumed_rows += int(shard.get("resumed_rows", 0))
        summary.reused_rows += int(shard.get("reused_rows", 0))
        summary.changed_rows += int(shard.get("changed_rows", 0))
        room = CHANGED_EXAMPLES - len(summary.changed_examples)
        summary.changed_examples += list(shard.get("changed_examples") or [])[:room]
        errors.update({str(k): int(v) for k, v in dict(shard.get("errors") or {}).items()})
    # What this flow run's shards ended, from the merged manifest: the shards' own sums
    # when each ran once; more when a lost shard's first run had already ended rows.
    summary.credits = round(max(summary.credits, stats.fresh_credits), 2)
    summary.committed_credits = round(summary.committed_credits, 2)
    summary.credits_acked_earlier = round(summary.credits_acked_earlier, 2)
    summary.errors = dict(errors)
    return summary


async def write_run_json(sink: Sink, summary: RunSummary, extra: dict[str, Any]) -> str:
    data = summary.to_dict() | extra
    text = json.dumps(data, indent=2, default=str) + "\n"
    return await sink.put(RUN_JSON_RELPATH, text.encode("utf-8"), "application/json")
