"""One gate per host: while a host does not answer, rows wait at its gate instead of failing.

A connection refused, reset or cut before any answer (or a gateway's 502/504) says nothing
about the row that sent the request: when the API is down, every row meets it. Retried
row by row, an outage of forty seconds used up the attempts of most rows in flight (a
500-row run failed 342 rows). So each host the run talks to (the API, a regional cluster
that serves polls, a host serving results) has a ``HostGate``:

- **closing**: after ``CLOSE_AFTER`` failures of that kind in a row, with no answer from
  the host in between. Three, not one: a keep-alive connection the server had just closed
  fails now and then on a healthy host, and a lone failure must not stall the run. With
  rows in flight, three come within milliseconds of an outage, before rows spend attempts;
  a single row's own retries get there within a second. Any answer at all (a 200, a 404,
  a 429, a 500, a body cut after its headers) proves the host reachable and ends the run
  of failures. 503 is not counted: the API answers it for overload and maintenance with
  a ``Retry-After``, and the rows' retries follow that.
- **while closed**: every request to the host waits at the gate, except one at a time, the
  probe: a request that was waiting anyway (a submit whose connection is refused was never
  sent, so trying it costs nothing), first ``FIRST_PROBE_S`` after closing, then at
  doubling intervals up to ``MAX_PROBE_S``. The probe's answer opens the gate; every
  request waiting goes, and their rows keep the attempts they had.
- **giving up**: a host that has not answered for ``give_up_s`` (``--api-outage-wait``)
  calls ``on_give_up`` with an ``ApiUnreachable``; the engine then stops the run as it does
  on a storage error (nothing sent is lost, the rerun resumes).

A request's failure is its row's (it spends an attempt) only when the host answered
another request after this one began: the host is up and this request met its own bad
luck. Otherwise (``Passage.failed`` returns True) the failure was the host's, and the row
tries again through the gate without spending an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import aiohttp

from pipeline.errors import ApiUnreachable
from pipeline.urls import without_credentials

log = logging.getLogger(__name__)

#: Failures without an answer in a row, with no answer between them, that close a gate.
CLOSE_AFTER: Final = 3
#: The first probe after a gate closes; each later one waits twice as long, up to the max.
FIRST_PROBE_S: Final = 1.0
MAX_PROBE_S: Final = 15.0
#: Answers that say a gateway in front of the API could not reach it: no answer of the API.
GATEWAY_ERRORS: Final = frozenset({502, 504})


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of ``url`` (credentials kept: the key of a gate, not shown).

    Plain string work: this runs for every request, and yarl's parsing was a visible share
    of a request's CPU (``Engine._submit_url``)."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    return f"{scheme.lower()}://{host.lower()}"


def no_answer(exc: BaseException) -> str | None:
    """Why a request that raised ``exc`` before its answer's headers got no answer, in a
    few words; None when ``exc`` says nothing about the host being reachable (a TLS
    certificate refused, a URL aiohttp cannot use, an error of ours)."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return None  # a certificate problem is no outage: waiting would not mend it
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "host name not resolved"
        if isinstance(cause, TimeoutError):
            return "connection timed out"
        return f"cannot connect ({cause.strerror or type(cause).__name__})"
    if isinstance(exc, ConnectionResetError):  # aiohttp's ClientConnectionResetError too
        return "connection reset"
    if isinstance(exc, aiohttp.ClientOSError):
        if exc.errno == errno.ECONNRESET:
            return "connection reset"
        return f"connection failed ({exc.strerror or type(exc).__name__})"
    if isinstance(exc, TimeoutError):
        return "no answer before the request's timeout"
    return None


@dataclass(slots=True)
class Outages:
    """Time during which at least one host of the run was unreachable, for ``run.json`` and
    for the retry policy's elapsed time (waiting at a gate spends no row's time)."""

    clock: Callable[[], float] = time.monotonic
    #: Gates closed now, and since when one has been.
    closed: int = 0
    since: float = 0.0
    total_s: float = 0.0
    #: Times some host stopped answering while all answered before (an API and its
    #: regional host down together count once; down twice, twice).
    count: int = 0

    def seconds(self) -> float:
        """Seconds spent with some host unreachable so far, the current outage included."""
        if self.closed:
            return self.total_s + (self.clock() - self.since)
        return self.total_s

    def _closing(self) -> None:
        if self.closed == 0:
            self.since = self.clock()
            self.count += 1
        self.closed += 1

    def _opening(self) -> None:
        self.closed -= 1
        if self.closed == 0:
            self.total_s += self.clock() - self.since


@dataclass(slots=True, eq=False)
class Passage:
    """One request through a gate; says what became of it (once) with ``heard``,
    ``answered`` or ``failed``, and ``close`` when done, whatever happened."""

    gate: HostGate
    started: float
    probe: bool
    reported: bool = False
    #: It failed and the host answered nothing from its start: the host's failure.
    silent: bool = False

    def heard(self, status: int) -> None:
        """The answer's status arrived: an answer, unless a gateway says the API is not."""
        if status in GATEWAY_ERRORS:
            self.failed(f"HTTP {status} from a gateway")
        else:
            self.answered()

    def answered(self) -> None:
        if not self.reported:
            self.reported = True
            self.gate._answered(self)

    def failed(self, reason: str) -> bool:
        """Report no answer; True when the failure is the host's rather than the row's."""
        if not self.reported:
            self.reported = True
            self.silent = self.gate._failed(self, reason)
        return self.silent

    def close(self) -> None:
        if self.probe and not self.reported:
            self.gate._probe_abandoned()


@dataclass(slots=True, eq=False)
class HostGate:
    """The gate of one host; see the module docstring."""

    #: The host as shown in messages: ``the API at https://api.example`` (no credentials).
    where: str
    give_up_s: float
    on_give_up: Callable[[ApiUnreachable], None]
    outages: Outages
    clock: Callable[[], float] = time.monotonic
    #: Failures without an answer since the host last answered.
    streak: int = 0
    last_error: str = ""
    #: When the host last answered (-inf: not yet), and when the current run of failures began.
    last_answer: float = -math.inf
    down_since: float | None = None
    #: When the gate closed; None while open.
    closed_at: float | None = None
    _probing: bool = False
    #: Requests waiting at the gate now, and how many of them are polls or downloads.
    _waiting: int = 0
    _idempotent: int = 0
    _next_probe: float = 0.0
    _probe_wait: float = FIRST_PROBE_S
    _news: asyncio.Event = field(default_factory=asyncio.Event)
    _give_up: asyncio.TimerHandle | None = None

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    def closed_for(self) -> float | None:
        """Seconds since the gate closed; None while it is open."""
        return None if self.closed_at is None else self.clock() - self.closed_at

    async def enter(self, *, idempotent: bool = True) -> Passage:
        """Wait while the host is unreachable; the passage of the request about to go.

        A submit (``idempotent=False``) probes only when no poll or download waits: cut off
        after it was sent (a proxy that takes connections for an API that is down), it is a
        submit that may have been paid without an answer."""
        self._waiting += 1
        self._idempotent += idempotent
        try:
            while self.closed_at is not None:
                now = self.clock()
                if (
                    not self._probing
                    and now >= self._next_probe
                    and (idempotent or not self._idempotent)
                ):
                    self._probing = True
                    return Passage(self, now, probe=True)
                news = self._news
                # A submit passed over for a poll's probe looks again shortly (the poll
                # may have left without probing).
                timeout = None if self._probing else max(self._next_probe - now, 0.05)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await news.wait()
            return Passage(self, self.clock(), probe=False)
        finally:
            self._waiting -= 1
            self._idempotent -= idempotent

    # --- what requests report ---------------------------------------------------------------

    def _answered(self, passage: Passage) -> None:
        now = self.clock()
        self.last_answer = now
        self.streak = 0
        self.down_since = None
        if passage.probe:
            self._probing = False
        if self.closed_at is not None:
            self._open(now)

    def _failed(self, passage: Passage, reason: str) -> bool:
        now = self.clock()
        self.last_error = reason
        self.streak += 1
        if self.down_since is None:
            self.down_since = now
        if passage.probe:
            self._probing = False
            self._next_probe = now + self._probe_wait
            self._probe_wait = min(self._probe_wait * 2.0, MAX_PROBE_S)
            self._announce()
        if self.closed_at is None and self.streak >= CLOSE_AFTER:
            self._close(now)
        return self.last_answer < passage.started

    def _probe_abandoned(self) -> None:
        """The probe ended without a word (cancelled, or its row ended): another one may go."""
        self._probing = False
        self._announce()

    # --- state ------------------------------------------------------------------------------

    def _close(self, now: float) -> None:
        self.closed_at = now
        self._probing = False
        self._probe_wait = FIRST_PROBE_S
        self._next_probe = now + self._probe_wait
        self._probe_wait = min(self._probe_wait * 2.0, MAX_PROBE_S)
        self.outages._closing()
        since = self.down_since if self.down_since is not None else now
        left = max(0.0, since + self.give_up_s - now)
        self._give_up = asyncio.get_running_loop().call_later(left, self._giving_up)
        log.warning(
            "%s does not answer (%s): requests to it wait instead of failing "
            "rows; checking again every %.0f-%.0f s, stopping after %.0f s without an answer",
            self.where,
            self.last_error,
            FIRST_PROBE_S,
            MAX_PROBE_S,
            self.give_up_s,
        )

    def _open(self, now: float) -> None:
        assert self.closed_at is not None
        down = now - self.closed_at
        self.closed_at = None
        if self._give_up is not None:
            self._give_up.cancel()
            self._give_up = None
        self.outages._opening()
        self._announce()
        log.warning(
            "%s answers again after %.1f s unreachable: requests resume",
            self.where,
            down,
        )

    def _announce(self) -> None:
        """Wake every request waiting at the gate (it opened, or a probe may go)."""
        self._news.set()
        self._news = asyncio.Event()

    def _giving_up(self) -> None:
        self._give_up = None
        if self.closed_at is None:
            return
        if not self._waiting and not self._probing:
            # Nothing of the run needs this host now (its last rows ended, or went to
            # another host): it stops the run only once a request has to wait for it.
            self._give_up = asyncio.get_running_loop().call_later(FIRST_PROBE_S, self._giving_up)
            return
        self.on_give_up(
            ApiUnreachable(
                f"{self.where} has not answered for {self.give_up_s:g} s (last "
                f"error: {self.last_error}); nothing is lost: run the same command again to "
                "go on (rows not sent are still to do, tasks in flight are polled, none is "
                "paid for twice)"
            )
        )

    def stop(self) -> None:
        """The run ends: no give-up timer may fire after it."""
        if self._give_up is not None:
            self._give_up.cancel()
            self._give_up = None


@dataclass(slots=True)
class Gates:
    """The run's gates, one per host (``origin_of``), made as hosts are first met."""

    give_up_s: float
    on_give_up: Callable[[ApiUnreachable], None]
    outages: Outages = field(default_factory=Outages)
    _by_origin: dict[str, HostGate] = field(default_factory=dict)

    def for_url(self, url: str, what: str = "the API") -> HostGate:
        """The gate of ``url``'s host, named ``what`` in messages if it is new (the API's
        host serves results too in dialect A: the submits meet it first)."""
        origin = origin_of(url)
        gate = self._by_origin.get(origin)
        if gate is None:
            gate = self._by_origin[origin] = HostGate(
                f"{what} at {without_credentials(origin)}",
                self.give_up_s,
                self.on_give_up,
                self.outages,
                clock=self.outages.clock,
            )
        return gate

    def closed_for(self) -> float | None:
        """Seconds the longest-closed gate has been closed; None when every host answers."""
        times = [t for gate in self._by_origin.values() if (t := gate.closed_for()) is not None]
        return max(times) if times else None

    def stop(self) -> None:
        for gate in self._by_origin.values():
            gate.stop()
