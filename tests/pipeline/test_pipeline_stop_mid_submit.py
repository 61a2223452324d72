"""A run stopped while its submits are in the air journals their answers: no image twice.

The API creates and charges a task before its answer leaves. A run cancelled at Ctrl-C
used to drop the submits it had in the air: their tasks were charged with nobody knowing
their ids, and the rerun sent the rows again (a CI run: 41.4 credits charged on
``--max-credits 30``). The simulator here answers every submit 1.5 s after charging it, so
a Ctrl-C always finds submits in the air.
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pytest
from pipeline_helpers import SimProcess, capped_run, ctrl_c_when, run_cli, write_catalog
from test_pipeline_resume import acked

from pipeline.contract import KLEIN_MODEL
from pipeline.sim import SimConfig

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
