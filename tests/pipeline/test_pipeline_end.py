"""The end of a run: its last task is noticed soon after it ends, not a back-off later."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pipeline_helpers import key_stats, run_against, write_catalog

from pipeline.sim import SimServer
from pipeline.sim.config import LatencyConfig


@pytest.mark.serial
def test_the_last_task_is_noticed_soon_after_it_ends(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    # A long tail: most tasks take about 50 ms, a few up to three seconds, and the run can
    # end only once the last of those is noticed.
    server = start_sim(latency=LatencyConfig(median_s=0.05, p95_s=2.0, cap_s=3.0))
    rows = 30
    summary = run_against(server, write_catalog(tmp_path / "in", rows), tmp_path / "out")
    assert summary.counts["succeeded"] == rows
    stats = key_stats(server)
    assert stats["finishes_polled"] == rows
    # On its back-off (half its age) or once a second as one of the last two, the last task
    # was noticed 0.6-1.1 s late; in the tail each task is now polled within a share of the
    # learned median (at least 0.1 s) times the number left, and by when it has more likely
    # ended than not: 0.01-0.13 s late.
    assert stats["last_finish_poll_lag_s"] < 0.3, stats
    # Neither rule polls a task more than ten times a second: a few more polls than the
    # back-off's (125-140 against 113-124).
    assert stats["polls"] < 8 * rows, stats
