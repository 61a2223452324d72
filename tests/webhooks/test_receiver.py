"""The webhook receiver over real HTTP: only proven, fresh, first-time deliveries act.

Each test posts what an attacker or a flaky network would send (forged signatures, replays,
stale or future timestamps, oversize bodies, duplicates) and checks both the HTTP answer and
that the engine was told nothing it should not have been.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from pipeline.errors import ConfigError
from pipeline.providers import TaskState, make_provider
from pipeline.sim import sign
from pipeline.webhooks import (
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    PATH,
    WebhookReceiver,
    parse_listen,
)

SECRET = "whsec_dGVzdC1zaWduaW5nLXNlY3JldC0xMjM0NTY="
BFL_SECRET = "bfl-run-secret-42"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


Receiver = tuple[WebhookReceiver, list[tuple[str, TaskState]], Clock]


@pytest.fixture
async def make_receiver() -> AsyncIterator[Callable[[str], Any]]:
    started: list[WebhookReceiver] = []

    async def make(dialect: str) -> Receiver:
        seen: list[tuple[str, TaskState]] = []
        clock = Clock(1_800_000_000.0)
        secret = SECRET if dialect == "klein" else BFL_SECRET
        receiver = WebhookReceiver(
            make_provider(dialect, "http://127.0.0.1:9", "k"),
            secret,
            lambda task_id, state: seen.append((task_id, state)),
            host="127.0.0.1",
            port=0,
            clock=clock,
        )
        await receiver.start()
        started.append(receiver)
        return receiver, seen, clock

    yield make
    for receiver in started:
        await receiver.stop()


def klein_body(task_id: str = "task-1", status: str = "COMPLETED") -> bytes:
    generated = ["http://127.0.0.1:9/result.jpg"] if status == "COMPLETED" else []
    body = {"task_id": task_id, "status": status, "generated": generated, "has_nsfw": [False]}
    return json.dumps(body).encode()


def svix_headers(body: bytes, msg_id: str, timestamp: int, secret: str = SECRET) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


async def post(
    session: aiohttp.ClientSession, receiver: WebhookReceiver, body: bytes, headers: dict[str, str]
) -> int:
    async with session.post(receiver.url, data=body, headers=headers) as response:
        await response.read()
        return response.status


async def test_klein_signed_delivery_acts_once(
    make_receiver: Callable[[str], Any], session: aiohttp.ClientSession
) -> None:
    receiver, seen, clock = await make_receiver("klein")
    body = klein_body()
    headers = svix_headers(body, "msg_1", int(clock.now))
    assert await post(session, receiver, body, headers) == 200
    assert await post(session, receiver, body, headers) == 200  # duplicate: ack, ignore
    assert [(task, state.phase) for task, state in seen] == [("task-1", "completed")]
    assert seen[0][1].image_url == "http://127.0.0.1:9/result.jpg"
    assert receiver.stats.accepted == 1 and receiver.stats.duplicates == 1
    # Progress deliveries are verified and acknowledged, but only endings reach the engine.
    created = klein_body("task-2", "CREATED")
    assert (
        await post(session, receiver, created, svix_headers(created, "m2", int(clock.now))) == 200
    )
    assert len(seen) == 1


async def test_klein_forged_stale_and_replayed_deliveries_are_refused(
    make_receiver: Callable[[str], Any], session: aiohttp.ClientSession
) -> None:
    receiver, seen, clock = await make_receiver("klein")
    body = klein_body()
    now = int(clock.now)
    forged = svix_headers(body, "msg_f", now, secret="whsec_" + "QUFBQQ==")
    assert await post(session, receiver, body, forged) == 401
    tampered = svix_headers(body, "msg_t", now)
    assert await post(session, receiver, body.replace(b"task-1", b"task-9"), tampered) == 401
    unsigned = {"webhook-id": "msg_u", "webhook-timestamp": str(now)}
    assert await post(session, receiver, body, unsigned) == 401
    assert await post(session, receiver, body, {}) == 401
    # Correctly signed, but signed six minutes ago (or six minutes ahead): refused.
    assert await post(session, receiver, body, svix_headers(body, "msg_old", now - 360)) == 400
    assert await post(session, receiver, body, svix_headers(body, "msg_new", now + 360)) == 400
    # A genuine delivery captured and replayed: ignored within 5 minutes, refused after.
    genuine = svix_headers(body, "msg_ok", now)
    assert await post(session, receiver, body, genuine) == 200
    assert await post(session, receiver, body, genuine) == 200
    clock.now += 301
    assert await post(session, receiver, body, genuine) == 400
    assert [task for task, _ in seen] == ["task-1"]
    assert sum(receiver.stats.refused.values()) == 7


async def test_oversize_and_malformed_bodies_are_refused(
    make_receiver: Callable[[str], Any], session: aiohttp.ClientSession
) -> None:
    receiver, seen, clock = await make_receiver("klein")
    now = int(clock.now)
    huge = b'{"task_id": "t", "pad": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    assert await post(session, receiver, huge, svix_headers(huge, "msg_big", now)) == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap still holds
        for _ in range(MAX_BODY_BYTES // 1024 + 8):
            yield b"x" * 1024

    headers = {"webhook-id": "m", "webhook-timestamp": str(now), "webhook-signature": "v1,x"}
    async with session.post(receiver.url, data=chunks(), headers=headers) as response:
        assert response.status == 413
    signed_junk = b"not json"
    assert await post(session, receiver, signed_junk, svix_headers(signed_junk, "m3", now)) == 400
    no_id = json.dumps({"status": "COMPLETED"}).encode()
    assert await post(session, receiver, no_id, svix_headers(no_id, "m4", now)) == 400
    assert seen == []
    async with session.get(receiver.url) as response:
        assert response.status == 405


def bfl_headers(body: bytes, secret: str = BFL_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"content-type": "application/json", "X-BFL-Signature": f"sha256={digest}"}


async def test_bfl_signature_and_duplicates(
    make_receiver: Callable[[str], Any], session: aiohttp.ClientSession
) -> None:
    receiver, seen, _ = await make_receiver("bfl")
    body = json.dumps(
        {"id": "b-1", "status": "Ready", "result": {"sample": "http://127.0.0.1:9/s.jpg"}}
    ).encode()
    assert await post(session, receiver, body, bfl_headers(body, "wrong")) == 401
    assert await post(session, receiver, body, {"content-type": "application/json"}) == 401
    bad_scheme = {"X-BFL-Signature": "md5=" + hashlib.md5(body).hexdigest()}
    assert await post(session, receiver, body, bad_scheme) == 401
    assert seen == []
    assert await post(session, receiver, body, bfl_headers(body)) == 200
    assert await post(session, receiver, body, bfl_headers(body)) == 200
    moderated = json.dumps({"id": "b-2", "status": "Content Moderated", "result": None}).encode()
    assert await post(session, receiver, moderated, bfl_headers(moderated)) == 200
    assert [(task, state.phase) for task, state in seen] == [
        ("b-1", "completed"),
        ("b-2", "moderated"),
    ]
    assert receiver.stats.duplicates == 1


async def test_listen_address_port_zero_and_public_url() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8787") == ("::1", 8787)
    for bad in ("8787", "host:", ":80", "127.0.0.1:99999", "127.0.0.1:http"):
        with pytest.raises(ConfigError, match="--webhook-listen"):
            parse_listen(bad)
    provider = make_provider("bfl", "http://127.0.0.1:9", "k")
    with pytest.raises(ConfigError, match="BFL_WEBHOOK_SECRET"):
        WebhookReceiver(provider, "", lambda *_: None)
    async with WebhookReceiver(provider, "s", lambda *_: None, port=0) as receiver:
        assert receiver.port > 0
        assert receiver.url == f"http://127.0.0.1:{receiver.port}{PATH}"
    public = WebhookReceiver(provider, "s", lambda *_: None, public_url="https://hooks.example/")
    assert public.url == "https://hooks.example" + PATH


async def _slow_request(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A slowloris connection: a request line and one header, and never the rest."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
    await writer.drain()
    return reader, writer


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server said before closing (b"" when it just closed); waits until it does."""
    try:
        async with asyncio.timeout(30):  # only guards against a hang
            return await reader.read()
    except ConnectionResetError:
        return b""


async def test_connections_are_bounded_and_slow_headers_cut_off(
    session: aiohttp.ClientSession,
) -> None:
    """Past the bound a connection is closed on arrival; slow headers are cut off, and the
    receiver then takes a genuine delivery again."""
    seen: list[tuple[str, TaskState]] = []
    receiver = WebhookReceiver(
        make_provider("bfl", "http://127.0.0.1:9", "k"),
        BFL_SECRET,
        lambda task_id, state: seen.append((task_id, state)),
        max_connections=4,
        header_timeout_s=0.5,
    )
    async with receiver:
        held = [await _slow_request(receiver.port) for _ in range(4)]
        extra, extra_writer = await _slow_request(receiver.port)
        assert await _closed_by_server(extra) == b""  # over the bound: dropped at once
        assert receiver.stats.connections_refused >= 1
        for reader, _ in held:  # the header deadline closes every slow connection
            assert await _closed_by_server(reader) == b""
        body = json.dumps({"id": "b-9", "status": "Ready", "result": {"sample": "x"}}).encode()
        assert await post(session, receiver, body, bfl_headers(body)) == 200
        for _, writer in [*held, (extra, extra_writer)]:
            writer.close()
    assert [task for task, _ in seen] == ["b-9"]
    assert receiver.max_connections == 4


async def test_a_slow_body_is_cut_off() -> None:
    receiver = WebhookReceiver(
        make_provider("bfl", "http://127.0.0.1:9", "k"),
        BFL_SECRET,
        lambda *_: None,
        body_timeout_s=0.3,
    )
    async with receiver:
        reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
        head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{"
        writer.write(head.encode())
        await writer.drain()
        answer = await _closed_by_server(reader)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert receiver.stats.refused["body too slow"] == 1
    # The bound follows the open-file limit when not given.
    assert 8 <= receiver.max_connections <= MAX_CONNECTIONS


async def test_running_out_of_files_while_accepting_is_one_warning_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flood can use up the process's files between two closes (asyncio then pauses
    ``accept`` for a second): the receiver says so in one line; other loop errors still
    reach the handler that was there before, which is back once the receiver stops."""
    loop = asyncio.get_running_loop()
    passed_on: list[str] = []
    before = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: passed_on.append(context["message"]))
    previous = loop.get_exception_handler()
    receiver = WebhookReceiver(
        make_provider("bfl", "http://127.0.0.1:9", "k"), BFL_SECRET, lambda *_: None
    )
    try:
        async with receiver:
            out_of_files = OSError(errno.EMFILE, "Too many open files")
            for _ in range(3):
                loop.call_exception_handler(
                    {"message": "socket.accept() out of system resource", "exception": out_of_files}
                )
            loop.call_exception_handler({"message": "something else", "exception": ValueError()})
        assert loop.get_exception_handler() is previous
    finally:
        loop.set_exception_handler(before)
    assert passed_on == ["something else"]
    warnings = [r for r in caplog.records if "out of open files" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    assert receiver.stats.connections_refused == 3


async def test_verified_deliveries_keep_their_connection_while_there_is_room() -> None:
    """A sender's next delivery reuses its connection (no new handshake per task end); a
    refusal closes it, and so does every answer once half the bound is open."""
    receiver = WebhookReceiver(
        make_provider("bfl", "http://127.0.0.1:9", "k"),
        BFL_SECRET,
        lambda *_: None,
        max_connections=4,
    )
    opened: list[object] = []
    tracing = aiohttp.TraceConfig()

    async def on_create(*_: object) -> None:
        opened.append(object())

    tracing.on_connection_create_end.append(on_create)
    connector = aiohttp.TCPConnector(limit=1)
    async with (
        receiver,
        aiohttp.ClientSession(connector=connector, trace_configs=[tracing]) as sender,
    ):

        async def deliver(task_id: str, secret: str = BFL_SECRET) -> tuple[int, str]:
            body = json.dumps({"id": task_id, "status": "Ready", "result": {"sample": "x"}})
            async with sender.post(
                receiver.url, data=body.encode(), headers=bfl_headers(body.encode(), secret)
            ) as response:
                await response.read()
                return response.status, response.headers.get("Connection", "")

        assert await deliver("k-1") == (200, "")
        assert await deliver("k-2") == (200, "")
        assert await deliver("k-2") == (200, "")  # a duplicate is answered alike
        assert len(opened) == 1  # three deliveries, one connection
        status, connection = await deliver("k-3", secret="forged")
        assert (status, connection.lower()) == (401, "close")
        held = [await _slow_request(receiver.port) for _ in range(2)]  # half the bound
        status, connection = await deliver("k-4")
        assert (status, connection.lower()) == (200, "close")
        for _, writer in held:
            writer.close()
    assert receiver.stats.accepted == 3
