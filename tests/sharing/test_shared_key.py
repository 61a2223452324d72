"""Pipeline jobs and an interactive app on one simulator key.

The scenario is ``benchmarks/sharing.py``'s: each job is its own process, as two scheduled
jobs would be, and so is the simulator; the app (a request every two seconds or so,
sometimes two at once, never polled) grabs slots at random moments. After a warm-up (the
jobs start together, the first to submit fills the key and the other joins a full one,
and the controller has to even that out: 20 s) the simulator's counters are read over 25 s,
some 500 submits: 429s must stay under 2% of the jobs' submits, the key's slots must be
at least 90% busy, and each job must get at least half the images the other gets. Both
jobs are then stopped with SIGINT, as Ctrl-C would, and must exit promptly (130) without a
traceback. The three bounds are statistics over one window: when one is missed, the
scenario runs once more (same bounds) and that run decides; exits, tracebacks and the
key's limit are checked in both.

Tasks take about a second (median 1 s, p95 2 s): what a job loses to the key being shared
is the time between a task finishing on the server and the job noticing, so the scenario
keeps that small against a task's duration even on a loaded CI machine.

One job beside the app (webhooks) must keep the key at least 80% busy and leave the app
at least a third of its requests: at the moment the key fills, the app's request or two
looks like a second job's first slot, and a job that halved its window for it and grew
back at AIMD's pace kept the key 66-73% busy; one that took the room back up to the whole
key took 4-11 of the app's 36 requests (benchmarks/notes.md "Session 36"). The job's one
deep cut, for the app's first 429, may fall inside the window: 84-94% busy.

The two jobs run twice over: with webhooks (what production integrations are told to use; the
server tells a job the moment a task ends) in every CI run, and polling on demand
(KLEIN_SHARING=1). Polling notices a finished task some 30 ms late at ~15 polls per image,
which leaves the 2% / 90% bounds a thinner margin (RESULTS.md, "Sharing a key").
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.sharing import SLOTS, Figures, measure, simulator

#: The warm-up covers the start, where a job joins a key the other filled first. With
#: session 34's controller that took up to 20 s (its first slot up to 18.5 s, then up to
#: 12 s at 13-19 of the 24 slots while its window grew), and after a 10 s warm-up 3 of 19
#: windows beside the suite's parallel part read 89.4-90.8% busy; after 20 s, 9 of 9 read
#: 93.5-96.9%. Session 35's controller takes about 3 s (12 of 12 windows after 10 s within
#: the bounds, idle machine); the 20 s stay, for a busier machine than that
#: (benchmarks/notes.md "Session 34", "Session 35"). The window is shorter than the
#: benchmark's 40 s; the bounds are 2% 429s, 90% busy and fairness 0.5.
WARMUP_S, WINDOW_S = 20.0, 25.0
DEBUG = [os.environ["DBG"]] if os.environ.get("DBG") else []

POLLING_ON_DEMAND = pytest.mark.skipif(
    os.environ.get("KLEIN_SHARING") != "1",
    reason="on demand (KLEIN_SHARING=1): polling sits closer to the 2% / 90% bounds",
)


@pytest.mark.slow(seconds=50)
@pytest.mark.serial  # shares of the CPU would decide the 2% / 90% bounds
@pytest.mark.parametrize("delivery", ["webhooks", pytest.param("polling", marks=POLLING_ON_DEMAND)])
async def test_two_jobs_and_an_app_share_a_key_politely(tmp_path: Path, delivery: str) -> None:
    await _decided(tmp_path, delivery, jobs=2, warmup_s=WARMUP_S, bounds=_statistical_misses)


@pytest.mark.slow(seconds=45)
@pytest.mark.serial  # shares of the CPU would decide the 80% bound
async def test_one_job_beside_an_app_keeps_the_key_busy_and_leaves_the_app_room(
    tmp_path: Path,
) -> None:
    # 15 s: one job has no newcomer to make room for; the app's first request comes
    # within seconds.
    await _decided(tmp_path, "webhooks", jobs=1, warmup_s=15.0, bounds=_app_misses)


async def _decided(
    tmp_path: Path,
    delivery: str,
    *,
    jobs: int,
    warmup_s: float,
    bounds: Callable[[Figures], list[str]],
) -> None:
    figures = await _scenario(tmp_path / "first", delivery, jobs, warmup_s)
    missed = bounds(figures)
    if missed:
        # The 2% / 90% / one-half bounds are statistics over 25 s on a machine that is
        # also running other things: one scenario more decides, with the same bounds.
        # A warning, not a print: it reaches the summary of a run that passes too, so CI
        # logs say how often the first scenario misses, and by what.
        warnings.warn(
            f"first scenario missed {missed}: {figures.line()}; running it once more",
            stacklevel=1,
        )
        figures = await _scenario(tmp_path / "second", delivery, jobs, warmup_s)
        missed = bounds(figures)
    assert not missed, f"{missed}: {figures.line()}"


async def _scenario(workdir: Path, delivery: str, jobs: int, warmup_s: float) -> Figures:
    """One scenario, with the checks no rerun may excuse: prompt exits, no traceback, the
    key's limit, and (webhooks) the server telling the jobs."""
    await asyncio.to_thread(workdir.mkdir)
    with simulator(workdir) as sim:
        figures = await measure(
            sim,
            workdir,
            jobs=jobs,
            delivery=delivery,
            warmup_s=warmup_s,
            window_s=WINDOW_S,
            debug=DEBUG,
        )
    report = figures.line()
    print(report)
    for code, err in zip(figures.exit_codes, figures.errors, strict=True):
        assert code == 130, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    assert figures.peak_active <= SLOTS, report
    assert figures.submits > 0, report
    if delivery == "webhooks":  # the server told the jobs; they did not have to ask
        assert figures.webhooks_sent > 0, report
        assert figures.polls_per_image < 1.0, report
    return figures


def _statistical_misses(figures: Figures) -> list[str]:
    """The bounds a 25 s window measures statistically, each one that was missed."""
    missed = []
    if not figures.refused_429 < 0.02 * figures.submits:
        missed.append("429s >= 2% of submits")
    if not figures.occupancy >= 0.90:
        missed.append("occupancy < 90%")
    if not figures.fairness >= 0.5:
        missed.append("one job got less than half the other's images")
    return missed


def _app_misses(figures: Figures) -> list[str]:
    """The bounds of one job beside the app, each one that was missed."""
    missed = []
    if not figures.occupancy >= 0.80:
        missed.append("occupancy < 80%")
    if not 2 * figures.app_accepted >= figures.app_refused:
        missed.append("the app got less than a third of its requests")
    if not figures.refused_429 < 0.02 * figures.submits:
        missed.append("429s >= 2% of submits")
    return missed
