"""The progress display: plain log lines for cron, a live bar for people, never a crash."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading

import pytest

from pipeline.progress import ProgressDisplay, format_duration, format_line
from pipeline.summary import ProgressSnapshot

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def snap(done: int, elapsed: float, total: int = 100) -> ProgressSnapshot:
    return ProgressSnapshot(
        total=total,
        counts={
            "succeeded": done - 2 if done >= 2 else done,
            "failed": min(done, 1),
            "moderated": min(done, 1) if done >= 2 else 0,
            "rejected": 0,
        },
        in_flight=7,
        images_per_s=2.5,
        credits=done * 1.05,
        elapsed_s=elapsed,
        eta_s=(total - done) / 2.5,
    )


class Broken(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("disk full")


def test_plain_lines_every_interval_and_one_at_the_end() -> None:
    stream = io.StringIO()
    with ProgressDisplay(stream=stream, interval_s=5.0) as display:
        assert display.mode == "plain"  # a StringIO is not a terminal
        for second in range(13):
            display(snap(done=second * 3, elapsed=float(second)))
    lines = stream.getvalue().splitlines()
    # t=0, t=5, t=10, and the final snapshot (t=12) at exit.
    assert len(lines) == 4
    assert lines[0].startswith("progress 0/100 (0.0%)")
    assert lines[1].startswith("progress 15/100 (15.0%)")
    assert lines[-1].startswith("progress 36/100 (36.0%)")
    last = lines[-1]
    for part in (
        "succeeded 34",
        "failed 1",
        "moderated 1",
        "rejected 0",
        "in flight 7",
        "2.50 img/s",
        "ETA 26s",
        "37.80 credits",
        "elapsed 12s",
    ):
        assert part in last
    assert not ANSI.search(stream.getvalue())


def test_at_the_end_the_line_says_what_the_run_waits_for_not_the_rate_s_eta() -> None:
    """Once every row left is a task in flight, the rate's ETA (3 rows at 2.5 img/s: 1 s)
    says nothing of a tail task that may run a minute more: the line says how many are
    left and how long the oldest has run."""
    waiting = snap(done=97, elapsed=40.0)
    waiting.eta_s, waiting.last_running_s = None, 45.2
    assert "ETA ? (last 3 tasks, running up to 45s)" in format_line(waiting)
    last = snap(done=99, elapsed=90.0)
    last.eta_s, last.last_running_s = None, 81.0
    assert "ETA ? (the last task, running 1m21s)" in format_line(last)
    assert "ETA 26s" in format_line(snap(done=35, elapsed=12.0))  # before the end: the rate
    just = snap(done=80, elapsed=0.5)
    just.eta_s, just.last_running_s = None, 0.4  # a run of a key's worth, just submitted
    assert "ETA ? (last 20 tasks in flight)" in format_line(just)


def test_final_line_not_repeated_when_already_printed() -> None:
    stream = io.StringIO()
    with ProgressDisplay(stream=stream, mode="plain", interval_s=5.0) as display:
        display(snap(done=100, elapsed=0.0))
    assert len(stream.getvalue().splitlines()) == 1


def test_no_snapshot_no_output() -> None:
    stream = io.StringIO()
    with ProgressDisplay(stream=stream, mode="plain"):
        pass
    assert stream.getvalue() == ""


def test_bar_mode_draws_counts_rate_eta_and_credits() -> None:
    stream = io.StringIO()
    with ProgressDisplay(stream=stream, mode="bar") as display:
        display(snap(done=40, elapsed=10.0))
    text = ANSI.sub("", stream.getvalue())
    assert "40/100" in text
    assert "succeeded 38" in text and "failed 1" in text and "moderated 1" in text
    assert "2.50 img/s" in text
    assert "ETA 24s" in text
    assert "42.00 credits" in text


@pytest.mark.parametrize("mode", ["plain", "bar"])
def test_a_broken_stream_never_stops_the_run(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    with ProgressDisplay(stream=Broken(), mode=mode) as display:  # type: ignore[arg-type]
        for second in range(3):
            display(snap(done=second, elapsed=float(second * 10)))
    assert "progress display turned off (OSError: disk full)" in capsys.readouterr().err


def test_off_mode_is_silent() -> None:
    stream = io.StringIO()
    with ProgressDisplay(stream=stream, mode="off") as display:
        display(snap(done=1, elapsed=1.0))
    assert stream.getvalue() == ""


def test_snapshots_from_another_thread() -> None:
    stream = io.StringIO()
    with ProgressDisplay(stream=stream, mode="plain", interval_s=1.0) as display:
        worker = threading.Thread(
            target=lambda: [display(snap(done=i, elapsed=float(i))) for i in range(5)]
        )
        worker.start()
        worker.join()
    assert len(stream.getvalue().splitlines()) == 5


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of auto, bar, plain, off"):
        ProgressDisplay(mode="fancy")  # type: ignore[arg-type]


def test_durations_and_empty_totals() -> None:
    assert format_duration(None) == "?"
    assert format_duration(float("nan")) == "?"
    assert format_duration(9.4) == "9s"
    assert format_duration(245) == "4m05s"
    assert format_duration(3725) == "1h02m"
    empty = ProgressSnapshot(
        total=0, counts={}, in_flight=0, images_per_s=0.0, credits=0.0, elapsed_s=0.0, eta_s=None
    )
    assert format_line(empty).startswith("progress 0/0 (100.0%)")


def test_auto_mode_writes_plain_lines_to_a_pipe() -> None:
    script = (
        "from pipeline.progress import ProgressDisplay\n"
        "from pipeline.summary import ProgressSnapshot\n"
        "with ProgressDisplay() as display:\n"
        "    for i in range(3):\n"
        "        display(ProgressSnapshot(total=3, counts={'succeeded': i}, in_flight=1,\n"
        "                images_per_s=1.0, credits=float(i), elapsed_s=i * 10.0, eta_s=1.0))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = result.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "progress 0/3",
        "progress 1/3",
        "progress 2/3",
    ]
    assert not ANSI.search(result.stdout)


def test_a_budget_stop_line_leaves_rejected_rows_out_of_the_share() -> None:
    stopped = ProgressSnapshot(
        total=10,
        counts={"succeeded": 2, "rejected": 2, "skipped": 6},
        in_flight=0,
        images_per_s=1.0,
        credits=2.8,
        elapsed_s=2.0,
        eta_s=None,
        stopped="budget",
    )
    assert format_line(stopped).startswith(
        "stopped: budget · 2 of 8 images made (25%); 2 rejected rows left out · "
    )
    assert stopped.made_share == 0.25
