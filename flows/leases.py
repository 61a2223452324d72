"""A night goes on when its deployment's concurrency lease cannot be renewed.

``nightly-catalog`` has a deployment concurrency limit of 1 (``prefect.yaml``), so a night
that overruns makes the next one wait. Prefect's flow engine holds that slot with a lease
of 300 s that it renews every 225 s, and it *cancels the run* when a renewal fails three
times in a row, about 3 s apart (``raise_on_lease_renewal_failure=True``, fixed in
``prefect.flow_engine``). A Prefect server restarted while a night runs makes that
renewal fail: measured on the test pool, a server down 30 s (SIGTERM) answered the night's
next renewal with 410 Gone (the server keeps leases in memory by default and forgot it),
the engine stopped the night and it ended ``Crashed``, unmerged, with nothing to run it
again; a server that is down at the moment of a renewal does the same whatever it keeps.

The slot only keeps the next night waiting; losing it must not stop this one. So the
catalog flows keep the lease here instead: renewed on Prefect's schedule, retried every
``RETRY_S`` while the server cannot be reached (it may come back with the lease intact),
and given up with a warning once the server says it no longer knows it. The run is never
cancelled for it. A night whose slot was released that way can overlap the next one,
which writes its own dated folder (or, into the same output, stops at once on its lock).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import UUID

log = logging.getLogger(__name__)

#: Renew when this share of the lease has passed (Prefect's own fraction).
RENEW_AT = 0.75
#: Pause between renewals while the Prefect server cannot be reached.
RETRY_S = 10.0


def _renew_until(lease_id: UUID, lease_duration: float, stop: threading.Event) -> None:
    """Renew the lease until ``stop`` is set or the server no longer knows the lease."""
    from prefect.client.orchestration import get_client

    from flows.queue import unreachable

    with get_client(sync_client=True) as client:
        while not stop.is_set():
            try:
                client.renew_concurrency_lease(lease_id=lease_id, lease_duration=lease_duration)
            except Exception as exc:
                if unreachable(exc):
                    log.warning(
                        "deployment concurrency lease %s: the Prefect server cannot be "
                        "reached (%s); the night goes on, trying again in %.0f s",
                        lease_id,
                        exc,
                        RETRY_S,
                    )
                    stop.wait(RETRY_S)
                    continue
                log.warning(
                    "deployment concurrency lease %s is gone (%s; a restarted Prefect server "
                    "forgets leases it keeps in memory): this night no longer holds the "
                    "deployment's slot, and goes on",
                    lease_id,
                    exc,
                )
                return
            stop.wait(lease_duration * RENEW_AT)


@contextlib.contextmanager
def keep_lease(lease_id: UUID, lease_duration: float, *_: Any, **__: Any) -> Iterator[None]:
    """Stands in for ``prefect.flow_engine.maintain_concurrency_lease``; never cancels."""
    stop = threading.Event()
    context = contextvars.copy_context()
    thread = threading.Thread(
        target=context.run,
        args=(_renew_until, lease_id, lease_duration, stop),
        daemon=True,
        name=f"deployment-lease-{lease_id}",
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)


@contextlib.asynccontextmanager
async def akeep_lease(
    lease_id: UUID, lease_duration: float, *_: Any, **__: Any
) -> AsyncIterator[None]:
    """Stands in for ``prefect.flow_engine.amaintain_concurrency_lease``; never cancels."""
    with keep_lease(lease_id, lease_duration):
        yield


def install() -> bool:
    """Make Prefect's flow engine keep deployment leases with ``keep_lease`` in this process.

    Only the flow engine's names are replaced: global concurrency limits taken with
    ``prefect.concurrency`` (the key's, ``flows/budget.py``) keep Prefect's own renewal.
    False (and a warning) if this Prefect has no such names: then a failed renewal cancels
    the night again, and ``tests/flows/test_leases.py`` fails.
    """
    from prefect import flow_engine

    names = ("maintain_concurrency_lease", "amaintain_concurrency_lease")
    if not all(hasattr(flow_engine, name) for name in names):
        log.warning(
            "prefect.flow_engine has no %s: a night whose deployment lease cannot be "
            "renewed (a Prefect server restart) is cancelled by Prefect",
            " or ".join(names),
        )
        return False
    flow_engine.maintain_concurrency_lease = keep_lease  # type: ignore[assignment]
    flow_engine.amaintain_concurrency_lease = akeep_lease  # type: ignore[assignment]
    return True


#: The server setting that keeps leases across a restart (Prefect's file-based storage).
FILE_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
MEMORY_LEASES = "prefect.server.concurrency.lease_storage.memory"


async def leases_in_memory() -> str | None:
    """A warning for the night's log when the Prefect server keeps its leases in memory.

    The shards' claims and the key's slots are Prefect global concurrency limits held
    with leases. A server that keeps those leases in memory (Prefect's default) forgets
    them when it restarts, but the slots they held stay counted: nobody can ever claim a
    shard whose claim it forgot once its runner stopped, and the key's limit stays short
    of the slots it forgot, night after night. ``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``
    set to ``FILE_LEASES`` keeps them (README: Production). Never raises: the check is
    advice, and an old server without ``/admin/settings`` is not a reason to stop a night.
    """
    from prefect.client.orchestration import get_client

    try:
        async with get_client() as client:
            answer = await client._client.get("/admin/settings")
            answer.raise_for_status()
            storage = answer.json()["server"]["concurrency"]["lease_storage"]
    except Exception as exc:  # ephemeral mode, an older server, no access: no advice
        log.debug("could not read the Prefect server's lease storage: %s", exc)
        return None
    if storage != MEMORY_LEASES:
        return None
    warning = (
        "the Prefect server keeps concurrency leases in memory: if it restarts while this "
        "night runs, the shards' claims and the key's slots it forgets stay taken; start it "
        f"with PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE={FILE_LEASES} (README: Production)"
    )
    return warning
