"""Dialect B in the simulator, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from bfl_sim_helpers import HEADERS, MODEL, config, submit
from PIL import Image

from pipeline.sim import (
    FaultConfig,
    KeyConfig,
    LatencyConfig,
    ModerationConfig,
    SimConfig,
    SimServer,
)


def price(cfg: SimConfig, width: int, height: int, model: str = MODEL) -> float:
    """What ``cfg``'s simulator charges for one image of ``model`` at that size."""
    return cfg.price(model).credits(width, height)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def wait(session: aiohttp.ClientSession, polling_url: str) -> dict[str, Any]:
    for _ in range(500):
        async with session.get(polling_url, headers=HEADERS) as r:
            assert r.status == 200
            body = await r.json()
        if body["status"] != "Pending":
            return body
        await asyncio.sleep(0.02)
    raise AssertionError("task never finished")


async def test_submit_poll_download_with_explicit_size(session: aiohttp.ClientSession) -> None:
    cfg = config()
    async with SimServer(cfg) as server:
        status, body = await submit(server, session, width=512, height=320, seed=3,
                                    output_format="png", prompt="a red shoe")  # fmt: skip
        assert status == 200, body
        assert body["cost"] == price(cfg, 512, 320)
        assert body["output_mp"] == round(512 * 320 / 1e6, 2)
        # The polling URL names the regional listener, with the usual path.
        assert server.regional_url != server.url
        assert body["polling_url"] == f"{server.regional_url}/v1/get_result?id={body['id']}"
        done = await wait(session, body["polling_url"])
        assert done["status"] == "Ready"
        result = done["result"]
        assert result["seed"] == 3 and result["prompt"] == "a red shoe"
        assert result["start_time"] < result["end_time"]
        elapsed = result["end_time"] - result["start_time"]
        assert result["duration"] == pytest.approx(elapsed, abs=1e-3)
        # A client that rebuilds the URL on the global host finds nothing there.
        async with session.get(f"{server.url}/v1/get_result?id={body['id']}", headers=HEADERS) as r:
            assert r.status == 200
            assert (await r.json())["status"] == "Task not found"
        async with session.get(result["sample"]) as r:
            assert r.status == 200
            image = Image.open(io.BytesIO(await r.read()))
        assert image.size == (512, 320) and image.format == "PNG"
        stats = server.stats()["keys"]["demo"]
        assert stats["submits_accepted"] == 1 and stats["polls"] >= 2
        assert stats["credits_charged"] == price(cfg, 512, 320)


async def test_validation_errors_are_fastapi_bodies(session: aiohttp.ClientSession) -> None:
    async with SimServer(config()) as server:
        status, body = await submit(
            server, session, prompt="", width=100, height=64, seed=-1, output_format="gif"
        )
        assert status == 422
        fields = {tuple(d["loc"]) for d in body["detail"]}
        assert fields == {("body", n) for n in ("prompt", "width", "seed", "output_format")}
        assert all(isinstance(d["msg"], str) and d["type"] for d in body["detail"])
        status, body = await submit(server, session, width=2048, height=2048)
        assert status == 422 and "4000000" in body["detail"][0]["msg"]
        async with session.post(f"{server.url}/v1/flux-2-klein-9b", json={"prompt": "x"}) as r:
            assert r.status == 401 and "x-key" in (await r.json())["detail"]
        async with session.post(
            f"{server.url}/v1/flux-2-klein-9b", json={"prompt": "x"}, headers={"x-key": "nope"}
        ) as r:
            assert r.status == 403 and (await r.json())["detail"]
        async with session.get(f"{server.url}/v1/get_result?id=nope", headers=HEADERS) as r:
            assert (await r.json())["status"] == "Task not found"


async def test_active_limit_429_and_credits_402(session: aiohttp.ClientSession) -> None:
    slow = LatencyConfig(median_s=5.0, p95_s=6.0)
    keys = [KeyConfig(max_active=2, credits=price(config(), 64, 64) * 3)]
    async with SimServer(config(latency=slow, keys=keys)) as server:
        for i in range(2):
            status, _ = await submit(server, session, width=64, height=64, seed=i)
            assert status == 200
        status, body = await submit(server, session, width=64, height=64, seed=9)
        assert status == 429 and "2 active" in body["detail"]
        stats = server.stats()["keys"]["demo"]
        assert stats["rate_limited"] == 1 and stats["max_active"] == 2
    keys = [KeyConfig(credits=0.0)]
    async with SimServer(config(keys=keys)) as server:
        status, body = await submit(server, session)
        assert status == 402 and "credits" in body["detail"].lower()


async def test_default_key_allows_24_active(session: aiohttp.ClientSession) -> None:
    slow = LatencyConfig(median_s=5.0, p95_s=6.0)
    async with SimServer(config(latency=slow)) as server:
        answers = await asyncio.gather(
            *(submit(server, session, width=64, height=64, seed=i) for i in range(25))
        )
        assert sorted(status for status, _ in answers) == [200] * 24 + [429]


async def test_moderated_tasks_are_not_charged(session: aiohttp.ClientSession) -> None:
    cfg = config(moderation=ModerationConfig(rate=0.0))
    async with SimServer(cfg) as server:
        status, body = await submit(server, session, prompt="a nude statue", safety_tolerance=1)
        assert status == 200 and body["cost"] > 0
        done = await wait(session, body["polling_url"])
        assert done["status"] == "Request Moderated" and done["result"] is None
        assert server.stats()["keys"]["demo"]["credits_charged"] == 0
    cfg = config(moderation=ModerationConfig(rate=1.0))
    async with SimServer(cfg) as server:
        _, body = await submit(server, session, prompt="a teapot")
        done = await wait(session, body["polling_url"])
        assert done["status"] == "Content Moderated"
        assert server.stats()["keys"]["demo"]["tasks_moderated"] == 1
    async with SimServer(config(faults=FaultConfig(task_failed=1.0))) as server:
        _, body = await submit(server, session, prompt="a teapot")
        assert (await wait(session, body["polling_url"]))["status"] == "Error"


async def test_sample_url_expires_ten_minutes_after_ready(session: aiohttp.ClientSession) -> None:
    now = [1_000_000.0]
    server = SimServer(config(latency=LatencyConfig(median_s=1.0, p95_s=1.0)), clock=lambda: now[0])
    async with server:
        _, body = await submit(server, session, width=64, height=64)
        now[0] += 1.5
        done = await wait(session, body["polling_url"])
        sample = done["result"]["sample"]
        now[0] += 590
        async with session.get(sample) as r:
            assert r.status == 200
        now[0] += 20
        async with session.get(sample) as r:
            assert r.status == 403


async def test_signed_webhook_on_completion(session: aiohttp.ClientSession) -> None:
    received: list[tuple[dict[str, str], bytes]] = []
    arrived = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        arrived.set()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        async with SimServer(config()) as server:
            _, body = await submit(
                server, session, width=64, height=64, webhook_url=url, webhook_secret="s3cret"
            )
            await asyncio.wait_for(arrived.wait(), 10)
            headers, raw = received[0]
            payload = json.loads(raw)
            assert payload["id"] == body["id"] and payload["status"] == "Ready"
            assert payload["result"]["sample"].startswith(server.regional_url)
            assert payload["result"]["prompt"] == "a red shoe on white"
            assert {"seed", "start_time", "end_time", "duration"} <= set(payload["result"])
            expected = hmac.new(b"s3cret", raw, hashlib.sha256).hexdigest()
            assert headers["X-BFL-Signature"] == "sha256=" + expected
            assert server.stats()["keys"]["demo"]["webhooks_sent"] == 1
    finally:
        await runner.cleanup()


async def test_reference_as_base64_or_data_url(session: aiohttp.ClientSession) -> None:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(out, "PNG")
    b64 = base64.b64encode(out.getvalue()).decode()
    async with SimServer(config()) as server:
        status, body = await submit(server, session, width=64, height=64, input_image=b64,
                                    input_image_2="data:image/png;base64," + b64)  # fmt: skip
        assert status == 200, body
        assert body["input_mp"] == round(2 * 40 * 30 / 1e6, 2)
        status, body = await submit(server, session, input_image="!!not base64!!")
        assert status == 422 and body["detail"][0]["loc"] == ["body", "input_image"]
