"""A task the API accepted but whose result never reached us is polled again, never re-paid.

Polls that fail after every retry end the row ``failed``; the task itself may well have
finished on the server and been charged. ``--retry-failed`` must collect it by its task id.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline_helpers import check_output, fast_options, key_stats, run_against, write_catalog

from pipeline.ledger import UNFETCHED_REASONS
from pipeline.sim import SimServer


def test_retry_failed_polls_a_task_whose_polls_failed_instead_of_paying_again(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    sim = start_sim()
    manifest = write_catalog(tmp_path / "in", 4)
    out = tmp_path / "out"
    sim.config.faults.poll.error_503 = 1.0  # every poll fails: no result reaches us

    first = run_against(sim, manifest, out)

    assert first.counts["failed"] == 4
    failed = check_output(out, 4)
    assert all(reason.startswith(UNFETCHED_REASONS) for reason in failed["reason"])
    assert failed["task_id"].null_count() == 0
    assert key_stats(sim)["submits_accepted"] == 4  # the API took (and will charge) all four

    sim.config.faults.poll.error_503 = 0.0
    again = run_against(sim, manifest, out, options=fast_options(retry_failed=True))

    assert again.counts["succeeded"] == 4
    assert key_stats(sim)["submits_accepted"] == 4  # collected by task id, not paid again
    done = check_output(out, 4)
    assert done["task_id"].to_list() == failed["task_id"].to_list()
