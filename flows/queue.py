"""Shards as a queue: runners claim whole shards with leases that lapse when a runner dies.

A deployment's shards used to be bound to flow runs when they were dispatched: a shard
waited for its worker to notice it and start a process (10-20 s each), ran in a fixed
share of the key that never grew when other shards finished, and a worker that died took
its shards with it for good (measured: the key 0.32 busy where one process kept it 0.75,
and a lost worker hung the night). Here every runner, the parent flow's own process first
and one long-lived process per helper flow run on the workers, pulls the next unfinished
shard (as soon as its current shard has submitted its last row, so the current one's tail
drains while the next one fills the key) and runs it with the whole key, sharing it with
the other runners by the engine's adaptive sharing (``pipeline/limits.py``: the share grows as
others finish and shrinks as they start, from the API's own 429s, never a server round
trip per request).

A runner owns a shard while it holds that shard's claim: one slot of a Prefect global
concurrency limit of 1 named after the output and the shard (so a rerun of the same output
sees the same claims), taken with a lease of ``CLAIM_LEASE_S`` that the runner renews every
``RENEW_EVERY_S``. A killed runner stops renewing, the Prefect server's repossessor revokes
the lease (it looks every 15 s by default), and the next runner that looks claims the shard
and resumes it from the shard's journal, so nothing acknowledged is paid twice. A runner
that cannot renew its lease before it lapses stops its shard, so two runners never run one
shard at once. A shard is finished when its ``shard.json`` carries this night's token.

A Prefect server that is down or restarting stops nothing else: while it cannot be reached
nobody can claim a shard, so runners wait and look again (``SERVER_WAIT_S``) instead of
failing, and a shard stopped for its claim does not count as one of its attempts. Once
the server is back, lapsed claims are revoked and the shards claimed again and resumed
(README: "A Prefect server restarted while a night runs").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final
from uuid import UUID

from flows.shards import SHARD_INFO, ShardSpec, shard_folder
from pipeline.storage import Sink, open_sink

log = logging.getLogger(__name__)

#: Seconds a claim outlives a runner that stopped renewing it (a killed worker).
CLAIM_LEASE_S: Final = 60.0  # the shortest lease a Prefect server grants
#: How often a running shard's claim is renewed.
RENEW_EVERY_S: Final = 5.0
#: How often an idle runner looks again for a shard whose claim lapsed.
IDLE_POLL_S: Final = 2.0
#: Pause before a runner tries a shard that failed in it again.
RETRY_DELAY_S: Final = 5.0
#: The longest a lost shard waits before a surviving runner takes it over: the lease, the
#: server's repossessor loop (15 s by default) and one idle look.
TAKEOVER_BOUND_S: Final = CLAIM_LEASE_S + 15.0 + IDLE_POLL_S

#: Shards one runner *feeds* at once. A shard whose rows are all submitted has only its
#: tail left (straggling tasks, downloads, its manifest and report): the runner claims its
#: next shard then and feeds it while that tail drains, so the key does not idle at each
#: shard's end. Two shards fed at once in one process were slower than one on the 2-core
#: benchmark machine (``benchmarks/RESULTS.md``), so feeding stays one at a time.
FEEDING: Final = 1

#: Called with each shard a runner finished (its shard.json) or gave up on (None).
OnShard = Callable[[ShardSpec, dict[str, Any] | None], Awaitable[None]]


#: Pause between looks while the Prefect server cannot be reached (restarting, say).
SERVER_WAIT_S: Final = 5.0
#: A claim the server answers it does not know (410) though it was renewed less than this
#: long ago cannot have lapsed: the server was restarted and forgot it (leases in memory).
FORGOTTEN_WITHIN_S: Final = CLAIM_LEASE_S - 3 * RENEW_EVERY_S


class ClaimLost(Exception):
    """The shard's claim could not be renewed before it lapsed; another runner may take it.

    ``forgotten``: the server answered that it does not know the claim's lease though the
    lease cannot have lapsed (a server restarted with its leases in memory). Its slot then
    stays taken with no lease to lapse, so nobody could ever claim the shard again: the
    runner gives the slot back itself once its shard has stopped (``_held``).
    """

    def __init__(self, message: str, *, forgotten: bool = False) -> None:
        super().__init__(message)
        self.forgotten = forgotten


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the Prefect server could not answer (down, restarting, a
    gateway error), rather than that it refused what was asked. Only a request to the
    Prefect API counts: the image API's errors are the engine's to handle."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    if isinstance(exc, httpx.HTTPStatusError):
        if exc.response.status_code < 500:
            return False
    elif not isinstance(exc, httpx.TransportError):
        return False
    try:
        url = str(exc.request.url)
    except RuntimeError:  # an error raised without its request
        return False
    api = PREFECT_API_URL.value()
    return bool(api) and url.startswith(str(api).rstrip("/"))


def _gone(exc: BaseException) -> bool:
    """The server does not know the lease (410 Gone): it lapsed, or the server forgot it."""
    import httpx

    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 410


def claim_name(out: str, index: int) -> str:
    """The global concurrency limit that stands for shard ``index`` of output ``out``."""
    digest = hashlib.sha256(out.encode("utf-8")).hexdigest()[:16]
    return f"klein-shard-{digest}-{index}"


async def finished_info(sink: Sink, index: int, token: str) -> dict[str, Any] | None:
    """Shard ``index``'s ``shard.json`` when tonight's run (``token``) finished it."""
    data = await sink.get(f"{shard_folder(index)}/{SHARD_INFO}")
    if not data:
        return None
    with contextlib.suppress(ValueError):
        info = json.loads(data)
        if isinstance(info, dict) and info.get("token") == token:
            return info
    return None


async def _try_claim(client: Any, name: str) -> UUID | None:
    """Take the shard's only slot with a lease, or None when another runner holds it."""
    import httpx
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        with contextlib.suppress(ObjectAlreadyExists):
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1)
            )
    try:
        response = await client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=CLAIM_LEASE_S
        )
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 423:  # locked: the slot is held
            return None
        raise
    return UUID(str(response.json()["lease_id"]))


@contextlib.asynccontextmanager
async def _held(client: Any, lease_id: UUID, name: str) -> AsyncIterator[None]:
    """Keep the claim while the block runs; if it cannot be renewed in time, stop the block.

    A claim the server forgot (``ClaimLost.forgotten``) is given back once the block has
    stopped, so the shard can be claimed again (by this runner or another) and resumed.
    """
    owner = asyncio.current_task()
    lost = False
    forgotten = False
    since = time.monotonic()

    async def renew() -> None:
        nonlocal lost, forgotten
        # When the last renewal that worked was sent: the server's lease runs from later.
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            sent = time.monotonic()
            try:
                await client.renew_concurrency_lease(lease_id, lease_duration=CLAIM_LEASE_S)
                renewed = sent
            except Exception as exc:
                forgotten = _gone(exc) and time.monotonic() - renewed < FORGOTTEN_WITHIN_S
                if forgotten or time.monotonic() - renewed >= CLAIM_LEASE_S - RENEW_EVERY_S:
                    log.error(
                        "%s: claim lost (%s); stopping the shard%s",
                        name,
                        exc,
                        " (the Prefect server forgot its lease: it was restarted and keeps "
                        "leases in memory; the claim is given back once the shard stopped)"
                        if forgotten
                        else "",
                    )
                    lost = True
                    if owner is not None:
                        owner.cancel()
                    return
                log.warning("%s: could not renew the claim yet (%s)", name, exc)

    renewer = asyncio.create_task(renew())
    try:
        yield
    except asyncio.CancelledError:
        if lost:
            if owner is not None:
                owner.uncancel()
            raise ClaimLost(
                f"{name}: the claim lapsed before it could be renewed", forgotten=forgotten
            ) from None
        raise
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await renewer
        if forgotten:
            # Its slot is still counted and no lease will ever lapse it; the shard has
            # stopped (the block is over), so freeing it cannot put two runners on it.
            # (The server refuses an occupancy of 0 s: 422.)
            held_s = max(time.monotonic() - since, 0.001)
            try:
                await client.release_concurrency_slots(
                    names=[name], slots=1, occupancy_seconds=held_s
                )
            except Exception as exc:
                log.error("%s: could not give the forgotten claim back: %s", name, exc)
        else:
            with contextlib.suppress(Exception):  # unreleased, it lapses in CLAIM_LEASE_S
                await client.release_concurrency_slots_with_lease(lease_id)


async def drain(
    shards: list[ShardSpec],
    *,
    out: str,
    token: str,
    run: Callable[[ShardSpec, Callable[[], None]], Awaitable[dict[str, Any]]],
    attempts: int,
    on_shard: OnShard | None = None,
    feeding: int = FEEDING,
) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """Run unfinished shards until every shard is finished by some runner.

    ``run(shard, fed)`` runs one shard and calls ``fed()`` once every row of it is
    submitted; from then on this runner claims and feeds its next shard while the first
    one's tail drains (``feeding`` shards fed at once). Returns the ``shard.json`` of every
    finished shard (by whichever runner) and the shards this runner gave up on after
    ``attempts`` failures of its own. While other runners hold the remaining shards it
    waits and looks again, so the runner that lives longest ends the night, taking over the
    shards of runners that died.
    """
    from prefect.client.orchestration import get_client

    finished: dict[int, dict[str, Any]] = {}
    failures: dict[int, int] = {}
    given_up: set[int] = set()
    not_before: dict[int, float] = {}
    running_here: set[int] = set()
    feeders = asyncio.Semaphore(max(1, feeding))

    async def finish(shard: ShardSpec, info: dict[str, Any] | None) -> None:
        if shard.index in finished or shard.index in given_up:
            return
        if info is None:
            given_up.add(shard.index)
        else:
            finished[shard.index] = info
        if on_shard is not None:
            await on_shard(shard, info)

    async def attempt(client: Any, shard: ShardSpec, lease: UUID, name: str) -> None:
        outcome: dict[str, Any] | None = None
        released = False

        def fed() -> None:
            nonlocal released
            if not released:
                released = True
                feeders.release()

        try:
            async with _held(client, lease, name):
                outcome = await finished_info(sink, shard.index, token)
                if outcome is None:
                    outcome = await run(shard, fed)
        except Exception as exc:
            if isinstance(exc, ClaimLost) or unreachable(exc):
                # Not the shard's fault (the Prefect server restarting, this runner cut off
                # from it): it is claimed again, here or by another runner, and resumes
                # from its journal; it does not count as one of its attempts.
                log.warning("shard %d of %d stopped: %s", shard.index, shard.count, exc)
                not_before[shard.index] = time.monotonic() + RETRY_DELAY_S
                return
            failures[shard.index] = failures.get(shard.index, 0) + 1
            log.error(
                "shard %d of %d failed (attempt %d of %d): %s",
                shard.index,
                shard.count,
                failures[shard.index],
                attempts,
                exc,
            )
            if failures[shard.index] >= attempts:
                await finish(shard, None)
            else:
                not_before[shard.index] = time.monotonic() + RETRY_DELAY_S
        finally:
            fed()
            running_here.discard(shard.index)
        if outcome is not None:
            await finish(shard, outcome)

    async def next_claim(client: Any) -> tuple[ShardSpec, UUID, str] | None:
        """Claim the next unfinished shard; None when none is left to run here."""
        while True:
            waiting: list[ShardSpec] = []
            for shard in shards:
                if shard.index in finished or shard.index in given_up:
                    continue
                if shard.index in running_here:
                    continue
                info = await finished_info(sink, shard.index, token)
                if info is not None:
                    await finish(shard, info)
                else:
                    waiting.append(shard)
            if not waiting:
                return None  # the rest is finished, or running here already
            for shard in waiting:
                if not_before.get(shard.index, 0.0) > time.monotonic():
                    continue
                name = claim_name(out, shard.index)
                try:
                    lease = await _try_claim(client, name)
                except Exception as exc:
                    if not unreachable(exc):
                        raise
                    # The server is down or restarting: nobody can claim anything now.
                    log.warning("the Prefect server cannot be reached (%s); waiting", exc)
                    await asyncio.sleep(SERVER_WAIT_S)
                    break
                if lease is not None:
                    running_here.add(shard.index)
                    return shard, lease, name
            await asyncio.sleep(IDLE_POLL_S)

    # Where finished shards leave their shard.json; closed with the drain.
    with contextlib.closing(open_sink(out)) as sink:
        async with get_client() as client:
            tails: set[asyncio.Task[None]] = set()
            try:
                while True:
                    await feeders.acquire()
                    claimed = await next_claim(client)
                    if claimed is None:
                        feeders.release()
                        if not tails:
                            break
                        # A shard running here may fail and need another try: wait for one.
                        await asyncio.wait(tails, return_when=asyncio.FIRST_COMPLETED)
                        continue
                    task = asyncio.create_task(attempt(client, *claimed))
                    tails.add(task)
                    task.add_done_callback(tails.discard)
            finally:
                for task in tails:
                    task.cancel()
                await asyncio.gather(*tails, return_exceptions=True)
    return finished, sorted(given_up)


async def forget_claims(out: str, shards: list[ShardSpec]) -> None:
    """Delete the shards' claim limits once the night is over (a rerun creates them again)."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for shard in shards:
            with contextlib.suppress(Exception):
                await client.delete_global_concurrency_limit_by_name(claim_name(out, shard.index))
