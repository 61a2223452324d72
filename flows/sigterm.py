"""A SIGTERM to a flow run's process stops its shards the way Ctrl-C stops a run.

Prefect ends a cancelled flow run's process with SIGTERM, then SIGKILL 30 s later. (A
worker that is itself stopped, SIGTERM or SIGINT to ``prefect worker start``, does not:
Prefect 3.9.1 SIGKILLs its flow runs' processes within 10 ms, so nothing here runs then;
``klein-batch worker``, ``flows/worker.py``, sends them SIGTERM first.) Prefect's own SIGTERM
handler raises ``TerminationSignal`` wherever the main thread is, most often in the
event loop's ``select``: out of ``asyncio.run``, whose clean-up cancels every task of
the loop at once, the engines' submits on the wire among them. Those tasks were charged
by the API and never journaled, and the next night paid for their rows again (measured
on a pool, a night cancelled with submits answered 3 s late: 34 tasks charged, 30
journaled). Here the signal cancels the flow's work instead, which winds its shards down
(each engine waits for the answers to its submits in the air and journals them,
``pipeline.engine.SETTLE_SUBMITS_S``); then the flow run ends as Prefect would have
ended it: Cancelled when that is what the server asked for; else, a deployment's run,
Crashed named ``Interrupted`` (its worker was stopped: ``klein-batch worker`` stops its
flow runs this way before itself, and the night runs again); else by Prefect's
``TerminationSignal`` (Crashed).

The price: while this handler is installed Prefect's own is not, so a worker's cancel
intent is not acknowledged over its control channel and the worker takes its fallback
path (SIGTERM, 30 s, SIGKILL; it then marks the run Cancelled itself).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

from pipeline.run import sigterm_taken, take_sigterm

log = logging.getLogger(__name__)

#: How long the work may take to stop after SIGTERM: within Prefect's 30 s before SIGKILL,
#: room for each engine's wait on its submits (``pipeline.engine.SETTLE_SUBMITS_S``, 10 s)
#: and the shards' partial outputs.
STOP_S = 25.0

#: The name of the state a deployment's flow run ends in when SIGTERM stopped it and no one
#: cancelled it: its worker was stopped (``klein-batch worker``, systemd, an eviction).
#: ``automations.yaml`` runs such a night again, as a Lost one; a runner's shards are
#: taken over by the night's other runners.
INTERRUPTED = "Interrupted"
INTERRUPTED_MESSAGE = (
    "stopped by SIGTERM (its worker was stopped), not cancelled: the shards running here "
    "stopped first and journaled their submits in the air; a night runs again by itself "
    "(automations.yaml), a runner's shards are taken over by the others"
)

_Flow = Callable[..., Awaitable[Any]]


def stops_on_sigterm(fn: _Flow) -> _Flow:
    """Decorate a flow function (under ``@flow``): SIGTERM winds its work down first."""

    @functools.wraps(fn)
    async def stopping_on_sigterm(*args: Any, **kwargs: Any) -> Any:
        return await stop_on_sigterm(fn(*args, **kwargs))

    # Prefect builds the flow's parameters from this signature, resolving its annotations
    # in the decorator's module: resolved here, in ``fn``'s, they are types already.
    stopping_on_sigterm.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    return stopping_on_sigterm


async def stop_on_sigterm(work: Awaitable[Any]) -> Any:
    """Await ``work``; on SIGTERM cancel it and wait for it to stop (``STOP_S``), then
    return a Cancelled state if this flow run is being cancelled, a Crashed one named
    ``INTERRUPTED`` if it is a deployment's, else raise Prefect's ``TerminationSignal``.
    Further SIGTERMs are logged (workers may send more than one); SIGKILL ends the process
    at once.

    Signals belong to the main thread: elsewhere (a flow called from a notebook's thread),
    and inside another such wait (a subflow in the same process), ``work`` is awaited as it
    is.
    """
    if threading.current_thread() is not threading.main_thread() or sigterm_taken():
        return await work
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    termed = asyncio.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread: hand over to the loop, nothing more.
        loop.call_soon_threadsafe(_termed, termed)

    previous = take_sigterm(on_sigterm)
    try:
        waiter = asyncio.ensure_future(termed.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the flow itself cancelled: its work with it
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_S)
            raise
        finally:
            waiter.cancel()
        if not termed.is_set():
            return task.result()
        log.warning(
            "SIGTERM: stopping the shards running here first (each journals the answers to "
            "its submits in the air, so the next run polls those tasks instead of paying "
            "again), then this flow run ends"
        )
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_S)
        if not task.done():
            log.error("the shards did not stop within %.0f s; ending without them", STOP_S)
        elif not task.cancelled() and task.exception() is not None:
            log.error("the flow failed as it stopped: %s", task.exception())
    finally:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)
    if await _being_cancelled():
        from prefect.states import Cancelled

        return Cancelled(message="cancelled; the shards running here stopped first")
    if _of_a_deployment():
        from prefect.states import Crashed

        return Crashed(name=INTERRUPTED, message=INTERRUPTED_MESSAGE)
    from prefect.exceptions import TerminationSignal

    raise TerminationSignal(signal.SIGTERM)


def _of_a_deployment() -> bool:
    """Whether this flow run is a deployment's, which a worker can run again: a run
    started from a shell (``klein-batch flow``) is not, and its own user reruns it."""
    from prefect.runtime import deployment

    return bool(deployment.id)


def _termed(termed: asyncio.Event) -> None:
    if termed.is_set():
        log.warning("SIGTERM again: still stopping the shards (SIGKILL ends at once)")
    termed.set()


async def _being_cancelled() -> bool:
    """Whether the server is cancelling this flow run (what a worker's SIGTERM means)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return False
    try:
        async with get_client() as client:
            state = (await client.read_flow_run(flow_run.id)).state
    except Exception as exc:  # the server gone: Prefect's own ending (Crashed) then
        log.warning("could not read this flow run's state: %s", exc)
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())
