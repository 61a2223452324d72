"""Shard planning, the shard's view of the output, budget shares and the manifest merge."""

from __future__ import annotations

import asyncio
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.budget import runner_share, share_of
from flows.credits import CreditPool
from flows.merge import merge_files
from flows.shards import ShardSink, StoredPlan, plan_shards, shard_count
from pipeline.contract import Tier
from pipeline.errors import ConfigError, KleinError
from pipeline.keys import key_shard
from pipeline.storage import LocalSink


def test_shards_are_sized_from_the_rows_and_a_row_stays_in_its_shard() -> None:
    assert shard_count(23, 5) == 5
    assert shard_count(0, 5) == 1
    assert [s.folder for s in plan_shards(1)] == [".klein/shards/0"]
    with pytest.raises(ConfigError, match="shard_size must be at least 1"):
        shard_count(10, 0)
    keys = [f"sku-{n}" for n in range(2_000)]
    placed = {key: key_shard(key, 4) for key in keys}
    assert set(placed.values()) == {0, 1, 2, 3}
    assert all(500 - 120 < list(placed.values()).count(n) < 500 + 120 for n in range(4))
    # Rows inserted or removed around it never move a row: its key alone decides.
    assert {key: key_shard(key, 4) for key in reversed(keys[5:])} == {
        key: placed[key] for key in keys[5:]
    }


def test_an_output_of_row_range_shards_is_refused_by_name() -> None:
    old = b'{"manifest": "m.csv", "total_rows": 10, "shard_size": 5, "first_keys": {}}'
    with pytest.raises(ConfigError, match="older klein-batch whose shards are row ranges"):
        StoredPlan.from_bytes(old, "out/night")
    plan = StoredPlan(manifest="m.csv", total_rows=10, shard_size=5, shards=2)
    assert StoredPlan.from_bytes(plan.to_bytes(), "out") == plan


def test_credit_caps_never_add_up_past_the_budget_and_unused_credit_moves_on() -> None:
    pool = CreditPool.load(10.0, None, 3)
    first, second = pool.grant(0), pool.grant(1)
    assert (first, second) == (3.33, 3.33)
    assert pool.held <= 10.0
    pool.settle(0, 1.0)  # shard 0 needed 1 credit: 2.33 of its cap go back
    assert pool.grant(2) == 5.67  # all that is free, as the last shard to start
    assert pool.held <= 10.0
    pool.settle(1, 3.33)  # stopped on its cap
    pool.settle(2, 0.5)
    assert pool.grant(1, everything=True) == pytest.approx(8.5)
    assert pool.held == pytest.approx(10.0)
    again = CreditPool.load(10.0, pool.to_bytes(), 3)  # a rerun starts from the stored caps
    assert again.caps == pool.caps and again.free == 0.0


def test_shares_never_add_up_past_the_budget() -> None:
    standard = Tier("standard", 24, 3600)
    share = share_of(standard, 24, 4)
    assert (share.occupy, share.max_active, share.submits_per_minute) == (6, 6, 900)
    assert share_of(standard, 10, 4).occupy == 2  # an operator's smaller limit wins
    assert share_of(standard, 100, 1).occupy == 24  # never more than the tier
    trial = share_of(Tier("trial", 2, 120), 2, 4)
    assert (trial.occupy, trial.submits_per_minute) == (1, 60)


def test_runners_share_the_keys_own_budget_adaptively_and_a_smaller_one_in_fixed_parts() -> None:
    standard = Tier("standard", 24, 3600)
    # At the key's own limit its 429s divide it: each runner may grow to all of it.
    whole = runner_share(standard, 24, 24, 3)
    assert (whole.occupy, whole.max_active, whole.submits_per_minute) == (1, 24, 3600)
    # Below it (`--max-active 6` on a 24-slot key, or a `klein-api-key` limit of 12) no 429
    # says the budget is spent: fixed parts that never add up past it.
    six = Tier("standard", 6, 3600)
    assert runner_share(six, 24, 6, 3).max_active == 2
    assert runner_share(standard, 24, 12, 4).max_active == 3
    assert runner_share(six, 24, 6, 3).occupy == 1  # a running shard holds one slot
    assert 3 * runner_share(six, 24, 6, 3).submits_per_minute <= 3600


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


def _part(
    path: Path, rows: list[int], extra: pa.Array, finished: list[float] | None = None
) -> Path:
    count = len(rows)
    ended = [int(t * 1_000_000) for t in finished] if finished else [None] * count
    table = pa.table(
        {
            "row": pa.array(rows, pa.int64()),
            "status": pa.array(["succeeded"] * count),
            "finished_at": pa.array(ended, pa.timestamp("us", tz="UTC")),
            "latency_s": pa.array([1.0] * count, pa.float64()),
            "cost_credits": pa.array([1.5] * count, pa.float64()),
            "size": extra,
        }
    )
    pq.write_table(table, path, row_group_size=2)
    return path


def test_merge_interleaves_shards_in_row_order_and_unifies_column_types(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.merge

    monkeypatch.setattr(flows.merge, "MERGE_WINDOW", 2)  # several windows, a few rows each
    first = _part(tmp_path / "a.parquet", [1, 2, 2, 5], pa.array([1, 2, 3, 6], pa.int64()))
    second = _part(tmp_path / "b.parquet", [3, 4], pa.array([None, None], pa.null()))
    target = tmp_path / "m.parquet"
    stats = merge_files([first, second], target, total_rows=5, fresh_after=0.0)
    merged = pl.read_parquet(target)
    assert merged["row"].to_list() == [1, 2, 2, 3, 4, 5]  # row 2's two variations in order
    assert merged.schema["size"] == pl.Int64
    assert merged["size"].to_list() == [1, 2, 3, None, None, 6]
    assert stats.rows == 6 and stats.counts["succeeded"] == 6


def test_merge_counts_what_this_flow_run_ended_whichever_shard_run_ended_it(
    tmp_path: Path,
) -> None:
    """A shard lost with its worker and resumed elsewhere reports only its last run's
    credits; the merged manifest knows every row this flow run ended."""
    started = 1_800_000_000.0
    first = _part(tmp_path / "a.parquet", [1, 2], pa.array([1, 2]), [started - 60, started + 5])
    second = _part(tmp_path / "b.parquet", [3], pa.array([3]), [started + 9])
    stats = merge_files([first, second], tmp_path / "m.parquet", total_rows=3, fresh_after=started)
    assert stats.fresh_succeeded == 2 and stats.fresh_credits == pytest.approx(3.0)
    assert stats.latencies == [1.0, 1.0]


def test_merge_refuses_shards_that_miss_rows(tmp_path: Path) -> None:
    first = _part(tmp_path / "a.parquet", [1, 2, 3], pa.array([1, 2, 3], pa.int64()))
    short = _part(tmp_path / "b.parquet", [5], pa.array([5], pa.int64()))
    with pytest.raises(KleinError, match="hold row 5 after row 3"):
        merge_files([first, short], tmp_path / "m.parquet", total_rows=5, fresh_after=0.0)
    with pytest.raises(KleinError, match=r"hold rows 1\.\.3 of 5"):
        merge_files([first], tmp_path / "m.parquet", total_rows=5, fresh_after=0.0)
