"""The shapes a run reports itself in: live progress snapshots and the final summary.

The CLI renders these, ``run.json`` serialises ``RunSummary``, and the Python API returns it,
so all three always agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import IntEnum

from pipeline.contract import MERGED_STATUS, RowStatus


class ExitCode(IntEnum):
    """The CLI's documented exit codes."""

    #: Every row of the manifest succeeded.
    OK = 0
    #: The run finished, but some rows ended moderated, failed, rejected or skipped.
    PARTIAL = 1
    #: The run could not start: bad options, unreadable manifest, missing API key, ...
    CANNOT_START = 2
    #: The API did not answer for ``--api-outage-wait`` seconds (sysexits' EX_UNAVAILABLE).
    UNAVAILABLE = 69
    #: An internal error (a bug in klein-batch).
    INTERNAL = 70
    #: The output or its journal could not be written (sysexits' EX_IOERR).
    STORAGE = 74
    #: Ctrl-C (128 + SIGINT, the shell's convention): the same command resumes.
    INTERRUPTED = 130
    #: SIGTERM (128 + 15): handled as Ctrl-C, resumable.
    TERMINATED = 143


#: Why a run stopped before every row ended (``RunSummary.stopped``; run.json's ``state`` is
#: ``stopped: <reason>``), with the exit code the process ends with. None: the counts decide
#: (a budget stop exits 1, since rows were skipped). Every reason but the budget's is
#: resumed by running the same command again.
STOP_EXIT_CODES: dict[str, ExitCode | None] = {
    "budget": None,
    "interrupted": ExitCode.INTERRUPTED,
    "terminated": ExitCode.TERMINATED,
    "key refused": ExitCode.CANNOT_START,
    "api unreachable": ExitCode.UNAVAILABLE,
    "output not writable": ExitCode.STORAGE,
}

#: What to do after each kind of stop, as the summary, report.html and status say it.
STOP_ADVICE: dict[str, str] = {
    "budget": "rerun with a higher --max-credits to continue",
    "interrupted": "Ctrl-C stopped it; run the same command again to resume (no "
    "acknowledged task is paid for twice)",
    "terminated": "SIGTERM stopped it; run the same command again to resume (no acknowledged "
    "task is paid for twice)",
    "key refused": "the API refused the key and nothing was submitted; set the right key "
    "and run the same command again",
    "api unreachable": "the API did not answer for --api-outage-wait seconds; run the same "
    "command again once it answers (nothing is lost or paid twice)",
    "output not writable": "the output or its journal could not be written; free space or "
    "fix the permissions and run the same command again",
}


def stop_advice(reason: str) -> str:
    """What a person should do after a run stopped for ``reason`` (unknown: resume)."""
    return STOP_ADVICE.get(reason, "run the same command again to resume")


@dataclass(slots=True)
class ProgressSnapshot:
    """What the progress display shows; sent a few times a second while a run goes."""

    total: int
    counts: dict[str, int]
    in_flight: int
    images_per_s: float
    credits: float
    elapsed_s: float
    eta_s: float | None
    #: Why the run stops short of its rows (``budget``), once it does; None otherwise.
    stopped: str | None = None
    #: Seconds the API has not answered while it does not (rows wait); None while it does.
    api_unreachable_s: float | None = None
    #: Once every row left is a task in flight: how long the oldest of them has run. The
    #: rate's ETA says nothing then (under a heavy tail it said 5 s for a last task that
    #: took 90 s), so the display says what the run waits for instead. None before.
    last_running_s: float | None = None

    @property
    def left(self) -> int:
        return max(0, self.total - self.done)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    @property
    def made_share(self) -> float:
        """Images made as a share of the images a higher budget could make (what a budget
        stop leaves; rejected rows never make one)."""
        makeable = self.total - self.counts.get(RowStatus.REJECTED, 0)
        return self.counts.get(RowStatus.SUCCEEDED, 0) / makeable if makeable > 0 else 1.0


def budget_made(made: int, asked: int, rejected: int) -> str:
    """How much a budget stop made: "2 of 8 images made (25%)", counted over the rows that
    can make an image. A rejected row never does, whatever the budget, so counting it told
    a merchandiser that a higher ``--max-credits`` would make images it cannot."""
    makeable = max(0, asked - rejected)
    share = 100.0 * made / makeable if makeable else 100.0
    text = f"{made:,} of {makeable:,} images made ({share:.0f}%)"
    if rejected:
        text += f"; {rejected:,} rejected {'row' if rejected == 1 else 'rows'} left out"
    return text


#: Keys of changed rows named in the summary (``RunSummary.changed_examples``).
CHANGED_EXAMPLES = 5


@dataclass(slots=True)
class RunSummary:
    """A finished run, as `run.json` records it and `run_manifest` returns it."""

    run_id: str
    manifest: str
    output: str
    dialect: str
    tier: str
    max_active: int
    submits_per_minute: int
    total_rows: int
    counts: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0
    images_per_s: float = 0.0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    credits: float = 0.0
    #: Credits every run into this output spent so far, plus tasks still in flight: what a
    #: budget counts (a flow's shards report it so unused budget can go to other shards).
    committed_credits: float = 0.0
    #: Of ``credits``, what tasks an earlier run submitted and this one finished cost
    #: (charged to that run's submit: collected here, not paid again).
    credits_acked_earlier: float = 0.0
    submits: int = 0
    retries: int = 0
    rate_limited: int = 0
    polls: int = 0
    #: Times the API's task list was read to learn which tasks ended (``task_list``).
    task_lists: int = 0
    #: Tasks whose end was learned from a verified webhook rather than a poll.
    webhooks: int = 0
    #: Submits whose response was lost (dropped connection, kill); each may have been paid.
    ambiguous_submits: int = 0
    resumed_rows: int = 0
    #: Rows kept as an earlier run made them (or polled) though the manifest now asks them
    #: for another prompt or settings; the first few keys in ``changed_examples``.
    changed_rows: int = 0
    changed_examples: list[str] = field(default_factory=list)
    #: Rows whose image was copied from the library (``--library``): no submit, no cost.
    reused_rows: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    #: What ``--webhook-listen``'s receiver saw: deliveries accepted, duplicates, refusals by
    #: reason and connections closed on arrival (a flood shows here, not in failed rows).
    webhook_receiver: dict[str, object] = field(default_factory=dict)
    #: Why the run stopped before every row ended, one of ``STOP_EXIT_CODES``: ``budget``
    #: (``--max-credits``), ``interrupted`` (Ctrl-C), ``terminated`` (SIGTERM), ``key
    #: refused``, ``api unreachable``, ``output not writable``; None when it finished.
    stopped: str | None = None
    #: What the run noticed about its input that stopped nothing, e.g. columns that look
    #: like a size request it does not read (``pipeline.manifest.size_notice``).
    notices: list[str] = field(default_factory=list)
    #: Seconds during which the API (or the host of its results) did not answer and rows
    #: waited for it, and how many times it stopped answering (``pipeline/gate.py``).
    api_unreachable_s: float = 0.0
    api_outages: int = 0

    @property
    def elapsed_s(self) -> float:
        return max(0.0, self.finished_at - self.started_at)

    @property
    def succeeded(self) -> int:
        return self.counts.get(RowStatus.SUCCEEDED, 0)

    @property
    def images_asked(self) -> int:
        """Rows that ask for an image (lines merged into another's image do not)."""
        return self.total_rows - self.counts.get(MERGED_STATUS, 0)

    @property
    def state(self) -> str:
        """``finished``, or ``stopped: <reason>`` (``stopped: budget``, ``stopped:
        interrupted``, ...) when the run ended before every row did."""
        return f"stopped: {self.stopped}" if self.stopped else "finished"

    @property
    def exit_code(self) -> ExitCode:
        """The process's exit code: a stop's own (130 after Ctrl-C, ...), else 0 or 1."""
        code = STOP_EXIT_CODES.get(self.stopped) if self.stopped else None
        if code is not None:
            return code
        # Lines merged into another line's image (product exports) are not rows that failed.
        done = self.succeeded + self.counts.get(MERGED_STATUS, 0)
        return ExitCode.OK if done == self.total_rows else ExitCode.PARTIAL

    def changed_warning(self) -> str:
        """Rows kept although their request changed: said, since the image in DEST is not
        what the manifest asks for now, and how to make them anew at no cost for the rest."""
        shown = ", ".join(self.changed_examples)
        more = ", ..." if self.changed_rows > len(self.changed_examples) else ""
        if self.changed_rows == 1:
            rows, its = "1 row asks", "its"
        else:
            rows, its = f"{self.changed_rows:,} rows ask", "their"
        return (
            f"warning: {rows} for another prompt or settings than when {its} image was made "
            f"({shown}{more}); kept as made, since a rerun never pays for a key again. To "
            "make them anew, run into a new --out (with --library, the images the library "
            "holds are copied there at no cost)"
        )

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        data["exit_code"] = int(self.exit_code)
        data["state"] = self.state
        return data
