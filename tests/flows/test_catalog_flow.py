"""The catalog flow for real: Prefect flow runs against the simulator on 127.0.0.1."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import polars as pl
import pytest
from flow_helpers import PROMPTS, write_catalog

from pipeline.keys import key_shard
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer
from pipeline.spec import RunSpec

pytestmark = pytest.mark.usefixtures("prefect_api")

SECRET = "sk-flow-test-7f3a9c1e5b"


def sim_config(max_active: int = 4) -> SimConfig:
    return SimConfig(
        keys=[KeyConfig(name="flow", key=SECRET, max_active=max_active)],
        latency=LatencyConfig(median_s=0.05, p95_s=0.1),
    )


def catalog_rows() -> list[tuple[str, str, str]]:
    """23 rows: row 9 has no prompt, row 17 repeats row 2's id (in another shard)."""
    rows = [(f"item-{n:02d}", PROMPTS[n % len(PROMPTS)], f"SKU{n:03d}") for n in range(1, 24)]
    rows[8] = ("item-09", "", "SKU009")
    rows[16] = ("item-02", "blue mug again", "SKU017")
    return rows


async def flow_run_records(flow_run_id: UUID) -> dict[str, Any]:
    """Everything the Prefect server keeps about a flow run and its children, as text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    drained = APILogWorker.drain_all()
    if inspect.isawaitable(drained):
        await drained
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {"run": run, "artifacts": artifacts, "logs": logs, "task_runs": task_runs}


def assert_images(done: pl.DataFrame, out: Path, count: int) -> None:
    """Every succeeded row's image is in the shared images/ folder, and nothing else is."""
    images = (out / "images").resolve()
    assert len(list(images.iterdir())) == count
    for uri in done.filter(pl.col("status") == "succeeded")["output_uri"]:
        assert Path(uri).is_file() and Path(uri).parent == images


async def test_flow_shards_merges_in_row_order_and_publishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.catalog import generate_catalog

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    manifest = write_catalog(tmp_path / "catalog.csv", catalog_rows())
    out = tmp_path / "out"
    async with SimServer(sim_config(max_active=10)) as sim:
        state = await generate_catalog(
            str(manifest),
            RunSpec(out=str(out), api_url=sim.url, max_active=10),
            shard_size=5,
            parallel_shards=2,
            return_state=True,
        )
        stats = sim.stats()["keys"]["flow"]
    assert state.is_completed(), state.message
    result = await state.result()
    # Completed (a retry would fix nothing), but the flow run says which rows need a look.
    assert state.message.startswith("21 of 23 images made; 2 rejected: "), state.message
    assert "manifest.parquet" in state.message

    done = pl.read_parquet(out / "manifest.parquet")
    assert done["row"].to_list() == list(range(1, 24))
    assert done["sku"].to_list() == [f"SKU{n:03d}" for n in range(1, 24)]
    status = dict(zip(done["row"].to_list(), done["status"].to_list(), strict=True))
    assert status[9] == "rejected" and status[17] == "rejected"
    assert {row for row, s in status.items() if s != "succeeded"} == {9, 17}
    reasons = dict(zip(done["row"].to_list(), done["reason"].to_list(), strict=True))
    assert "row 9, column prompt" in reasons[9]
    assert "row 17" in reasons[17] and "repeats row 2" in reasons[17]
    # 21 distinct images, each paid once, each file where the manifest says.
    assert stats["submits_accepted"] == 21
    assert_images(done, out, 21)
    # The merged manifest has the schema of a single run's.
    shard0 = pl.read_parquet(out / ".klein/shards/0/manifest.parquet")
    assert done.schema == shard0.schema

    summary = json.loads((out / "run.json").read_text())
    assert summary["counts"]["succeeded"] == 21 and summary["counts"]["rejected"] == 2
    assert summary["total_rows"] == 23 and result["total_rows"] == 23
    assert [s["shard"] for s in summary["shards"]] == [0, 1, 2, 3, 4]
    assert sum(s["rows"] for s in summary["shards"]) == 23  # each row in exactly one shard
    assert summary["shard_share"] == 5
    assert summary["credits"] == pytest.approx(done["cost_credits"].sum(), abs=0.01)
    assert summary["credits"] == pytest.approx(stats["credits_charged"], abs=0.01)
    assert stats["max_active"] <= 10

    records = await flow_run_records(state.state_details.flow_run_id)
    by_type = {a.type: a for a in records["artifacts"]}
    assert set(by_type) >= {"progress", "table", "markdown"}
    assert by_type["progress"].data == 100.0
    table = by_type["table"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [row["shard"] for row in table] == [0, 1, 2, 3, 4]
    assert sum(row["succeeded"] for row in table) == 21
    markdown = by_type["markdown"].data
    assert "| succeeded | 21 |" in markdown and "images/s" in markdown
    assert (out / "manifest.parquet").resolve().as_uri() in markdown
    shard_runs = [t for t in records["task_runs"] if t.name.startswith("shard-")]
    assert len(shard_runs) == 5  # one task per shard, not per row

    # The key is nowhere the server or the output keeps things.
    stored = json.dumps(
        {
            "parameters": records["run"].parameters,
            "artifacts": [a.model_dump(mode="json") for a in records["artifacts"]],
            "logs": [log.message for log in records["logs"]],
            "task_inputs": [t.model_dump(mode="json") for t in records["task_runs"]],
        }
    )
    assert records["logs"], "the flow's logs reached the server"
    assert SECRET not in stored
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".parquet"):
            assert SECRET.encode() not in path.read_bytes(), path


async def test_failed_shard_is_retried_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.catalog as catalog
    from pipeline.run import arun_manifest

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    monkeypatch.setattr(catalog, "RETRY_DELAY_S", 0)
    calls: list[int] = []

    async def crash_once(manifest: Any, out: Any, **kwargs: Any) -> Any:
        options = kwargs["options"]
        shard = options.shard[0]
        calls.append(shard)
        if shard == 1 and calls.count(1) == 1:
            options.limit = 6  # its rows among the first 6 get done, then the worker "dies"
            await arun_manifest(manifest, out, **kwargs)
            raise RuntimeError("worker lost")
        return await arun_manifest(manifest, out, **kwargs)

    monkeypatch.setattr(catalog, "arun_manifest", crash_once)
    rows = [(f"r{n}", PROMPTS[n % len(PROMPTS)], f"S{n}") for n in range(1, 13)]
    manifest = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    async with SimServer(sim_config()) as sim:
        state = await catalog.generate_catalog(
            str(manifest),
            RunSpec(out=str(out), api_url=sim.url, max_active=4),
            shard_size=6,
            parallel_shards=2,
            return_state=True,
        )
        stats = sim.stats()["keys"]["flow"]
    assert state.is_completed(), state.message
    assert not state.message or "images made" not in state.message  # every row succeeded
    assert sorted(calls) == [0, 1, 1]
    shard = json.loads((out / ".klein/shards/1/run.json").read_text())
    assert shard["resumed_rows"] == sum(key_shard(f"r{n}", 2) == 1 for n in range(1, 7)) > 0
    assert stats["submits_accepted"] == 12  # the retry paid for nothing twice
    done = pl.read_parquet(out / "manifest.parquet")
    assert done["status"].to_list() == ["succeeded"] * 12
    # The night's credits count what the lost attempt had finished too, not only the retry's.
    night = json.loads((out / "run.json").read_text())
    assert night["credits"] == pytest.approx(stats["credits_charged"], abs=0.01)
    assert night["committed_credits"] == pytest.approx(stats["credits_charged"], abs=0.01)

    # A rerun into the same output resumes everything and submits nothing.
    async with SimServer(sim_config()) as sim:
        again = await catalog.generate_catalog(
            str(manifest),
            RunSpec(out=str(out), api_url=sim.url),
            shard_size=6,
            return_state=True,
        )
        assert sim.stats()["keys"]["flow"]["submits_accepted"] == 0
    assert again.is_completed()
    assert (await again.result())["resumed_rows"] == 12

    # Tonight's catalog: a row inserted on top, one removed: a normal edit. The rerun into
    # the same output completes and pays for the new row only.
    edited = [("new", "a new first row", "S0"), *rows[:5], *rows[6:]]
    write_catalog(manifest, edited)
    async with SimServer(sim_config()) as sim:
        moved = await catalog.generate_catalog(
            str(manifest),
            RunSpec(out=str(out), api_url=sim.url),
            shard_size=3,  # asked for other shards: the output keeps its 2
            return_state=True,
        )
        paid = sim.stats()["keys"]["flow"]["submits_accepted"]
    assert moved.is_completed(), moved.message
    assert paid == 1
    done = pl.read_parquet(out / "manifest.parquet")
    assert done["key"].to_list() == [key for key, _, _ in edited]
    assert done["status"].to_list() == ["succeeded"] * 12
    assert (await moved.result())["shard_count"] == 2


async def test_no_more_shards_run_at_once_than_the_key_has_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-slot key with 4 parallel shards asked for: 2 at a time, 1 slot each, never 4."""
    from flows.catalog import generate_catalog

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    rows = [(f"t{n:02d}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, 13)]
    manifest = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    async with SimServer(sim_config(max_active=2)) as sim:
        result = await generate_catalog(
            str(manifest),
            RunSpec(out=str(out), api_url=sim.url, max_active=2),
            shard_size=3,
            parallel_shards=4,
            concurrency_limit=None,
        )
        stats = sim.stats()["keys"]["flow"]
    summary = json.loads((out / "run.json").read_text())
    assert result["counts"]["succeeded"] == 12
    assert summary["parallel_shards"] == 2
    assert summary["shard_share"] == 1
    assert {shard["occupy"] for shard in summary["shards"]} == {1}
    shard_runs = [json.loads((out / f".klein/shards/{n}/run.json").read_text()) for n in range(4)]
    assert {run["max_active"] for run in shard_runs} == {1}
    assert stats["max_active"] <= 2


async def test_max_active_below_the_keys_is_a_hard_cap_in_the_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`max_active` 5 on a 24-slot standard key, in one shard: the flow's budget is a share
    of the key (as `klein-batch run --max-active 5` is), so the shard never probes past it
    into slots the key's other jobs hold."""
    from flows.catalog import generate_catalog

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    rows = [(f"h{n:02d}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, 41)]
    manifest = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    # Uneven task times: a probe past the share sometimes guesses a finish wrong.
    uneven = SimConfig(
        keys=[KeyConfig(name="flow", key=SECRET, max_active=24)],
        latency=LatencyConfig(median_s=0.2, p95_s=1.0),
    )
    async with SimServer(uneven) as sim:
        result = await generate_catalog(
            str(manifest),
            RunSpec(out=str(out), api_url=sim.url, max_active=5),
            shard_size=100,
            concurrency_limit=None,
        )
        stats = sim.stats()["keys"]["flow"]
    assert result["counts"]["succeeded"] == 40
    assert stats["max_active"] <= 5, stats
    assert stats["submits_refused"] == 0, stats
    assert result["shard_count"] == 1 and result["key_max_active"] == 24
