"""The retry policy, kept apart from the things retried.

The engine wraps each step (submit, poll, download) in ``retry_transient(policy, step)``;
nothing below it retries on its own. A step signals "try again" by raising ``Transient``,
optionally with the server's ``Retry-After``, which wins over the exponential backoff when
present. Backoff has full jitter so that many rows failing together do not retry in
lockstep.

The first attempt is a plain ``await``; only a step that failed once enters tenacity's
``AsyncRetrying`` for the attempts left. The engine runs a step three or four times per
image, almost always once, and building tenacity's retry state, wrapped callbacks and
statistics for every call was about 3% of the client's CPU per image (issue 16's
profile); the policy (attempts, elapsed time, waits) is the same either way.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)
from tenacity.stop import stop_base

T = TypeVar("T")

#: The run's own source of jitter: drawing from the ``random`` module would move the
#: global state of the program running us (a notebook or script that seeded it for its
#: own reasons sees its sequence change with our retries).
JITTER = random.Random()


class Transient(Exception):
    """A failure worth retrying: 5xx, a dropped connection, a timeout, a truncated body."""

    def __init__(
        self, reason: str, *, retry_after: float | None = None, unanswered: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        #: The host answered nothing since the request began (``pipeline.gate``): the
        #: failure is the host's, and the engine tries again through the host's gate
        #: without spending one of the row's attempts.
        self.unanswered = unanswered


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard one step tries before its row ends ``failed``."""

    max_attempts: int = 8
    max_elapsed_s: float = 300.0
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 20.0
    #: Longest Retry-After we honour as given; longer ones are clipped to this.
    max_retry_after_s: float = 120.0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date.

    Never raises: the header comes from the server, and it is read on answers that may
    acknowledge a paid task (a 200 submit), so anything it cannot mean (``²``, ``-5``,
    ``1e9``, ``NaN``, junk) is no hint at all. Callers clip the figure it gives."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_s(policy: RetryPolicy, attempt: int, error: Transient) -> float:
    """How long to wait after failed attempt number ``attempt`` (1-based).

    The server's Retry-After when the failure carried one (clipped to
    ``max_retry_after_s``), else full jitter over an exponential ceiling:
    uniform(0, min(max_backoff_s, initial_backoff_s * 2 ** (attempt - 1))).
    """
    if error.retry_after is not None:
        return min(error.retry_after, policy.max_retry_after_s)
    ceiling = min(policy.max_backoff_s, policy.initial_backoff_s * 2.0 ** (attempt - 1))
    return JITTER.uniform(0.0, max(0.0, ceiling))


class _Wait:
    """tenacity's wait for the attempts after the first: ``backoff_s`` for the attempt that
    failed (numbered from the step's first attempt, which ran outside tenacity)."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy

    def __call__(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        assert isinstance(error, Transient)  # tenacity retries nothing else
        return backoff_s(self._policy, state.attempt_number + 1, error)


class _StopAfter(stop_base):
    """tenacity's stop once ``clock`` passes ``deadline`` (``stop_after_delay`` reads the
    wall clock, which would count the time a step waited at a closed gate)."""

    def __init__(self, clock: Callable[[], float], deadline: float) -> None:
        self._clock = clock
        self._deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        return self._clock() >= self._deadline


async def retry_transient(
    policy: RetryPolicy,
    step: Callable[[], Awaitable[T]],
    *,
    on_retry: Callable[[Transient], None] | None = None,
    paused: Callable[[], float] | None = None,
) -> T:
    """``await step()`` until it returns, retrying on ``Transient`` within ``policy``.

    Gives up (re-raising the last ``Transient``) after ``max_attempts`` attempts, or when
    ``max_elapsed_s`` has passed since the first attempt began once an attempt fails.
    Any other exception ends the step at once. ``on_retry`` hears each failure that is
    retried, before the wait. ``paused`` gives the seconds so far during which the API
    could not be reached (``pipeline.gate.Outages.seconds``): they do not count toward
    ``max_elapsed_s``, since an outage must not use up a row's time.
    """

    def now() -> float:
        return time.monotonic() - (paused() if paused is not None else 0.0)

    started = now()
    try:
        return await step()
    except Transient as error:
        if policy.max_attempts <= 1 or now() - started >= policy.max_elapsed_s:
            raise
        if on_retry is not None:
            on_retry(error)
        await asyncio.sleep(backoff_s(policy, 1, error))

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if on_retry is not None and isinstance(error, Transient):
            on_retry(error)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(Transient),
        wait=_Wait(policy),
        stop=stop_after_attempt(policy.max_attempts - 1)
        | _StopAfter(now, started + policy.max_elapsed_s),
        before_sleep=before_sleep,
        reraise=True,
    )
    # The attempt-block form: ``retrying(step)`` would call a lambda returning a coroutine
    # as a plain function (tenacity awaits only coroutine functions) and return it unawaited.
    async for attempt in retrying:
        with attempt:
            return await step()
    raise AssertionError("tenacity ended without a result or an error")  # reraise=True
