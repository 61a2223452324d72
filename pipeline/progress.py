"""Showing a run's progress: a live bar for people, plain lines for logs.

A person at a terminal wants one bar that redraws in place; a cron job's log wants a line
every few seconds that still reads well in ``less``. Progress is only ever a view: any
failure while drawing it is swallowed (once, with a note) so it can never stop a run that is
spending real credits.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, Self, TextIO

from pipeline.contract import RowStatus
from pipeline.summary import ProgressSnapshot, budget_made

if TYPE_CHECKING:
    from rich.progress import TaskID

    from pipeline.progress_bar import TwoLineProgress

Mode = Literal["auto", "bar", "plain", "off"]
MODES: Final = ("auto", "bar", "plain", "off")

#: Order the per-status counts are shown in; the ones a person watches first come first.
_SHOWN: Final = (
    RowStatus.SUCCEEDED,
    RowStatus.FAILED,
    RowStatus.MODERATED,
    RowStatus.REJECTED,
    RowStatus.SKIPPED,
)


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``4m05s``, ``12s``: short enough for a bar, exact enough to plan with."""
    if seconds is None or seconds != seconds or seconds < 0:  # None, NaN or nonsense
        return "?"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _counts(snapshot: ProgressSnapshot) -> str:
    parts = [f"{status.value} {snapshot.counts.get(status, 0)}" for status in _SHOWN[:4]]
    skipped = snapshot.counts.get(RowStatus.SKIPPED, 0)
    if skipped:
        parts.append(f"skipped {skipped}")
    return " · ".join(parts)


def _waiting(snapshot: ProgressSnapshot) -> str:
    """Said while the API does not answer: a run standing still is waiting, not stuck."""
    if snapshot.api_unreachable_s is None:
        return ""
    return f" · API unreachable for {format_duration(snapshot.api_unreachable_s)}, waiting"


def format_eta(snapshot: ProgressSnapshot) -> str:
    """The ETA from the rate; at the run's end, what it waits for: ``? (last 3 tasks,
    running up to 45s)``. Under a heavy tail the rate's figure said 5 s for 90 s."""
    if snapshot.last_running_s is None:
        return format_duration(snapshot.eta_s)
    left = snapshot.left
    tasks = "the last task" if left == 1 else f"last {left} tasks"
    if snapshot.last_running_s < 1.0:  # just submitted (a run of a key's worth or less)
        return f"? ({tasks} in flight)"
    running = "running" if left == 1 else "running up to"
    return f"? ({tasks}, {running} {format_duration(snapshot.last_running_s)})"


def format_line(snapshot: ProgressSnapshot) -> str:
    """One self-contained log line: every figure a person grepping a log would look for."""
    done = snapshot.done
    percent = 100.0 * done / snapshot.total if snapshot.total else 100.0
    head = f"progress {done}/{snapshot.total} ({percent:.1f}%)"
    if snapshot.stopped:
        made = snapshot.counts.get(RowStatus.SUCCEEDED, 0)
        rejected = snapshot.counts.get(RowStatus.REJECTED, 0)
        head = f"stopped: {snapshot.stopped} · {budget_made(made, snapshot.total, rejected)}"
    return (
        f"{head} · {_counts(snapshot)}{_waiting(snapshot)}"
        f" · in flight {snapshot.in_flight} · {snapshot.images_per_s:.2f} img/s"
        f" · ETA {format_eta(snapshot)} · {snapshot.credits:.2f} credits"
        f" · elapsed {format_duration(snapshot.elapsed_s)}"
    )


class ProgressDisplay:
    """``on_progress`` callback for ``run_manifest``, used as a context manager.

    ``mode="auto"`` draws a live bar when the stream is a terminal and writes plain lines
    (one every ``interval_s`` of run time, plus one at the end) otherwise. Snapshots may
    arrive from another thread (the run's event loop), so drawing is serialised.
    """

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        mode: Mode = "auto",
        interval_s: float = 5.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
        self._stream = stream if stream is not None else sys.stdout
        #: A Jupyter kernel's cell output: rich draws the bar there as a live widget.
        self._jupyter = stream is None and in_jupyter()
        if mode == "auto":
            mode = "bar" if self._jupyter or _isatty(self._stream) else "plain"
        self.mode: Mode = mode
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last: ProgressSnapshot | None = None
        self._last_printed_at: float | None = None
        self._last_printed: ProgressSnapshot | None = None
        self._progress: TwoLineProgress | None = None
        self._task: TaskID | None = None
        self._broken = False

    def __enter__(self) -> Self:
        if self.mode == "bar":
            self._guard(self._start_bar)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __call__(self, snapshot: ProgressSnapshot) -> None:
        """Take a snapshot; never raises, whatever the terminal or stream does."""
        with self._lock:
            self._last = snapshot
            if self._broken or self.mode == "off":
                return
            if self.mode == "bar":
                self._guard(self._draw_bar, snapshot)
            elif self._due(snapshot):
                self._guard(self._print_line, snapshot)

    update = __call__

    def close(self) -> None:
        """Finish the display: the bar is left at its last state, the log gets a final line."""
        with self._lock:
            if self.mode == "bar" and self._progress is not None:
                if self._last is not None:
                    self._guard(self._draw_bar, self._last)
                self._guard(self._progress.stop)
                self._progress = None
            elif (
                self.mode == "plain"
                and self._last is not None
                and self._last is not self._last_printed
            ):
                self._guard(self._print_line, self._last)

    # --- internals ---------------------------------------------------------------------------

    def _guard(self, action: Callable[..., object], *args: object) -> None:
        if self._broken:
            return
        try:
            action(*args)
        except Exception as exc:  # a view must never take the run down with it
            self._broken = True
            with contextlib.suppress(Exception):  # stderr itself is gone: nothing left to tell
                sys.stderr.write(
                    f"note: progress display turned off ({exc.__class__.__name__}: {exc})\n"
                )

    def _due(self, snapshot: ProgressSnapshot) -> bool:
        # Run time from the snapshot, not the wall clock, so the cadence follows the run.
        if self._last_printed_at is None:
            return True
        return snapshot.elapsed_s - self._last_printed_at >= self._interval_s

    def _print_line(self, snapshot: ProgressSnapshot) -> None:
        self._stream.write(format_line(snapshot) + "\n")
        self._stream.flush()
        self._last_printed_at = snapshot.elapsed_s
        self._last_printed = snapshot

    def _start_bar(self) -> None:
        # rich only here: a log's plain lines (and every run without a terminal) skip it.
        from pipeline.progress_bar import start_bar

        self._progress, self._task = start_bar(None if self._jupyter else self._stream)

    def _draw_bar(self, snapshot: ProgressSnapshot) -> None:
        if self._progress is None or self._task is None:
            return
        self._progress.status = (
            f"{_counts(snapshot)}{_waiting(snapshot)} · in flight {snapshot.in_flight}"
        )
        if snapshot.stopped:
            self._progress.status = (
                f"stopped: {snapshot.stopped} · {100.0 * snapshot.made_share:.0f}% of the "
                f"images made · {self._progress.status}"
            )
        self._progress.update(
            self._task,
            total=snapshot.total,
            completed=snapshot.done,
            of=snapshot.total,
            rate=f"{snapshot.images_per_s:.2f} img/s",
            eta=format_eta(snapshot),
            credits=f"{snapshot.credits:.2f} credits",
        )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def in_jupyter() -> bool:
    """Whether this process is a Jupyter kernel (a notebook cell shows our output)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()  # type: ignore[attr-defined]
    except Exception:  # an odd IPython: no bar rather than no run
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
