"""The retry policy, kept apart from the things retried.

The engine wraps each step (submit, poll, download) in ``retrying(policy)``; nothing below
it retries on its own. A step signals "try again" by raising ``Transient``, optionally with
the server's ``Retry-After``, which wins over the exponential backoff when present. Backoff
has full jitter so that many rows failing together do not retry in lockstep.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)


class Transient(Exception):
    """A failure worth retrying: 5xx, a dropped connection, a timeout, a truncated body."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


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
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _WaitRetryAfter:
    """Honour the server's Retry-After when the failure carried one, else back off."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._cap = policy.max_retry_after_s
        self._backoff = wait_random_exponential(
            multiplier=policy.initial_backoff_s, max=policy.max_backoff_s
        )

    def __call__(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, Transient) and error.retry_after is not None:
            return min(error.retry_after, self._cap)
        return self._backoff(state)


def retrying(
    policy: RetryPolicy, *, on_retry: Callable[[Transient], None] | None = None
) -> AsyncRetrying:
    """A fresh tenacity loop for one step: ``async for attempt in retrying(p): with attempt:``."""

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if on_retry is not None and isinstance(error, Transient):
            on_retry(error)

    return AsyncRetrying(
        retry=retry_if_exception_type(Transient),
        wait=_WaitRetryAfter(policy),
        stop=stop_after_attempt(policy.max_attempts) | stop_after_delay(policy.max_elapsed_s),
        before_sleep=before_sleep,
        reraise=True,
    )
