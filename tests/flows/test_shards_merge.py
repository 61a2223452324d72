"""Shard planning, the shard's view of the output, budget shares and the manifest merge."""

from __future__ import annotations

import asyncio
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flow_helpers import write_catalog

from flows.budget import share_of
from flows.merge import merge_files
from flows.shards import (
    ShardSink,
    ShardSpec,
    earlier_duplicates,
    plan_shards,
    scan_keys,
)
from pipeline.contract import Tier
from pipeline.errors import ConfigError, KleinError
from pipeline.manifest import Defaults
from pipeline.storage import LocalSink


def test_plan_covers_every_row_once() -> None:
    shards = plan_shards(23, 5)
    assert [(s.start, s.stop) for s in shards] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert plan_shards(0, 5) == []
    assert [s.folder for s in plan_shards(10, 10)] == [".klein/shards/0"]
    with pytest.raises(ConfigError, match="shard_size must be at least 1"):
        plan_shards(10, 0)


def test_shares_never_add_up_past_the_budget() -> None:
    standard = Tier("standard", 24, 3600)
    share = share_of(standard, 24, 4)
    assert (share.occupy, share.max_active, share.submits_per_minute) == (6, 6, 900)
    assert share_of(standard, 10, 4).occupy == 2  # an operator's smaller limit wins
    assert share_of(standard, 100, 1).occupy == 24  # never more than the tier
    trial = share_of(Tier("trial", 2, 120), 2, 4)
    assert (trial.occupy, trial.submits_per_minute) == (1, 60)


class _ServerGone:
    """A concurrency lease whose release fails, as when Ctrl-C stopped the Prefect server."""

    entered = 0

    async def __aenter__(self) -> None:
        type(self).entered += 1

    async def __aexit__(self, *exc_info: object) -> None:
        raise RuntimeError("The client cannot be started again after closing.")


@pytest.mark.parametrize("stopped", [False, True])
def test_a_failed_lease_release_never_becomes_the_shards_error(
    monkeypatch: pytest.MonkeyPatch, stopped: bool
) -> None:
    """Else Prefect retries (and pays for) a shard the user stopped, or fails one that worked."""
    import prefect.concurrency.asyncio

    from flows.budget import leased

    monkeypatch.setattr(prefect.concurrency.asyncio, "concurrency", lambda *a, **k: _ServerGone())

    async def shard() -> str:
        async with leased("klein-api-key", 2) as lease:
            if stopped:
                raise asyncio.CancelledError
        assert lease.released_at >= lease.acquired_at > 0
        return "done"

    if stopped:
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(shard())
    else:
        assert asyncio.run(shard()) == "done"
    assert _ServerGone.entered >= 1


def test_shard_sink_shares_images_and_keeps_the_rest(tmp_path: Path) -> None:
    base = LocalSink(tmp_path)
    sink = ShardSink(base, ".klein/shards/3")

    async def write() -> None:
        await sink.put("images/a.jpg", b"img", "image/jpeg")
        await sink.put("run.json", b"{}", "application/json")
        assert await sink.get("run.json") == b"{}"
        assert await sink.exists("images/a.jpg")

    asyncio.run(write())
    assert (tmp_path / "images/a.jpg").read_bytes() == b"img"
    assert (tmp_path / ".klein/shards/3/run.json").is_file()
    assert not (tmp_path / "run.json").exists()
    assert sink.local_path(".klein") == (tmp_path / ".klein/shards/3/.klein").resolve()
    assert sink.uri("images/a.jpg") == str((tmp_path / "images/a.jpg").resolve())


class _Remote(LocalSink):
    """A local folder posing as a remote sink, to see what the shard view passes on."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.deleted: list[str] = []

    async def list(self, relprefix: str) -> list[str]:
        return sorted(
            str(p.relative_to(self.root)) for p in (self.root / relprefix).rglob("*") if p.is_file()
        )

    async def delete(self, relpaths: list[str]) -> None:
        self.deleted += relpaths


def test_shard_sink_maps_paths_of_remote_only_methods(tmp_path: Path) -> None:
    base = _Remote(tmp_path)
    sink = ShardSink(base, ".klein/shards/2")

    async def listing() -> list[str]:
        await sink.put(".klein/parts/a.parquet", b"x", "application/octet-stream")
        await base.put(".klein/parts/other.parquet", b"y", "application/octet-stream")
        found = await sink.list(".klein/parts")
        await sink.delete(found)
        return found

    assert asyncio.run(listing()) == [".klein/parts/a.parquet"]
    assert base.deleted == [".klein/shards/2/.klein/parts/a.parquet"]


def test_scan_finds_keys_repeated_across_shards(tmp_path: Path) -> None:
    rows = [(f"id{n}", f"prompt {n}", "") for n in range(10)]
    rows[7] = ("id1", "again", "")  # repeats row 2 (index 1), in a later shard
    rows[3] = ("id2", "again", "")  # repeats index 2 inside the first shard
    rows[5] = ("", "", "")  # rejected: keyless, not a duplicate
    manifest = write_catalog(tmp_path / "m.csv", rows)
    scan = scan_keys(manifest, defaults=Defaults(), limit=None, shard_size=5)
    assert scan.total_rows == 10
    assert scan.duplicates.rows() == [(3, 2), (7, 1)]
    first, second = ShardSpec(0, 0, 5), ShardSpec(1, 5, 10)
    assert earlier_duplicates(scan.duplicates, first) == {}  # its own ledger names row 3's
    assert earlier_duplicates(scan.duplicates, second) == {7: 1}
    assert scan.first_keys == {0: "id0", 1: None}


def _part(path: Path, start: int, count: int, extra: pa.Array) -> Path:
    table = pa.table(
        {
            "row": pa.array(range(start + 1, start + count + 1), pa.int64()),
            "status": pa.array(["succeeded"] * count),
            "finished_at": pa.array([None] * count, pa.timestamp("us", tz="UTC")),
            "latency_s": pa.array([None] * count, pa.float64()),
            "size": extra,
        }
    )
    pq.write_table(table, path, row_group_size=2)
    return path


def test_merge_streams_in_order_and_unifies_column_types(tmp_path: Path) -> None:
    first = _part(tmp_path / "a.parquet", 0, 3, pa.array([1, 2, 3], pa.int64()))
    second = _part(tmp_path / "b.parquet", 3, 2, pa.array([None, None], pa.null()))
    target = tmp_path / "m.parquet"
    stats = merge_files([(0, 3, first), (3, 5, second)], target, fresh_after=0.0)
    merged = pl.read_parquet(target)
    assert merged["row"].to_list() == [1, 2, 3, 4, 5]
    assert merged.schema["size"] == pl.Int64
    assert merged["size"].to_list() == [1, 2, 3, None, None]
    assert stats.rows == 5 and stats.counts["succeeded"] == 5
    assert pq.ParquetFile(target).num_row_groups == 3  # row group by row group


def test_merge_refuses_a_shard_that_misses_rows(tmp_path: Path) -> None:
    first = _part(tmp_path / "a.parquet", 0, 3, pa.array([1, 2, 3], pa.int64()))
    short = _part(tmp_path / "b.parquet", 3, 1, pa.array([4], pa.int64()))
    with pytest.raises(KleinError, match="expected up to 5"):
        merge_files([(0, 3, first), (3, 5, short)], tmp_path / "m.parquet", fresh_after=0.0)
