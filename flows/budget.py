"""Sharing one API key's active-task budget between shards on many workers.

The key allows ``L`` active tasks. A Prefect global concurrency limit named after the key
holds ``L`` slots; each running shard leases its share ``k`` once, for its whole life, and
its in-process limiter (``RunOptions.max_active = k``) keeps it within that share. The sum
of the shares of running shards therefore never passes ``L``, and no request ever waits
for a round trip to the Prefect server. A shard whose worker dies gives its share back when
the lease expires (``LEASE_S``), without anyone cleaning up.

The submit rate is a key-wide limit too, so each shard also gets ``k / L`` of it.

That fixed split is for shards run in the flow's own process. A deployment's runners
(``flows/queue.py``) each run with the whole budget and share it adaptively, since a share
fixed for a shard's whole life leaves slots idle as soon as shards finish unevenly; there a
running shard leases one slot, so the limit counts the shards on the key. Adaptive sharing
needs the key's own 429s to say when the others hold a slot, so a budget below the key's
limit is split between the runners as fixed parts instead (``runner_share``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

from pipeline.contract import Tier

log = logging.getLogger(__name__)

#: Name of the global concurrency limit that stands for the API key's active tasks.
DEFAULT_LIMIT_NAME: Final = "klein-api-key"
#: Seconds a lease outlives a dead worker; a live shard renews it in the background.
LEASE_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Share:
    """One shard's part of the key: its lease size and the limits its engine obeys."""

    occupy: int
    max_active: int
    submits_per_minute: int


def share_of(limits: Tier, budget: int, parallel: int) -> Share:
    """Split ``budget`` active tasks (at most the tier's) between ``parallel`` shards."""
    budget = max(1, min(budget, limits.max_active))
    occupy = max(1, budget // max(1, parallel))
    rate = max(1, limits.submits_per_minute * occupy // limits.max_active)
    return Share(occupy=occupy, max_active=occupy, submits_per_minute=rate)


def runner_share(limits: Tier, key_active: int, budget: int, runners: int) -> Share:
    """One queue runner's part of ``budget`` when ``runners`` share the key's ``key_active``.

    At the key's own limit each runner gets the whole budget and the runners divide it
    adaptively: the key's 429s tell each one when the others hold a slot. Below it (a
    ``--max-active`` share, or a ``klein-api-key`` limit an operator set lower) no 429 ever
    says the budget is spent, so each runner gets a fixed equal part and never probes past
    it: ``runners`` engines each growing to the whole budget would use the whole key.
    A running shard holds one slot of the limit either way (the limit counts shards).
    """
    budget = max(1, min(budget, limits.max_active))
    if budget >= key_active:
        rate = max(1, limits.submits_per_minute * budget // limits.max_active)
        return Share(occupy=1, max_active=budget, submits_per_minute=rate)
    fixed = share_of(limits, budget, runners)
    return Share(occupy=1, max_active=fixed.max_active, submits_per_minute=fixed.submits_per_minute)


async def ensure_limit(name: str, slots: int) -> tuple[int, bool]:
    """Create the limit with ``slots`` slots unless it exists; return (its limit, active).

    An existing limit is respected as it is: an operator may have set it lower to keep
    part of the key for other jobs.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # Another flow may have created it a moment ago: then theirs stands.
            with contextlib.suppress(ObjectAlreadyExists):
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=slots)
                )
            limit = await client.read_global_concurrency_limit_by_name(name)
        return int(limit.limit), bool(limit.active)


@dataclass(slots=True)
class Lease:
    """When a shard held its share (recorded in ``shard.json`` for audits and tests)."""

    name: str | None
    occupy: int
    acquired_at: float = 0.0
    released_at: float = 0.0


@asynccontextmanager
async def leased(name: str | None, occupy: int) -> AsyncIterator[Lease]:
    """Hold ``occupy`` slots of the limit ``name`` for the block (no limit when ``None``)."""
    lease = Lease(name=name, occupy=occupy)
    if name is None:
        lease.acquired_at = time.time()
        try:
            yield lease
        finally:
            lease.released_at = time.time()
        return
    from prefect.concurrency.asyncio import concurrency

    held = concurrency(
        name,
        occupy=occupy,
        lease_duration=LEASE_S,
        strict=True,
        raise_on_lease_renewal_failure=False,
    )
    await held.__aenter__()
    lease.acquired_at = time.time()
    try:
        yield lease
    except BaseException as exc:
        lease.released_at = time.time()
        await _release(held, exc)
        raise
    lease.released_at = time.time()
    await _release(held, None)


async def _release(
    held: contextlib.AbstractAsyncContextManager[object], exc: BaseException | None
) -> None:
    """Give the share back; if the server cannot be reached, the lease lapses in ``LEASE_S``.

    Releasing needs the Prefect server, and Ctrl-C stops the ephemeral one before the shards
    wind down. A failed release must not become the shard's error: Prefect would retry the
    shard (and spend credits) after the user stopped the run, or fail a shard that worked.
    """
    try:
        await held.__aexit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
    except Exception as error:
        log.warning(
            "could not release the concurrency lease (%s); it lapses in %.0f s", error, LEASE_S
        )
