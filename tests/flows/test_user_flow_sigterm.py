"""A data team's own Prefect flow calling ``arun_manifest``, stopped with SIGTERM (what a
worker sends to a cancelled flow run) while submits wait for their answers.

Prefect's handler raised ``TerminationSignal`` wherever the main thread was: inside a row's
task it ended that row and the run went on; in the loop's ``select``, ``asyncio.run``'s
clean-up cancelled the submits on the wire, tasks the API had charged and nobody
journaled. Now the run stops first (``pipeline.run._until_done_or_terminated``), and then
Prefect ends the flow run as before.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from flow_helpers import journal_submits, signal_when

#: The user's flow: 60 rows on an in-process simulator whose tasks take about 2 s and whose
#: answers to submits come 1.5 s after it charged them.
_FLOW = """
import asyncio, sys
from prefect import flow
from pipeline import arun_manifest
from pipeline.sim import SimConfig
from pipeline.sim.config import FaultConfig, LatencyConfig

@flow(name="team-images")
async def team_images(manifest: str, out: str) -> int:
    sim = SimConfig(
        latency=LatencyConfig(median_s=2.0, p95_s=3.0),
        faults=FaultConfig(submit_answer_delay_s=1.5),
    )
    summary = await arun_manifest(manifest, out, sim=sim, max_active=8)
    return summary.total_rows

asyncio.run(team_images(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.slow(seconds=30)
def test_sigterm_stops_a_run_in_a_users_flow_with_its_submits_journaled(
    tmp_path: Path, prefect_server: str
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,prompt\n" + "".join(f"r{n},mug number {n}\n" for n in range(60)), encoding="utf-8"
    )
    out = tmp_path / "out"
    journal = out / ".klein" / "ledger.sqlite"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FREEPIK"))}
    env |= {
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }

    def submits_waiting() -> int:  # charged by the API, their answers not yet read
        waiting = journal_submits([journal])[1]
        return waiting if waiting >= 3 else 0

    code, output, waiting = signal_when(
        [sys.executable, "-c", _FLOW, str(manifest), str(out)], env, submits_waiting, signal.SIGTERM
    )
    assert waiting >= 3, "no submits in the air"
    acked, still_waiting = journal_submits([journal])
    assert still_waiting == 0, output[-3000:]  # every charged task is known to the rerun
    assert acked >= waiting
    # The run stopped, then Prefect's handler ended the flow run and the process as before.
    assert code == -signal.SIGTERM, output[-3000:]
    summary = json.loads((out / "run.json").read_text())
    assert summary["stopped"] == "terminated", summary
    assert summary["total_rows"] == 60
    assert "waiting up to 10 s for the answers to" in output
