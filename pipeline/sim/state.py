"""What the simulated API remembers: keys, their limits and credits, tasks, counters.

No HTTP here, so a second dialect can share it. Nothing runs on a timer: a task's status,
a key's active count, refunds and the occupancy integral are all derived from timestamps
when somebody looks (``advance``), which keeps thousands of idle tasks free and makes the
counters exact at the moment they are read.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from pipeline.contract import KLEIN_MODEL, KleinStatus, Tier
from pipeline.sim.config import KeyConfig, SimConfig
from pipeline.sim.faults import LatencyModel, decide, unit

#: Outcomes a task can end in.
COMPLETED, FAILED, MODERATED = "completed", "failed", "moderated"
_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """A validated submit, in dialect-neutral terms (explicit width/height)."""

    prompt: str
    width: int
    height: int
    seed: int | None
    safety_tolerance: int
    fmt: str
    references: tuple[bytes, ...] = ()
    webhook_url: str | None = None
    #: The model priced (``contract.PRICES``): dialect A's one model, or B's path name.
    model: str = KLEIN_MODEL
    #: Width x height of all references together (dialect B charges input megapixels).
    input_pixels: int = 0

    def digest(self) -> bytes:
        """Identity of what would be generated: equal digests mean a paid-for duplicate."""
        h = hashlib.blake2b(digest_size=16)
        parts = (self.prompt, str(self.seed), str(self.width), str(self.height), self.fmt)
        for part in (*parts, self.model):
            h.update(part.encode())
            h.update(b"\0")
        for ref in self.references:
            h.update(hashlib.blake2b(ref, digest_size=16).digest())
        return h.digest()


@dataclass(slots=True, eq=False)
class Task:
    task_id: str
    key: KeyState
    prompt: str
    seed: int
    width: int
    height: int
    fmt: str
    ref_digests: tuple[str, ...]
    created_at: float
    started_at: float
    finished_at: float
    outcome: str
    cost_cents: int
    #: Where the client reached us when it submitted (webhook bodies carry result URLs).
    base_url: str
    webhook_url: str | None
    #: Unix second at which the result URL stops working.
    expires: int
    #: Which dialect took it ("klein" or "bfl"): each dialect lists and polls its own only.
    dialect: str = "klein"
    #: Stable name of the request behind it (key, body digest, repeat): fault decisions
    #: about the task hash this, not the random task id, so a seeded faulty run repeats.
    identity: str = ""
    ended: bool = False
    polls: int = 0
    downloads: int = 0
    #: Whether a poll has already reported this task finished.
    seen_finished: bool = False

    def status(self, now: float) -> KleinStatus:
        if now >= self.finished_at:
            return KleinStatus.COMPLETED if self.outcome == COMPLETED else KleinStatus.FAILED
        if now >= self.started_at:
            return KleinStatus.IN_PROGRESS
        return KleinStatus.CREATED

    def has_nsfw(self, status: KleinStatus) -> list[bool]:
        if status == KleinStatus.COMPLETED:
            return [False]
        if status == KleinStatus.FAILED:
            return [self.outcome == MODERATED]
        return []


@dataclass(slots=True)
class Counters:
    submits_accepted: int = 0
    submits_refused: int = 0
    rate_limited: int = 0
    max_active: int = 0
    polls: int = 0
    list_calls: int = 0
    downloads: int = 0
    downloads_expired: int = 0
    credits_charged_cents: int = 0
    duplicate_submits: int = 0
    tasks_failed: int = 0
    tasks_moderated: int = 0
    webhooks_sent: int = 0
    webhooks_failed: int = 0
    #: Tasks a poll reported finished, and the seconds between finishing and that poll:
    #: while a key is shared, each such second is a slot nobody uses.
    finishes_polled: int = 0
    finish_poll_lag_s: float = 0.0
    #: The same for the task that finished last of those seen: how long after the key's
    #: last task ended its client noticed, which is when a run can end.
    last_finished_at: float = -math.inf
    last_finish_poll_lag_s: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Body:
    seen: int = 0
    accepted: bool = False
    #: Submits of this body the key took (refused ones left out): the task's own identity.
    taken: int = 0
    last_seen: float = 0.0


class KeyState:
    """One key's limits, money, tasks and counters."""

    def __init__(self, config: KeyConfig, tier: Tier) -> None:
        self.config = config
        self.name = config.name
        self.tier = tier
        self.credits_cents: int | None = (
            None if config.credits is None else round(config.credits * 100)
        )
        self.window: deque[float] = deque()
        self.ends: list[tuple[float, int, Task]] = []
        self.active = 0
        self.tasks: dict[str, Task] = {}
        self.bodies: OrderedDict[bytes, _Body] = OrderedDict()
        self.counters = Counters()
        self.occupancy_s = 0.0
        self.occ_last = time.time()


class SimState:
    """The whole simulated account system, driven by explicit ``now`` timestamps."""

    def __init__(self, config: SimConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.seed = config.faults.seed
        self.latency = LatencyModel.from_config(config.latency)
        words = [re.escape(w) for w in config.moderation.words if w.strip()]
        self._moderation_re = (
            re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE) if words else None
        )
        self.keys: dict[str, KeyState] = {}
        self._by_value: dict[str, KeyState] = {}
        self.tasks: dict[str, Task] = {}
        self.references: dict[str, list[Any]] = {}  # digest -> [bytes, refcount]
        self.unauthorized = 0
        self._retry_after_n = 0
        self._seq = 0
        self.reset()

    # --- lifecycle ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every task and zero every counter; keys get their configured credits back."""
        self.keys = {}
        self._by_value = {}
        for key_config in self.config.keys:
            key = KeyState(key_config, self.config.key_tier(key_config))
            key.occ_last = self.clock()
            self.keys[key.name] = key
            self._by_value[key_config.key] = key
        self.tasks = {}
        self.references = {}
        self.unauthorized = 0
        self._retry_after_n = 0

    def authenticate(self, value: str | None) -> KeyState | None:
        if not value:
            return None
        return self._by_value.get(value)

    # --- time -------------------------------------------------------------------------------

    def advance(self, key: KeyState, now: float) -> None:
        """Bring a key up to ``now``: end finished tasks, refund failures, integrate occupancy."""
        ends = key.ends
        while ends and ends[0][0] <= now:
            finished_at, _, task = heapq.heappop(ends)
            if finished_at > key.occ_last:
                key.occupancy_s += key.active * (finished_at - key.occ_last)
                key.occ_last = finished_at
            key.active -= 1
            self._end(task)
        if now > key.occ_last:
            key.occupancy_s += key.active * (now - key.occ_last)
            key.occ_last = now

    def _end(self, task: Task) -> None:
        task.ended = True
        if task.outcome == COMPLETED:
            return
        key = task.key
        key.counters.tasks_failed += 1
        if task.outcome == MODERATED:
            key.counters.tasks_moderated += 1
        if task.cost_cents:
            key.counters.credits_charged_cents -= task.cost_cents
            if key.credits_cents is not None:
                key.credits_cents += task.cost_cents

    # --- admission --------------------------------------------------------------------------

    def record_submit(self, key: KeyState, now: float) -> float | None:
        """Count a submit in the sliding minute; seconds until a slot frees if over the limit."""
        window = key.window
        cutoff = now - _WINDOW_S
        while window and window[0] <= cutoff:
            window.popleft()
        over = len(window) >= key.tier.submits_per_minute
        window.append(now)
        if over:
            return window[0] + _WINDOW_S - now
        return None

    def active_wait(self, key: KeyState, now: float) -> float | None:
        """Seconds until an active slot frees, or ``None`` if one is free now."""
        self.advance(key, now)
        if key.active < key.tier.max_active:
            return None
        return key.ends[0][0] - now

    def cost_cents(self, request: SubmitRequest) -> int:
        """The request's price in hundredths of a credit, at this simulator's prices."""
        price = self.config.price(request.model)
        return round(price.credits(request.width, request.height, request.input_pixels) * 100)

    def _task_id(self, identity: str, n: int) -> str:
        """A random UUID, as production hands out; with ``task_id_seed``, a repeatable one."""
        seed = self.config.task_id_seed
        if seed is None:
            return str(uuid.uuid4())
        raw = hashlib.blake2b(f"{seed}|task|{identity}|{n}".encode(), digest_size=16).digest()
        return str(uuid.UUID(bytes=raw, version=4))

    def can_pay(self, key: KeyState, cents: int) -> bool:
        return key.credits_cents is None or key.credits_cents >= cents

    def see_body(self, key: KeyState, digest: bytes, now: float) -> int:
        """How many times this body was submitted before by this key (fault identity)."""
        body = key.bodies.get(digest)
        if body is None:
            body = key.bodies[digest] = _Body()
        else:
            key.bodies.move_to_end(digest)
        n = body.seen
        body.seen += 1
        body.last_seen = now
        return n

    def fault(self, key: KeyState, kind: str, identity: str, n: int, rate: float) -> bool:
        """Decide a fault deterministically and count it when it hits."""
        if not decide(self.seed, kind, identity, n, rate):
            return False
        faults = key.counters.faults
        faults[kind] = faults.get(kind, 0) + 1
        return True

    def retry_after(self, delay_s: float, now: float) -> dict[str, str]:
        """The Retry-After header (or none) for a 429, per the configured mode."""
        seconds = max(1, math.ceil(delay_s))
        mode = self.config.retry_after
        if mode == "mixed":
            mode = ("seconds", "http-date", "none")[self._retry_after_n % 3]
            self._retry_after_n += 1
        if mode == "seconds":
            return {"Retry-After": str(seconds)}
        if mode == "http-date":
            return {"Retry-After": formatdate(math.ceil(now + delay_s), usegmt=True)}
        return {}

    # --- tasks ------------------------------------------------------------------------------

    def accept(
        self,
        key: KeyState,
        request: SubmitRequest,
        digest: bytes,
        n: int,
        now: float,
        base_url: str,
        *,
        dialect: str = "klein",
        request_moderated: bool = False,
    ) -> Task:
        """Create a task (limits, credits and faults already checked) and charge for it.

        ``request_moderated``: the prompt was refused before any generation (dialect B's
        ``Request Moderated``), so the task ends the moment it is taken: the first poll
        already shows it moderated, its slot is free and its charge refunded.
        """
        identity = f"{key.name}:{digest.hex()}"
        task_id = self._task_id(identity, n)
        # The task's own luck (duration, moderation, failure, seed) follows the body and
        # how many of its submits were *taken*, not how many were refused first: a row
        # refused with 429 once gets the same task as a row never refused, so clients
        # that probe and clients that never do face the same latency tail.
        n = key.bodies[digest].taken
        duration = self.latency.duration(unit(self.seed, "latency", identity, n))
        if request_moderated:
            duration = 0.0
        started = now + duration * self.config.latency.queued_fraction
        finished = now + duration
        seed = request.seed
        if seed is None:
            seed = int(unit(self.seed, "seed", identity, n) * 4_294_967_296)
        outcome = COMPLETED
        moderation = self.config.moderation
        if (
            request_moderated
            or (
                self._moderation_re is not None
                and request.safety_tolerance < moderation.pass_tolerance
                and self._moderation_re.search(request.prompt)
            )
            or self.fault(key, "moderation_random", identity, n, moderation.rate)
        ):
            outcome = MODERATED
        elif self.fault(key, "task_failed", identity, n, self.config.faults.task_failed):
            outcome = FAILED
        ref_digests = tuple(self._hold_reference(ref) for ref in request.references)
        cents = self.cost_cents(request)
        task = Task(
            task_id=task_id,
            key=key,
            prompt=request.prompt,
            seed=seed,
            width=request.width,
            height=request.height,
            fmt=request.fmt,
            ref_digests=ref_digests,
            created_at=now,
            started_at=started,
            finished_at=finished,
            outcome=outcome,
            cost_cents=cents,
            base_url=base_url,
            webhook_url=request.webhook_url,
            expires=math.ceil(finished + self.config.result_ttl_s),
            dialect=dialect,
            identity=f"{identity}:{n}",
        )
        self.advance(key, now)
        self._seq += 1
        heapq.heappush(key.ends, (finished, self._seq, task))
        key.active += 1
        counters = key.counters
        counters.max_active = max(counters.max_active, key.active)
        counters.submits_accepted += 1
        counters.credits_charged_cents += cents
        if key.credits_cents is not None:
            key.credits_cents -= cents
        body = key.bodies[digest]
        if body.accepted:
            counters.duplicate_submits += 1
        body.accepted = True
        body.taken += 1
        key.tasks[task_id] = task
        self.tasks[task_id] = task
        return task

    def _hold_reference(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        entry = self.references.get(digest)
        if entry is None:
            self.references[digest] = [data, 1]
        else:
            entry[1] += 1
        return digest

    def reference_bytes(self, task: Task) -> Sequence[bytes]:
        return [self.references[d][0] for d in task.ref_digests if d in self.references]

    def get_task(self, key: KeyState, task_id: str, now: float, dialect: str) -> Task | None:
        """The key's task of that id taken through ``dialect`` (the other dialect's: None)."""
        task = key.tasks.get(task_id)
        if task is None or task.dialect != dialect:
            return None
        self.advance(key, now)
        return task

    def polled(self, task: Task, now: float) -> int:
        """Count a poll of ``task``; returns how many polls it had before (fault decisions)."""
        n = task.polls
        task.polls += 1
        if not task.seen_finished and now >= task.finished_at:
            task.seen_finished = True
            counters = task.key.counters
            counters.finishes_polled += 1
            counters.finish_poll_lag_s += now - task.finished_at
            if task.finished_at >= counters.last_finished_at:
                counters.last_finished_at = task.finished_at
                counters.last_finish_poll_lag_s = now - task.finished_at
        return n

    def prune(self, now: float) -> int:
        """Forget tasks (and old body records) long past their result URL's expiry."""
        horizon = self.config.result_ttl_s + self.config.retention_s
        cutoff = now - horizon
        pruned = 0
        for key in self.keys.values():
            self.advance(key, now)
            doomed = []
            for task_id, task in key.tasks.items():
                if task.created_at > cutoff:
                    break
                if task.finished_at <= cutoff:
                    doomed.append(task_id)
            for task_id in doomed:
                task = key.tasks.pop(task_id)
                self.tasks.pop(task_id, None)
                for digest in task.ref_digests:
                    entry = self.references.get(digest)
                    if entry is not None:
                        entry[1] -= 1
                        if entry[1] <= 0:
                            del self.references[digest]
            pruned += len(doomed)
            bodies = key.bodies
            while bodies:
                first = next(iter(bodies.values()))
                if first.last_seen > cutoff:
                    break
                bodies.popitem(last=False)
        return pruned

    # --- reporting --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters per key name (never the key value) and totals, exact as of now.

        Totals are sums over keys; ``totals.max_active`` is therefore the sum of each key's
        own high-water mark, an upper bound on the server-wide peak.
        """
        now = self.clock()
        per_key: dict[str, dict[str, Any]] = {}
        for key in self.keys.values():
            self.advance(key, now)
            c = key.counters
            per_key[key.name] = {
                "tier": key.tier.name,
                "max_active_limit": key.tier.max_active,
                "submits_per_minute_limit": key.tier.submits_per_minute,
                "submits_accepted": c.submits_accepted,
                "submits_refused": c.submits_refused,
                "rate_limited": c.rate_limited,
                "active": key.active,
                "max_active": c.max_active,
                "polls": c.polls,
                "finishes_polled": c.finishes_polled,
                "finish_poll_lag_s": round(c.finish_poll_lag_s, 6),
                "last_finish_poll_lag_s": round(c.last_finish_poll_lag_s, 6),
                "list_calls": c.list_calls,
                "downloads": c.downloads,
                "downloads_expired": c.downloads_expired,
                "credits_charged": c.credits_charged_cents / 100,
                "credits_remaining": None if key.credits_cents is None else key.credits_cents / 100,
                "occupancy_s": round(key.occupancy_s, 6),
                "duplicate_submits": c.duplicate_submits,
                "tasks_failed": c.tasks_failed,
                "tasks_moderated": c.tasks_moderated,
                "faults": dict(sorted(c.faults.items())),
                "webhooks_sent": c.webhooks_sent,
                "webhooks_failed": c.webhooks_failed,
                "tasks_retained": len(key.tasks),
            }
        totals: dict[str, Any] = {}
        summed = (
            "submits_accepted", "submits_refused", "rate_limited", "active", "max_active",
            "polls", "list_calls", "downloads", "downloads_expired", "credits_charged",
            "occupancy_s", "duplicate_submits", "tasks_failed", "tasks_moderated",
            "webhooks_sent", "webhooks_failed", "tasks_retained",
        )  # fmt: skip
        for name in summed:
            totals[name] = sum(k[name] for k in per_key.values())
        totals["credits_charged"] = round(totals["credits_charged"], 2)
        faults: dict[str, int] = {}
        for k in per_key.values():
            for kind, count in k["faults"].items():
                faults[kind] = faults.get(kind, 0) + count
        totals["faults"] = dict(sorted(faults.items()))
        totals["unauthorized"] = self.unauthorized
        return {"keys": per_key, "totals": totals}
