"""Shards: the rows of one manifest split by their stable key, each shard run on its own.

Shard ``n`` of ``N`` holds the rows whose product key hashes to ``n``
(``pipeline.keys.key_shard``): not a row range, so a row inserted into or removed from
tonight's manifest moves no other row to another shard, and a rerun into last night's
output resumes every shard from its own journal, paying only for rows it has not seen. ``N``
is fixed by the first run into an output (``plan.json``) and kept by every rerun.

A key repeated in the manifest lands in one shard, whose own ledger rejects the repeat
naming the first row, as a single run does.

A shard writes its journal, partial manifest and ``run.json`` under
``<out>/.klein/shards/<n>/`` and its images into the shared ``<out>/images/``, so a shard
retried on another worker resumes from its own ledger, and the merged output looks exactly
like a single run's.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from pipeline.errors import ConfigError
from pipeline.storage import Sink

SHARDS_DIR: Final = ".klein/shards"
PLAN_RELPATH: Final = f"{SHARDS_DIR}/plan.json"
#: What each shard leaves in its folder besides the engine's files.
SHARD_INFO: Final = "shard.json"
#: Only these paths of a shard go to the shared output; everything else is the shard's own.
SHARED_PREFIXES: Final = ("images/",)


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Shard ``index`` of ``count``: the rows whose key ``key_shard`` puts there."""

    index: int
    count: int

    @property
    def folder(self) -> str:
        return shard_folder(self.index)


def shard_folder(index: int) -> str:
    return f"{SHARDS_DIR}/{index}"


def shard_count(total_rows: int, shard_size: int) -> int:
    """How many shards ``total_rows`` rows of about ``shard_size`` each make (at least 1)."""
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
    return max(1, -(-total_rows // shard_size))


def plan_shards(count: int) -> list[ShardSpec]:
    return [ShardSpec(index=n, count=count) for n in range(count)]


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

    def close(self) -> None:
        """Not the base's: the flow that opened the output closes it after every shard."""

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


# --- plan.json: the sharding a destination was started with -----------------------------------


@dataclass(frozen=True, slots=True)
class StoredPlan:
    """What a flow's output was started with: the shard count every rerun keeps."""

    manifest: str
    total_rows: int
    shard_size: int
    shards: int

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> StoredPlan:
        raw = json.loads(data.decode("utf-8"))
        if "shards" not in raw:
            # Row-range shards of an older klein-batch: its rows sit in other shards than
            # key shards would put them, so resuming here would pay for them again.
            raise ConfigError(
                f"{where}: this output was started by an older klein-batch whose shards are "
                "row ranges; finish it with that version, or run the flow into a new output"
            )
        return cls(
            manifest=str(raw["manifest"]),
            total_rows=int(raw["total_rows"]),
            shard_size=int(raw["shard_size"]),
            shards=int(raw["shards"]),
        )
