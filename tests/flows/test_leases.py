"""Leases across a Prefect server restart, piece by piece, with no server at all.

``test_server_restart.py`` restarts a real server under a real night; these pin the parts
it relies on: the flow engine keeps a deployment lease without cancelling the night, a
claim the server forgot is given back once its shard stopped, and only the Prefect API's
own failures count as the server being unreachable.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import httpx
import pytest

API = "http://127.0.0.1:9/api"


def _error(status: int, url: str = f"{API}/v2/concurrency_limits/leases/x/renew") -> Exception:
    request = httpx.Request("POST", url)
    return httpx.HTTPStatusError("", request=request, response=httpx.Response(status))


def _refused(url: str = f"{API}/v2/concurrency_limits/increment-with-lease") -> Exception:
    return httpx.ConnectError("All connection attempts failed", request=httpx.Request("POST", url))


@pytest.fixture
def api() -> Iterator[str]:
    """The Prefect API these tests' requests name (nothing listens there)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: API}):
        yield API


def test_only_the_prefect_api_failing_counts_as_the_server_unreachable(api: str) -> None:
    from flows.queue import unreachable

    assert unreachable(_refused())
    assert unreachable(_error(503))
    assert not unreachable(_error(423))  # an answer: the slot is held
    assert not unreachable(_error(410))
    # The image API (or S3) failing is the engine's to handle, not a server restart.
    assert not unreachable(_refused("http://127.0.0.1:8765/v1/ai/text-to-image"))
    assert not unreachable(OSError("disk full"))


def test_the_flow_engine_keeps_deployment_leases_without_cancelling() -> None:
    """Prefect's engine cancels a run whose deployment lease cannot be renewed; a restarted
    server made it cancel a live night (measured). ``flows.catalog`` replaces it."""
    from prefect import flow_engine

    import flows.catalog  # noqa: F401  (installs it)
    from flows import leases

    assert flow_engine.amaintain_concurrency_lease is leases.akeep_lease
    assert flow_engine.maintain_concurrency_lease is leases.keep_lease


class _Client:
    """A sync Prefect client whose renewals answer from ``answers`` in turn."""

    def __init__(self, answers: list[Exception | None]) -> None:
        self.answers = answers
        self.calls = 0
        self.done = threading.Event()

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def renew_concurrency_lease(self, lease_id: Any, lease_duration: float) -> None:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else None
        if not self.answers:
            self.done.set()
        if answer is not None:
            raise answer


def test_a_deployment_lease_is_retried_while_the_server_is_down_then_given_up_quietly(
    api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prefect.client.orchestration as orchestration

    from flows import leases

    client = _Client([_refused(f"{API}/v2/x"), _refused(f"{API}/v2/x"), _error(410)])
    monkeypatch.setattr(orchestration, "get_client", lambda sync_client=False: client)
    monkeypatch.setattr(leases, "RETRY_S", 0.01)
    with leases.keep_lease(uuid4(), 300):
        assert client.done.wait(10)  # renewed again after each refusal, until it is gone
    assert client.calls == 3


async def test_a_claim_the_server_forgot_is_given_back_once_its_shard_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server restarted with its leases in memory answers 410 for a claim renewed
    seconds ago: its slot stays counted with no lease to lapse, so the runner stops the
    shard and then frees the slot itself; the shard is claimed again and resumed."""
    from flows import queue

    monkeypatch.setattr(queue, "RENEW_EVERY_S", 0.05)
    order: list[str] = []

    class Client:
        async def renew_concurrency_lease(self, lease_id: Any, lease_duration: float) -> None:
            raise _error(410)

        async def release_concurrency_slots(
            self, names: list[str], slots: int, occupancy_seconds: float
        ) -> None:
            assert occupancy_seconds > 0  # the server answers 422 to 0
            order.append(f"freed {names[0]} {slots}")

        async def release_concurrency_slots_with_lease(self, lease_id: Any) -> None:
            order.append("released with lease")

    with pytest.raises(queue.ClaimLost) as lost:
        async with queue._held(Client(), uuid4(), "klein-shard-x-3"):
            try:
                await asyncio.sleep(30)
            finally:
                order.append("shard stopped")
    assert lost.value.forgotten
    assert order == ["shard stopped", "freed klein-shard-x-3 1"]


async def test_a_claim_that_lapsed_is_not_freed_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """410 for a claim not renewed for longer than its lease: the server's repossessor
    freed its slot (another runner may hold it now), so the runner frees nothing."""
    from flows import queue

    monkeypatch.setattr(queue, "RENEW_EVERY_S", 0.05)
    monkeypatch.setattr(queue, "CLAIM_LEASE_S", 0.3)
    monkeypatch.setattr(queue, "FORGOTTEN_WITHIN_S", 0.15)
    freed: list[str] = []
    answers = [_refused(f"{API}/v2/x")] * 5 + [_error(410)] * 20

    class Client:
        async def renew_concurrency_lease(self, lease_id: Any, lease_duration: float) -> None:
            raise answers.pop(0)

        async def release_concurrency_slots(self, names: list[str], **_: Any) -> None:
            freed.append(names[0])

        async def release_concurrency_slots_with_lease(self, lease_id: Any) -> None:
            pass

    with pytest.raises(queue.ClaimLost) as lost:
        async with queue._held(Client(), uuid4(), "klein-shard-x-4"):
            await asyncio.sleep(30)
    assert not lost.value.forgotten
    assert freed == []


async def test_giving_a_forgotten_claim_back_frees_its_slot_on_a_real_server(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against the session's Prefect server: the claim is taken for real, the server is
    made to answer 410 for it, and once the shard stopped its slot is free again."""
    from prefect.client.orchestration import get_client

    from flows import queue

    monkeypatch.setattr(queue, "RENEW_EVERY_S", 0.05)
    name = f"klein-shard-test-{uuid4().hex[:8]}-0"

    class Forgetful:
        """The real client, but the server has forgotten the lease."""

        def __init__(self, client: Any) -> None:
            self.client = client

        def __getattr__(self, attribute: str) -> Any:
            return getattr(self.client, attribute)

        async def renew_concurrency_lease(self, lease_id: Any, lease_duration: float) -> None:
            raise _error(410, f"{prefect_api}/v2/concurrency_limits/leases/x/renew")

    async with get_client() as client:
        lease = await queue._try_claim(client, name)
        assert lease is not None
        assert await queue._try_claim(client, name) is None  # held
        with pytest.raises(queue.ClaimLost):
            async with queue._held(Forgetful(client), lease, name):
                await asyncio.sleep(30)
        limit = await client.read_global_concurrency_limit_by_name(name)
        assert limit.active_slots == 0
        await client.delete_global_concurrency_limit_by_name(name)
