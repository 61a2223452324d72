"""Webhooks received by a real receiver on 127.0.0.1, signatures checked independently."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sim_helpers import Client, fast_config

from pipeline.sim import FaultConfig, KeyConfig, SimServer, secret_bytes, sign

RAW_SECRET = b"\x01\x02secret-bytes\xff"
WHSEC = "whsec_" + base64.b64encode(RAW_SECRET).decode()


@dataclass
class Receiver:
    url: str
    status: int = 200
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def until(self, count: int, timeout_s: float = 10.0) -> None:
        async def wait() -> None:
            while len(self.calls) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(wait(), timeout_s)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    holder: list[Receiver] = []

    async def hook(request: web.Request) -> web.Response:
        rec = holder[0]
        rec.calls.append((dict(request.headers), await request.read()))
        rec.arrived.set()
        return web.Response(status=rec.status)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    holder.append(Receiver(f"http://127.0.0.1:{port}/hook"))
    yield holder[0]
    await runner.cleanup()


def expected_signature(key: bytes, headers: dict[str, str], body: bytes) -> str:
    """The contract's algorithm, written out independently of the simulator's code."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@pytest.mark.parametrize(
    ("secret", "key_bytes"), [(WHSEC, RAW_SECRET), ("plain-s3cret", b"plain-s3cret")]
)
async def test_every_status_change_is_delivered_and_signed(
    receiver: Receiver, secret: str, key_bytes: bytes
) -> None:
    config = fast_config(keys=[KeyConfig(webhook_secret=secret)])
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        task_id = await client.submit(prompt="a hat", seed=1, webhook_url=receiver.url)
        await receiver.until(3)
        bodies = [json.loads(body) for _, body in receiver.calls]
        assert [b["status"] for b in bodies] == ["CREATED", "IN_PROGRESS", "COMPLETED"]
        assert all(b["task_id"] == task_id for b in bodies)
        assert "data" not in bodies[0]
        assert bodies[2]["has_nsfw"] == [False]
        polled = await client.wait(task_id)
        assert bodies[2] == polled
        status, _, _ = await client.download(bodies[2]["generated"][0])
        assert status == 200
        ids = set()
        for headers, body in receiver.calls:
            assert headers["webhook-signature"] == expected_signature(key_bytes, headers, body)
            assert headers["webhook-timestamp"].isdigit()
            ids.add(headers["webhook-id"])
        assert len(ids) == 3
        assert server.stats()["keys"]["demo"]["webhooks_sent"] == 3


async def test_unsigned_without_secret_and_moderated_final_body(receiver: Receiver) -> None:
    async with SimServer(fast_config()) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        await client.submit(prompt="gore", safety_tolerance=0, webhook_url=receiver.url)
        await receiver.until(3)
        headers, body = receiver.calls[-1]
        assert "webhook-signature" not in headers
        assert json.loads(body)["status"] == "FAILED"
        assert json.loads(body)["has_nsfw"] == [True]


async def test_duplicated_deliveries_share_a_webhook_id(receiver: Receiver) -> None:
    config = fast_config(
        keys=[KeyConfig(webhook_secret="s")], faults=FaultConfig(webhook_duplicate=1.0)
    )
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        await client.submit(seed=1, webhook_url=receiver.url)
        await receiver.until(6)
        by_id: dict[str, list[bytes]] = {}
        for headers, body in receiver.calls:
            by_id.setdefault(headers["webhook-id"], []).append(body)
        assert len(by_id) == 3
        assert all(len(bodies) == 2 and bodies[0] == bodies[1] for bodies in by_id.values())
        assert server.stats()["keys"]["demo"]["faults"] == {"webhook_duplicate": 3}


async def test_lost_deliveries_never_arrive(receiver: Receiver) -> None:
    config = fast_config(faults=FaultConfig(webhook_lost=1.0))
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        await client.wait(await client.submit(seed=1, webhook_url=receiver.url))
        await asyncio.sleep(0.2)
        assert receiver.calls == []
        stats = server.stats()["keys"]["demo"]
        assert stats["faults"] == {"webhook_lost": 3}
        assert stats["webhooks_sent"] == 0


async def test_late_deliveries_arrive_after_the_task_finished(receiver: Receiver) -> None:
    config = fast_config(faults=FaultConfig(webhook_late=1.0, webhook_late_s=1.5))
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        await client.wait(await client.submit(seed=1, webhook_url=receiver.url))
        assert receiver.calls == []  # all three are still held back
        await receiver.until(3)
        assert server.stats()["keys"]["demo"]["faults"] == {"webhook_late": 3}


async def test_failing_receiver_is_counted_not_fatal(receiver: Receiver) -> None:
    receiver.status = 500
    async with SimServer(fast_config()) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        await client.submit(seed=1, webhook_url=receiver.url)
        await client.submit(seed=2, webhook_url="http://127.0.0.1:9/unreachable")
        await receiver.until(3)
        for _ in range(200):
            if server.stats()["keys"]["demo"]["webhooks_failed"] == 6:
                break
            await asyncio.sleep(0.02)
        assert server.stats()["keys"]["demo"]["webhooks_failed"] == 6
        assert (await client.submit_raw({"prompt": "still up"})).status == 200


def test_secret_bytes_follow_svix_convention() -> None:
    assert secret_bytes(WHSEC) == RAW_SECRET
    assert secret_bytes("plain") == b"plain"
    assert secret_bytes("whsec_not*base64") == b"whsec_not*base64"
    headers = {"webhook-id": "msg_1", "webhook-timestamp": "1700000000"}
    body: Any = b'{"a":1}'
    assert sign(WHSEC, "msg_1", 1700000000, body) == expected_signature(RAW_SECRET, headers, body)
