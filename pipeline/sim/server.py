"""Assembling the simulator: the aiohttp app, operator endpoints, and ways to run it.

Three ways to run the same server: ``async with SimServer(config)`` inside a test's event
loop, ``with SimServer.in_thread(config)`` for synchronous code (its own loop in a daemon
thread), and ``serve(config, host, port)`` blocking until Ctrl-C or SIGTERM (the command
line). Operator endpoints need no key, so they answer loopback peers only.

Each runs two listeners: the API's global host (``url``: both dialects' submits, dialect
A's polls and lists, results, operator endpoints) and a second one standing for the
regional cluster that takes dialect B's tasks (``regional_url``: its ``/v1/get_result``
and results). Dialect B's ``polling_url`` names the second, so only a client that polls it
as given finds its tasks. Paths neither knows answer JSON like the API's own: FastAPI's
``{"detail": "Not Found"}`` (and ``405 {"detail": "Method Not Allowed"}``), or
``{"message": "Not Found"}`` under dialect A's ``/v1/ai/`` paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
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
#: The standalone simulator's GIL switch interval (``serve``): see the comment there.
RENDER_SWITCH_INTERVAL_S = 0.0005
#: Unknown paths under this prefix are dialect A's and answer its error shape.
_KLEIN_PREFIX = "/v1/ai/"


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


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """404s and 405s from the router as the API's JSON, not aiohttp's ``text/plain``.

    The public docs show FastAPI's bodies for dialect B (``{"detail": "Not Found"}``);
    dialect A's docs are silent, so its paths answer in its own error shape
    (``{"message": ...}``) rather than a text page no client parses.
    """
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        text = "Not Found" if exc.status == 404 else "Method Not Allowed"
        field = "message" if request.path.startswith(_KLEIN_PREFIX) else "detail"
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_response({field: text}, status=exc.status, headers=headers)


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

    app = web.Application(client_max_size=config.max_body_bytes(), middlewares=[_json_errors])
    app[SIM_KEY] = sim
    klein.add_routes(app)
    bfl.add_routes(app)
    app.router.add_get(RESULTS_PREFIX + "{name}", results.handle)
    app.router.add_get(STATS_PATH, _stats)
    app.router.add_post(RESET_PATH, _reset)
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
    return app


def create_regional_app(app: web.Application) -> web.Application:
    """The regional cluster's listener for ``app``'s simulator: same state, fewer routes."""
    sim = app[SIM_KEY]
    regional = web.Application(middlewares=[_json_errors])
    regional[SIM_KEY] = sim
    if sim.bfl is not None:
        sim.bfl.add_regional_routes(regional)
    regional.router.add_get(RESULTS_PREFIX + "{name}", sim.results.handle)
    return regional


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


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _listen(runner: web.AppRunner, host: str, port: int) -> int:
    """Start a TCP site for ``runner``; the port it got (port 0 picks a free one)."""
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    if server is not None and getattr(server, "sockets", None):
        return server.sockets[0].getsockname()[1]
    return port


class SimServer:
    """A running simulator on ``host:port`` (port 0 picks a free one)."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        regional_host: str | None = None,
        regional_port: int = 0,
    ) -> None:
        self.config = config if config is not None else SimConfig()
        #: Unix-seconds clock the simulated API runs on; tests pass a fake one to skip time.
        self.clock = clock
        self.host = host
        self.port = port
        #: The regional listener: ``host`` unless told, any free port unless told.
        self.regional_host = regional_host or host
        self.regional_port = regional_port
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._regional_runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API's global host: where clients are configured to go."""
        return _url(self.host, self.port)

    @property
    def regional_url(self) -> str:
        """The regional cluster dialect B's ``polling_url`` names (nobody is told it)."""
        return _url(self.regional_host, self.regional_port)

    @property
    def sim(self) -> Sim:
        if self._app is None:
            raise RuntimeError("the simulator is not running")
        return self._app[SIM_KEY]

    async def start(self) -> None:
        self._app = create_app(self.config, clock=self.clock)
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self.port = await _listen(self._runner, self.host, self.port)
        regional = create_regional_app(self._app)
        self._regional_runner = web.AppRunner(regional, access_log=None, handle_signals=False)
        await self._regional_runner.setup()
        self.regional_port = await _listen(
            self._regional_runner, self.regional_host, self.regional_port
        )
        bfl = self._app[SIM_KEY].bfl
        if bfl is not None:
            bfl.regional_url = self.regional_url
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        if self._regional_runner is not None:
            await self._regional_runner.cleanup()
            self._regional_runner = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def stop_listening(self) -> None:
        """Stop answering on both listeners, as an API whose process died does: new
        connections are refused and open ones are cut (a request being handled may still
        create its task, as a server that dies before its answer leaves, unseen, behind).

        The simulator's state is kept: ``listen_again`` brings the same API back on the same
        ports, and tasks acknowledged before the outage can be polled after it."""
        for runner in (self._runner, self._regional_runner):
            if runner is None:
                continue
            for site in list(runner.sites):
                await site.stop()
            if runner.server is not None:
                for handler in runner.server.connections:
                    handler.force_close()

    async def listen_again(self, *, retry_for_s: float = 5.0) -> None:
        """Answer again on the ports ``stop_listening`` closed.

        Binding is retried for a while: the port was free while the server was down, and the
        kernel may have lent it to an outgoing connection meanwhile."""
        deadline = time.monotonic() + retry_for_s
        for runner, host, port in (
            (self._runner, self.host, self.port),
            (self._regional_runner, self.regional_host, self.regional_port),
        ):
            if runner is None or runner.sites:
                continue
            while True:
                try:
                    await web.TCPSite(runner, host, port).start()
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(0.05)

    def go_down(self) -> None:
        """``stop_listening`` from another thread than the server's (``in_thread``)."""
        self._await(self.stop_listening)

    def come_back(self) -> None:
        """``listen_again`` from another thread than the server's (``in_thread``)."""
        self._await(self.listen_again)

    def _await(self, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        loop = self._loop
        if self._thread is None or loop is None or threading.current_thread() is self._thread:
            raise RuntimeError("for a simulator run in_thread, from another thread; else await")
        asyncio.run_coroutine_threadsafe(make(), loop).result(timeout=30)

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
    regional_port: int = 0,
) -> None:
    """Run until Ctrl-C or SIGTERM, announcing the base URL in one line once listening.

    The regional listener (``regional_port``, any free one by default) is not announced:
    clients are given the base URL only and learn the other from ``polling_url``.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        async with SimServer(config, host=host, port=port, regional_port=regional_port) as server:
            announce(f"klein simulator listening on {server.url}")
            await stop.wait()

    # Results render in worker threads. At Python's default switch interval (5 ms) a render
    # holding the GIL kept a submit that had arrived waiting up to that long: the key stood
    # idle for the simulator's sake, under every client alike. The real API's downloads come
    # from a CDN and never delay its admissions; a short interval keeps ours near that.
    sys.setswitchinterval(RENDER_SWITCH_INTERVAL_S)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
