"""Shards: contiguous row ranges of one manifest, each run by the engine on its own.

A shard writes its journal, partial manifest and ``run.json`` under
``<out>/.klein/shards/<n>/`` and its images into the shared ``<out>/images/``, so a shard
retried on another worker resumes from its own ledger, and the merged output looks exactly
like a single run's.

Keys are unique per run, but shards are separate runs: a key repeated in two shards would
be paid twice. The planning scan therefore finds every row whose key an earlier shard
already owns and hands that list to the later shard, which rejects the row as a duplicate
naming the first row, as a single run does.
"""

from __future__ import annotations

import inspect
import io
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.manifest import INDEX_COLUMN, Defaults, validate_batch
from pipeline.product_exports import ExportSpec, open_manifest
from pipeline.storage import Sink

SHARDS_DIR: Final = ".klein/shards"
PLAN_RELPATH: Final = f"{SHARDS_DIR}/plan.json"
DUPLICATES_RELPATH: Final = f"{SHARDS_DIR}/duplicates.parquet"
#: What each shard leaves in its folder besides the engine's files.
SHARD_INFO: Final = "shard.json"
#: Only these paths of a shard go to the shared output; everything else is the shard's own.
SHARED_PREFIXES: Final = ("images/",)


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Rows ``start`` .. ``stop - 1`` (0-based data rows) of the manifest."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def folder(self) -> str:
        return shard_folder(self.index)


def shard_folder(index: int) -> str:
    return f"{SHARDS_DIR}/{index}"


def plan_shards(total_rows: int, shard_size: int) -> list[ShardSpec]:
    """Split ``total_rows`` into ranges of ``shard_size`` rows (the last may be shorter)."""
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
    return [
        ShardSpec(index=n, start=start, stop=min(start + shard_size, total_rows))
        for n, start in enumerate(range(0, total_rows, shard_size))
    ]


class ShardSink:
    """The output as one shard sees it: shared ``images/``, everything else in its folder.

    Every ``Sink`` method takes the relative path first, so methods this class does not
    know (a later sink may add some) are forwarded with that path mapped too.
    """

    def __init__(self, base: Sink, folder: str) -> None:
        self.base = base
        self.folder = folder.strip("/")

    def __repr__(self) -> str:
        return f"ShardSink({self.base!r}, {self.folder!r})"

    def __str__(self) -> str:
        return self.base.uri(self.folder + "/" + SHARD_INFO).rsplit("/", 1)[0]

    def map(self, relpath: str) -> str:
        if relpath.startswith(SHARED_PREFIXES):
            return relpath
        return f"{self.folder}/{relpath.lstrip('/')}"

    def uri(self, relpath: str) -> str:
        return self.base.uri(self.map(relpath))

    async def put(self, relpath: str, data: bytes, content_type: str) -> str:
        return await self.base.put(self.map(relpath), data, content_type)

    async def put_file(self, relpath: str, local_path: Path, content_type: str) -> str:
        return await self.base.put_file(self.map(relpath), local_path, content_type)

    async def get(self, relpath: str) -> bytes | None:
        return await self.base.get(self.map(relpath))

    async def exists(self, relpath: str) -> bool:
        return await self.base.exists(self.map(relpath))

    def local_path(self, relpath: str) -> Path | None:
        return self.base.local_path(self.map(relpath))

    def unmap(self, relpath: str) -> str:
        """A path of the base sink as this shard names it (inverse of ``map``)."""
        mine = self.folder + "/"
        return relpath[len(mine) :] if relpath.startswith(mine) else relpath

    def __getattr__(self, name: str) -> Any:
        # Remote sinks add methods (download, list, delete, ...); paths in and out are mapped
        # so the journal's own calls (list then delete, say) stay inside the shard's folder.
        attribute = getattr(self.base, name)
        if not callable(attribute):
            return attribute

        def mapped(*args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], str):
                args = (self.map(args[0]), *args[1:])
            elif args and isinstance(args[0], list):
                args = ([self.map(p) if isinstance(p, str) else p for p in args[0]], *args[1:])
            result = attribute(*args, **kwargs)
            if name == "list" and inspect.isawaitable(result):
                return self._unmapped(result)
            return result

        return mapped

    async def _unmapped(self, listing: Awaitable[list[str]]) -> list[str]:
        return [self.unmap(path) for path in await listing]


# --- the planning scan --------------------------------------------------------------------------


@dataclass(slots=True)
class ScanResult:
    """What the flow learns from one pass over the manifest before any shard runs."""

    total_rows: int
    #: (row index, index of the earlier row with the same key) for repeated keys.
    duplicates: pl.DataFrame
    #: Key of each shard's first row (None when that row is rejected): what a rerun into
    #: the same output compares, to notice rows that moved between shards.
    first_keys: dict[int, str | None]


def scan_keys(
    manifest: str | Path,
    *,
    defaults: Defaults,
    limit: int | None,
    shard_size: int,
    batch_size: int = 10_000,
    on_batch: Callable[[int], None] | None = None,
    export: ExportSpec | None = None,
    reference_column: str | None = None,
) -> ScanResult:
    """Count rows and find repeated keys, holding only (index, key) pairs, not rows.

    Shards are ranges of input lines: a product export's lines that make no image of their
    own (``merged``) count towards the total too, so every line lands in a shard.
    """
    reader = open_manifest(
        manifest,
        export=export,
        reference_column=reference_column,
        batch_size=batch_size,
        limit=limit,
    )
    parts: list[pl.DataFrame] = []
    first_keys: dict[int, str | None] = {}
    total = 0
    for batch in reader.batches():
        total += batch.height
        rows, rejections = validate_batch(
            batch, source_name=reader.name, defaults=defaults, names=reader.shown_as
        )
        # A shard starting on a merged line starts with no key (as on a rejected row).
        starts = batch.filter(pl.col(INDEX_COLUMN) % shard_size == 0).get_column(INDEX_COLUMN)
        for index in starts.to_list():
            first_keys.setdefault(index // shard_size, None)
        for row in rows:
            if row.index % shard_size == 0:
                first_keys[row.index // shard_size] = row.key
        for rejection in rejections:
            if rejection.index % shard_size == 0:
                first_keys[rejection.index // shard_size] = None
        if rows:
            parts.append(
                pl.DataFrame(
                    {"index": [row.index for row in rows], "key": [row.key for row in rows]},
                    schema={"index": pl.Int64, "key": pl.String},
                )
            )
        if on_batch is not None:
            on_batch(total)
    empty = pl.DataFrame(schema={"index": pl.Int64, "first": pl.Int64})
    if not parts:
        return ScanResult(total_rows=total, duplicates=empty, first_keys=first_keys)
    keys = pl.concat(parts)
    duplicates = (
        keys.with_columns(pl.col("index").min().over("key").alias("first"))
        .filter(pl.col("index") != pl.col("first"))
        .select("index", "first")
        .sort("index")
    )
    return ScanResult(total_rows=total, duplicates=duplicates, first_keys=first_keys)


def earlier_duplicates(duplicates: pl.DataFrame, shard: ShardSpec) -> dict[int, int]:
    """Rows of ``shard`` whose key a row before the shard owns (repeats inside it are the
    shard's own ledger's business, and it names them the same way)."""
    if duplicates.height == 0:
        return {}
    mine = duplicates.filter(
        pl.col("index").is_between(shard.start, shard.stop, closed="left")
        & (pl.col("first") < shard.start)
    )
    return dict(zip(mine["index"].to_list(), mine["first"].to_list(), strict=True))


def duplicates_to_bytes(duplicates: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(duplicates.to_arrow(), buffer, compression="zstd")
    return buffer.getvalue()


def duplicates_from_bytes(data: bytes | None) -> pl.DataFrame:
    if not data:
        return pl.DataFrame(schema={"index": pl.Int64, "first": pl.Int64})
    table = pq.read_table(pa.BufferReader(data))
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


# --- plan.json: the sharding a destination was started with -----------------------------------


@dataclass(frozen=True, slots=True)
class StoredPlan:
    manifest: str
    total_rows: int
    shard_size: int
    first_keys: dict[int, str | None]

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["first_keys"] = {str(k): v for k, v in sorted(self.first_keys.items())}
        return (json.dumps(data, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredPlan:
        raw = json.loads(data.decode("utf-8"))
        return cls(
            manifest=str(raw["manifest"]),
            total_rows=int(raw["total_rows"]),
            shard_size=int(raw["shard_size"]),
            first_keys={int(k): v for k, v in dict(raw.get("first_keys") or {}).items()},
        )

    def moved_shard(self, current: dict[int, str | None]) -> int | None:
        """The first shard whose first row is another row than before (rows were inserted
        or removed), or None when every shard both plans know starts at the same row."""
        for index in sorted(set(self.first_keys) & set(current)):
            if self.first_keys[index] != current[index]:
                return index
        return None
