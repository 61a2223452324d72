"""Assembling the simulator: the aiohttp app, operator endpoints, and ways to run it.

Three ways to run the same server: ``async with SimServer(config)`` inside a test's event
loop, ``with SimServer.in_thread(config)`` for synchronous code (its own loop in a daemon
thread), and ``serve(config, host, port)`` blocking until Ctrl-C or SIGTERM (the command
line). Operator endpoints need no key, so they answer loopback peers only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pipeline.sim.bfl import BflApi
from pipeline.sim.config import SimConfig
from pipeline.sim.klein import KleinApi
from pipeline.sim.responses import is_loopback, json_response
from pipeline.sim.results import RESULTS_PREFIX, Results
from pipeline.sim.state import SimState
from pipeline.sim.webhooks import WebhookSender

log = logging.getLogger(__name__)

STATS_PATH = "/_sim/stats"
RESET_PATH = "/_sim/reset"


@dataclass(slots=True)
class Sim:
    """The parts of one running simulator, reachable from the app."""

    state: SimState
    results: Results
    webhooks: WebhookSender
    klein: KleinApi
    bfl: BflApi | None = None

    def reset(self) -> None:
        self.webhooks.cancel_all()
        if self.bfl is not None:
            self.bfl.cancel_all()
        self.results.cache.clear()
        self.state.reset()


SIM_KEY = web.AppKey("klein_sim", Sim)


def create_app(
    config: SimConfig | None = None, *, clock: Callable[[], float] = time.time
) -> web.Application:
    """The simulator as an aiohttp application (both dialects, results, operator endpoints)."""
    config = config if config is not None else SimConfig()
    config.validate()
    state = SimState(config, clock=clock)
    secret = config.url_secret.encode() if config.url_secret else secrets.token_bytes(32)
    results = Results(state, secret)
    holder: list[KleinApi] = []
    webhooks = WebhookSender(
        state, lambda task, status: holder[0].webhook_body(task, status),
        timeout_s=config.webhook_timeout_s,
    )  # fmt: skip
    klein = KleinApi(state, results, webhooks)
    holder.append(klein)
    bfl = BflApi(state, results)
    sim = Sim(state, results, webhooks, klein, bfl)

    app = web.Application(client_max_size=config.max_body_bytes())
    app[SIM_KEY] = sim
    klein.add_routes(app)
    bfl.add_routes(app)
    app.router.add_get(RESULTS_PREFIX + "{name}", results.handle)
    app.router.add_get(STATS_PATH, _stats)
    app.router.add_post(RESET_PATH, _reset)
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
    return app


def _operator_refusal(request: web.Request) -> web.Response | None:
    if is_loopback(request.remote):
        return None
    return json_response(
        {"message": "Operator endpoints answer requests from this machine (loopback) only"},
        status=403,
    )


async def _stats(request: web.Request) -> web.Response:
    refusal = _operator_refusal(request)
    if refusal is not None:
        return refusal
    return json_response(request.app[SIM_KEY].state.stats())


async def _reset(request: web.Request) -> web.Response:
    refusal = _operator_refusal(request)
    if refusal is not None:
        return refusal
    request.app[SIM_KEY].reset()
    return json_response({"reset": True})


_PRUNER = web.AppKey("klein_sim_pruner", asyncio.Task)


async def _startup(app: web.Application) -> None:
    sim = app[SIM_KEY]
    await sim.webhooks.start()
    app[_PRUNER] = asyncio.get_running_loop().create_task(_prune_forever(sim.state))


async def _cleanup(app: web.Application) -> None:
    pruner = app[_PRUNER]
    pruner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pruner
    await app[SIM_KEY].webhooks.close()


async def _prune_forever(state: SimState) -> None:
    """Forget long-expired tasks so memory stays flat however long the server runs."""
    horizon = state.config.result_ttl_s + state.config.retention_s
    interval = min(30.0, max(0.5, horizon / 10))
    while True:
        await asyncio.sleep(interval)
        pruned = state.prune(state.clock())
        if pruned:
            log.debug("pruned %d finished tasks", pruned)


class SimServer:
    """A running simulator on ``host:port`` (port 0 picks a free one)."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config if config is not None else SimConfig()
        #: Unix-seconds clock the simulated API runs on; tests pass a fake one to skip time.
        self.clock = clock
        self.host = host
        self.port = port
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def sim(self) -> Sim:
        if self._app is None:
            raise RuntimeError("the simulator is not running")
        return self._app[SIM_KEY]

    async def start(self) -> None:
        self._app = create_app(self.config, clock=self.clock)
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if server is not None and getattr(server, "sockets", None):
            self.port = server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop: state is touched from that loop only."""
        loop = self._loop
        if (
            self._thread is not None
            and loop is not None
            and threading.current_thread() is not self._thread
        ):

            async def run() -> Any:
                return fn()

            return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=30)
        return fn()

    def stats(self) -> dict[str, Any]:
        """The operator counters (same as ``GET /_sim/stats``)."""
        return self._call(self.sim.state.stats)

    def reset(self) -> None:
        """Zero counters and forget tasks (same as ``POST /_sim/reset``)."""
        self._call(self.sim.reset)

    @classmethod
    @contextlib.contextmanager
    def in_thread(
        cls,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout_s: float = 30.0,
    ) -> Iterator[SimServer]:
        """Run a simulator on its own event loop in a daemon thread, for synchronous callers."""
        server = cls(config, host=host, port=port)
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(server.start())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(server.stop())
            loop.close()

        thread = threading.Thread(target=main, name="klein-sim", daemon=True)
        server._thread = thread
        thread.start()
        if not started.wait(startup_timeout_s):
            raise RuntimeError("the simulator did not start in time")
        if failure:
            raise failure[0]
        try:
            yield server
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=startup_timeout_s)


def serve(
    config: SimConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    announce: Callable[[str], None] = print,
) -> None:
    """Run until Ctrl-C or SIGTERM, announcing the base URL in one line once listening."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        async with SimServer(config, host=host, port=port) as server:
            announce(f"klein simulator listening on {server.url}")
            await stop.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
