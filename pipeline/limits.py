"""Client-side limits: the submit-rate window and the active-task slot controller.

The server frees a slot the moment a task finishes, not when we find out, and polling every
task often enough to notice at once would cost many polls per image. So the slot controller
keeps two counts: tasks we hold that are not yet known to be finished, and a lower bound on
how many of those have in fact finished (each submit the server accepts while we believed
every slot busy proves one more did). While that bound says a slot is free, it submits at
once; when every slot may be busy it *probes*: one submit at a time, spaced so that a share
``refusal_target`` of probes is refused with 429. A refused probe costs one request and no
credits; an accepted one reuses a slot within a fraction of a task's duration of its
freeing. ``benchmarks/`` measures the trade: slot utilisation against 429s.

A 429 that arrives while the bound says a slot is free means someone else shares the key:
the controller then shrinks its own limit multiplicatively and grows it back additively
(AIMD, as TCP and botocore's adaptive mode do), never past the tier's limit.

Sharing changes what probing costs. Alone on a key, a refused probe means "not yet" and
the 25% refusal share is the price of filling slots within a fraction of a task of their
freeing. With another job on the key, every slot we do not hold is taken by it, so most
probes are refused and 429s reach a quarter of our submits. So once contention is seen,
the controller stops probing for ``contention_hold_s`` (renewed by each contention 429) and
relies on the AIMD window alone, as TCP does: the window counts our tasks not yet known to
be finished, and it grows until the key is full, which the next 429 says. Meanwhile:

- each cut is taken from what we hold at the 429 plus the refused one (the server just
  said the key is full, so that is our share right now), at most once per task duration
  (like TCP's one cut per round trip), and the window grows by one slot per
  ``increase_every`` x window accepted submits, and only while it is what holds us back
  (RFC 7661: a window running ahead of what we hold would make the next cut meaningless);
- a job holding more of the full key than all the others together cuts deeper: ``backoff``
  to the power of its share over theirs, at most by half and not below half the key
  (``_cut``). With webhooks a job refills its own slots within milliseconds, so a second
  job starting on a full key gets a slot only when the first gives one up, and plain AIMD
  would take minutes to even the split.
  Meanwhile a window far below what the others held grows up to ``MAX_GROWTH_BOOST``
  times faster once the key has had room for ``BOOST_AFTER_QUIET`` task durations, so the
  room a deep cut leaves does not idle, and a job that joined a key already full grows by a
  slot per accepted submit (TCP's slow start) until its first 429 after it (``_slow_start``).
  An interactive app holding a slot or two when the key fills looks the same as a second
  job's first slot, so the job cuts as deep for it; a job claims that room within a task
  duration or two, an app does not, so after ``ROOM_BACK_AFTER_QUIET`` task durations
  without a 429 the job takes it back a slot per accepted submit, and others holding up
  to three slots then get the plain cut (one job beside the app: 70-83% busy polling,
  86-94% with webhooks, 66-73% before; ``benchmarks/sharing.py``). With webhooks it then
  stops a few slots below the tier (``_ceiling``), or it would starve the app unseen;
- for a task duration after a cut, one submit at a time, and a pause of half a task after
  a 429 (ended early by one of our own tasks finishing), so a full key costs one 429, not
  one per submit on its way; a submit sent after the cut and refused within that task
  duration cuts nothing more but brings the window down toward what we hold (a cut's step
  at most each time), so a finish then sends only its own refill (with the window above,
  every finish sent one submit more, refused: two jobs and an app read 4.5% 429s in one
  window of twelve, ``benchmarks/notes.md`` "Session 34");
- the engine polls our tasks early and often (``engine.CONTENDED_*``): our own
  finished-but-unnoticed tasks count against our window, and the other clients take the
  slots we leave idle meanwhile.

429s then stay near one per AIMD cycle, about
``1 / ((1 - backoff) * window * increase_every * window)`` of submits, while a cut of 10%
leaves little of the key idle (two jobs and an app on 24 slots: 0.9-1.5% 429s, 93-97% busy;
``tests/sharing``, ``benchmarks/sharing.py``). When the 429s stop for the hold period,
probing resumes and a lone job gets its full speed back. A refused probe is never taken for
contention when our own tasks could have filled the key at the moment it was sent, so a
lone job never enters this mode (its utilisation, polls per image and 429 share are
unchanged; README). Where finishes are known (webhooks), ``probing=False`` turns probes off
altogether.

Heavy tails change when to probe. Under the real API's latency (median 2.7 s, p95 29 s) a
full key is sometimes held by a few slow tasks for many seconds, and at other times a
dozen short tasks end within a second; evenly spaced probes are refused in the first
case, which pushes the spacing out, and then too sparse for the second. Once the engine
has learned the task-time distribution (``set_distribution``: a lognormal from two
learned quantiles), the controller probes from it instead: it sums, over every task it
holds, the probability that the task has finished since it was last known to be running
(acknowledged, polled pending, or the last refused probe, which proves every slot busy),
takes off the finishes accepted probes have already proven, and sends a probe while that
expectation exceeds a threshold, several in the air when several tasks have probably
finished. The threshold adapts like the spacing does, so that about ``refusal_target`` of
probes are refused (``benchmarks/notes.md`` measures it against even spacing), and up to
``SLOW_FINISHES_REFUSAL`` when tasks end seldom (``_refusal_share``: an idle slot then
stays idle longer, so a refusal buys more).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import math
import time
from dataclasses import dataclass

from pipeline.contract import TIERS, Tier
from pipeline.errors import ConfigError

#: The deepest single cut (TCP Reno's), for a job holding nearly the whole shared key.
MAX_CUT = 0.5
#: Task durations without a contention 429 after a deep cut before the job takes the room
#: it gave up back, a slot per accepted submit: nobody claimed it (``_taking_room_back``).
ROOM_BACK_AFTER_QUIET = 4.0
#: Slots the others may hold when the key fills and still be taken for an interactive app
#: (a request or two, overlapping) once a deep cut's room went unclaimed: they get the
#: plain cut. At two, an app's three overlapping tasks read as a job, and the deep cut it
#: got took a polling job beside the app down to 62% busy in one run (80-83% at three).
SMALL_OTHERS = 3
#: The most a window far below the others' holdings grows faster than plain AIMD.
MAX_GROWTH_BOOST = 4.0
#: Task durations without a contention 429 before such a window grows faster.
BOOST_AFTER_QUIET = 3.0
#: ... and before a job that joined a full key grows a slot per accepted submit.
SLOW_START_AFTER_QUIET = 1.0
#: Submits a task duration while a full key holds none of our tasks (after the first
#: contention 429); with some of ours running, the pause after a 429 is half a duration.
TRIES_WHILE_SHUT_OUT = 8.0
#: How long one full sum of expected finishes serves later calls, extrapolated along its
#: rate: this share of the median task time, at most ``SUM_REUSE_MAX_S``. A task younger
#: than that has almost no chance of having ended (about 1e-8 at the ``standard`` shape,
#: 3e-4 at the production one), so the tasks acknowledged meanwhile change the sum by
#: nothing worth a full pass; the ones seen to end are taken out one by one.
SUM_REUSE_SHARE = 0.02
SUM_REUSE_MAX_S = 0.02
#: The share of probes allowed to be refused when tasks end seldom (``_refusal_share``),
#: and the paces (accepted submits per second over the last ``PACE_WINDOW_S``: on a full
#: key, the pace tasks end at) between which the share moves from ``refusal_target`` (at
#: ``FAST_FINISHES_PER_S`` and above) to it.
SLOW_FINISHES_REFUSAL = 0.45
FAST_FINISHES_PER_S = 20.0
SLOW_FINISHES_PER_S = 5.0
PACE_WINDOW_S = 10.0
#: ... and only while the key's submits per minute are this many times the pace.
SPARE_SUBMITS = 4.0


def resolve_tier(
    name: str | None = None, max_active: int | None = None, submits_per_minute: int | None = None
) -> Tier:
    """The limits a run obeys: a named tier, with any explicit limit overriding it."""
    if name is not None and name not in TIERS:
        allowed = ", ".join(TIERS)
        raise ConfigError(f"unknown tier {name!r}; allowed: {allowed}")
    base = TIERS[name or "standard"]
    for label, value in (("max active", max_active), ("submits per minute", submits_per_minute)):
        if value is not None and value < 1:
            raise ConfigError(f"{label} must be at least 1, got {value}")
    if max_active is None and submits_per_minute is None:
        return base
    return Tier(
        name if name is not None else "custom",
        max_active if max_active is not None else base.max_active,
        submits_per_minute if submits_per_minute is not None else base.submits_per_minute,
    )


class SubmitRateLimiter:
    """At most ``per_minute`` submit requests in any sliding 60-second window.

    Every request counts, accepted or refused, as the server counts them. A small margin
    covers the time between our clock and the server's receipt.
    """

    def __init__(self, per_minute: int, *, window_s: float = 60.0, margin_s: float = 0.05) -> None:
        self._per_minute = per_minute
        self._window = window_s + margin_s
        self._sent: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._sent and now - self._sent[0] >= self._window:
                    self._sent.popleft()
                if len(self._sent) < self._per_minute:
                    self._sent.append(now)
                    return
                await asyncio.sleep(self._sent[0] + self._window - now)


class RankedTurn:
    """One holder at a time; waiters get the turn lowest rank first (then first come).

    The slot controller's queue of rows waiting to submit. A FIFO lock sent a row refused
    with 429 to the back, behind every row waiting (about a hundred at the ``standard``
    tier), so rows left manifest order; under a heavy latency tail a long row started late
    decides the run's wall time. With ranks, a refused row asks again first.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    async def take(self, rank: int) -> None:
        if not self._held and not self._waiters:
            self._held = True
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._arrival), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.give()  # handed the turn as we were cancelled: pass it on
            raise

    def give(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._held = False


@dataclass(slots=True, eq=False)
class Permit:
    """One submit request in the air; tells the controller how to read its answer."""

    speculative: bool
    settled: bool = False
    #: Our tasks that may have been busy when it was sent (the probe's reason to exist).
    busy_at_send: int = 0
    #: When it left (monotonic): a 429 to a submit sent after a cut says more than one to a
    #: submit already in the air then.
    sent_at: float = 0.0
    #: Once accepted: when (monotonic), and the last moment the task was known running.
    acked_at: float = 0.0
    running_at: float = 0.0
    #: ``SlotController._expected_finishes``'s share of this task still running at the
    #: moment it was last known running, and what that was computed from (that moment
    #: and the distribution): it changes when a poll says so, not at every call.
    survived: float = 1.0
    survived_from: tuple[float, object] | None = None


class SlotController:
    """Decides when the next submit may go, from what the server's answers prove."""

    def __init__(
        self,
        limit: int,
        *,
        expected_latency_s: float = 1.0,
        refusal_target: float = 0.25,
        submits_per_minute: int | None = None,
        max_outstanding: int | None = None,
        probing: bool = True,
        prompt_finishes: bool = False,
        backoff: float = 0.9,
        increase_every: float = 3.5,
        contention_hold_s: float | None = None,
    ) -> None:
        if not 0.0 < refusal_target < 1.0:
            raise ConfigError(f"refusal target must be between 0 and 1, got {refusal_target}")
        if not 0.0 < backoff < 1.0:
            raise ConfigError(f"backoff must be between 0 and 1, got {backoff}")
        self.limit = limit
        self._effective = float(limit)
        self._held = 0  # submitted or acknowledged, not yet known finished
        self._finished_lb = 0  # of those, how many have certainly finished
        self._in_air = 0  # of those, submits still waiting for their answer
        self._probes_out = 0  # probes in the air
        self._next_probe = 0.0
        self._probe_scale = 1.0
        self._latency_s = expected_latency_s
        self._target = refusal_target
        self._submits_per_s = submits_per_minute / 60.0 if submits_per_minute else math.inf
        self._max_outstanding = max_outstanding or 4 * limit + 16
        self._grow_credit = 0.0
        self._changed = asyncio.Event()
        self._turn = RankedTurn()
        self._unranked = itertools.count(1 << 62)
        self._probing_enabled = probing
        self._prompt_finishes = prompt_finishes
        self._backoff = backoff
        self._increase_every = max(increase_every, 0.1)
        self._hold_s = contention_hold_s
        self._contended_until = 0.0
        self._last_cut = -math.inf
        self._others = 0.0  # slots the others held when a 429 last said the key was full
        self._last_contention = -math.inf
        self._paused_until = 0.0
        # Joining a key another client filled (no task of ours ran when contention began)
        # and not yet refused since the slow start grew the window (``_slow_start``).
        self._joining = False
        self._slow_grown = False
        # The last cut was deep; the room a deep cut gave up went unclaimed for
        # ``ROOM_BACK_AFTER_QUIET`` task durations and no 429 since showed the others on
        # more than ``SMALL_OTHERS`` slots (an app shares the key); the slots the others
        # held for sure at the last contention 429 (every slot not counted as ours).
        self._deep_cut = False
        self._app_seen = False
        self._others_seen = 0
        self.refused_probes = 0
        self.refused_contention = 0
        # The learned task-time distribution (log median, sigma), once the engine has one.
        self._dist: tuple[float, float] | None = None
        self._live: set[Permit] = set()  # acknowledged tasks not yet known finished
        self._all_running_at = -math.inf  # a refused probe proved every slot busy then
        self._proven = 0  # finishes accepted probes proved since then
        self._threshold = 1.0  # expected unproven finishes that let a probe go
        # The last full sum of expected finishes: when, the sum and its rate (per second),
        # and how long it may serve (``SUM_REUSE_SHARE``). Every change to what a term is
        # made of but a finish (a poll's "still running", a refused probe, the distribution)
        # drops it (``_sum_t = -inf``); a finish takes its own term out (``_drop_term``).
        self._sum_t = -math.inf
        self._sum_e = self._sum_r = 0.0
        self._sum_reuse_s = 0.0
        #: Tasks whose submit answer was lost (``lost``): (when to forget, order, permit).
        self._unnamed: list[tuple[float, int, Permit]] = []
        #: Unnamed tasks whose slots came back because their hold ran out, not because
        #: anything showed them ended: (when, permit), for ``_guess_was_wrong``.
        self._guessed: collections.deque[tuple[float, Permit]] = collections.deque()
        self._seq = itertools.count()
        #: When the submits of the last ``PACE_WINDOW_S`` were accepted, and the first ever.
        self._accepts: collections.deque[float] = collections.deque()
        self._first_accept = math.inf

    # --- what the engine reads ---------------------------------------------------------------

    @property
    def effective_limit(self) -> int:
        return max(1, int(self._effective))

    @property
    def contended(self) -> bool:
        """Whether another client was seen on the key recently (probing is off meanwhile)."""
        return time.monotonic() < self._contended_until

    @property
    def max_outstanding(self) -> int:
        return self._max_outstanding

    @property
    def probing(self) -> bool:
        """Whether this controller probes (alone on the key's own limit, polling)."""
        return self._probing_enabled

    @property
    def held(self) -> int:
        return self._held

    @property
    def pace(self) -> float:
        """Submits accepted a second over the last ``PACE_WINDOW_S`` (on a full key, the
        pace tasks end at); 0 before the first."""
        return self._pace_at(time.monotonic())

    def _pace_at(self, now: float) -> float:
        self._forget_accepts(now)
        if not self._accepts:
            return 0.0
        return len(self._accepts) / min(PACE_WINDOW_S, max(now - self._first_accept, 1.0))

    def _forget_accepts(self, now: float) -> None:
        accepts = self._accepts
        while accepts and accepts[0] < now - PACE_WINDOW_S:
            accepts.popleft()

    def _busy_upper_bound(self) -> int:
        return self._held - self._finished_lb

    def set_latency(self, seconds: float) -> None:
        """Typical task duration, learned by the collector; spaces the probes."""
        self._latency_s = max(0.01, seconds)

    @property
    def distribution(self) -> tuple[float, float] | None:
        """The learned task-time lognormal as ``(mu, sigma)`` of the log, or None yet."""
        return self._dist

    def set_distribution(self, median_s: float, sigma: float) -> None:
        """The task-time distribution the engine learned: probes then follow it."""
        self._dist = (math.log(max(median_s, 1e-3)), max(sigma, 0.05))
        self._sum_reuse_s = min(SUM_REUSE_SHARE * median_s, SUM_REUSE_MAX_S)
        self._sum_t = -math.inf

    def still_running(self, permit: Permit) -> None:
        """A poll said this task had not finished: it was running until now."""
        permit.running_at = time.monotonic()
        self._sum_t = -math.inf

    # --- the protocol ------------------------------------------------------------------------

    async def acquire(self, rank: int | None = None) -> Permit:
        """Wait until a submit may go, and count it as holding a slot.

        Callers queue for their turn, so each change wakes the row at the head of the queue
        rather than every waiting row (hundreds of wake-ups per submit at the scale tier).
        The head is the lowest ``rank`` (the engine passes the row's place in the run, so a
        row refused with 429 asks again before rows behind it); without one, callers queue
        after every ranked caller, first come first served.
        """
        await self._turn.take(next(self._unranked) if rank is None else rank)
        try:
            return await self._acquire()
        finally:
            self._turn.give()

    async def _acquire(self) -> Permit:
        while True:
            now = time.monotonic()
            forget_at = self._forget_unnamed(now) if self._unnamed else math.inf
            # For a task duration after a contention 429, one submit at a time: a full key
            # then costs one 429, not one per submit already on its way.
            serial = now < self._last_cut + self._latency_s and self._in_air > 0
            if self._held < self._max_outstanding and now >= self._paused_until and not serial:
                if self._busy_upper_bound() < self.effective_limit:
                    self._held += 1
                    self._in_air += 1
                    return Permit(speculative=False, sent_at=now)
                if self._may_probe(now):
                    self._probes_out += 1
                    busy = self._busy_upper_bound()
                    self._held += 1
                    self._in_air += 1
                    return Permit(speculative=True, busy_at_send=busy, sent_at=now)
            self._changed.clear()
            timeout = None
            if self._may_probe(math.inf) and self._held < self._max_outstanding:
                timeout = max(0.0, max(self._next_probe, self._contended_until) - now)
                if self._dist is not None and now >= self._contended_until:
                    timeout = self._until_likely_free(now)
            if now < self._paused_until:
                timeout = min(timeout or math.inf, self._paused_until - now)
            if forget_at < math.inf:
                timeout = min(timeout if timeout is not None else math.inf, forget_at - now)
            # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives
            # as the event is set (gh-86296), and a run stopped by Ctrl-C then waits here
            # for ever, since every task that could set the event was just cancelled.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()

    def accepted(self, permit: Permit) -> None:
        """The server took the task: it proves our busy slots are at most the limit."""
        if permit.settled:
            return
        permit.settled = True
        self._in_air -= 1
        permit.acked_at = permit.running_at = now = time.monotonic()
        self._live.add(permit)
        self._accepts.append(now)
        self._first_accept = min(self._first_accept, now)
        self._forget_accepts(now)
        # Only our acknowledged tasks are on the server's count; submits still in the air
        # may not have reached it, so they prove nothing about finishes.
        bound = self._held - self._in_air - self.limit
        if bound > self._finished_lb:
            self._proven += bound - self._finished_lb
            self._finished_lb = bound
        if permit.speculative:
            self._probes_out -= 1
            # Accepted probes pull the next one closer; refused ones push it away. The
            # multiplicative steps balance when refusals are ``refusal_target`` of probes.
            target = self._refusal_share(now)
            step = 1.0 - 0.1 * target / (1.0 - target)
            self._probe_scale = max(self._probe_scale * step, 0.01)
            self._threshold = max(self._threshold * step, 0.2)
        if self._busy_upper_bound() >= self.effective_limit:
            self._schedule_probe()
        # Grow only while the window is what holds us back (RFC 7661): a window that runs
        # ahead of what we hold would make the next cut meaningless.
        # The ceiling is asked for only below the tier: a lone job's accepts never need it.
        if self._effective < self.limit and self._held >= self.effective_limit - 1:
            ceiling = self._ceiling()
            if self._effective < ceiling:
                self._grow(ceiling)
        self._changed.set()

    def _grow(self, ceiling: float) -> None:
        """One accepted submit's growth of a window below ``ceiling``."""
        if self._slow_start():
            self._grow_credit = 1.0
            self._slow_grown = True
        elif self._taking_room_back():
            self._grow_credit = 1.0
            self._app_seen = self._app_seen or self._others_seen <= SMALL_OTHERS
        else:
            self._grow_credit += self._growth_boost() / (self._increase_every * self._effective)
        if self._grow_credit >= 1.0:
            self._grow_credit = 0.0
            self._effective = min(ceiling, self._effective + 1.0)

    def refused(self, permit: Permit) -> None:
        """A 429: a probe that came too early, or another client holding our slots."""
        if permit.settled:
            return
        permit.settled = True
        # More of our own submits were out than the key has slots (a probe overtook an
        # ordinary submit on the wire, as in the first burst): the 429 is our own doing and
        # says nothing about other clients.
        overcommitted = self._busy_upper_bound() > self.limit
        acknowledged = self._held - self._in_air
        self._held -= 1
        self._in_air -= 1
        if permit.speculative:
            self._probes_out -= 1
        if overcommitted and not permit.speculative:
            self.refused_probes += 1
        elif permit.speculative and permit.busy_at_send >= self.limit:
            # Sent while our own tasks may have filled the key: "not yet", not another
            # client, even if one of them was seen to finish while the answer was on its
            # way (the server decided before that; counting it as contention would stop a
            # lone job's probing for many task durations).
            self.refused_probes += 1
            self._probe_scale = min(self._probe_scale * 1.1, 100.0)
            self._threshold = min(self._threshold * 1.1, 8.0)
            # The server had at most ``limit`` of ours running when it refused: the rest of
            # those it knew have finished, and every task was running when the probe left.
            self._finished_lb = max(self._finished_lb, acknowledged - self.limit)
            self._all_running_at = max(self._all_running_at, permit.sent_at)
            self._sum_t = -math.inf
            self._proven = 0
        elif self._guess_was_wrong():
            self.refused_probes += 1  # our own miscount (an unnamed task), not another client
        else:
            # We were sure a slot was free, or we hold fewer tasks than the key allows and
            # the key is full anyway: someone else is using it.
            self.refused_contention += 1
            now = time.monotonic()
            if now >= self._contended_until:
                # Contention begins: joining if the key was full before we held any of it.
                self._joining, self._slow_grown = not self._live, False
            elif self._slow_grown:
                self._joining = False  # the slow start's first 429: AIMD from here
            self._contended_until = now + (
                self._hold_s if self._hold_s is not None else max(5.0, 20.0 * self._latency_s)
            )
            # The key is full right now: our share is what we hold plus the one just
            # refused, and the others hold the rest. The multiplicative cut comes at most
            # once per task duration: answers to submits already in the air describe the
            # same full moment.
            share = min(self._effective, float(self._held + 1))
            self._others = max(0.0, self.limit - share)
            self._others_seen = max(0, self.limit - self._held)
            if self._others_seen > SMALL_OTHERS:
                self._app_seen = False  # more than an app: a job wants a share
            self._last_contention = now
            if now - self._last_cut >= self._latency_s:
                self._last_cut = now
                window = self._cut(share)
                self._deep_cut = window < share * self._backoff
                self._effective = max(1.0, window)
                self._grow_credit = 0.0
            elif permit.sent_at > self._last_cut:
                # Sent after the cut, and refused: no second cut, but the window comes down
                # to what we hold. Above it, each of our finishes would send its refill and
                # one submit more into the full key, refused, a 429 per finish until the
                # next cut. By a cut's step at most: a newcomer whose every submit is
                # refused would otherwise fall to a window of one at once, and grow back
                # from there. (Submits already in the air at the cut tell nothing new.)
                floor = max(float(self._held), self._effective * self._backoff)
                self._effective = max(1.0, min(self._effective, floor))
            # The key is full right now: the next submit waits for one of our tasks to
            # finish, or a share of a task's duration, instead of asking again at once.
            # With none of ours running nothing of ours will end that pause, and a slot
            # the others free is theirs again within milliseconds when they learn of
            # finishes by webhook: each try is a draw of about the same odds however it is
            # spaced, so trying more often costs no more 429s before the first slot, and
            # gets it sooner (at two tries a duration a job joining such a key waited up
            # to 18.5 s; benchmarks/notes.md "Session 35").
            shut_out = not self._live and self._in_air == 0
            self._paused_until = now + self._latency_s / (TRIES_WHILE_SHUT_OUT if shut_out else 2)
        self._schedule_probe()
        self._changed.set()

    def abandoned(self, permit: Permit) -> None:
        """The submit ended without a task (an error): give the slot back."""
        if permit.settled:
            return
        permit.settled = True
        self._held -= 1
        self._in_air -= 1
        if permit.speculative:
            self._probes_out -= 1
        self._changed.set()

    def lost(self, permit: Permit) -> None:
        """The submit's answer never arrived: the server may be running a task we cannot name.

        The slot stays counted as ours (an *unnamed* task) until the learned distribution
        says the task has almost surely ended (``_unnamed_hold_s``). Given back at once, as
        an error's is, the key held one more task than we counted, the next submit we
        believed safe was refused, and that 429 read as another client on the key: the
        controller then cut its window by half, stopped probing and the engine polled
        every task early (issue 16's ``scale-faults``: 6.3 polls per image, the key a third
        busy). Probes see the unnamed task like any other: its chance of having ended
        counts toward the next probe.
        """
        if permit.settled:
            return
        permit.settled = True
        self._in_air -= 1
        if permit.speculative:
            self._probes_out -= 1
        now = time.monotonic()
        permit.acked_at = permit.running_at = now
        self._hold_unnamed(permit, now + self._unnamed_hold_s())
        self._changed.set()

    def orphaned(self, permit: Permit) -> None:
        """An acknowledged task this run will not poll (an error of ours right after its
        answer, before the engine tracked it): its slot is held as a lost answer's is,
        until the task has surely ended, then given back. Left alone it stayed counted as
        held for the rest of the run, and with enough of them no submit was allowed again
        (the own-errors test at ``journaling an ack`` stalled under load)."""
        if permit not in self._live:
            return
        self._hold_unnamed(permit, permit.acked_at + self._unnamed_hold_s())
        self._changed.set()

    def _refusal_share(self, now: float) -> float:
        """The share of probes that may be refused, higher when tasks end seldom.

        A refused probe costs one request; a slot left idle costs its share of the key for
        as long as it stays idle. At a given share of probes refused the controller leaves
        about the same number of slots idle whatever the pace (``benchmarks/notes.md``, the
        probe-only bound), so the slot-seconds lost per image grow with the time between
        finishes while the refused requests per image do not: when tasks end seldom, each
        refusal buys more. The pace is the accepted submits of the last ``PACE_WINDOW_S``
        (on a full key each replaced a task that ended), not the learned distribution:
        under a heavy tail that starts far too short and learns the long tasks last. At or
        below ``SLOW_FINISHES_PER_S`` (the real API's latency on a 24-slot key: about 3 a
        second) the share is ``SLOW_FINISHES_REFUSAL``; from ``FAST_FINISHES_PER_S`` (the
        ``standard`` tier's 1 s tasks) up, and in the run's first window (the first burst
        is no pace), ``refusal_target``. Refused submits count against the key's submits
        per minute too, so the share only rises while the pace leaves most of that budget
        unused (not at the ``trial`` tier, whose 2 a second are its pace).
        """
        if self._target >= SLOW_FINISHES_REFUSAL or now - self._first_accept < PACE_WINDOW_S:
            return self._target
        per_s = max(self._pace_at(now), 1.0 / PACE_WINDOW_S)
        if per_s * SPARE_SUBMITS > self._submits_per_s:
            return self._target
        slow = math.log(FAST_FINISHES_PER_S / per_s) / math.log(
            FAST_FINISHES_PER_S / SLOW_FINISHES_PER_S
        )
        return self._target + (SLOW_FINISHES_REFUSAL - self._target) * min(1.0, max(0.0, slow))

    def _unnamed_hold_s(self) -> float:
        """How long an unnamed task counts as running: its 99.9th percentile once the
        distribution is learned, else four first-poll times (a lognormal's 99.9th
        percentile is about three of them at the ``standard`` tier's shape)."""
        if self._dist is not None:
            mu, sigma = self._dist
            return min(math.exp(mu + 3.09 * sigma), 3600.0)
        return 4.0 * self._latency_s

    def _forget_unnamed(self, now: float) -> float:
        """Give back the slots of unnamed tasks past their hold; when the next one is due."""
        self._forget_old_guesses(now)
        while self._unnamed and self._unnamed[0][0] <= now:
            _, _, permit = heapq.heappop(self._unnamed)
            self.finished(permit)
            self._guessed.append((now, permit))
        return self._unnamed[0][0] if self._unnamed else math.inf

    def _forget_old_guesses(self, now: float) -> None:
        """Guesses made more than a typical task time ago: too old to explain a 429."""
        guessed = self._guessed
        while guessed and now - guessed[0][0] > self._latency_s:
            guessed.popleft()

    def _guess_was_wrong(self) -> bool:
        """Whether a 429 that would read as another client is explained by an unnamed task
        given back on a guess that was still running; if so, that task holds a slot again,
        for one more typical task time.

        An unnamed task's hold is a guess (its 99.9th percentile, or four first-poll times
        before the distribution is learned): a slow task may outlive it, and the submit
        sent into its slot is refused. Read as another client on the key, that one 429
        halved the window and stopped probing for 20 task times, and the window grew back
        a slot per 3.5 s: with 2% of submit answers dropped, one run in four kept the key
        half to two thirds busy for the rest of its run (``standard-faults``, steady 0.64
        against 0.96; benchmarks/notes.md, session 26). A guess is blamed within a typical
        task time of being made, once.
        """
        now = time.monotonic()
        self._forget_old_guesses(now)
        if not self._guessed:
            return False
        _, permit = self._guessed.popleft()
        self._held += 1
        self._sum_t = -math.inf
        self._hold_unnamed(permit, now + self._latency_s)
        return True

    def _hold_unnamed(self, permit: Permit, due: float) -> None:
        """``permit``'s task counts as ours and running until ``due``, when its slot is
        given back (``_forget_unnamed``): nothing will tell us when it ends."""
        self._live.add(permit)
        heapq.heappush(self._unnamed, (due, next(self._seq), permit))

    @property
    def unnamed(self) -> int:
        """Tasks whose submit answer was lost, still counted as holding a slot."""
        return len(self._unnamed)

    def unnamed_ended(self, running: int, listed_at: float) -> int:
        """A task list says ``running`` tasks of the key that we cannot name are still
        running: of our unnamed tasks known to the server before ``listed_at`` (the list
        was asked then), as many more than that have ended, whoever the others' tasks
        are. Their slots are given back now, oldest first; returns how many.

        Without a list they are held until almost surely ended (``lost``): with the list's
        quick refills that hold was the key's largest loss under 2% dropped submit answers
        (``standard-faults``, benchmarks/notes.md).
        """
        known = sorted((p.acked_at, seq) for _, seq, p in self._unnamed if p.acked_at < listed_at)
        ended = len(known) - running
        if ended <= 0:
            return 0
        gone = {seq for _, seq in known[:ended]}
        kept = []
        for entry in self._unnamed:
            if entry[1] in gone:
                self.finished(entry[2])
            else:
                kept.append(entry)
        heapq.heapify(kept)
        self._unnamed = kept
        return ended

    def finished(self, permit: Permit | None = None) -> None:
        """A task we held is now known to be finished (or abandoned for good)."""
        if permit is not None and permit in self._live:
            self._drop_term(permit)
            self._live.discard(permit)
        self._held = max(0, self._held - 1)
        self._finished_lb = max(0, self._finished_lb - 1)
        self._proven = max(0, self._proven - 1)
        self._paused_until = 0.0
        self._changed.set()

    def adopt(self) -> None:
        """Count a task from an earlier run (resumed, still possibly running) as held."""
        self._held += 1
        self._changed.set()

    def _cut(self, share: float) -> float:
        """The window after a multiplicative cut from ``share``: deeper the more of the full
        key we hold than the others.

        Holding more than everyone else together is above any fair share (two jobs or ten),
        so the cut is ``backoff`` raised to that ratio, at most by half and not below half
        the key: an even split keeps the plain 10%, a job on 20 of 24 slots comes down to 12
        at once, and a newcomer gets room in seconds rather than minutes of plain AIMD. An
        interactive app holding a slot or two when the key fills looks the same as a job's
        first slot, so it gets the deep cut too, until the room went unclaimed once
        (``_taking_room_back``): from then on, until a 429 shows the others on more, others
        holding no more than ``SMALL_OTHERS`` slots get the plain cut.
        """
        if self._app_seen and self._others_seen <= SMALL_OTHERS:
            return share * self._backoff
        factor = MAX_CUT
        if self._others > 0.0:
            factor = max(MAX_CUT, self._backoff ** max(1.0, share / self._others))
        return max(share * factor, min(share * self._backoff, self.limit * MAX_CUT))

    def _ceiling(self) -> float:
        """How far the window grows: the tier, or a twelfth of it below (at most
        ``SMALL_OTHERS`` slots: two of the ``standard`` tier's 24) once an interactive app
        was seen on the key, where finishes are known at once (webhooks).

        Such a job refills each slot within milliseconds, so at the full tier an app's
        request is refused whenever it comes, and the job, refused nothing itself, never
        learns that it starves the app (one job beside the app: 4-11 of its 36 requests
        taken, and 0 of 22 once the room was left only while 429s kept coming: with the
        room, none came, and the room went). An app is what took none of the room a deep
        cut gave up and held no more than ``SMALL_OTHERS`` slots at every 429 since; the
        room stays for the rest of the run, or until a 429 shows the others on more (a job:
        it gets its share through the cuts; a job joining later with a slot or two looks
        like the app until one of its tries lands between one of our tasks ending and our
        refill, as a job joining a full key does). A polling job leaves such gaps by
        itself (it notices its finishes late), and two slots of a key of fewer than 12 are
        too much of it.
        """
        if self._prompt_finishes and self._app_seen:
            return float(self.limit - min(SMALL_OTHERS, self.limit // 12))
        return float(self.limit)

    def _taking_room_back(self) -> bool:
        """Whether the window grows a slot per accepted submit back into the room its last
        cut, a deep one, gave up: no 429 has come for ``ROOM_BACK_AFTER_QUIET`` task
        durations since, so nobody claimed it.

        A job that joins takes the room within a task duration or two (``_slow_start``), and
        the key is then full: the first submit of ours past our share is refused, which
        ends this. Beside an interactive app that held a slot or two, the room stays
        empty: the job kept half the key idle for the tens of seconds AIMD took to grow
        back (one job beside the app: 66-73% busy; ``benchmarks/notes.md`` "Session 36").
        """
        return self._deep_cut and self._quiet_for(ROOM_BACK_AFTER_QUIET)

    def _quiet_for(self, durations: float) -> bool:
        """Whether no contention 429 has come for ``durations`` task durations."""
        return time.monotonic() - self._last_contention >= durations * self._latency_s

    def _growth_boost(self) -> float:
        """Faster growth for a small window beside others that held far more, once the key
        has had room for us a while.

        A job that joins a full key starts from a window of one beside a job holding nearly
        all of it; after that job's deep cut (``_cut``) the room it gave up would idle
        for tens of seconds at plain AIMD's pace. Two signs are asked for: the others held
        more than twice our window at the last contention 429, and no 429 has come for
        ``BOOST_AFTER_QUIET`` task durations. At an even split of many jobs each window is
        small beside the others together too, but there 429s come often enough that the
        boost seldom applies.
        """
        if (
            not self.contended
            or self._others <= 2.0 * self._effective
            or not self._quiet_for(BOOST_AFTER_QUIET)
        ):
            return 1.0
        return min(MAX_GROWTH_BOOST, self._others / self._effective - 1.0)

    def _slow_start(self) -> bool:
        """Whether the window grows a slot per accepted submit (TCP's slow start: in traces
        it doubled within a task duration) rather than by AIMD's step.

        For a job that joined a key already full: it starts from a window of one beside a
        job that held nearly all of it, and the room that job's deep cut (``_cut``)
        gives up idled for 6-11 s at the boosted AIMD pace once the job got its first slot
        within a second or two (two jobs held 12-16 of 24 slots; ``benchmarks/notes.md``
        "Session 35"). As TCP's, it ends at the first 429 after it has grown the window.
        Only for the job that joined: four jobs at an even split each hold less than half
        of what the others do too, and a slow start after every quiet task duration took
        their 429s from 4% of submits to 9-17%. And only while the others held more than
        twice our window at the last contention 429 and none has come for
        ``SLOW_START_AFTER_QUIET`` task durations.
        """
        return (
            self._joining
            and self.contended
            and self._others > 2.0 * self._effective
            and self._quiet_for(SLOW_START_AFTER_QUIET)
        )

    def _may_probe(self, now: float) -> bool:
        if not self._probing_enabled or now < self._contended_until:
            return False
        if self._dist is None:
            return self._probes_out == 0 and now >= self._next_probe
        if now == math.inf:
            return self._probes_out < self._max_probes()
        if self._probes_out >= self._max_probes():
            return False  # before the sum over every live task: the cheap test first
        extra, _ = self._expected_finishes(now)
        return extra - self._proven >= self._threshold + self._probes_out

    def _max_probes(self) -> int:
        return max(1, self.limit // 4)

    def _expected_finishes(self, now: float) -> tuple[float, float]:
        """Expected finishes among our tasks since each was last known running, and the
        rate at which that expectation grows (per second), from the learned distribution."""
        assert self._dist is not None
        since = now - self._sum_t
        if 0.0 <= since < self._sum_reuse_s:
            return self._sum_e + self._sum_r * since, self._sum_r
        mu, sigma = self._dist
        scale = 1.0 / (sigma * math.sqrt(2.0))
        density = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
        expected = rate = 0.0
        floor = self._all_running_at
        dist = self._dist
        log, erfc, exp = math.log, math.erfc, math.exp
        # Called at every wake-up of a waiting submit, over every live task (about 100 at
        # the scale tier): the loop is written for speed (issue 16's CPU profile put it
        # first among the pipeline's own functions). Same terms, same order, same floats
        # as the plain form ``(survived - 0.5 * erfc(z)) / survived`` and
        # ``density * exp(-z * z) / (age * survived)``.
        for permit in self._live:
            acked = permit.acked_at
            age = now - acked
            if age <= 0.0:
                continue
            running = permit.running_at
            known = (running if running > floor else floor) - acked
            memo = permit.survived_from
            if memo is None or memo[0] != known or memo[1] != dist:
                # Memoised: two of the five transcendental calls per task and call (the
                # controller asks several times per image: issue 16's CPU profile).
                permit.survived = 0.5 * erfc((log(known) - mu) * scale) if known > 0 else 1.0
                permit.survived_from = (known, dist)
            survived = permit.survived
            if survived < 1e-9:
                continue  # far past the learned tail: this model says nothing of it
            z = (log(age) - mu) * scale
            expected += (survived - 0.5 * erfc(z)) / survived
            rate += density * exp(-z * z) / (age * survived)
        self._sum_t, self._sum_e, self._sum_r = now, expected, rate
        return expected, rate

    def _drop_term(self, permit: Permit) -> None:
        """Take a task that is now known finished out of the last sum, as of its moment.

        Its term then is what the full pass gave it: the same memoised share survived
        (nothing it is made of has changed since, or the sum was dropped), and nothing if
        the pass skipped it (acknowledged after it, or far past the learned tail).
        """
        if self._sum_t == -math.inf or self._dist is None:
            return
        acked = permit.acked_at
        age = self._sum_t - acked
        survived = permit.survived
        if age <= 0.0 or survived < 1e-9 or permit.survived_from is None:
            return
        mu, sigma = self._dist
        z = (math.log(age) - mu) * (1.0 / (sigma * math.sqrt(2.0)))
        self._sum_e -= (survived - 0.5 * math.erfc(z)) / survived
        density = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
        self._sum_r -= density * math.exp(-z * z) / (age * survived)

    def _until_likely_free(self, now: float) -> float:
        """Seconds until the expected finishes reach the next probe's threshold.

        The straight line from today's rate is only a guess: for young tasks the expected
        finishes bend upward (a task a tenth of the median old almost never ends; at the
        median, half do), so the line overshoots by far. Followed to its end (up to a
        second), it kept a run's first burst at the ``scale`` tier, 96 tasks of half a
        second, from being probed for 0.6 s while 58 of them ended. Looked at again
        within a tenth of the median, the sum is caught when it reaches the threshold.
        """
        assert self._dist is not None
        extra, rate = self._expected_finishes(now)
        missing = self._threshold + self._probes_out - (extra - self._proven)
        if missing <= 0.0:
            return 0.002
        horizon = min(1.0, 0.1 * math.exp(self._dist[0]))
        if rate <= 0.0:
            return horizon
        return min(max(missing / rate, 0.002), horizon)

    def _schedule_probe(self) -> None:
        spacing = self._probe_scale * self._latency_s / max(1, self.effective_limit)
        self._next_probe = time.monotonic() + min(spacing, 30.0)


class QuantileTracker:
    """Online estimate of one quantile of task duration, from done/not-done answers alone.

    A poll only tells whether a task finished by the time we asked, not when it finished,
    so the usual averages are biased. The Robbins-Monro update below moves the estimate up
    when a task was still running at it and down when it was done, and settles where a share
    ``q`` of tasks are done: exactly the moment to poll each task first.

    Each answer arrives one task duration after the estimate it judges was used, while
    about ``limit`` other answers are on their way: the step must be small against
    ``1 / limit`` or the estimate overshoots and swings (a delayed feedback loop).
    """

    def __init__(self, q: float, initial_s: float, *, step: float = 0.05) -> None:
        self.q = q
        self._log = math.log(max(initial_s, 1e-3))
        self._step = step
        #: Answers observed: while none, ``value`` is the starting guess, not a measurement.
        self.answers = 0

    @property
    def value(self) -> float:
        return math.exp(self._log)

    def observe(self, done: bool) -> None:
        self.answers += 1
        self._log += self._step * (self.q - (1.0 if done else 0.0))
        self._log = min(max(self._log, math.log(0.005)), math.log(3600.0))
