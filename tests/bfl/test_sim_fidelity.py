"""What real client libraries expect of the API, held against the simulator over real HTTP.

Each test is one way a client written against production could pass here and fail there
(issue 17): task ids that repeat across starts, text 404s, one model's price for both, a
task list mixing dialects, moderation that shows late.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from bfl_sim_helpers import HEADERS, KEY, MODEL, config, submit
from PIL import Image

from pipeline.contract import KLEIN_MODEL, KLEIN_PATH
from pipeline.errors import ConfigError
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer
from pipeline.sim.config import PriceConfig

KLEIN = {"x-freepik-api-key": KEY}
BFL = HEADERS


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def bfl_submit(
    server: SimServer, session: aiohttp.ClientSession, model: str = MODEL, **body: Any
) -> dict[str, Any]:
    status, answer = await submit(server, session, model, **body)
    assert status == 200, answer
    return answer


async def klein_submit(server: SimServer, session: aiohttp.ClientSession, **body: Any) -> str:
    body.setdefault("prompt", "a red shoe on white")
    async with session.post(server.url + KLEIN_PATH, json=body, headers=KLEIN) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["data"]["task_id"]


def png_b64(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


async def test_unknown_paths_and_methods_answer_json(session: aiohttp.ClientSession) -> None:
    async with SimServer(config()) as server:
        for base in (server.url, server.regional_url):
            async with session.get(f"{base}/v1/flux-2-pro-nope", headers=BFL) as r:
                assert r.status == 404 and r.content_type == "application/json"
                assert await r.json() == {"detail": "Not Found"}
        async with session.get(f"{server.url}/v1/flux-2-klein-4b", headers=BFL) as r:
            assert r.status == 405 and r.content_type == "application/json"
            assert await r.json() == {"detail": "Method Not Allowed"}
            assert "POST" in r.headers["Allow"]
        # Dialect A's paths keep dialect A's error shape.
        async with session.get(f"{server.url}/v1/ai/text-to-image/nope/x/y", headers=KLEIN) as r:
            assert r.status == 404 and await r.json() == {"message": "Not Found"}
        async with session.delete(server.url + KLEIN_PATH, headers=KLEIN) as r:
            assert r.status == 405 and await r.json() == {"message": "Method Not Allowed"}
        # The regional host takes no submits: a client that posts there fails too.
        async with session.post(
            f"{server.regional_url}/v1/flux-2-klein-4b", json={"prompt": "x"}, headers=BFL
        ) as r:
            assert r.status == 404 and await r.json() == {"detail": "Not Found"}


async def test_task_ids_are_random_per_start_unless_seeded(
    session: aiohttp.ClientSession,
) -> None:
    async def first_ids(cfg: SimConfig) -> tuple[str, str]:
        async with SimServer(cfg) as server:
            klein = await klein_submit(server, session, seed=1)
            bfl = (await bfl_submit(server, session, seed=1))["id"]
            return klein, bfl

    one, two = await first_ids(config()), await first_ids(config())
    assert one[0] != two[0] and one[1] != two[1]
    seeded = [await first_ids(config(task_id_seed=7)) for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert seeded[0] != await first_ids(config(task_id_seed=8))


async def test_an_earlier_runs_id_is_not_found_on_a_fresh_server(
    session: aiohttp.ClientSession,
) -> None:
    async with SimServer(config()) as server:
        old_klein = await klein_submit(server, session, seed=1)
        old_bfl = await bfl_submit(server, session, seed=1)
    async with SimServer(config()) as server:
        await klein_submit(server, session, seed=1)
        await bfl_submit(server, session, seed=1)
        async with session.get(f"{server.url}{KLEIN_PATH}/{old_klein}", headers=KLEIN) as r:
            assert r.status == 404
        poll = f"{server.regional_url}/v1/get_result?id={old_bfl['id']}"
        async with session.get(poll, headers=BFL) as r:
            assert (await r.json())["status"] == "Task not found"


async def test_prices_per_model_follow_the_published_list(
    session: aiohttp.ClientSession,
) -> None:
    cfg = config()
    async with SimServer(cfg) as server:
        # 1008 x 992 is just under one megapixel (pixels / 1e6): the first-megapixel price.
        four = await bfl_submit(server, session, "flux-2-klein-4b", width=1008, height=992)
        nine = await bfl_submit(server, session, "flux-2-klein-9b", width=1008, height=992)
        big = await bfl_submit(server, session, "flux-2-klein-9b", width=2000, height=2000)
        edit = await bfl_submit(
            server, session, "flux-2-klein-4b", width=1008, height=992,
            input_image=png_b64(1000, 1000),
        )  # fmt: skip
        # docs.bfl.ai: klein 4B "from $0.014" (1.4 credits), 9B 1.5; + per further MP.
        assert four["cost"] == pytest.approx(1.4)
        assert nine["cost"] == pytest.approx(1.5)
        assert big["cost"] == pytest.approx(1.5 + 3.0 * 0.2)
        assert edit["cost"] == pytest.approx(1.4 + 0.1)  # one input megapixel
        assert edit["input_mp"] == 1.0
        charged = server.stats()["keys"]["demo"]["credits_charged"]
        assert charged == pytest.approx(sum(b["cost"] for b in (four, nine, big, edit)))
        assert big["cost"] == cfg.price("flux-2-klein-9b").credits(2000, 2000)


async def test_prices_are_a_setting(session: aiohttp.ClientSession) -> None:
    prices = {
        "flux-2-klein-9b": PriceConfig(first_mp=3.0),
        KLEIN_MODEL: PriceConfig(first_mp=2.0, extra_mp=0.0),
    }
    keys = [KeyConfig(credits=100.0)]
    async with SimServer(config(prices=prices, keys=keys)) as server:
        nine = await bfl_submit(server, session, "flux-2-klein-9b", width=2000, height=1008)
        assert nine["cost"] == pytest.approx(3.0 + 0.2)  # extra_mp kept at the published 0.2
        four = await bfl_submit(server, session, "flux-2-klein-4b", width=1008, height=992)
        assert four["cost"] == pytest.approx(1.4)
        await klein_submit(server, session, resolution="2k")  # 2048 x 2048: extra is 0 here
        remaining = server.stats()["keys"]["demo"]["credits_remaining"]
        assert remaining == pytest.approx(100.0 - 3.2 - 1.4 - 2.0)
    data = {"prices": {"flux-2-klein-9b": {"first_mp": 1.0}}}
    assert SimConfig.from_dict(data).price("flux-2-klein-9b").first_mp == 1.0
    with pytest.raises(ConfigError, match=r"prices\.flux-2-pro"):
        SimConfig.from_dict({"prices": {"flux-2-pro": {"first_mp": 1.0}}})
    with pytest.raises(ConfigError, match=r"prices\.flux-2-klein-4b\.extra_mp"):
        SimConfig.from_dict({"prices": {"flux-2-klein-4b": {"extra_mp": -1}}})


async def test_each_dialect_sees_its_own_tasks(session: aiohttp.ClientSession) -> None:
    async with SimServer(config()) as server:
        klein_id = await klein_submit(server, session, seed=1)
        bfl_id = (await bfl_submit(server, session, seed=1))["id"]
        async with session.get(server.url + KLEIN_PATH, headers=KLEIN) as r:
            listed = [t["task_id"] for t in (await r.json())["data"]]
        assert listed == [klein_id]
        async with session.get(f"{server.url}{KLEIN_PATH}/{bfl_id}", headers=KLEIN) as r:
            assert r.status == 404
        poll = f"{server.regional_url}/v1/get_result?id={klein_id}"
        async with session.get(poll, headers=BFL) as r:
            assert (await r.json())["status"] == "Task not found"
        # One key: the limits and the money stay shared.
        assert server.stats()["keys"]["demo"]["submits_accepted"] == 2


async def test_request_moderated_shows_at_the_first_poll(session: aiohttp.ClientSession) -> None:
    now = [1_000_000.0]
    slow = LatencyConfig(median_s=30.0, p95_s=30.0)
    keys = [KeyConfig(max_active=1)]
    server = SimServer(config(latency=slow, keys=keys), clock=lambda: now[0])
    async with server:
        body = await bfl_submit(server, session, prompt="a nude statue", safety_tolerance=1)
        async with session.get(body["polling_url"], headers=BFL) as r:
            first = await r.json()
        assert first["status"] == "Request Moderated"
        assert first["result"] is None and first["progress"] is None
        stats = server.stats()["keys"]["demo"]
        assert stats["active"] == 0 and stats["credits_charged"] == 0
        # Its slot is free at once: the one-task key takes another submit now.
        second = await bfl_submit(server, session, prompt="a teapot")
        async with session.get(second["polling_url"], headers=BFL) as r:
            assert (await r.json())["status"] == "Pending"


async def test_regional_listener_serves_tasks_while_global_does_not(
    session: aiohttp.ClientSession,
) -> None:
    async with SimServer(config()) as server:
        body = await bfl_submit(server, session)
        swapped = body["polling_url"].replace(server.regional_url, server.url)
        for _ in range(200):
            async with session.get(body["polling_url"], headers=BFL) as r:
                done = await r.json()
            if done["status"] != "Pending":
                break
            await asyncio.sleep(0.02)
        assert done["status"] == "Ready"
        async with session.get(swapped, headers=BFL) as r:
            assert (await r.json()) == {
                "id": body["id"], "status": "Task not found", "result": None, "progress": None
            }  # fmt: skip
        async with session.get(f"{server.regional_url}/v1/get_result", headers=BFL) as r:
            assert r.status == 422
