"""One output manifest and one ``run.json`` from the shards' own.

Shards cover contiguous row ranges, so concatenating their manifests in shard order gives
input row order. The merge streams one row group at a time (a shard's manifest has one per
input batch), so memory is one row group, whatever the catalog's size. Extra input columns
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
from pipeline.summary import RunSummary

MANIFEST_RELPATH = "manifest.parquet"
RUN_JSON_RELPATH = "run.json"


@dataclass(slots=True)
class MergeStats:
    rows: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    #: Latencies of rows that succeeded since ``fresh_after`` (this flow run's own work).
    latencies: list[float] = field(default_factory=list)
    fresh_succeeded: int = 0


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


def merge_files(
    parts: list[tuple[int, int, Path]], target: Path, *, fresh_after: float
) -> MergeStats:
    """Concatenate shard manifests ``(start, stop, path)`` into ``target``, checking that each
    holds exactly its rows, in order."""
    if not parts:
        raise KleinError("no shard manifests to merge")
    files = [pq.ParquetFile(path) for _, _, path in parts]
    names = [tuple(f.schema_arrow.names) for f in files]
    if len(set(names)) != 1:
        raise KleinError(
            "shard manifests have different columns; was the manifest changed while the "
            "catalog ran? Run the flow again into a new output"
        )
    schema = _unified_schema([f.schema_arrow for f in files])
    stats = MergeStats()
    fresh_us = int(fresh_after * 1_000_000)
    with pq.ParquetWriter(target, schema, compression="zstd") as writer:
        for (start, stop, path), parquet in zip(parts, files, strict=True):
            expected = start + 1
            for group in range(parquet.num_row_groups):
                table = _conform(parquet.read_row_group(group), schema)
                if table.num_rows == 0:
                    continue
                rows = table.column("row").to_pylist()
                if rows != list(range(expected, expected + len(rows))):
                    raise KleinError(
                        f"{path}: rows {rows[0]}..{rows[-1]} where rows from {expected} "
                        "were expected; the shard's manifest does not match its range"
                    )
                expected += len(rows)
                writer.write_table(table, row_group_size=table.num_rows)
                stats.rows += table.num_rows
                for status, count in zip(*_value_counts(table.column("status")), strict=True):
                    stats.counts[status] += count
                _fresh(table, fresh_us, stats)
            if expected != stop + 1:
                raise KleinError(
                    f"{path}: holds rows {start + 1}..{expected - 1}, expected up to {stop}; "
                    "run the flow again to finish the shard"
                )
    return stats


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counts = pc.value_counts(column).to_pylist()
    return [str(item["values"]) for item in counts], [int(item["counts"]) for item in counts]


def _fresh(table: pa.Table, fresh_us: int, stats: MergeStats) -> None:
    finished = pc.cast(table.column("finished_at"), pa.int64())
    mask = pc.and_(
        pc.equal(table.column("status"), RowStatus.SUCCEEDED.value),
        pc.greater_equal(finished, fresh_us),
    )
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
    sink: Sink, parts: list[tuple[int, int, str]], *, fresh_after: float
) -> tuple[str, MergeStats]:
    """Merge shard manifests (by relpath in ``sink``) into ``manifest.parquet``; atomic."""
    import asyncio

    local_target = sink.local_path(MANIFEST_RELPATH)
    tmp_dir = local_target.parent if local_target is not None else None
    with tempfile.TemporaryDirectory(prefix="klein-merge-") as scratch:
        files = [
            (start, stop, await _local_copy(sink, relpath, Path(scratch)))
            for start, stop, relpath in parts
        ]
        fd, tmp_name = tempfile.mkstemp(prefix=".manifest-", suffix=".parquet.tmp", dir=tmp_dir)
        os.close(fd)
        try:
            stats = await asyncio.to_thread(
                merge_files, files, Path(tmp_name), fresh_after=fresh_after
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
        summary.submits += int(shard.get("submits", 0))
        summary.retries += int(shard.get("retries", 0))
        summary.rate_limited += int(shard.get("rate_limited", 0))
        summary.polls += int(shard.get("polls", 0))
        summary.ambiguous_submits += int(shard.get("ambiguous_submits", 0))
        summary.resumed_rows += int(shard.get("resumed_rows", 0))
        errors.update({str(k): int(v) for k, v in dict(shard.get("errors") or {}).items()})
    summary.credits = round(summary.credits, 2)
    summary.errors = dict(errors)
    return summary


async def write_run_json(sink: Sink, summary: RunSummary, extra: dict[str, Any]) -> str:
    data = summary.to_dict() | extra
    text = json.dumps(data, indent=2, default=str) + "\n"
    return await sink.put(RUN_JSON_RELPATH, text.encode("utf-8"), "application/json")
