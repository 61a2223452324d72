"""The pipeline's webhook receiver: verified task endings, handed to the engine.

``--webhook-listen HOST:PORT`` runs this aiohttp server inside the run; the API calls
``--webhook-public-url`` (default ``http://HOST:PORT``) plus ``PATH``. A delivery is
acted on only when it is proven to come from the API:

- dialect klein (Svix convention): ``webhook-id``, ``webhook-timestamp`` and
  ``webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``; a
  ``whsec_<base64>`` secret means the decoded bytes. Timestamps more than 5 minutes away
  from now are refused, so a captured delivery cannot be replayed later, and an id seen
  before is not acted on again.
- dialect bfl: ``X-BFL-Signature: sha256=<hex HMAC-SHA256(secret, body)>``. The signature
  covers the body only, so freshness cannot be proven; a replayed body names a task that
  already ended and says the same thing again, so it is harmless, and the body's digest
  serves as its id.

Why a forged, stale or replayed delivery can do no harm anyway: the engine still polls
every task on its own (later) schedule, so a delivery only makes a task end sooner, and a
verified one carries the same answer a poll would give. Duplicates are answered 200 (so
the sender stops retrying) and ignored. Signing secrets come from the environment
(``WEBHOOK_SECRET_ENV``), never from a flag, and never appear in logs.

Bounds. The receiver listens on an address anyone may reach, and a flood against it must
never cost the run more than its webhooks: at most ``max_connections`` connections are
open at once (by default an eighth of the open-file limit, at most 256; beyond it a new
connection is closed the moment it is accepted, so none queue for ever and the process
keeps its file descriptors for the journal, the API and the images), a request's headers
must arrive within ``header_timeout_s`` of the connection (or of the previous answer) and
its body within ``body_timeout_s``, bodies are capped at ``MAX_BODY_BYTES``, a refusal
closes its connection, and so does every answer once half the bound is open. Below that, a
verified delivery's connection stays open for the sender's next one (it must come within
``header_timeout_s``, like any request): each task sends three, and a new connection (a
TLS handshake, in production) per delivery put milliseconds between a task's end and the
submit that refills its slot. A starved receiver only means tasks are noticed by their
polls, a little later: rows still end as the API ended their tasks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import errno
import hashlib
import hmac
import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from pipeline.config import WEBHOOK_SECRET_ENV
from pipeline.errors import ConfigError
from pipeline.providers import ProtocolError, Provider, TaskState

log = logging.getLogger(__name__)

PATH: Final = "/klein-batch/webhook"
#: Deliveries signed longer ago than this (or this far in the future) are refused.
TOLERANCE_S: Final = 300.0
#: Task webhooks are small JSON objects; anything bigger is not one.
MAX_BODY_BYTES: Final = 64 * 1024
_SEEN_CAPACITY: Final = 200_000
#: Connections held open at once, at most (see ``connection_bound``).
MAX_CONNECTIONS: Final = 256
#: A request's headers (slowloris sends them a byte at a time) and its body must arrive
#: within these; the API sends a delivery in one go.
HEADER_TIMEOUT_S: Final = 10.0
BODY_TIMEOUT_S: Final = 10.0
#: A full receiver says so at most this often.
_FULL_WARNING_EVERY_S: Final = 60.0
#: What ``accept()`` fails with when the process (or system) is out of file descriptors:
#: asyncio then stops accepting for a second by itself, and reports it with a traceback.
_OUT_OF_FILES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def connection_bound() -> int:
    """How many connections the receiver holds at once: an eighth of the open-file limit
    (the rest is the run's: journal, API connections, images), at most ``MAX_CONNECTIONS``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, soft // 8))


def secret_bytes(secret: str) -> bytes:
    """The HMAC key a Svix-style secret stands for: ``whsec_<base64>`` decoded, else UTF-8."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode("utf-8")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as given to ``--webhook-listen``."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"--webhook-listen {value!r} is not allowed; expected HOST:PORT, "
            "e.g. 0.0.0.0:8787 or 127.0.0.1:0"
        )
    return host, int(port)


class Refused(Exception):
    """A delivery not acted on; ``status`` is what the sender is told."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Verifier:
    """Checks one dialect's signature scheme; returns the delivery's id for deduplication."""

    def __init__(self, dialect: str, secret: str, *, clock: Callable[[], float] = time.time):
        if dialect not in WEBHOOK_SECRET_ENV:
            raise ConfigError(f"webhooks: unknown dialect {dialect!r}")
        self.dialect = dialect
        self._key = secret_bytes(secret) if dialect == "klein" else secret.encode("utf-8")
        self._clock = clock

    def verify(self, headers: Any, body: bytes) -> str:
        if self.dialect == "klein":
            return self._svix(headers, body)
        return self._bfl(headers, body)

    def _svix(self, headers: Any, body: bytes) -> str:
        msg_id = headers.get("webhook-id", "")
        stamp = headers.get("webhook-timestamp", "")
        signatures = headers.get("webhook-signature", "")
        if not msg_id or not stamp or not signatures:
            raise Refused(401, "missing webhook-id, webhook-timestamp or webhook-signature")
        try:
            timestamp = int(stamp)
        except ValueError:
            raise Refused(400, "webhook-timestamp is not unix seconds") from None
        payload = f"{msg_id}.{stamp}.".encode() + body
        expected = base64.b64encode(hmac.new(self._key, payload, hashlib.sha256).digest())
        if not any(
            version == "v1" and hmac.compare_digest(sig.encode(), expected)
            for version, _, sig in (part.partition(",") for part in signatures.split())
        ):
            raise Refused(401, "bad signature")
        # Checked after the signature, so a forger cannot learn anything from the answer.
        if abs(self._clock() - timestamp) > TOLERANCE_S:
            raise Refused(400, "stale delivery (timestamp more than 5 minutes from now)")
        return "svix:" + msg_id

    def _bfl(self, headers: Any, body: bytes) -> str:
        header = headers.get("X-BFL-Signature", "")
        scheme, _, given = header.partition("=")
        if scheme != "sha256" or not given:
            raise Refused(401, "missing X-BFL-Signature: sha256=<hex>")
        expected = hmac.new(self._key, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given.strip().lower().encode(), expected.encode()):
            raise Refused(401, "bad signature")
        return "bfl:" + hashlib.sha256(body).hexdigest()


@dataclass(slots=True)
class ReceiverStats:
    """What the receiver saw, for ``run.json`` and tests."""

    accepted: int = 0
    duplicates: int = 0
    #: Connections closed on arrival because ``max_connections`` were open.
    connections_refused: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, object]:
        """The figures as ``run.json`` keeps them."""
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "connections_refused": self.connections_refused,
            "refused": dict(self.refused),
        }


class WebhookReceiver:
    """An aiohttp server that verifies deliveries and reports task endings to ``on_state``."""

    def __init__(
        self,
        provider: Provider,
        secret: str,
        on_state: Callable[[str, TaskState], None],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        public_url: str | None = None,
        clock: Callable[[], float] = time.time,
        max_connections: int | None = None,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        if not secret:
            env = WEBHOOK_SECRET_ENV.get(provider.dialect, "the webhook secret variable")
            raise ConfigError(
                f"webhooks need a signing secret: set ${env} (never a flag), so forged "
                "deliveries can be told apart"
            )
        self._provider = provider
        self._verifier = Verifier(provider.dialect, secret, clock=clock)
        self._on_state = on_state
        self.host = host
        self.port = port
        self._public = public_url.rstrip("/") if public_url else None
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._runner: web.AppRunner | None = None
        self.max_connections = max_connections or connection_bound()
        self._header_timeout = header_timeout_s
        self._body_timeout = body_timeout_s
        self._warned_at: dict[str, float] = {}
        self._loop_handler: tuple[asyncio.AbstractEventLoop, Any] | None = None
        self.stats = ReceiverStats()

    @property
    def url(self) -> str:
        """The address the API should call (``webhook_url`` in each submit)."""
        if self._public:
            return self._public if self._public.endswith(PATH) else self._public + PATH
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{PATH}"

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(PATH, self._handle)
        # aiohttp closes a connection still waiting for a whole request this long after it
        # opened (or after the last answer): the header-read deadline.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self._header_timeout,
            # An answered request's unread body is not waited for (aiohttp lingers 10 s).
            lingering_time=0.0,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        self._quiet_accept_errors()
        site = _BoundedSite(self._runner, self.host, self.port, receiver=self)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(
                f"--webhook-listen {self.host}:{self.port}: cannot listen ({exc.strerror or exc})"
            ) from None
        self.port = site.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._loop_handler is not None:
            loop, previous = self._loop_handler
            loop.set_exception_handler(previous)
            self._loop_handler = None

    def _quiet_accept_errors(self) -> None:
        """A flood can use up the process's files between two closes of refused connections;
        asyncio then pauses ``accept`` for a second and reports it with a traceback. That is
        the bound working, not an error: one warning line a minute says so instead."""
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        self._loop_handler = (loop, previous)

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if (
                isinstance(exc, OSError)
                and exc.errno in _OUT_OF_FILES
                and "accept" in str(context.get("message", ""))
            ):
                self._refused_connection(
                    "files",
                    "webhook receiver: out of open files (%s), accepting again in a "
                    "second; tasks are noticed by polling meanwhile",
                    exc.strerror or exc,
                )
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

    async def __aenter__(self) -> WebhookReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
                raise Refused(413, "body too large")
            try:
                async with asyncio.timeout(self._body_timeout):
                    body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise Refused(413, "body too large") from None
            except TimeoutError:
                raise Refused(408, "body too slow") from None
            delivery_id = self._verifier.verify(request.headers, body)
            if delivery_id in self._seen:
                self.stats.duplicates += 1
                return self._kept(web.json_response({"ok": True, "duplicate": True}))
            try:
                task_id, state = self._provider.parse_webhook(json.loads(body))
            except (ValueError, ProtocolError) as exc:
                raise Refused(400, f"not a task webhook ({exc})") from None
        except Refused as refusal:
            self.stats.refused[refusal.reason.split(" (")[0]] += 1
            log.debug("webhook refused: %s", refusal.reason)
            return _closing(web.json_response({"error": refusal.reason}, status=refusal.status))
        self._remember(delivery_id)
        self.stats.accepted += 1
        if state.phase != "pending":
            self._on_state(task_id, state)
        return self._kept(web.json_response({"ok": True}))

    def _kept(self, response: web.Response) -> web.Response:
        """A verified delivery's answer keeps its connection while the receiver has room.

        Past half the bound every answer closes its connection, so senders holding idle
        ones cannot keep new senders out (an idle one closes after ``header_timeout_s``
        anyway: aiohttp's keep-alive timeout is set to it).
        """
        server = self._runner.server if self._runner is not None else None
        if server is None or 2 * len(server.connections) >= self.max_connections:
            response.force_close()
        return response

    def admit(self, open_connections: int) -> bool:
        """Whether a new connection may stay, with ``open_connections`` open already."""
        if open_connections < self.max_connections:
            return True
        self._refused_connection(
            "full",
            "webhook receiver: %d connections open, closing new ones at once (a flood?); "
            "tasks are noticed by polling meanwhile",
            open_connections,
        )
        return False

    def _refused_connection(self, why: str, message: str, *args: object) -> None:
        """Count a connection the receiver could not take; say so once a minute per cause
        (a flood would otherwise write a line per connection)."""
        self.stats.connections_refused += 1
        now = time.monotonic()
        if now - self._warned_at.get(why, -_FULL_WARNING_EVERY_S) >= _FULL_WARNING_EVERY_S:
            self._warned_at[why] = now
            log.warning(message, *args)

    def _remember(self, delivery_id: str) -> None:
        now = time.monotonic()
        self._seen[delivery_id] = now
        seen = self._seen
        # Ids older than the tolerance are refused as stale anyway; the cap bounds memory.
        while seen and (
            len(seen) > _SEEN_CAPACITY or now - next(iter(seen.values())) > 2 * TOLERANCE_S
        ):
            seen.popitem(last=False)


def _closing(response: web.Response) -> web.Response:
    """A refusal ends its connection: whoever sent it gets no connection kept for them."""
    response.force_close()
    return response


class _Closed(asyncio.Protocol):
    """A connection over the bound: dropped the moment it is accepted (its fd freed)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()


class _BoundedSite(web.TCPSite):
    """A ``TCPSite`` whose protocol factory refuses connections beyond the receiver's bound."""

    __slots__ = ("_receiver",)

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, receiver: WebhookReceiver):
        super().__init__(runner, host, port)
        self._receiver = receiver

    async def start(self) -> None:
        await super(web.TCPSite, self).start()  # BaseSite's: registers the site with its runner
        server = self._runner.server
        assert server is not None
        receiver = self._receiver

        def connection() -> asyncio.BaseProtocol:
            if receiver.admit(len(server.connections)):
                return server()
            return _Closed()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(connection, self._host, self._port)
        self._bound_port = self._server.sockets[0].getsockname()[1]
