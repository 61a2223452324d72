"""A run stopped while its submits are in the air journals their answers: no image twice.

The API creates and charges a task before its answer leaves. A run cancelled at Ctrl-C
used to drop the submits it had in the air: their tasks were charged with nobody knowing
their ids, and the rerun sent the rows again (a CI run: 41.4 credits charged on
``--max-credits 30``). The simulator here answers every submit 1.5 s after charging it, so
a Ctrl-C always finds submits in the air.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from pipeline_helpers import (
    SIM_KEY,
    SimProcess,
    capped_run,
    ctrl_c_when,
    fast_options,
    key_stats,
    run_cli,
    write_catalog,
)
from test_pipeline_interrupt import ambiguous
from test_pipeline_resume import acked

from pipeline import limits
from pipeline.contract import KLEIN_MODEL
from pipeline.run import arun_manifest
from pipeline.sim import FaultConfig, KeyConfig, SimConfig, SimServer

ROWS = 30
EACH = SimConfig().price(KLEIN_MODEL).credits(1024, 1024)
#: Room for 14 images: fewer than the rows, so a row paid twice shows as a budget passed.
CAP = round(14 * EACH, 2)
SIM_TOML = """
[latency]
median_s = 0.5
p95_s = 0.9

[faults]
submit_answer_delay_s = 1.5

[[keys]]
name = "demo"
key = "sim-demo-key"
max_active = 12
"""


@pytest.mark.slow
def test_ctrl_c_with_submits_in_the_air_journals_their_tasks_and_the_rerun_pays_once(
    sim_process: SimProcess, tmp_path: Path
) -> None:
    manifest = write_catalog(tmp_path / "in", ROWS)
    out = tmp_path / "out"
    ledger = out / ".klein" / "ledger.sqlite"
    command = capped_run(manifest, out, sim_process.url, CAP)

    def not_yet_answered() -> None:
        assert len(acked(ledger)) < sim_process.stats()["submits_accepted"]

    # Charged by the API, not yet answered: the first answer leaves 1.5 s after.
    code, stderr = ctrl_c_when(
        command,
        lambda: sim_process.stats()["submits_accepted"] >= 4,
        "submits taken by the simulator",
        before=not_yet_answered,
    )
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert "stopping: waiting up to 10 s for the answers to" in stderr  # why it is not at once
    # Every task the API charged is in the journal, to be polled, not paid again.
    sent = sim_process.stats()["submits_accepted"]
    assert len(acked(ledger)) == sent >= 4

    rerun = run_cli(command)
    assert "Traceback" not in rerun.stderr
    time.sleep(0.2)  # let the simulator settle its counters
    stats = sim_process.stats()
    table = pl.read_parquet(out / "manifest.parquet")
    made = table.filter(pl.col("status") == "succeeded")
    assert stats["submits_accepted"] == made.height  # one task per image made
    assert round(float(stats["credits_charged"]), 2) == pytest.approx(made.height * EACH)
    assert float(stats["credits_charged"]) <= CAP + 1e-6
    assert made.height == int(CAP // EACH)


def test_a_row_whose_turn_to_submit_comes_after_the_stop_is_not_sent(
    start_sim: Callable[..., SimServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop lands while a row, its slot taken, waits for its turn under the submit
    rate. It was sent all the same once its turn came (and every row after it): a submit
    started after the settling wait had ended was cut off on the wire, its task charged
    and never journaled (2 submits left waiting in a double-Ctrl-C'd flow's journals).
    Now only the submit already in the air is answered and journaled; nothing else goes."""
    server = start_sim(
        keys=[KeyConfig(max_active=2)], faults=FaultConfig(submit_answer_delay_s=1.0)
    )
    manifest = write_catalog(tmp_path / "in", 3)
    out = tmp_path / "out"
    real = limits.SubmitRateLimiter.acquire
    turns = 0
    second_waits = asyncio.Event()

    async def acquire(self: limits.SubmitRateLimiter) -> None:
        nonlocal turns
        await real(self)
        turns += 1
        if turns == 2:  # the first row's submit is in the air (its answer comes in 1 s)
            second_waits.set()
            await asyncio.sleep(0.3)  # the stop lands meanwhile

    monkeypatch.setattr(limits.SubmitRateLimiter, "acquire", acquire)

    async def stopped_run() -> None:
        options = fast_options(max_active=2, submits_per_minute=100_000)
        run = asyncio.create_task(
            arun_manifest(manifest, out, api_url=server.url, api_key=SIM_KEY, options=options)
        )
        await second_waits.wait()
        run.cancel()  # what Ctrl-C does (``pipeline/run.py``'s ``_on_stop_signal``)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, timeout=30)

    asyncio.run(stopped_run())
    assert key_stats(server)["submits_accepted"] == 1  # 3 before: the waiting rows went
    ledger = out / ".klein" / "ledger.sqlite"
    # The one charged task, for the rerun to poll; no submit left waiting for its answer.
    assert len(acked(ledger)) == 1
    assert ambiguous(ledger) == 0
