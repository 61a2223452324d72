"""The retry policy on steps that fail on purpose: attempts, waits, Retry-After, giving up."""

from __future__ import annotations

import time

import pytest

from pipeline.retry import RetryPolicy, Transient, backoff_s, retry_transient

QUICK = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.002)


class Flaky:
    """Fails ``failures`` times with ``error``, then answers "ok"; counts its calls."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or Transient("503")
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


async def test_a_step_that_succeeds_runs_once() -> None:
    step = Flaky(0)
    assert await retry_transient(QUICK, step) == "ok"
    assert step.calls == 1


async def test_transient_failures_are_retried_and_each_is_heard_before_its_wait() -> None:
    heard: list[str] = []
    step = Flaky(3)
    assert await retry_transient(QUICK, step, on_retry=lambda e: heard.append(e.reason)) == "ok"
    assert step.calls == 4
    assert heard == ["503"] * 3


async def test_it_gives_up_after_max_attempts_with_the_last_failure() -> None:
    step = Flaky(10, Transient("still down"))
    with pytest.raises(Transient, match="still down"):
        await retry_transient(QUICK, step)
    assert step.calls == QUICK.max_attempts


async def test_one_attempt_means_no_retry() -> None:
    step = Flaky(1)
    with pytest.raises(Transient):
        await retry_transient(RetryPolicy(max_attempts=1), step)
    assert step.calls == 1


async def test_other_errors_end_the_step_at_once() -> None:
    step = Flaky(1, ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        await retry_transient(QUICK, step)
    assert step.calls == 1


async def test_the_elapsed_cap_stops_retrying_even_with_attempts_left() -> None:
    policy = RetryPolicy(max_attempts=100, max_elapsed_s=0.3, initial_backoff_s=0.05)
    step = Flaky(1000, Transient("slow", retry_after=0.1))
    started = time.monotonic()
    with pytest.raises(Transient):
        await retry_transient(policy, step)
    assert 2 <= step.calls <= 6
    assert time.monotonic() - started < 5


async def test_retry_after_is_waited_for_and_clipped() -> None:
    step = Flaky(1, Transient("429", retry_after=0.2))
    started = time.monotonic()
    assert await retry_transient(QUICK, step) == "ok"
    assert time.monotonic() - started >= 0.2
    clipped = RetryPolicy(max_retry_after_s=1.0)
    assert backoff_s(clipped, 1, Transient("429", retry_after=1e9)) == 1.0


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    policy = RetryPolicy(initial_backoff_s=0.25, max_backoff_s=20.0)
    waits = [backoff_s(policy, 3, Transient("x")) for _ in range(200)]
    assert all(0.0 <= w <= 1.0 for w in waits) and max(waits) > 0.5
    assert all(backoff_s(policy, 30, Transient("x")) <= 20.0 for _ in range(50))


async def test_a_lambda_returning_a_coroutine_is_awaited_on_every_attempt() -> None:
    """The engine passes ``lambda: self._poll_once(tracked)``: not a coroutine function."""
    step = Flaky(2)
    assert await retry_transient(QUICK, lambda: step()) == "ok"
    assert step.calls == 3
