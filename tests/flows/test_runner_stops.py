"""A shard runner stops when its night is cancelled, even if the cancellation never reaches
its process (a worker that did not get it, a server that refused it: "database is locked").

The runner is the `generate-catalog-shard` flow with a queue, run here in-process against
the session's Prefect server and the simulator on 127.0.0.1; the night is a flow run of its
own that the test cancels through the server, as `prefect flow-run cancel` does.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from flow_helpers import PROMPTS, write_catalog

from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer
from pipeline.spec import RunSpec

pytestmark = pytest.mark.usefixtures("prefect_api")

SECRET = "sk-runner-stops-3b8e1d"
ROWS = 60


async def test_a_runner_stops_when_its_night_is_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Running

    import flows.catalog as catalog

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    monkeypatch.setattr(catalog, "NIGHT_CHECK_S", 0.5)
    manifest = write_catalog(
        tmp_path / "catalog.csv",
        [(f"n{n:02d}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, ROWS + 1)],
    )
    out = tmp_path / "out"

    @flow(name="a-night")
    def night() -> None: ...

    config = SimConfig(
        keys=[KeyConfig(name="night", key=SECRET, max_active=2)],
        latency=LatencyConfig(median_s=0.4, p95_s=0.8),
    )
    async with get_client() as client, SimServer(config) as sim:
        parent = await client.create_flow_run(night, state=Running())
        job = catalog.ShardJob(
            index=0,
            count=2,
            manifest=str(manifest),
            spec=RunSpec(out=str(out), api_url=sim.url),
            max_active=2,
            submits_per_minute=600,
            key_max_active=2,
            concurrency_limit=None,
            token=f"{parent.id}-test",
        )
        queue = catalog.ShardQueue(total_rows=ROWS, shards=2, night=str(parent.id))
        runner = asyncio.create_task(catalog.generate_catalog_shard(job, queue, return_state=True))
        deadline = time.monotonic() + 60
        while sim.stats()["keys"]["night"]["submits_accepted"] < 4:
            assert time.monotonic() < deadline and not runner.done()
            await asyncio.sleep(0.1)
        # The server marks the night cancelled; nothing tells the runner's process.
        await client.set_flow_run_state(parent.id, Cancelled(), force=True)
        state = await asyncio.wait_for(runner, timeout=30)
        submitted = sim.stats()["keys"]["night"]["submits_accepted"]
        await asyncio.sleep(1.5)
        stats = sim.stats()["keys"]["night"]

    assert state.is_cancelled(), state
    assert stats["submits_accepted"] == submitted < ROWS  # nothing sent after it stopped
    # Neither shard was finished: the night's rerun resumes them from their journals.
    for index in (0, 1):
        info = out / f".klein/shards/{index}/shard.json"
        assert not info.exists() or json.loads(info.read_text())["token"] != job.token


async def test_a_sigterm_after_the_night_s_cancel_lets_the_shards_finish_stopping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The runner saw the night cancelled and cancelled its shards, which now wait for the
    answers to their submits in the air; the SIGTERM of the same cancellation comes a
    moment later and cancels the runner again. That second cancellation must not reach the
    shards (it cut their wait short: a task the API charged went unjournaled), and the
    runner still ends cancelled once they have stopped."""
    from flows import catalog

    night_cancelled = asyncio.Event()

    async def cancelled(night: object) -> None:
        await night_cancelled.wait()

    monkeypatch.setattr(catalog, "_cancelled", cancelled)
    stopped: list[str] = []

    async def shards() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # the answers to its submits in the air, then journaled
            stopped.append("answers journaled")
            raise

    night = "5f0c2b1e-8d7a-4c3b-9e6f-2a1d0c9b8e7f"
    runner = asyncio.ensure_future(catalog._unless_the_night_is_cancelled(shards(), night))
    await asyncio.sleep(0.05)
    night_cancelled.set()
    await asyncio.sleep(0.05)
    runner.cancel()  # the SIGTERM's cancellation, on top
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert stopped == ["answers journaled"]
