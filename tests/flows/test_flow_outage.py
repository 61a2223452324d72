"""A shard whose API stays away longer than ``api_outage_wait`` fails with the run's message
(not an internal error), and the flow's shard retry resumes it once the API is back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from flow_helpers import PROMPTS, write_catalog

from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer
from pipeline.spec import RunSpec

pytestmark = pytest.mark.usefixtures("prefect_api")

SECRET = "sk-flow-outage-2b8d41"


async def test_a_shard_stopped_by_an_outage_fails_and_its_retry_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.catalog as catalog
    from pipeline.run import arun_manifest

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    monkeypatch.setattr(catalog, "RETRY_DELAY_S", 2)
    failures: list[BaseException] = []
    failed = asyncio.Event()

    async def watched(manifest: Any, out: Any, **kwargs: Any) -> Any:
        try:
            return await arun_manifest(manifest, out, **kwargs)
        except BaseException as exc:
            failures.append(exc)
            failed.set()
            raise

    monkeypatch.setattr(catalog, "arun_manifest", watched)
    rows = [(f"r{n:02d}", PROMPTS[n % len(PROMPTS)], f"S{n}") for n in range(1, 41)]
    manifest = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    config = SimConfig(
        keys=[KeyConfig(name="flow", key=SECRET, max_active=6)],
        latency=LatencyConfig(median_s=0.3, p95_s=0.6),
    )
    async with SimServer(config) as sim:

        async def outage() -> None:
            while True:
                if sim.stats()["keys"]["flow"]["submits_accepted"] >= 10:
                    break
                await asyncio.sleep(0.01)
            await sim.stop_listening()
            await failed.wait()  # the shard gives up after its 1 s wait
            await sim.listen_again()  # back before the shard's retry (2 s later)

        down = asyncio.create_task(outage())
        state = await catalog.generate_catalog(
            str(manifest),
            RunSpec(out=str(out), api_url=sim.url, max_active=6, api_outage_wait=1),
            shard_size=100,
            # No global limit: one made here with this key's 6 slots would outlive the test
            # in the session's Prefect server and narrow the other flow tests' shares.
            concurrency_limit=None,
            return_state=True,
        )
        await asyncio.wait_for(down, timeout=30)
        stats = sim.stats()["keys"]["flow"]

    assert state.is_completed(), state.message
    (stopped,) = failures
    assert type(stopped).__name__ == "ApiUnreachable"
    assert f"the API at {sim.url} has not answered for 1 s" in str(stopped)
    shard = json.loads((out / ".klein/shards/0/run.json").read_text())
    assert shard["resumed_rows"] > 0  # the retry polled what the stopped attempt had sent
    assert stats["submits_accepted"] == len(rows) + stats["duplicate_submits"]
    assert stats["duplicate_submits"] <= shard["ambiguous_submits"]
    done = pl.read_parquet(out / "manifest.parquet")
    assert done["status"].to_list() == ["succeeded"] * len(rows)
