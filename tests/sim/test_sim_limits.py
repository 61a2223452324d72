"""Tiers, Retry-After, credits and the operator counters, enforced over real HTTP."""

from __future__ import annotations

import asyncio
import math
from email.utils import parsedate_to_datetime

import aiohttp
import pytest
from sim_helpers import Client, fast_config, price, second_key

from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer, TierConfig

T0 = 1_800_000_000.0


class Clock:
    """A clock the test moves by hand, so minute-long windows take no time."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def slow_tasks(**changes: object) -> SimConfig:
    """Tasks that take exactly 10 s of (fake) time."""
    config = SimConfig(latency=LatencyConfig(median_s=10.0, p95_s=10.0))
    for name, value in changes.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize("mode", ["seconds", "http-date", "none"])
async def test_active_limit_429_with_each_retry_after_form(mode: str) -> None:
    clock = Clock()
    config = slow_tasks(keys=[KeyConfig(tier="trial")], retry_after=mode)
    async with SimServer(config, clock=clock) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        await client.submit(seed=1)
        clock.now += 2.5
        await client.submit(seed=2)
        resp = await client.submit_raw({"prompt": "third", "seed": 3})
        assert resp.status == 429
        assert "active" in (await resp.json())["message"]
        # The first task ends at T0 + 10: 7.5 s from now, rounded up.
        if mode == "seconds":
            assert resp.headers["Retry-After"] == "8"
        elif mode == "http-date":
            when = parsedate_to_datetime(resp.headers["Retry-After"]).timestamp()
            assert when == math.ceil(T0 + 10.0)
        else:
            assert "Retry-After" not in resp.headers
        clock.now = T0 + 10.0
        assert (await client.submit_raw({"prompt": "third", "seed": 3})).status == 200
        stats = server.stats()["keys"]["demo"]
        assert stats["submits_accepted"] == 3
        assert stats["submits_refused"] == 1
        assert stats["rate_limited"] == 1
        assert stats["max_active"] == 2


async def test_task_is_active_until_it_finishes_even_if_never_polled() -> None:
    clock = Clock()
    config = slow_tasks(keys=[KeyConfig(tier="trial")])
    async with SimServer(config, clock=clock) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        await client.submit(seed=1)
        await client.submit(seed=2)
        clock.now += 9.999
        assert (await client.submit_raw({"prompt": "x", "seed": 3})).status == 429
        clock.now = T0 + 10.0
        assert server.stats()["keys"]["demo"]["active"] == 0
        assert (await client.submit_raw({"prompt": "x", "seed": 3})).status == 200


async def test_per_minute_limit_counts_refused_submits_and_slides() -> None:
    clock = Clock()
    config = slow_tasks(
        keys=[KeyConfig(tier="tiny")],
        tiers={"tiny": TierConfig(max_active=100, submits_per_minute=3)},
        latency=LatencyConfig(median_s=0.5, p95_s=0.5),
    )
    async with SimServer(config, clock=clock) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        await client.submit(seed=1)
        clock.now += 10
        assert (await client.submit_raw({"prompt": ""})).status == 400  # counts too
        clock.now += 10
        await client.submit(seed=3)
        resp = await client.submit_raw({"prompt": "x", "seed": 4})
        assert resp.status == 429
        assert "per minute" in (await resp.json())["message"]
        # The oldest entry (T0) leaves the window at T0 + 60: 40 s from now.
        assert resp.headers["Retry-After"] == "40"
        clock.now = T0 + 60.0
        # Window now holds T0+10, T0+20 and the refused T0+20: still full.
        assert (await client.submit_raw({"prompt": "x", "seed": 4})).status == 429
        clock.now = T0 + 80.001
        assert (await client.submit_raw({"prompt": "x", "seed": 4})).status == 200
        stats = server.stats()["keys"]["demo"]
        assert stats["rate_limited"] == 2
        assert stats["submits_refused"] == 3
        assert stats["submits_accepted"] == 3


async def test_mixed_retry_after_cycles_deterministically() -> None:
    clock = Clock()
    config = slow_tasks(keys=[KeyConfig(max_active=1)], retry_after="mixed")
    async with SimServer(config, clock=clock) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        await client.submit(seed=1)
        forms = []
        for _ in range(6):
            resp = await client.submit_raw({"prompt": "x", "seed": 2})
            assert resp.status == 429
            value = resp.headers.get("Retry-After")
            forms.append("none" if value is None else "seconds" if value.isdigit() else "date")
        assert forms == ["seconds", "date", "none"] * 2


async def test_max_active_never_exceeds_tier_under_concurrent_hammering() -> None:
    config = fast_config(keys=[KeyConfig(tier="trial", max_active=5, submits_per_minute=10_000)])
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)

        async def hammer(worker: int) -> int:
            accepted = 0
            for i in range(15):
                resp = await client.submit_raw({"prompt": f"w{worker} i{i}", "seed": i})
                assert resp.status in (200, 429)
                accepted += resp.status == 200
            return accepted

        accepted = sum(await asyncio.gather(*(hammer(w) for w in range(20))))
        stats = server.stats()["keys"]["demo"]
        assert stats["max_active"] == 5
        assert stats["submits_accepted"] == accepted
        assert stats["submits_accepted"] + stats["submits_refused"] == 300
        assert stats["rate_limited"] == stats["submits_refused"] > 0


async def test_credits_charged_refused_402_and_refunded_on_failure() -> None:
    # Credits for two and a half 1k squares at the configured price: two are paid for.
    config = fast_config()
    each = price(config)
    config.keys = [KeyConfig(credits=round(2.5 * each, 2)), second_key()]
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        await client.wait(await client.submit(seed=1))
        await client.wait(await client.submit(prompt="nude", seed=2))  # moderated: refunded
        await client.submit(seed=3)
        resp = await client.submit_raw({"prompt": "x", "seed": 4})
        assert resp.status == 402
        message = (await resp.json())["message"]
        assert "credits" in message
        assert f"{each:.2f}" in message
        stats = server.stats()
        demo = stats["keys"]["demo"]
        assert demo["credits_charged"] == pytest.approx(2 * each)
        assert demo["credits_remaining"] == pytest.approx(round(2.5 * each, 2) - 2 * each)
        assert demo["submits_refused"] == 1
        assert stats["keys"]["other"]["credits_remaining"] is None
        assert stats["totals"]["credits_charged"] == pytest.approx(2 * each)


async def test_counters_polls_lists_downloads_duplicates_occupancy() -> None:
    clock = Clock()
    config = slow_tasks()
    async with SimServer(config, clock=clock) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        first = await client.submit(prompt="p", seed=1)
        await client.submit(prompt="p", seed=1)  # duplicate body
        await client.submit(prompt="p", seed=1, safety_tolerance=4)  # same image: duplicate
        await client.submit(prompt="p", seed=2)
        clock.now += 4
        stats = server.stats()["keys"]["demo"]
        assert stats["active"] == 4
        assert stats["occupancy_s"] == pytest.approx(16.0)
        clock.now += 6
        await client.poll(first)
        data = (await (await client.poll(first)).json())["data"]
        await s.get(server.url + "/v1/ai/text-to-image/flux-2-klein", headers=client.headers)
        status, _, _ = await client.download(data["generated"][0])
        assert status == 200
        clock.now += 100
        stats = await client.stats()
        demo = stats["keys"]["demo"]
        assert "sim-demo-key" not in str(stats)
        assert demo["duplicate_submits"] == 2
        assert demo["polls"] == 2
        assert demo["list_calls"] == 1
        assert demo["downloads"] == 1
        assert demo["active"] == 0
        assert demo["occupancy_s"] == pytest.approx(40.0)
        assert stats["totals"]["submits_accepted"] == 4


async def test_reset_zeroes_counters_and_forgets_tasks(client: Client) -> None:
    task_id = await client.submit(seed=1)
    async with client.session.post(client.server.url + "/_sim/reset") as resp:
        assert resp.status == 200
    stats = await client.stats()
    assert stats["keys"]["demo"]["submits_accepted"] == 0
    assert stats["keys"]["demo"]["active"] == 0
    assert (await client.poll(task_id)).status == 404
    await client.submit(seed=1)
    client.server.reset()
    assert client.server.stats()["totals"]["submits_accepted"] == 0


async def _duration_of_third(*, refused_first: bool) -> float:
    """How long the task of body ``third`` runs, optionally after one 429 on it."""
    clock = Clock()
    config = SimConfig(
        keys=[KeyConfig(tier="trial")], latency=LatencyConfig(median_s=10.0, p95_s=40.0)
    )
    async with SimServer(config, clock=clock) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        first = await client.submit(prompt="first", seed=1)
        await client.submit(prompt="second", seed=2)
        if refused_first:
            assert (await client.submit_raw({"prompt": "third", "seed": 3})).status == 429
        state = server.sim.state
        clock.now = state.tasks[first].finished_at
        task_id = await client.submit(prompt="third", seed=3)
        task = state.tasks[task_id]
        return task.finished_at - task.created_at


async def test_a_refused_submit_does_not_change_the_task_it_later_gets() -> None:
    # The latency is drawn from the body and its *taken* submits: a client that was told
    # 429 first gets the same task as one that never was, so contenders that probe and
    # contenders that never do are compared on the same latency tail.
    assert await _duration_of_third(refused_first=True) == await _duration_of_third(
        refused_first=False
    )
