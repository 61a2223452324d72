"""The async fan-out: submit, wait, download, verify, store; one place for retries.

One coroutine per row in flight carries the row from its submit to its outcome, so every
row ends in exactly one terminal state however its steps fail. Three things are shared:

- the ``SlotController`` and ``SubmitRateLimiter`` (``limits.py``) decide when a submit may
  go; they keep the server's slots full without waiting to learn that a task finished;
- the poll scheduler polls each task first when a learned share of tasks (``poll_quantile``)
  is done, then backs off, so most images cost one poll; where the API's task list keeps
  up with the endings (``task_list.py``), it tells which tasks ended and their slots are
  given back at once, each task polled once it is known done;
- the journal (``ledger.py``) records every acknowledged task id before anything else
  happens to it, so a rerun polls it instead of paying for it again.

Once the API acknowledged a row's task, every way the row can end goes through
``Engine._outcome``, which takes the task id, submitted_at and cost from the row's
acknowledgement (``Job.tracked``): an internal error of ours, a failed poll or download, a
refused write all keep them, and only an end the API itself gave the task lets
``--retry-failed`` pay for a new one (``Outcome.resubmit_on_retry``). Storage and journal
errors (``StorageError``) stop the whole run at once instead of failing rows one by one:
rows in flight keep their acknowledged tasks in the journal and the rerun polls them.

Every request goes through its host's gate (``pipeline/gate.py``): while the API does not
answer, rows wait there instead of spending their attempts, one request at a time checks
whether it is back, and a host silent for ``EngineSettings.outage_wait_s`` stops the run
the way a storage error does (``ApiUnreachable``).

The engine knows tasks, not dialects: requests and responses go through a ``Provider``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Protocol, TypeVar

import aiohttp
import orjson
import yarl

from pipeline import task_list
from pipeline.budget import Budget
from pipeline.contract import FORMAT_EXT, FORMAT_MIME, RowStatus
from pipeline.errors import (
    ApiUnreachable,
    KleinError,
    ReferenceError,
    ReferenceUnreachable,
    StorageError,
)
from pipeline.gate import Gates, Passage, no_answer
from pipeline.html_report import INLINE_THUMBS, THUMB_PX, THUMB_QUALITY, THUMBS_RELDIR
from pipeline.library import Entry, Library
from pipeline.limits import Permit, QuantileTracker, SlotController, SubmitRateLimiter
from pipeline.providers import ProtocolError, Provider, Submitted, TaskState
from pipeline.references import Reference, ReferenceStore
from pipeline.retry import (
    JITTER,
    RetryPolicy,
    Transient,
    backoff_s,
    parse_retry_after,
    retry_transient,
)
from pipeline.rows import ImageRequest, Outcome, Row
from pipeline.storage import Sink
from pipeline.urls import with_credentials_of
from pipeline.verdicts import reference_reason
from pipeline.verify import ImageInfo, InvalidImage, inspect_image

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Largest image body accepted from a result URL (a 2k PNG is well under this).
MAX_IMAGE_BYTES = 64 * 1024 * 1024
#: Largest submit or poll answer read (they are a few hundred bytes; see ``_read_json``).
MAX_ANSWER_BYTES = 1024 * 1024
#: A task this run was just given that a poll calls unknown (404) is not yet believed gone
#: for this long: an API's read side may learn of a task after its submit answered, and
#: taking the 404 at its word would make ``--retry-failed`` pay for the task again.
UNKNOWN_GRACE_S = 60.0

#: Consecutive 429s, with no submit accepted in between, beyond what probing explains: a
#: limit the client was not told (a per-minute limit, another job on the key). The server
#: counts refused submits against its sliding minute too, so a client that keeps knocking
#: can hold the window full for ever; from here on one scout submit goes per round, after
#: the server's Retry-After or, without one, a pause doubling from ``STORM_FIRST_PAUSE_S``
#: up to a whole minute (the window then surely drains).
STORM_REFUSALS = 8
STORM_FIRST_PAUSE_S = 0.5
STORM_MAX_PAUSE_S = 61.0

#: While another client shares the key (``SlotController.contended``), our window counts our
#: tasks until we *notice* they finished, and the others take every slot we leave idle, so
#: slow noticing costs us our share of the key. Tasks are then polled first at this share of
#: the usual first-poll time and again every ``CONTENDED_REPOLL`` of it (more polls per image,
#: only while sharing; polls count against no limit).
CONTENDED_FIRST_POLL = 0.3
CONTENDED_REPOLL = 0.05

#: One task in this many is first polled at the learned median rather than at the first-poll
#: quantile: with the first-poll quantile that fits a lognormal, which the slot controller
#: probes from (``SlotController.set_distribution``). It costs about half a poll per such
#: task; a task found done at the median also counts as done at the first-poll time.
CALIBRATE_EVERY = 4

#: Where the median estimate starts, as a share of the expected latency (where the first-poll
#: estimate starts). The slot controller probes from the lognormal through the two, so a
#: start slower than the API's tasks leaves slots idle for the run's first key's worth of
#: tasks (at the ``scale`` tier, median 0.5 s, 0.6 of the default 1 s left the quick suite's
#: 300-row runs 0.93-0.945 busy), while a start too fast costs refused probes (no credits),
#: which the trackers and the probes' threshold correct within a key's worth of answers.
#: 0.4 errs fast for tasks down to a 0.4 s median: ``scale`` 0.98 at 300 rows, ``standard``
#: and ``production`` unchanged (benchmarks/notes.md, session 15).
MEDIAN_START = 0.4

#: Once every row has been submitted, the run ends when its last task is *noticed*, and the
#: usual back-off (half the task's age, up to ``POLL_BACKOFF_CAP_S``) would add seconds to a
#: run with a heavy latency tail, or a second to a short run of half-second tasks. So each
#: task left is then polled at least every ``n`` times the drain spacing when ``n`` are
#: left (one poll per spacing in all), and no later than the moment it has more likely
#: ended than not (``Engine._likely_ended_in``): the spacing alone is shared by tasks ended
#: but not yet noticed, and left the last one to end, ending among four or five of those,
#: a second late at the ``standard`` tier. The spacing is ``DRAIN_MEDIAN_SHARE`` of the
#: learned median task time, between ``DRAIN_MIN_S`` and ``DRAIN_REPOLL_S``: under the
#: production preset (median 2.7 s) a second, as before (its last two tasks are often both
#: near the 120 s cap and alone for about a minute: a spacing of 3 s noticed the last one
#: 1.5 s late on average); at the ``scale`` tier (0.5 s) a fifth of a second, where one
#: second made a 300-row run's last task wait a second to be noticed, a fifth of its wall
#: time (``benchmarks/notes.md``). Neither rule polls a task more often than ``DRAIN_MIN_S``.
DRAIN_REPOLL_S = 1.0
DRAIN_MIN_S = 0.1
DRAIN_MEDIAN_SHARE = 0.4
#: ...or, when every task left is an earlier run's (a rerun after a kill), this share of the
#: youngest one's age, once longer: a task found running after 10 s is asked about once a
#: second, not at the pace of a median learned from other tasks or not at all.
DRAIN_AGE_SHARE = 0.1
#: A finished task waiting this long for its download means downloads lag behind the key:
#: submits then wait while ``download_concurrency`` or more wait (``_room_for_backlog``).
BACKLOG_WAIT_S = 1.0
#: The longest wait between two polls of one task (its back-off is half its age).
POLL_BACKOFF_CAP_S = 10.0
#: While the task list tells endings (``task_list``), a task's first poll waits this many
#: first-poll times: it only catches a task the list missed, as a webhook's backup does.
LIST_POLL_FACTOR = 4.0
#: How long a stopped run (Ctrl-C, SIGTERM, a cancelled flow) waits for the answers to the
#: submits it had in the air (``Engine._settle_submits``). An answer takes well under a
#: second when the API is healthy; one that has not come by then is left ambiguous.
SETTLE_SUBMITS_S = 10.0
#: Standard normal quantiles of the median and of ``EngineSettings.poll_quantile``'s default.
_Z85 = 1.0364
_normal_quantile = NormalDist().inv_cdf


class Journal(Protocol):
    """The part of the ledger the engine writes to."""

    def record_intent(self, key: str, cost: float | None = None) -> None: ...

    def record_refused(self, key: str) -> None: ...

    def record_ack(
        self, key: str, task_id: str, poll_url: str, submitted_at: float, cost: float | None
    ) -> str | None: ...

    def flush(self) -> None: ...


@dataclass(slots=True)
class Job:
    """A row to carry to its outcome; ``task_id`` set means resume by polling it."""

    row: Row
    source: str
    queued_at: float
    task_id: str | None = None
    poll_url: str | None = None
    attempts: int = 0
    #: Credits held against the budget for this row's submit until its outcome is known.
    reserved: float = 0.0
    #: A resumed task's submit time and quoted cost, from the journal.
    submitted_at: float | None = None
    ack_cost: float | None = None
    #: The acknowledged task this row waits for; set the moment it is journaled (or, for a
    #: resumed row, adopted), and from then on the source of every outcome's task id.
    tracked: _Tracked | None = None
    #: The API's acknowledgement (task id, submit time, cost) from the moment it arrives
    #: until ``tracked`` takes over: an error of ours in between (journaling it, say) still
    #: ends the row with its task id and cost, so ``--retry-failed`` does not pay again.
    acked: tuple[str, float, float] | None = None
    #: sha256 of each reference image, in order (once loaded).
    digests: tuple[str, ...] = ()
    #: What the API charges for this row's image with the references it is sent with (their
    #: megapixels are billed too), set once they are loaded; None until then. Every cost
    #: recorded for the row falls back to it (``Engine._price``), never to the request
    #: alone, which is 0.05 credits short per reference megapixel.
    price: float | None = None
    #: Said in the row's reason whatever its outcome (a reference left out, and why).
    note: str | None = None
    #: The product this image belongs to when a budget must stop at whole products, and
    #: the requests of all of that product's images this run submits (this one included).
    group: int | None = None
    group_requests: tuple[ImageRequest, ...] = ()
    #: Whether this job's image went through the budget (reserved or refused).
    budgeted: bool = False
    #: Counted by the budget as an image of ``group`` on its way to its reservation
    #: (``Budget.expect``): later products wait for it, so they start in file order.
    expected: bool = False
    #: The request fingerprint this row makes for the library (``Library.claim``), if any.
    fingerprint: str | None = None
    #: A resumed row's fingerprint: its task was paid for by an earlier run (killed, or
    #: its worker lost), and its image goes into the library once collected, without a
    #: claim; left out, the next night paid for it again.
    resumed_fingerprint: str | None = None
    #: Taken by the engine and not yet acknowledged by the API (``Engine.fed``).
    unsubmitted: bool = False
    #: Its place among the rows the engine took: rows ask for a submit permit in this order,
    #: a row refused with 429 before the rows behind it (``limits.RankedTurn``).
    rank: int = 0


@dataclass(slots=True)
class EngineSettings:
    max_active: int
    submits_per_minute: int
    expected_latency_s: float = 1.0
    #: Share of probe submits allowed to come back 429 (see ``limits.SlotController``).
    refusal_target: float = 0.25
    #: Share of tasks that should be finished at their first poll.
    poll_quantile: float = 0.85
    #: A task still unfinished after this long is given up (``failed``, rerun polls it again).
    task_timeout_s: float = 900.0
    request_timeout_s: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    download_concurrency: int = 32
    poll_concurrency: int = 64
    #: The API cannot know tasks of earlier runs (``--sim`` starts a fresh simulator per
    #: run): a resumed row takes the image an earlier run stored, else is submitted again,
    #: never polled. Not for a real API: a task it forgot may still have been charged.
    resubmit_unknown: bool = False
    #: Where the API should deliver webhooks; set means a receiver feeds ``notify_finished``.
    webhook_url: str | None = None
    #: With webhooks, each task's first poll waits this many learned first-poll times: it
    #: only catches webhooks that were lost, so it can come late and rarely.
    webhook_poll_factor: float = 4.0
    #: Whether ``max_active`` is the key's own limit. Only then does a submit the server
    #: accepts while all our slots seem busy prove that one of ours finished (probing).
    #: A share of a key (``--max-active`` below the tier, a Prefect shard's lease) is a hard
    #: cap: probing past it would take slots that belong to other jobs.
    limit_is_the_keys: bool = True
    #: A reference URL that cannot be fetched (``ReferenceUnreachable``) is left out and the
    #: image generated from the prompt alone (``--missing-reference text-only``), instead of
    #: the row ending ``failed``.
    text_only_without_reference: bool = False
    #: Ask the API's task list which tasks ended, where the dialect has one and it keeps up
    #: (``pipeline/task_list.py``); off, endings are found by polls and probes alone.
    use_task_list: bool = True
    #: A host that has not answered for this long stops the run (``ApiUnreachable``);
    #: until then requests to it wait at its gate and no row fails for it.
    outage_wait_s: float = 300.0


@dataclass(slots=True)
class EngineStats:
    """Counters the run summary and the benchmarks report."""

    submits: int = 0
    accepted: int = 0
    rate_limited: int = 0
    polls: int = 0
    #: Task lists the API answered (``pipeline/task_list.py``).
    lists: int = 0
    downloads: int = 0
    retries: int = 0
    ambiguous_submits: int = 0
    #: Tasks whose end came by a verified webhook rather than a poll.
    webhooks: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    #: Seconds some host of the run did not answer (its gate closed), and how many times
    #: that began (``pipeline/gate.Outages``).
    api_unreachable_s: float = 0.0
    api_outages: int = 0


class _Abort(Exception):
    """The API refused the key or ran out of credits: no further submits can succeed."""


class _Stopped(Exception):
    """The run is stopping (a storage error, the API gone): this row ends without an outcome.

    Its task, if acknowledged, stays open in the journal, so the rerun polls it.
    """


@dataclass(slots=True)
class KeyState:
    """What engines learn about one key: its slots in use, submit rate, task times.

    An engine makes its own by default. A process that runs several runs on one key, one
    after another or overlapping (a flow's runner: each shard is a run, and the next one
    starts while the last one's tasks finish), passes one ``KeyState`` to all of them, so
    a new run starts with the key as the last one learned it (limit, latency, the
    distribution its probes follow) and counts the slots the last one's tail still holds,
    instead of learning from scratch against 429s. Empty parts are made by the first
    engine that gets it.
    """

    slots: SlotController | None = None
    rate: SubmitRateLimiter | None = None
    first_poll: QuantileTracker | None = None
    median: QuantileTracker | None = None


@dataclass(slots=True)
class _Tracked:
    job: Job
    task_id: str
    poll_url: str
    submitted_at: float
    done: asyncio.Future[TaskState]
    polls: int = 0
    started: float = field(default_factory=time.monotonic)
    #: Polled early and often because another client shares the key (see CONTENDED_*).
    eager: bool = False
    #: What the API said the task costs at submit (dialect bfl), else None: priced by size.
    cost: float | None = None
    #: The API said the task completed: it is charged, whatever happens to its image.
    completed: bool = False
    #: The slot controller's handle on this task (None for tasks of earlier runs).
    permit: Permit | None = None
    #: First polled at the learned median, to learn the distribution (CALIBRATE_EVERY).
    calibrating: bool = False
    #: When its next poll is due (monotonic); inf while none is scheduled. A heap entry
    #: with another time was replaced by a sooner one (``Engine._schedule``).
    due: float = math.inf
    #: Its slot was given back to the controller (``Engine._release``): once only.
    released: bool = False
    #: Polled sooner than planned at the end of the run (``Engine._hurry_the_last``): its
    #: answers do not teach the first-poll estimate.
    hurried: bool = False
    #: First poll put off because the task list tells when it ends (``task_list``): its
    #: polls come late on purpose and do not teach the first-poll estimate either.
    deferred: bool = False
    #: ``Outages.seconds()`` when it was tracked: time the API did not answer since then
    #: does not count toward ``task_timeout_s`` (its polls could not ask).
    unreachable_at_start: float = 0.0


class Engine:
    """Carries jobs to outcomes within the tier; see the module docstring for the shape."""

    def __init__(
        self,
        *,
        provider: Provider,
        session: aiohttp.ClientSession,
        sink: Sink,
        references: ReferenceStore,
        journal: Journal,
        settings: EngineSettings,
        on_outcome: Callable[[Outcome], None],
        budget: Budget | None = None,
        library: Library | None = None,
        key_state: KeyState | None = None,
    ) -> None:
        self._provider = provider
        #: The submit address as aiohttp's URL object, parsed once rather than per submit
        #: (``_submit_url``): yarl's parsing was a visible share of every request's CPU.
        self._submit_at: tuple[str, yarl.URL] | None = None
        #: Images made before, by request fingerprint (``pipeline/library.py``).
        self._library = library
        self._budget = budget
        self._session = session
        self._sink = sink
        self._refs = references
        self._journal = journal
        self._settings = settings
        self._on_outcome = on_outcome
        self.stats = EngineStats()
        shared = key_state if key_state is not None else KeyState()
        if shared.slots is None:
            shared.slots = SlotController(
                settings.max_active,
                expected_latency_s=settings.expected_latency_s,
                refusal_target=settings.refusal_target,
                submits_per_minute=settings.submits_per_minute,
                # Webhooks tell us when slots free: no need to probe for them.
                probing=settings.webhook_url is None and settings.limit_is_the_keys,
                prompt_finishes=settings.webhook_url is not None,
            )
            shared.rate = SubmitRateLimiter(settings.submits_per_minute)
            shared.first_poll = QuantileTracker(
                settings.poll_quantile,
                settings.expected_latency_s,
                step=min(0.1, 0.5 / settings.max_active),
            )
            shared.median = QuantileTracker(
                0.5,
                settings.expected_latency_s * MEDIAN_START,
                step=min(0.1, 2.0 / settings.max_active),
            )
        assert shared.rate and shared.first_poll and shared.median
        self.slots = shared.slots
        self._rate = shared.rate
        self._first_poll = shared.first_poll
        self._median = shared.median
        if self.slots.probing:
            self._share_distribution()
        self._fresh = itertools.count()
        #: Fresh tasks the task list saw end, and when it last answered (``_watch_list``).
        self._listed_fresh = itertools.count(1)
        self._listed_at = -math.inf
        self._ranks = itertools.count()
        #: Permits of accepted submits, handed to their tracked task.
        self._permits: dict[str, Permit] = {}
        #: Every row has been taken: only the tasks in flight are left (DRAIN_*).
        self._draining = False
        #: Rows taken whose submit the API has not acknowledged yet.
        self._unsubmitted = 0
        #: Set once every row is taken and submitted (or ended): what is left is the tail of
        #: tasks in flight, which needs no new slots. A flow's runner starts its next shard
        #: then, so the key fills while this run's last tasks straggle (``flows/queue.py``).
        self.fed = asyncio.Event()
        self._timeout = aiohttp.ClientTimeout(total=settings.request_timeout_s)
        self._downloads = asyncio.Semaphore(settings.download_concurrency)
        #: Finished tasks whose image is not stored yet, with when each was found
        #: finished, oldest first. Their result URLs expire (10 min after ready), so while
        #: downloads lag, new submits wait rather than pile up paid images that would
        #: expire in the queue (``_room_for_backlog``).
        self._unfetched: collections.OrderedDict[int, float] = collections.OrderedDict()
        #: Up to ``download_concurrency`` of them never hold submits back; up to a key's
        #: worth do not while the oldest has waited less than ``BACKLOG_WAIT_S``. One poll
        #: round can find most of a key's tasks done at once (the ``scale`` tier's first
        #: burst: 84 of 96), and at 32 every submit then waited for about 50 downloads,
        #: verifications and thumbnails, a tenth of a second with the key a quarter idle;
        #: a backlog whose oldest has waited a second is downloads lagging, whatever its size.
        self._backlog_limit = max(settings.download_concurrency, settings.max_active)
        self._fetch_room = asyncio.Event()
        self._fetch_room.set()
        self._poll_gate = asyncio.Semaphore(settings.poll_concurrency)
        #: Contact-sheet thumbnails still to make while verifying: report.html inlines one
        #: in its first INLINE_THUMBS tiles, from a local output's thumbnail cache (see
        #: ``_wants_thumbnail``, ``_store_thumbnail``).
        self._thumbs_left = INLINE_THUMBS if sink.local_path(THUMBS_RELDIR) is not None else 0
        self._heap: list[tuple[float, int, _Tracked]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._by_task: dict[str, _Tracked] = {}
        self._polling: set[asyncio.Task[None]] = set()
        self._abort_reason: str | None = None
        #: Final states that arrived by webhook before their submit's answer was handled.
        self._early: collections.OrderedDict[str, TaskState | None] = collections.OrderedDict()
        #: The API's answer when it refused the key (401/403), else None.
        self.key_refused: str | None = None
        self._refusal_streak = 0
        self._storm_round = 0
        self._quiet_until = 0.0
        self._scout = asyncio.Lock()
        #: The error that stops the run (``fail``): storage, or the API gone; else None.
        self._fatal: KleinError | None = None
        #: One gate per host the run talks to (``pipeline/gate.py``).
        self._gates = Gates(settings.outage_wait_s, self.fail)
        self._running: set[asyncio.Task[None]] = set()
        #: Rows between their journaled intent and the submit's answer: never cancelled,
        #: since a submit cut off there may have been paid without our knowing its task.
        self._posting: set[asyncio.Task[Any]] = set()
        #: The run was cancelled and waits for its submits' answers: rows stop once theirs
        #: is journaled, and no row sends another (``_settle_submits``).
        self._settling = False
        #: Set as the last of those answers is read, while ``_settling``.
        self._answered = asyncio.Event()

    # --- public -------------------------------------------------------------------------------

    @property
    def abort_reason(self) -> str | None:
        """Why submitting stopped early (bad key, no credits), or None."""
        return self._abort_reason

    @property
    def in_flight(self) -> int:
        return len(self._by_task)

    @property
    def longest_running_s(self) -> float:
        """How long the oldest task not yet ended has been followed by this run (0 if none):
        at a run's end, what the wait is for."""
        now = time.monotonic()
        ages = [now - t.started for t in self._by_task.values() if not t.done.done()]
        return max(ages, default=0.0)

    @property
    def api_unreachable_for(self) -> float | None:
        """Seconds the API has not answered, while it does not; None while it does."""
        return self._gates.closed_for()

    @property
    def api_outages_so_far(self) -> tuple[float, int]:
        """The run's API outages until now: seconds without an answer in all, and how many."""
        outages = self._gates.outages
        return round(outages.seconds(), 3), outages.count

    def fail(self, error: KleinError) -> None:
        """Stop the run on a storage error (or an ``ApiUnreachable``): no new submits, rows
        in flight end unrecorded.

        A row whose submit is in the air keeps going until its answer is journaled; every
        other row stops where it is. Acknowledged tasks stay open in the journal and the
        rerun polls them; ``run`` raises ``error`` once the last row has stopped.
        """
        if self._fatal is not None:
            return
        self._fatal = error
        # The gate said already that the API does not answer, and the error is what the
        # run raises (the CLI's one line): said again here, it was said twice.
        level = logging.INFO if isinstance(error, ApiUnreachable) else logging.ERROR
        log.log(level, "stopping the run: %s", error)
        self.stop_submitting(f"stopped: {error}")
        current = asyncio.current_task()
        for task in self._running:
            if task is not current and task not in self._posting:
                task.cancel()

    def stop_submitting(self, reason: str) -> None:
        """No new submits from now on; rows not yet submitted end ``skipped`` with ``reason``."""
        if self._abort_reason is None:
            self._abort_reason = reason

    def notify_finished(self, task_id: str, state: TaskState | None = None) -> None:
        """A webhook said this task finished: take its verified ``state``, or poll it now.

        A state from a verified webhook ends the wait without a poll (the image URL comes
        with it; an expired one is refreshed by polling). Deliveries that beat their
        submit's answer are kept briefly, so a fast task's webhook is not lost to the race.
        """
        tracked = self._by_task.get(task_id)
        if tracked is None:
            self._early[task_id] = state
            while len(self._early) > 10_000:
                self._early.popitem(last=False)
            return
        if tracked.done.done():
            return
        if state is None or state.phase == "pending":
            self._schedule(tracked, 0.0)
            return
        if tracked.job.task_id is None:
            # The webhook is the finish time: learn the first-poll time from it directly.
            elapsed = time.monotonic() - tracked.started
            self._first_poll.observe(elapsed <= self._first_poll.value)
            self.slots.set_latency(self._first_poll.value)
        self.stats.webhooks += 1
        self._ended(tracked, state)

    async def run(self, jobs: AsyncIterator[Job]) -> EngineStats:
        """Carry every job to an outcome; returns when the last one has ended."""
        scheduler = asyncio.create_task(self._schedule_polls(), name="poll-scheduler")
        listing = self._provider.list_url()
        lister = None
        if listing is not None and self._settings.use_task_list and not self._settings.webhook_url:
            lister = asyncio.create_task(self._watch_list(listing), name="task-list")
        # Enough rows in the air to fill every slot the controller may hold, plus downloads.
        gate = asyncio.Semaphore(self.slots.max_outstanding + self._backlog_limit + 16)
        running = self._running
        try:
            try:
                async for job in jobs:
                    if self._fatal is not None:
                        break
                    await gate.acquire()
                    if self._fatal is not None:
                        gate.release()
                        break
                    if job.task_id is None:
                        # Queue-to-done starts when the engine takes the row, not when the
                        # manifest batch was read: otherwise it measures manifest position.
                        job.queued_at = time.time()
                        job.unsubmitted = True
                        self._unsubmitted += 1
                    job.rank = next(self._ranks)
                    if self._budget is not None and job.group is not None and job.task_id is None:
                        self._budget.expect(job.group)
                        job.expected = True
                    task = asyncio.create_task(self._carry(job, gate))
                    running.add(task)
                    task.add_done_callback(running.discard)
            except StorageError as exc:  # the journal refused the plan of a batch
                self.fail(exc)
            self._draining = True
            self._check_fed()
            while running:
                # wait, not gather: rows stopped by ``fail`` end cancelled, the run does not.
                await asyncio.wait(set(running))
        finally:
            await self._settle_submits()
            self._gates.stop()
            self.stats.api_unreachable_s = round(self._gates.outages.seconds(), 3)
            self.stats.api_outages = self._gates.outages.count
            self.fed.set()
            scheduler.cancel()
            pending = [*running, *self._polling]
            if lister is not None:
                pending.append(lister)
            for task in pending:
                task.cancel()
            await asyncio.gather(scheduler, *pending, return_exceptions=True)
            log.info(
                "engine done: %d submits, %d accepted, %d refused as probes, %d refused under "
                "contention, effective limit %d, first poll at %.2f s",
                self.stats.submits,
                self.stats.accepted,
                self.slots.refused_probes,
                self.slots.refused_contention,
                self.slots.effective_limit,
                self._first_poll.value,
            )
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    async def _settle_submits(self) -> None:
        """The run was cancelled with submits in the air: wait (up to ``SETTLE_SUBMITS_S``)
        for their answers, so each acknowledged task is journaled and the rerun polls it.

        Cancelled on the wire, such a submit was often taken and charged all the same, for
        a task no one could name: the rerun sent its row again and paid twice (a Ctrl-C
        among seven submits in the air: 41.4 credits charged on ``--max-credits 30``). An
        answer that does not come in time leaves its intent open in the journal, counted
        as possibly paid (``Ledger.destination_credits``, ``ambiguous_submits``).
        """
        if not self._posting:
            return
        self._settling = True
        # Said: a person who pressed Ctrl-C sees why the run does not stop at once.
        log.warning(
            "stopping: waiting up to %.0f s for the answers to %d submits in the air (the API "
            "charges a task before it answers: journaled, the rerun polls it, not pays again)",
            SETTLE_SUBMITS_S,
            len(self._posting),
        )
        # A row leaves ``_posting`` as its answer is read and journals its ack before it
        # next yields: once the set is empty, every answer that came is on disk. A second
        # cancellation (a flow's runner giving up) ends the wait, not the cleanup.
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._answered.wait(), SETTLE_SUBMITS_S)

    def _arrived(self, job: Job) -> None:
        """``job`` is at its reservation (or ended, or waits on the library): products after
        its own no longer wait for it (``Budget.expect``)."""
        if job.expected and self._budget is not None and job.group is not None:
            job.expected = False
            self._budget.arrive(job.group)

    def _submitted(self, job: Job) -> None:
        """The row's submit was acknowledged, or the row ended without one."""
        if job.unsubmitted:
            job.unsubmitted = False
            self._unsubmitted -= 1
            self._check_fed()

    def _check_fed(self) -> None:
        if self._in_tail() and not self.fed.is_set():
            self.fed.set()
            self._hurry_the_last()

    def _in_tail(self) -> bool:
        """Every row is taken and submitted: only the tasks in flight are left, and the run
        ends when the last of them is noticed."""
        return self._draining and self._unsubmitted == 0

    # --- one row, start to end ----------------------------------------------------------------

    async def _carry(self, job: Job, gate: asyncio.Semaphore) -> None:
        try:
            outcome = await self._outcome_of(job)
        except asyncio.CancelledError:
            raise
        except _Stopped:
            return
        except StorageError as exc:
            self.fail(exc)
            return
        except Exception as exc:  # a bug must not lose the row: it ends failed, with why
            # ...and keeps its acknowledged task (``_outcome``): the rerun polls it.
            log.exception("internal error on row %s", job.row.key)
            outcome = self._outcome(job, RowStatus.FAILED, reason=f"internal error: {exc!r}")
            if job.acked is not None:  # acknowledged, never tracked: its slot must come back
                permit = self._permits.pop(job.acked[0], None)
                if permit is not None:
                    self.slots.orphaned(permit)
        finally:
            gate.release()
            self._arrived(job)
            self._submitted(job)
            if job.fingerprint is not None and self._library is not None:
                self._library.release(job.fingerprint)  # rows waiting for it look again
            # The job and its tracked task point at each other: a cycle only Python's rare
            # full collections free, so ended rows piled up over a long run (benchmarks/notes.md).
            job.tracked = None
        if job.reserved and self._budget is not None:
            self._budget.settle(job.reserved, outcome.cost_credits)
            job.reserved = 0.0
        elif job.group is not None and not job.budgeted and self._budget is not None:
            self._budget.forgo(job.group, self._price(job))
        try:
            self._on_outcome(outcome)
        except StorageError as exc:
            self.fail(exc)

    async def _outcome_of(self, job: Job) -> Outcome:
        request = job.row.request
        references: list[Reference] = []
        for column, spec in request.reference_specs():
            try:
                references.append(await self._refs.load(spec, self._session))
            except ReferenceError as exc:
                if job.task_id is not None:
                    break  # already submitted in an earlier run: the digests are a nicety
                reason = reference_reason(job.source, job.row.where, column, spec, str(exc))
                if not isinstance(exc, ReferenceUnreachable):
                    return self._outcome(job, RowStatus.REJECTED, reason=reason)
                if not self._settings.text_only_without_reference:
                    # Gone now is not gone for good: failed, so --retry-failed tries again.
                    return self._outcome(
                        job,
                        RowStatus.FAILED,
                        reason=f"{reason}; --retry-failed tries again, --missing-reference "
                        "text-only generates from the prompt alone",
                    )
                job.note = f"generated from the prompt alone: {reason}"
        digests = job.digests = tuple(r.digest for r in references)
        price = job.price = self._provider.cost(request, references)
        # A resumed row's fingerprint, with every reference loaded (short-circuited: no
        # count of references for rows submitted in this run, the hot path).
        if (
            job.task_id is not None
            and self._library is not None
            and len(references) == sum(1 for _ in request.reference_specs())
        ):
            job.resumed_fingerprint = self._library.fingerprint(request, digests)
        if job.task_id is not None and self._settings.resubmit_unknown:
            # Tasks of earlier runs are unknown to this API (a fresh simulator): take the
            # image an earlier run stored, else submit the row again.
            stored = await self._stored_outcome(job, job.task_id, job.queued_at, digests)
            if stored is not None:
                return stored
            shown = self._provider.mask.seal(job.task_id)
            log.info("row %s: resubmitting task %s of an earlier run", job.row.key, shown)
            job.task_id = job.poll_url = None
            return await self._outcome_of(job)
        if job.task_id is None and self._library is not None:
            reused = await self._from_library(job, digests)
            if reused is not None:
                return reused
        if job.task_id is None:
            await self._room_to_fetch()
            if self._abort_reason:
                return self._outcome(job, RowStatus.SKIPPED, reason=self._abort_reason)
            if self._budget is not None:
                # Reserved before the POST: an accepted task is charged whatever happens next.
                cost = price
                group_cost = (
                    await self._product_cost(job, references)
                    if job.group is not None and not self._budget.holds(job.group)
                    else None
                )
                job.budgeted = True
                expected, job.expected = job.expected, False
                if not await self._budget.reserve(
                    cost, group=job.group, group_cost=group_cost or 0.0, expected=expected
                ):
                    reason = self._budget.reason(cost, group_cost)
                    return self._outcome(job, RowStatus.SKIPPED, reason=reason)
                job.reserved = cost
            body = self._provider.submit_body(request, references, self._settings.webhook_url)
            try:
                submitted = await self._submit(job, body)
            except _Abort:
                return self._outcome(job, RowStatus.SKIPPED, reason=self._abort_reason)
            except _AmbiguousSubmit as exc:
                # Perhaps charged: counted at its price, so budgets stay safe.
                if job.reserved and self._budget is not None:
                    self._budget.unanswered += price
                return self._outcome(job, RowStatus.FAILED, reason=exc.reason, cost=price)
            except _RowError as exc:
                return self._outcome(job, exc.status, reason=exc.reason)
            except Transient as exc:
                reason = f"submit failed after {job.attempts} attempts: {exc.reason}"
                return self._outcome(job, RowStatus.FAILED, reason=reason)
            submitted_at = time.time()
            # The API's own figure when it gives one (dialect B), else the published price
            # with the references' megapixels. Journaled either way: a resumed run collects
            # the task, and the budget counts it while in flight, at this figure, since the
            # journal does not keep the references' sizes to price it again.
            charged = submitted.cost if submitted.cost is not None else price
            job.acked = (submitted.task_id, submitted_at, charged)
            holder = self._journal.record_ack(
                job.row.key, submitted.task_id, submitted.poll_url, submitted_at, charged
            )
            if holder is not None or submitted.task_id in self._by_task:
                return self._taken_task(job, submitted, submitted_at, price, holder)
            tracked = self._track(job, submitted.task_id, submitted.poll_url, submitted_at)
            tracked.cost = charged
            if self._fatal is not None or self._settling:
                raise _Stopped  # journaled: the rerun polls it
            tracked.permit = self._permits.pop(submitted.task_id, None)
            first = self._first_poll.value
            if self._settings.webhook_url:
                first *= self._settings.webhook_poll_factor
            elif self._listing_live():
                first *= LIST_POLL_FACTOR
                tracked.deferred = True
            elif self.slots.contended:
                first *= CONTENDED_FIRST_POLL
                tracked.eager = True
            elif next(self._fresh) % CALIBRATE_EVERY == 0 and self.slots.probing:
                first = min(first, self._median.value)
                tracked.calibrating = True
            self._schedule(tracked, first)
        else:
            known = job.poll_url or self._provider.poll_url(job.task_id)
            if known is None:
                # Acknowledged, but the journal entry with its address was never written
                # (an error of ours right after the answer): kept failed, never paid again.
                shown = self._provider.mask.seal(job.task_id)
                return self._outcome(
                    job,
                    RowStatus.FAILED,
                    task_id=job.task_id,
                    submitted_at=job.submitted_at,
                    cost=job.ack_cost,
                    reason=f"task {shown} was acknowledged (and charged), but its poll "
                    "address was lost before it was journaled and this API's addresses "
                    "cannot be rebuilt from an id: its image cannot be collected, and no "
                    "rerun pays for the row again",
                )
            self.slots.adopt()
            submitted_at = job.submitted_at if job.submitted_at is not None else job.queued_at
            # The journal keeps poll URLs without credentials: this run's API URL has them.
            poll_url = with_credentials_of(known, self._provider.submit_url())
            tracked = self._track(job, job.task_id, poll_url, submitted_at)
            tracked.cost = job.ack_cost
            if job.ack_cost is None and job.price is not None and self._budget is not None:
                # Journaled by an older version without its cost: the budget counted it at
                # the request's price, short of its references' megapixels.
                self._budget.commit(job.price - self._provider.cost(request))
            self._schedule(tracked, 0.0)
        failure: _RowError | None = None
        try:
            state = await self._wait(tracked)
        except _RowError as exc:
            failure = exc
        finally:
            self._by_task.pop(tracked.task_id, None)
            self._release(tracked)
            self._hurry_the_last()
        if failure is not None:
            if isinstance(failure, _UnknownTask) and job.task_id is not None:
                # Resumed, and the API no longer knows the task: the earlier run may have
                # stored its image before it was stopped.
                stored = await self._stored_outcome(
                    job, tracked.task_id, tracked.submitted_at, digests
                )
                if stored is not None:
                    return stored
            return self._outcome(
                job,
                failure.status,
                reason=failure.reason,
                resubmit_on_retry=isinstance(failure, _UnknownTask),
            )
        if state.phase != "completed":
            status = RowStatus.MODERATED if state.phase == "moderated" else RowStatus.FAILED
            # The API ended the task: there is nothing to collect, a retry submits anew.
            return self._outcome(job, status, reason=state.reason, resubmit_on_retry=True)
        tracked.completed = True
        if self._fatal is not None:
            raise _Stopped
        self._unfetched[id(tracked)] = time.monotonic()
        try:
            return await self._fetch_and_store(job, tracked, state, digests)
        finally:
            del self._unfetched[id(tracked)]
            if self._room_for_backlog():
                self._fetch_room.set()

    def _taken_task(
        self, job: Job, submitted: Submitted, submitted_at: float, price: float, holder: str | None
    ) -> Outcome:
        """The API answered this row's submit with a task another row already holds.

        Polling it would give this row the other row's image. The row ends ``failed``,
        keeping the task id and the cost the API may have charged (journaled: a rerun
        does not submit it again on its own); ``--retry-failed`` submits it anew.
        """
        self.slots.finished(self._permits.pop(submitted.task_id, None))
        self.stats.errors["duplicate task id"] += 1
        other = holder or self._by_task[submitted.task_id].job.row.key
        log.warning(
            "row %s: the API answered with task %s, which row %s already holds",
            job.row.key,
            self._provider.mask.seal(submitted.task_id),
            other,
        )
        return self._outcome(
            job,
            RowStatus.FAILED,
            reason=f"the API answered this row's submit with task {submitted.task_id}, which "
            f"it had already given row {other}: its image is not taken for this row; the "
            "submit may have been charged; --retry-failed submits the row again",
            task_id=submitted.task_id,
            submitted_at=submitted_at,
            cost=submitted.cost if submitted.cost is not None else price,
            resubmit_on_retry=True,
        )

    # --- submit -------------------------------------------------------------------------------

    async def _submit(self, job: Job, body: dict[str, Any]) -> Submitted:
        """Submit until acknowledged; 429s are flow control, not failures."""
        payload = json.dumps(body).encode()

        async def attempt() -> Submitted:
            silent = 0
            while True:
                self._may_submit()  # the run may have stopped while this row waited
                try:
                    if self._storm_round:
                        async with self._scout:  # one submit at a time while 429s storm
                            # Only the scout (this lock's holder) extends a pause.
                            pause = self._quiet_until - time.monotonic()
                            if pause > 0:
                                await asyncio.sleep(pause)
                            if not self._storm_round:
                                continue  # it ended while we queued: back to full speed
                            result = await self._send(job, payload)
                    else:
                        result = await self._send(job, payload)
                except Transient as exc:
                    if not exc.unanswered:
                        raise
                    # The API answered nothing since it was sent: not the row's failure.
                    job.attempts -= 1
                    silent += 1
                    await self._pace(silent, exc)
                    continue
                if result is not None:
                    return result

        return await retry_transient(
            self._settings.retry,
            attempt,
            on_retry=self._count_retry,
            paused=self._gates.outages.seconds,
        )

    async def _pace(self, silent: int, error: Transient) -> None:
        """The pause before a request the host left unanswered goes again (``silent`` in a
        row): the policy's first back-offs only, since a host that stays silent closes its
        gate within a few of them (``gate.CLOSE_AFTER``), which then paces the requests."""
        await asyncio.sleep(backoff_s(self._settings.retry, min(silent, 3), error))

    async def _through(
        self, url: str, step: Callable[[Passage], Awaitable[T]], what: str = "the API"
    ) -> T:
        """``step`` (one poll or download request) through ``url``'s host gate, again and
        again while the host answers nothing: those failures are the host's, not the row's,
        and spend none of its attempts (``pipeline/gate.py``)."""
        gate = self._gates.for_url(url, what)
        silent = 0
        while True:
            passage = await gate.enter()
            try:
                return await step(passage)
            except Transient as exc:
                if not exc.unanswered:
                    raise
                error = exc
            finally:
                passage.close()
            silent += 1
            await self._pace(silent, error)

    def _room_for_backlog(self) -> bool:
        """Whether finished tasks waiting for their downloads leave room for a submit."""
        waiting = len(self._unfetched)
        if waiting < self._settings.download_concurrency:
            return True
        if waiting >= self._backlog_limit:
            return False
        oldest = next(iter(self._unfetched.values()), None)
        return oldest is None or time.monotonic() - oldest < BACKLOG_WAIT_S

    async def _room_to_fetch(self) -> None:
        """Wait while finished tasks queue for their downloads (their URLs are expiring)."""
        while not self._room_for_backlog():
            self._fetch_room.clear()
            await self._fetch_room.wait()

    async def _send(self, job: Job, payload: bytes) -> Submitted | None:
        """One submit request within the limits; None when it was refused with a 429."""
        while True:
            await self._room_to_fetch()
            permit = await self.slots.acquire(job.rank)
            # Rows queue for permits for a while: the download backlog may have grown since.
            if self._room_for_backlog():
                break
            self.slots.abandoned(permit)
        try:
            # While the API is unreachable the row waits here, its permit held: when the
            # gate opens it goes at once (and a permit leaked by a stopped run would stay
            # counted in a ``KeyState`` that the next run of a flow's runner inherits).
            gate = self._gates.for_url(self._provider.submit_url())
            passage = await gate.enter(idempotent=False)
            try:
                self._may_submit()
                await self._rate.acquire()
                # Again after the last wait: a row that waited here for its turn while the
                # run began to stop was sent all the same, and its answer could come after
                # the settling wait had ended: cut off, its task charged, unjournaled.
                self._may_submit()
            except BaseException:
                passage.close()
                raise
        except BaseException:
            self.slots.abandoned(permit)
            raise
        try:
            job.attempts += 1
            result = await self._submit_once(job, payload, permit, passage)
        finally:
            passage.close()
        if result is None:
            job.attempts -= 1  # a 429 is not an attempt: it was never taken
        return result

    def _may_submit(self) -> None:
        """Raise unless a row may send its submit now: not once the run is stopping
        (``_Stopped``: its submits in the air are being settled) or submits were stopped
        (``_Abort``: a budget, a refused key)."""
        if self._settling:
            raise _Stopped
        if self._abort_reason:
            raise _Abort

    def _refused_storm(self, retry_after: float | None) -> None:
        """Count a 429; past ``STORM_REFUSALS`` in a row, pause every submitter (a round).

        Only 429s the slot controller cannot explain count: a probe refused while our own
        tasks may have filled the key is the controller asking "free yet?", and at the
        ``scale`` tier a couple of dozen probes are in the air at once. Counted, eight of
        them in a row paused every submit for the server's Retry-After (a second) while
        the key drained: after the run's first burst, and for the last rows of a run.
        """
        self._refusal_streak += 1
        now = time.monotonic()
        if self._refusal_streak < STORM_REFUSALS or now < self._quiet_until:
            return  # probing explains it, or an answer already in the air during a pause
        self._storm_round += 1
        if retry_after:
            pause = min(retry_after, self._settings.retry.max_retry_after_s)
            why = "as Retry-After asks"
        else:
            backoff = STORM_FIRST_PAUSE_S * 2.0 ** (self._storm_round - 1)
            pause = min(STORM_MAX_PAUSE_S, backoff * JITTER.uniform(0.5, 1.0))
            why = "no Retry-After: backing off"
        self._quiet_until = now + pause
        log.warning(
            "%d submits refused (429) in a row: pausing submits for %.1f s (%s)",
            self._refusal_streak,
            pause,
            why,
        )

    def _submit_url(self) -> yarl.URL:
        """The provider's submit address, parsed again only if the provider changes it."""
        address = self._provider.submit_url()
        if self._submit_at is None or self._submit_at[0] != address:
            self._submit_at = (address, yarl.URL(address))
        return self._submit_at[1]

    async def _submit_once(
        self, job: Job, payload: bytes, permit: Permit, passage: Passage
    ) -> Submitted | None:
        task = asyncio.current_task()
        if task is not None:
            self._posting.add(task)
        try:
            return await self._post_submit(job, payload, permit, passage)
        finally:
            self._posting.discard(task)  # type: ignore[arg-type]
            if self._settling and not self._posting:
                self._answered.set()

    async def _post_submit(
        self, job: Job, payload: bytes, permit: Permit, passage: Passage
    ) -> Submitted | None:
        key = job.row.key
        try:
            self._journal.record_intent(key, job.price)
        except StorageError:
            # Nothing was sent: say so if the journal still takes it (a full disk's reserve),
            # so the rerun does not count a possibly paid duplicate that never was.
            with contextlib.suppress(StorageError):
                self._journal.record_refused(key)
                self._journal.flush()
            raise
        self._journal.flush()
        self.stats.submits += 1
        headers = {**self._provider.auth_headers(), "Content-Type": "application/json"}
        unreadable: str | None = None
        try:
            # Never followed: a 301/302/303 turns the POST into a GET of another address,
            # whose 200 could name a task this row never asked for (and a 307 re-sends
            # the key and the prompt wherever it points). A redirect is no acknowledgement.
            async with self._session.post(
                self._submit_url(),
                data=payload,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
                passage.heard(status)
                try:
                    body = await _read_json(response)
                except ValueError:  # a 200 over the read cap
                    body, unreadable = None, f"an answer over {MAX_ANSWER_BYTES:,} bytes"
                if body is None and unreadable is None:
                    unreadable = f"a {response.content_type or 'untyped'} answer that is not JSON"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except aiohttp.ClientConnectorError as exc:
            # Never reached the server: safe to send again.
            self.slots.abandoned(permit)
            self._journal.record_refused(key)
            # Counted, so that an API gone for a while says so in the summary and run.json
            # instead of only as a reason on each failed row.
            self.stats.errors["submit cannot connect"] += 1
            why = no_answer(exc)
            unanswered = passage.failed(why) if why is not None else False
            raise Transient(
                f"cannot connect: {exc.os_error or exc}", unanswered=unanswered
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The request may have reached the server: the intent stays open in the journal
            # and is counted as a possibly paid duplicate if we submit again. Its task, if
            # there is one, holds a slot we cannot poll (``SlotController.lost``).
            self.slots.lost(permit)
            self.stats.ambiguous_submits += 1
            why = None if passage.reported else no_answer(exc)
            unanswered = passage.failed(why) if why is not None else False
            # Under a budget, it goes again only while its price, perhaps charged, still fits.
            if self._budget is not None and job.reserved and not self._budget.lost(job.reserved):
                raise _AmbiguousSubmit(
                    RowStatus.FAILED,
                    f"the submit's answer was lost ({type(exc).__name__}): the API may have "
                    "charged for a task this run cannot name, and --max-credits leaves no "
                    "room to send the row again; check the API's task list, then "
                    "--retry-failed submits it again (and pays again if it was charged)",
                ) from None
            raise Transient(
                f"submit answer lost: {type(exc).__name__}", unanswered=unanswered
            ) from None
        except Exception as exc:
            # An error of ours (or a library's) while the request was out: it may have
            # been taken and charged. Ending the row without settling the permit kept its
            # slot counted as "in the air" for the rest of the run; a key's worth of them
            # and no submit was ever allowed again (the run waited for ever).
            self.slots.lost(permit)
            self.stats.ambiguous_submits += 1
            error = self._provider.mask.mask(repr(exc))
            log.error("row %s: the submit's answer was lost to an error: %s", key, error)
            raise _AmbiguousSubmit(
                RowStatus.FAILED,
                f"the submit's answer was lost to an error in the client ({error}): the API "
                "may have charged for a task this run cannot name, so the row was not "
                "submitted again; check the API's task list, then --retry-failed submits "
                "it again (and pays again if it was charged)",
            ) from None
        if 200 <= status < 300:
            # Any success (200, 201 Created, 202 Accepted, 204 No Content) means the API
            # took the request: a task id in it is an acknowledgement like a 200's.
            try:
                submitted = self._provider.parse_submit(body)
            except Exception as exc:  # ProtocolError, or a reader's bug: the same doubt
                # The API said yes and named no task we can read (a proxy's HTML page, a
                # body over the cap, a 204): it may have charged. Not sent again in this
                # run; the intent stays open in the journal (``ambiguous_submits``).
                self.slots.lost(permit)
                self.stats.ambiguous_submits += 1
                said = unreadable or f"no task we can read ({exc})"
                raise _AmbiguousSubmit(
                    RowStatus.FAILED,
                    f"the API accepted the submit (HTTP {status}) with {said}: it may have charged "
                    "for a task this run cannot name, so the row was not submitted again; "
                    "check the API's task list, then --retry-failed submits it again (and "
                    "pays again if it was charged)",
                ) from None
            self.slots.accepted(permit)
            self._permits[submitted.task_id] = permit
            self.stats.accepted += 1
            self._submitted(job)
            self._refusal_streak = self._storm_round = 0
            return submitted
        self._journal.record_refused(key)
        if status == 429:
            self.stats.rate_limited += 1
            speculative = permit.speculative
            explained = self.slots.refused_probes
            self.slots.refused(permit)
            if self.slots.refused_probes == explained:
                self._refused_storm(retry_after)
            if not speculative and retry_after:
                # We believed a slot was free: another client holds the key. Its hint counts.
                await asyncio.sleep(min(retry_after, self._settings.retry.max_retry_after_s))
            return None
        self.slots.abandoned(permit)
        message = self._provider.error_message(status, body)
        self.stats.errors[f"submit {status}"] += 1
        if status >= 500:
            raise Transient(message, retry_after=retry_after, unanswered=passage.silent)
        if status in (401, 403):
            self.key_refused = self.key_refused or message
            self.stop_submitting(f"the API refused the key ({message}); nothing more was submitted")
            raise _Abort
        if status == 402:
            self.stop_submitting(f"out of credits ({message}); rows not yet submitted were skipped")
            raise _Abort
        raise _RowError(RowStatus.REJECTED, f"the API refused the request: {message}")

    # --- waiting ------------------------------------------------------------------------------

    def _track(self, job: Job, task_id: str, poll_url: str, submitted_at: float) -> _Tracked:
        future: asyncio.Future[TaskState] = asyncio.get_running_loop().create_future()
        tracked = _Tracked(job, task_id, poll_url, submitted_at, future)
        tracked.unreachable_at_start = self._gates.outages.seconds()
        job.tracked = tracked
        self._by_task[task_id] = tracked
        if task_id in self._early:
            early = self._early.pop(task_id)
            if early is not None and early.phase != "pending":
                self.stats.webhooks += 1
                future.set_result(early)
            else:
                self._schedule(tracked, 0.0)
        return tracked

    def _schedule(self, tracked: _Tracked, delay: float) -> None:
        """Poll ``tracked`` after ``delay``, unless a poll of it is already due sooner.

        One scheduled poll per task: the sooner wins and the other heap entry is skipped.
        """
        due = time.monotonic() + delay
        if due >= tracked.due:
            return
        tracked.due = due
        heapq.heappush(self._heap, (due, next(self._seq), tracked))
        if self._heap[0][2] is tracked:
            self._wake.set()

    def _hurry_the_last(self) -> None:
        """Once every row is submitted, no task left waits longer for its next poll than the
        drain spacing times their number, or than the moment it has more likely ended than
        not (``DRAIN_*``, ``_likely_ended_in``).

        Their polls were scheduled while more tasks were in flight, with the usual back-off
        or at the first-poll time (the last tasks submitted), and the run ends when the last
        of them is noticed. The spacing is shared by the tasks not yet *noticed*, ended or
        not: alone it left the last task to end, ending while four or five others were
        unnoticed, a second late at the ``standard`` tier. A task polled sooner than its
        first-poll time is marked ``hurried``: its answers would teach the first-poll
        estimate the drain's spacing instead of the tasks' times.
        """
        spacing = self._tail_spacing()
        if spacing is None:
            return
        now = time.monotonic()
        for tracked in self._by_task.values():
            due = tracked.due
            if due < math.inf and not tracked.done.done():
                self._schedule(tracked, min(spacing, self._likely_ended_in(tracked, now)))
                if tracked.due < due:
                    tracked.hurried = True

    def _tail_spacing(self) -> float | None:
        """The drain spacing times the tasks left, in the run's tail; None outside it, and
        while no back-off waits longer (a large tier's tail, with many tasks left)."""
        if not self._in_tail():
            return None
        spacing = self._drain_spacing()
        return spacing if spacing < POLL_BACKOFF_CAP_S else None

    def _likely_ended_in(self, tracked: _Tracked, now: float) -> float:
        """Seconds from ``now`` until ``tracked`` has more likely ended than not, given it
        was running when last seen (the learned lognormal); at least ``DRAIN_MIN_S``, and
        infinite without a distribution or far past its tail."""
        dist = self.slots.distribution
        permit = tracked.permit
        if dist is None or permit is None or self._settings.webhook_url or self._listing_live():
            return math.inf  # endings arrive without a poll (a webhook, the task list)
        mu, sigma = dist
        seen = permit.running_at - permit.acked_at
        survived = 1.0
        if seen > 0.0:
            survived = 0.5 * math.erfc((math.log(seen) - mu) / (sigma * math.sqrt(2.0)))
        if survived < 1e-9:
            return math.inf  # far past the learned tail: this model says nothing of it
        # The age by which half the chance it had of running on, when last seen, is gone.
        age = math.exp(mu + sigma * _normal_quantile(1.0 - survived / 2.0))
        return max(age - (now - permit.acked_at), DRAIN_MIN_S)

    def _drain_spacing(self) -> float:
        """The longest wait for a poll of one of the tasks left once every row is submitted."""
        if self._settings.webhook_url or self._listing_live():
            base = DRAIN_REPOLL_S  # endings arrive without polls, which only back them up
        else:
            base = self._drain_base(self._earlier_runs_left())
        return base * max(1, len(self._by_task))

    def _drain_base(self, earlier: float | None) -> float:
        """The drain spacing for one task left: a share of the learned median; when every
        task left is an earlier run's, a share of the youngest one's age once that is longer
        (``DRAIN_AGE_SHARE``), and the longest spacing while no answer taught the median.
        ``earlier``: ``_earlier_runs_left()``, which the caller asks once.

        A rerun that collects a killed run's tasks learns nothing of *their* time: its
        median is its starting guess (under half a second) or learned from a few tasks of
        its own, and it asked about tasks running a minute or more several times a second
        until the last ended (on the production latency shape: 754 task lists in a 117 s
        rerun for 16 tasks). This run's own tasks keep the median's spacing: under a long
        tail with a short median (50 ms, tasks up to 3 s) the age's tenth noticed the last
        one 0.3 s late, where the median's share and ``_likely_ended_in`` take 0.01-0.13 s.
        """
        base = max(DRAIN_MEDIAN_SHARE * self._median.value, DRAIN_MIN_S)
        if earlier is not None:
            if not self._median.answers:
                return DRAIN_REPOLL_S
            base = max(base, DRAIN_AGE_SHARE * earlier)
        return min(base, DRAIN_REPOLL_S)

    def _earlier_runs_left(self) -> float | None:
        """When every task not yet ended is an earlier run's (resumed), how long the
        youngest of them has been followed by this run; None while any is this run's own."""
        now = time.monotonic()
        youngest = math.inf
        for tracked in self._by_task.values():
            if tracked.done.done():
                continue
            if tracked.job.task_id is None:  # submitted by this run: the median describes it
                return None
            youngest = min(youngest, now - tracked.started)
        return youngest if youngest < math.inf else None

    def _ended(self, tracked: _Tracked, state: TaskState) -> None:
        """The API says the task ended: its slot is given back now, then its row goes on.

        The slot first, so the row waiting for it is woken ahead of this row's download:
        the refill is what keeps the key busy, and this row's download, verification and
        file writes (a millisecond or more of this process) can come after the submit.
        """
        self._release(tracked)
        tracked.done.set_result(state)

    def _release(self, tracked: _Tracked) -> None:
        if not tracked.released:
            tracked.released = True
            self.slots.finished(tracked.permit)

    async def _wait(self, tracked: _Tracked) -> TaskState:
        try:
            return await tracked.done
        except Transient as exc:
            raise _RowError(
                RowStatus.FAILED, f"polling failed after retries: {exc.reason}"
            ) from None

    async def _schedule_polls(self) -> None:
        while True:
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                due, _, tracked = heapq.heappop(self._heap)
                if due != tracked.due:
                    continue  # a sooner poll replaced this one (``_schedule``)
                tracked.due = math.inf
                if not tracked.done.done():
                    poll = asyncio.create_task(self._poll_task(tracked))
                    self._polling.add(poll)
                    poll.add_done_callback(self._polling.discard)
            self._wake.clear()
            timeout = self._heap[0][0] - now if self._heap else None
            # asyncio.timeout, not wait_for: see SlotController._acquire (gh-86296).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _watch_list(self, url: str) -> None:
        """Ask the task list which of our tasks have ended, as often as ``task_list.plan``
        says it keeps up with the endings; while it does not, every task is polled as usual.

        A failed list (an error, no answer, a body that is no list) is not retried: the
        next one comes after a doubled interval, and past ``task_list.LIVE_S`` without an
        answer the tasks whose polls it put off are polled again as usual.
        """
        timeout = aiohttp.ClientTimeout(total=task_list.TIMEOUT_S)
        address = yarl.URL(url)  # parsed once, not by aiohttp at every list
        entries = failures = 0
        measure_at = answered_at = 0.0
        while True:
            held = self.slots.held
            if held == 0 or not self._by_task:
                # Nothing of ours to list yet: at a run's start the first submits are in
                # the air, and a plan made from them would guess a key's worth of tasks
                # ending within the median's first estimate.
                self._listing_stopped()
                await asyncio.sleep(task_list.MIN_INTERVAL_S)
                continue
            # The pace tasks are replaced at; with no accept for a while, the median's guess.
            endings = self.slots.pace or held / max(self._median.value, 1e-3)
            tail_s = None
            if self._in_tail():
                earlier = self._earlier_runs_left()
                tail_s = self._drain_base(earlier)
                if earlier is not None:
                    # Only an earlier run's tasks are left: the median, learned from this
                    # run's own or not at all, overstates how fast they end; the drain's
                    # spacing.
                    endings = task_list.PER_ENDING / tail_s
            step = task_list.plan(endings, entries, tail_s=tail_s, failures=failures)
            if step.useful:
                wait = answered_at + step.wait_s - time.monotonic()
                if wait > 0.0:
                    # Planned again every REPLAN_S at least: at a run's start the pace goes
                    # from one task in the air to a full key within a fraction of a second,
                    # and the list it then calls for is due sooner than the first plan said.
                    await asyncio.sleep(min(wait, task_list.REPLAN_S))
                    continue
            else:
                self._listing_stopped()
                now = time.monotonic()
                if not step.too_long or now < measure_at:
                    await asyncio.sleep(task_list.REPLAN_S)
                    continue
                measure_at = now + task_list.RECHECK_S  # read it once, to measure its size
            asked = time.monotonic()
            try:
                async with self._session.get(
                    address, headers=self._provider.auth_headers(), timeout=timeout
                ) as response:
                    body = await _read_json(response) if response.status == 200 else None
                listed = self._provider.read_list(body)
            except ValueError:  # over MAX_ANSWER_BYTES: far too long to keep up
                entries = task_list.OVERSIZED
                continue
            except (aiohttp.ClientError, TimeoutError, ProtocolError):
                failures += 1
                answered_at = time.monotonic()
                if not self._listing_live():
                    self._listing_stopped()
                continue
            failures = 0
            entries = listed.entries
            if step.useful and not self._listing_live():
                self._defer_to_the_list()  # not when it was asked only to measure its size
            self._listed_at = answered_at = time.monotonic()
            self.stats.lists += 1
            by_task = self._by_task
            # Our tasks in flight are asked about, not the list's every entry: a few dozen
            # against every task the key kept.
            ended = [
                tracked
                for task_id, tracked in by_task.items()
                if not tracked.released and not tracked.done.done() and listed.has_ended(task_id)
            ]
            for tracked in ended:
                self._listed(tracked)
            if self.slots.unnamed:
                # Tasks whose submit answer was lost are ours but have no id: the tasks the
                # list shows running that we cannot name bound how many of them still run.
                running = sum(1 for task_id in listed.running() if task_id not in by_task)
                self.slots.unnamed_ended(running, asked)

    def _listing_live(self) -> bool:
        """Whether the task list answered lately enough to tell endings instead of polls."""
        return time.monotonic() - self._listed_at < task_list.LIVE_S

    def _listing_stopped(self) -> None:
        """The list is no longer asked (too long, too slow, failing): the tasks whose first
        poll it put off get the usual first-poll time back. Called at every plan while the
        list is not asked: once stopped, nothing is put off until it answers again."""
        if self._listed_at == -math.inf:
            return
        self._listed_at = -math.inf
        now = time.monotonic()
        for tracked in self._by_task.values():
            if tracked.deferred and not tracked.done.done():
                tracked.deferred = False
                self._schedule(tracked, max(self._first_poll.value - (now - tracked.started), 0.0))

    def _defer_to_the_list(self) -> None:
        """The list answers (again): the tasks whose polls were planned without it are
        polled as those submitted while it answers are, once it shows them ended, and else
        ``LIST_POLL_FACTOR`` first-poll times after their submit (a backup). At a run's
        start that is every task submitted before its first answer, a key's worth: polled
        as planned, they were polled on top of the lists (a 20-row run: 70 polls and 37
        lists)."""
        backup = LIST_POLL_FACTOR * self._first_poll.value
        for tracked in self._by_task.values():
            if tracked.deferred or tracked.released or tracked.done.done():
                continue  # put off already, or ended
            if tracked.due == math.inf:
                continue  # its poll is in the air
            tracked.deferred = True
            tracked.calibrating = False  # the list teaches the median instead
            due = tracked.started + backup
            if due > tracked.due:
                tracked.due = due  # the earlier heap entry is skipped (``_schedule_polls``)
                heapq.heappush(self._heap, (due, next(self._seq), tracked))

    def _listed(self, tracked: _Tracked) -> None:
        """The task list says ``tracked`` ended: its slot is given back now and one poll
        fetches its image's address. Its age is about its time, as a webhook's is, so it
        teaches the median and first-poll estimates directly (every task: no calibration
        polls are needed while the list is asked)."""
        if tracked.job.task_id is None and not tracked.hurried and not tracked.eager:
            elapsed = time.monotonic() - tracked.started
            self._median.observe(elapsed <= self._median.value)
            self._first_poll.observe(elapsed <= self._first_poll.value)
            self.slots.set_latency(self._first_poll.value)
            if next(self._listed_fresh) % CALIBRATE_EVERY == 0:
                self._share_distribution()
        tracked.deferred = True  # the poll below comes at once, not at the first-poll time
        self._release(tracked)
        self._schedule(tracked, 0.0)

    async def _poll_task(self, tracked: _Tracked) -> None:
        if tracked.done.done():
            return
        try:
            async with self._poll_gate:
                state = await self._poll(tracked)
        except _RowError as exc:
            if not tracked.done.done():
                tracked.done.set_exception(exc)
            return
        except Exception as exc:
            if not tracked.done.done():
                tracked.done.set_exception(exc)
            return
        if tracked.done.done():
            return
        # With webhooks, timer polls come late on purpose and would bias the estimate.
        # Eager polls (a shared key) and hurried ones (the run's last tasks) come early on
        # purpose too.
        first = (
            tracked.polls == 1
            and tracked.job.task_id is None
            and not self._settings.webhook_url
            and not tracked.eager
            and not tracked.hurried
            and not tracked.deferred
        )
        done = state.phase != "pending"
        if first and tracked.calibrating:
            self._learn_median(done)
            if done:  # done at the median: done at the (later) first-poll time as well
                self._first_poll.observe(True)
        elif first or (tracked.calibrating and tracked.polls == 2 and not tracked.hurried):
            self._first_poll.observe(done)
            self.slots.set_latency(self._first_poll.value)
        if done:
            self._ended(tracked, state)
            return
        if tracked.permit is not None:
            self.slots.still_running(tracked.permit)
        age = time.monotonic() - tracked.started
        if first and tracked.calibrating:
            # Next at the first-poll time, as every other task: that poll teaches it.
            self._schedule(tracked, max(self._first_poll.value - age, 0.05))
            return
        waited = self._gates.outages.seconds() - tracked.unreachable_at_start
        if age - waited > self._settings.task_timeout_s:
            tracked.done.set_exception(
                _RowError(
                    RowStatus.FAILED,
                    f"task {tracked.task_id} still {state.raw_status or 'unfinished'} after "
                    f"{age:.0f} s; gave up waiting",
                )
            )
            return
        # Back off geometrically after the first poll: tail tasks cost a few polls each.
        delay = min(max(0.5 * age, 0.05), POLL_BACKOFF_CAP_S)
        spacing = self._tail_spacing()
        if spacing is not None:
            delay = min(delay, spacing, self._likely_ended_in(tracked, time.monotonic()))
        if self.slots.contended and not self._settings.webhook_url:
            delay = min(delay, max(0.02, CONTENDED_REPOLL * self._first_poll.value))
        self._schedule(tracked, delay)

    def _learn_median(self, done: bool) -> None:
        """One calibration answer: the median moves, and the slot controller's lognormal
        with it."""
        self._median.observe(done)
        self._share_distribution()

    def _share_distribution(self) -> None:
        """Give the slot controller the lognormal through the current median and first-poll
        estimates, from the first task on.

        Until the first ``2 x max_active`` calibration answers the controller had none and
        sent one probe at a time; the run's first burst of tasks (a whole tier's worth,
        ending together) was then refilled mostly by the first polls. At the ``scale`` tier
        that left the key about two-thirds busy for the run's first two seconds. From the
        estimates' starting values (the expected latency), refined with each answer, probes
        follow the burst as it ages: ``standard`` steady utilization 0.955 and 0.957
        against 0.950 and 0.952, the same 429s; ``production``, whose tasks are five times
        longer than that start, 148 429s against 146 (benchmarks/notes.md).
        """
        median = self._median.value
        sigma = math.log(max(self._first_poll.value / median, 1.01)) / _Z85
        self.slots.set_distribution(median, sigma)

    async def _poll(self, tracked: _Tracked) -> TaskState:
        return await retry_transient(
            self._settings.retry,
            lambda: self._through(tracked.poll_url, lambda way: self._poll_once(tracked, way)),
            on_retry=self._count_retry,
            paused=self._gates.outages.seconds,
        )

    async def _poll_once(self, tracked: _Tracked, passage: Passage) -> TaskState:
        tracked.polls += 1
        self.stats.polls += 1
        try:
            async with self._session.get(
                tracked.poll_url, headers=self._provider.auth_headers(), timeout=self._timeout
            ) as response:
                status = response.status
                passage.heard(status)
                body = await _read_json(response)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            shown = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
            if not isinstance(exc, ValueError):
                self.stats.errors[f"poll {shown}"] += 1
            why = None if passage.reported else no_answer(exc)
            unanswered = passage.failed(why) if why is not None else False
            raise Transient(f"poll failed: {shown}", unanswered=unanswered) from None
        if 200 <= status < 300:
            try:
                return self._provider.parse_poll(body)
            except ProtocolError as exc:
                raise Transient(f"bad poll answer: {exc}") from None
        message = self._provider.error_message(status, body)
        self.stats.errors[f"poll {status}"] += 1
        if status == 429 or status >= 500:
            raise Transient(message, retry_after=retry_after, unanswered=passage.silent)
        if status == 404:
            fresh = tracked.job.task_id is None  # acknowledged in this run, not resumed
            if fresh and time.monotonic() - tracked.started < UNKNOWN_GRACE_S:
                # Retried as any failed poll; polls failing to the end keep the task, so
                # --retry-failed polls it again rather than paying for it again.
                raise Transient(f"task {tracked.task_id} not found yet ({message})")
            raise _UnknownTask(
                RowStatus.FAILED,
                f"task {tracked.task_id} is unknown to the API ({message}); "
                "rerun with --retry-failed to submit it again",
            )
        if status in (401, 403):
            self.key_refused = self.key_refused or message
            self.stop_submitting(f"the API refused the key while polling ({message})")
        raise _RowError(RowStatus.FAILED, f"polling task {tracked.task_id} failed: {message}")

    # --- download, verify, store --------------------------------------------------------------

    async def _fetch_and_store(
        self, job: Job, tracked: _Tracked, state: TaskState, digests: tuple[str, ...]
    ) -> Outcome:
        request = job.row.request
        expected = self._provider.output_size(request)

        def lost(status: RowStatus, reason: str, *, api_ended: bool = False) -> Outcome:
            # Charged either way (the task completed); ``api_ended``: nothing to collect.
            return self._outcome(job, status, reason=reason, resubmit_on_retry=api_ended)

        url = state.image_url or ""
        refreshed = False
        while True:
            try:
                data = await self._download(
                    url, request.output_format, expected, self._wants_thumbnail(job)
                )
                break
            except _Expired as exc:
                if job.task_id is not None:
                    stored = await self._stored_outcome(
                        job, tracked.task_id, tracked.submitted_at, digests
                    )
                    if stored is not None:
                        return stored
                if refreshed:
                    return lost(
                        RowStatus.FAILED,
                        f"result URL expired before it could be downloaded ({exc})",
                        api_ended=True,
                    )
                refreshed = True
                try:
                    fresh = await self._poll(tracked)
                except (_RowError, Transient) as err:
                    return lost(RowStatus.FAILED, f"result expired and re-polling failed: {err}")
                if fresh.phase != "completed" or not fresh.image_url:
                    return lost(
                        RowStatus.FAILED,
                        f"result expired and the task now says {fresh.raw_status}",
                        api_ended=True,
                    )
                url = fresh.image_url
            except Transient as exc:
                return lost(RowStatus.FAILED, f"download failed after retries: {exc.reason}")
            except _RowError as exc:
                return lost(exc.status, exc.reason, api_ended=True)
        if self._fatal is not None:
            raise _Stopped
        info, body = data
        relpath = f"images/{job.row.key}.{FORMAT_EXT[info.format]}"
        try:
            uri = await self._sink.put(relpath, body, FORMAT_MIME[info.format])
        except StorageError:
            raise
        except KleinError as exc:  # S3 refusing the write (access denied): stop the same way
            raise StorageError(str(exc)) from None
        if info.thumbnail is not None:
            await self._store_thumbnail(job.row.key, info.thumbnail)
        fingerprint = job.fingerprint or job.resumed_fingerprint
        if fingerprint is not None and self._library is not None:
            cost = self._charged(job, tracked, RowStatus.SUCCEEDED, False)
            await self._add_to_library(
                fingerprint, info, tracked.task_id, cost, body, relpath, info.thumbnail
            )
        return self._outcome(
            job,
            RowStatus.SUCCEEDED,
            output_uri=uri,
            sha256=info.sha256,
            width=info.width,
            height=info.height,
            format=info.format,
            size=info.size,
        )

    # --- the library ----------------------------------------------------------------------------

    async def _from_library(self, job: Job, digests: tuple[str, ...]) -> Outcome | None:
        """The row's image copied from the library (succeeded, cost 0), or None: submit it.

        Rows of this run asking for the same fingerprint wait for the first of them and then
        take its image from the library, so the run pays for each fingerprint once.
        """
        library = self._library
        assert library is not None
        request = job.row.request
        fp = library.fingerprint(request, digests)
        relpath = f"images/{job.row.key}.{FORMAT_EXT[request.output_format]}"
        while True:
            reused = await library.reuse(fp, self._sink, relpath)
            if reused is not None:
                entry, uri = reused
                outcome = self._outcome(
                    job,
                    RowStatus.SUCCEEDED,
                    digests=digests,
                    output_uri=uri,
                    sha256=entry.sha256,
                    width=entry.width,
                    height=entry.height,
                    format=entry.format,
                    size=entry.bytes,
                )
                outcome.reused_from = library.location(entry)
                if self._wants_thumbnail(job):
                    # report.html's contact sheet: the library's thumbnail, not a decode.
                    thumb = f"{THUMBS_RELDIR}/{job.row.key}.jpg"
                    if await library.reuse_thumbnail(fp, self._sink, thumb):
                        self._thumbs_left -= 1
                return outcome
            making = library.claim(fp)
            if making is None:
                job.fingerprint = fp  # released when the row ends, whatever happens
                if await library.claim_shared(fp):
                    return None
                # Another run made it meanwhile: copy it (rows here waiting look again too).
                library.release(fp)
                job.fingerprint = None
                continue
            # Waiting on another row of this run, perhaps of a later product, which may be
            # waiting at the budget for this one: not waited for there any more.
            self._arrived(job)
            await making.wait()

    async def _add_to_library(
        self,
        fingerprint: str,
        info: ImageInfo,
        task_id: str,
        cost: float,
        body: bytes,
        relpath: str,
        thumbnail: bytes | None,
    ) -> None:
        """Keep a paid image in the library; a library that fails to take it costs a later
        run a submit, never this row its image (it is in DEST already)."""
        assert self._library is not None
        entry = Entry(
            fingerprint=fingerprint,
            format=info.format,
            bytes=info.size,
            sha256=info.sha256,
            width=info.width,
            height=info.height,
            task_id=self._provider.mask.seal(task_id),  # the index is an output
            cost_credits=cost,
            created_at=time.time(),
        )
        try:
            await self._library.store(entry, body, self._sink, relpath, thumbnail)
        except (KleinError, OSError, ValueError) as exc:
            log.warning("library %s did not take %s: %s", self._library.uri, relpath, exc)

    async def _stored_outcome(
        self, job: Job, task_id: str, submitted_at: float, digests: tuple[str, ...]
    ) -> Outcome | None:
        """A resumed row's image as an earlier run stored it, verified; None if there is none.

        A run stopped between storing an image and committing its outcome leaves the file
        and an open task in the ledger. When the result URL has since expired, or the API
        has forgotten the task, that file is the image (already paid for): use it.
        """
        request = job.row.request
        relpath = f"images/{job.row.key}.{FORMAT_EXT[request.output_format]}"
        if not await self._sink.exists(relpath):
            return None
        data = await self._sink.get(relpath)
        if data is None:
            return None
        try:
            info = await asyncio.to_thread(
                inspect_image,
                data,
                expected_format=request.output_format,
                expected_size=self._provider.output_size(request),
            )
        except InvalidImage as exc:
            log.warning("stored image %s is not usable (%s): not taken as done", relpath, exc)
            return None
        if job.resumed_fingerprint is not None and self._library is not None:
            cost = self._price(job)
            await self._add_to_library(
                job.resumed_fingerprint, info, task_id, cost, data, relpath, None
            )
        return self._outcome(
            job,
            RowStatus.SUCCEEDED,
            task_id=task_id,
            digests=digests,
            submitted_at=submitted_at,
            output_uri=self._sink.uri(relpath),
            sha256=info.sha256,
            width=info.width,
            height=info.height,
            format=info.format,
            size=info.size,
            cost=self._price(job),
        )

    async def _download(
        self, url: str, fmt: str, expected: tuple[int, int], thumbnail: bool
    ) -> tuple[Any, bytes]:
        async def one(passage: Passage) -> tuple[Any, bytes]:
            # A download slot per attempt, not across the backoff sleeps between them (nor
            # the wait at a closed gate): a retrying download must not keep other finished
            # tasks from theirs.
            async with self._downloads:
                return await self._download_once(url, fmt, expected, thumbnail, passage)

        return await retry_transient(
            self._settings.retry,
            lambda: self._through(url, one, "the host of the results"),
            on_retry=self._count_retry,
            paused=self._gates.outages.seconds,
        )

    async def _download_once(
        self, url: str, fmt: str, expected: tuple[int, int], thumbnail: bool, passage: Passage
    ) -> tuple[Any, bytes]:
        self.stats.downloads += 1
        try:
            # Result URLs are signed and may live on another host: never send the API key.
            # That host has its own gate: a CDN that answers keeps serving while the API
            # does not, and the other way round.
            async with self._session.get(url, timeout=self._timeout) as response:
                status = response.status
                passage.heard(status)
                if status == 200:
                    length = response.content_length
                    if length is not None and length > MAX_IMAGE_BYTES:
                        raise _RowError(RowStatus.FAILED, f"image of {length} bytes is too large")
                    chunks: list[bytes] = []
                    received = 0
                    async for chunk in response.content.iter_chunked(1 << 18):
                        received += len(chunk)
                        if received > MAX_IMAGE_BYTES:
                            raise _RowError(RowStatus.FAILED, "image body is too large")
                        chunks.append(chunk)
                    data = b"".join(chunks)
                    if length is not None and len(data) != length:
                        raise Transient(f"image body cut short ({len(data)} of {length} bytes)")
                # Any other answer stands for its status alone: its body is not read (an
                # error page streaming without end must not take the run's memory).
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.stats.errors[f"download {type(exc).__name__}"] += 1
            why = None if passage.reported else no_answer(exc)
            unanswered = passage.failed(why) if why is not None else False
            raise Transient(
                f"download failed: {type(exc).__name__}", unanswered=unanswered
            ) from None
        if status in (403, 404, 410):
            raise _Expired(f"HTTP {status}")
        if status != 200:
            self.stats.errors[f"download {status}"] += 1
            raise Transient(
                f"download answered HTTP {status}",
                retry_after=retry_after,
                unanswered=passage.silent,
            )
        thumb = THUMB_PX if thumbnail else None
        try:
            if len(data) > 1_000_000:
                info = await asyncio.to_thread(
                    inspect_image,
                    data,
                    expected_format=fmt,
                    expected_size=expected,
                    thumbnail_px=thumb,
                    thumbnail_quality=THUMB_QUALITY,
                )
            else:
                info = inspect_image(
                    data,
                    expected_format=fmt,
                    expected_size=expected,
                    thumbnail_px=thumb,
                    thumbnail_quality=THUMB_QUALITY,
                )
        except InvalidImage as exc:
            raise Transient(f"downloaded image is invalid: {exc}") from None
        return info, data

    def _wants_thumbnail(self, job: Job) -> bool:
        """Whether ``job``'s image gets a contact-sheet thumbnail as it is verified.

        Only rows near the top of the manifest, whose tiles come first on report.html, and
        at most INLINE_THUMBS of them: the 1/8-scale decode behind a thumbnail was about
        40% of the client's CPU per image (issue 16's profile). Every other JPEG has its
        structure walked instead (``verify.jpeg_size``) and its tile shows the image file.
        """
        return self._thumbs_left > 0 and job.row.index < INLINE_THUMBS

    async def _store_thumbnail(self, key: str, thumbnail: bytes) -> None:
        """Put the verification decode's thumbnail where report.html looks for it first.

        Written after the image, so the page's freshness check (thumbnail not older than
        the image) accepts it. Only a cache: a failure here costs the page a decode later.
        """
        self._thumbs_left -= 1
        with contextlib.suppress(OSError, ValueError, KleinError):
            await self._sink.put(f"{THUMBS_RELDIR}/{key}.jpg", thumbnail, "image/jpeg")

    # --- helpers ------------------------------------------------------------------------------

    def _count_retry(self, error: Transient) -> None:
        self.stats.retries += 1
        log.debug("retrying after: %s", error.reason)

    def _price(self, job: Job) -> float:
        """What the API charges (or charged) for ``job``'s task, references included.

        The figure journaled with its acknowledgement first (the API's own, or the price
        with references at submit), then the price with the references loaded this run.
        The request's price alone is only left for a row whose references were never
        loaded, and it is short by their megapixels: budgets and recorded costs must not
        fall back to it where better is known.
        """
        if job.ack_cost is not None:
            return job.ack_cost
        if job.price is not None:
            return job.price
        return self._provider.cost(job.row.request)

    async def _product_cost(self, job: Job, references: Sequence[Reference]) -> float:
        """The price of every image of ``job``'s product in this run, for its budget hold."""
        costs = await asyncio.gather(
            *(self._sibling_cost(job, sibling, references) for sibling in job.group_requests)
        )
        return sum(costs)

    async def _sibling_cost(
        self, job: Job, sibling: ImageRequest, references: Sequence[Reference]
    ) -> float:
        """The price of another image of ``job``'s product, its references included.

        A sibling that asks for the same references as ``job`` (a variation matrix over
        style or size) is priced with them. One asking for others (a shop's variants, each
        with its own Variant Image) has them loaded now: they are cached for its own turn.
        Priced without them, the hold fell short of the product, the rest of which then
        had to find room beside products that started later: a budget stop left a product
        with one variant of three, and the next product made. A reference that does not
        load is left out (that image is rejected in its turn and its share given back).
        """
        own = [spec for _, spec in job.row.request.reference_specs()]
        theirs = [spec for _, spec in sibling.reference_specs()]
        if own == theirs:
            return self._provider.cost(sibling, references)
        loaded: list[Reference] = []
        for _, spec in sibling.reference_specs():
            with contextlib.suppress(ReferenceError):
                loaded.append(await self._refs.load(spec, self._session))
        return self._provider.cost(sibling, loaded)

    def _outcome(
        self,
        job: Job,
        status: RowStatus,
        *,
        reason: str | None = None,
        task_id: str | None = None,
        digests: Sequence[str] = (),
        submitted_at: float | None = None,
        output_uri: str | None = None,
        sha256: str | None = None,
        width: int | None = None,
        height: int | None = None,
        format: str | None = None,
        size: int | None = None,
        cost: float | None = None,
        resubmit_on_retry: bool = False,
    ) -> Outcome:
        """The one place a row's outcome is made, so an acknowledged task is never lost.

        With ``job.tracked`` set (the API acknowledged the row's task) the task id, its
        submit time and the reference digests come from it whatever the caller knew, and
        the cost follows what the API said of the task: charged once it completed (or
        when it is unknown how it ended: counted, so budgets stay on the safe side),
        nothing when it was moderated or the API failed it.
        """
        tracked = job.tracked
        if tracked is not None:
            task_id = tracked.task_id
            submitted_at = tracked.submitted_at
            digests = digests or job.digests
            if cost is None:
                cost = self._charged(job, tracked, status, resubmit_on_retry)
        else:
            digests = digests or job.digests
            if job.acked is not None and task_id is None:
                task_id, submitted_at, acked_cost = job.acked
                cost = acked_cost if cost is None else cost
        return Outcome(
            index=job.row.index,
            key=job.row.key,
            status=status,
            request=job.row.request,
            reason=reason if reason is not None else job.note,
            reference_digests=tuple(digests),
            task_id=task_id,
            output_uri=output_uri,
            sha256=sha256,
            width=width,
            height=height,
            format=format,
            bytes=size,
            attempts=job.attempts,
            queued_at=job.queued_at,
            submitted_at=submitted_at,
            finished_at=time.time(),
            cost_credits=cost or 0.0,
            resubmit_on_retry=resubmit_on_retry,
        )

    def _charged(self, job: Job, tracked: _Tracked, status: RowStatus, api_ended: bool) -> float:
        """What an acknowledged task costs: see ``_outcome``; its price is ``_price``'s."""
        quoted = self._price(job) if tracked.cost is None else tracked.cost
        if tracked.completed:
            return quoted  # a verified image is exactly the size asked for: the same price
        if status is RowStatus.MODERATED or api_ended:
            return 0.0
        return quoted


class _RowError(Exception):
    """This row ends now, with this status and reason."""

    def __init__(self, status: RowStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _AmbiguousSubmit(_RowError):
    """A submit answered 200 without a task we can read: perhaps charged, never resent."""


class _UnknownTask(_RowError):
    """The API answers 404 for the task: it was forgotten (or never existed there)."""


class _Expired(Exception):
    """The result URL no longer serves the image."""


async def _read_json(response: aiohttp.ClientResponse) -> Any:
    """The answer's JSON (None if it is not JSON); a 2xx answer over ``MAX_ANSWER_BYTES``
    raises ``ValueError`` before it is all read: a submit or poll answer is a few hundred
    bytes, and an API (or a proxy) that streams hundreds of megabytes must not take the
    run's memory with it (a submit answered so is ambiguous, a poll is retried). A larger
    error answer is read no further and stands for its status alone."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            if not 200 <= response.status < 300:
                return None  # a refusal all the same: said by its status alone
            raise ValueError(f"answer larger than {MAX_ANSWER_BYTES} bytes is too large")
        chunks.append(chunk)
    return decode_answer(b"".join(chunks))


def decode_answer(text: bytes) -> Any:
    """An answer's JSON, None if it is empty or no JSON. orjson reads the task list's
    thousands of entries in about half the time the standard library takes; what orjson
    refuses and the standard library reads (a byte-order mark, UTF-16, NaN, integers past
    64 bits) is read as before, so no answer is understood differently."""
    if not text:
        return None
    try:
        return orjson.loads(text)
    except ValueError:  # orjson.JSONDecodeError is one
        pass
    try:
        return json.loads(text)
    except ValueError:
        return None
