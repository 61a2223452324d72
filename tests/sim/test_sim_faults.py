"""Fault injection: each kind does what it says, is counted, and repeats under a fixed seed."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import pytest
from PIL import Image
from sim_helpers import Client, fast_config, price

from pipeline.contract import KLEIN_PATH
from pipeline.sim import EndpointFaults, FaultConfig, KeyConfig, SimServer
from pipeline.sim.config import LatencyConfig
from pipeline.sim.faults import LatencyModel, decide, unit


def faulty(**faults: object) -> FaultConfig:
    config = FaultConfig(seed=42)
    for name, value in faults.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize(("kind", "status"), [("error_503", 503), ("error_500", 500)])
async def test_submit_errors_create_no_task(kind: str, status: int) -> None:
    config = fast_config(faults=faulty(submit=EndpointFaults(**{kind: 1.0})))
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        resp = await client.submit_raw({"prompt": "x", "seed": 1})
        assert resp.status == status
        assert "message" in await resp.json()
        stats = server.stats()["keys"]["demo"]
        assert stats["submits_accepted"] == 0
        assert stats["submits_refused"] == 1
        assert stats["faults"] == {f"submit_{status}": 1}


async def test_dropped_submit_still_creates_and_charges_the_task() -> None:
    config = fast_config(
        keys=[KeyConfig(credits=5.0)], faults=faulty(submit=EndpointFaults(drop=1.0))
    )
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        with pytest.raises(aiohttp.ClientPayloadError):
            await client.submit_raw({"prompt": "x", "seed": 1})
        async with s.get(server.url + KLEIN_PATH, headers=client.headers) as resp:
            listed = (await resp.json())["data"]
        assert len(listed) == 1
        data = await client.wait(listed[0]["task_id"])
        assert data["status"] == "COMPLETED"
        stats = server.stats()["keys"]["demo"]
        assert stats["submits_accepted"] == 1
        assert stats["credits_remaining"] == pytest.approx(5.0 - price(config))
        assert stats["faults"] == {"submit_drop": 1}


@pytest.mark.parametrize("endpoint", ["poll", "list"])
@pytest.mark.parametrize("kind", ["error_503", "error_500", "drop"])
async def test_poll_and_list_faults(endpoint: str, kind: str) -> None:
    config = fast_config(faults=faulty(**{endpoint: EndpointFaults(**{kind: 1.0})}))
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        task_id = await client.submit(seed=1)
        url = f"{server.url}{KLEIN_PATH}" + (f"/{task_id}" if endpoint == "poll" else "")
        if kind == "drop":
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(url, headers=client.headers) as resp:
                    await resp.read()
        else:
            async with s.get(url, headers=client.headers) as resp:
                assert resp.status == int(kind[-3:])
        short = "drop" if kind == "drop" else kind[-3:]
        assert server.stats()["keys"]["demo"]["faults"] == {f"{endpoint}_{short}": 1}


async def _completed_url(client: Client) -> str:
    data = await client.wait(await client.submit(prompt="a clock", seed=5))
    return data["generated"][0]


@pytest.mark.parametrize(("kind", "status"), [("error_503", 503), ("error_500", 500)])
async def test_download_errors(kind: str, status: int) -> None:
    config = fast_config(faults=faulty(download=EndpointFaults(**{kind: 1.0})))
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        got, _, _ = await client.download(await _completed_url(client))
        assert got == status


@pytest.mark.parametrize("fault", ["truncate", "drop"])
async def test_truncated_and_dropped_downloads_announce_full_length(fault: str) -> None:
    faults = (
        faulty(truncate=1.0) if fault == "truncate" else faulty(download=EndpointFaults(drop=1.0))
    )
    config = fast_config(faults=faults)
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        url = await _completed_url(client)
        async with s.get(url) as resp:
            assert resp.status == 200
            announced = int(resp.headers["Content-Length"])
            received = bytearray()
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
        assert len(received) < announced
        if fault == "truncate":
            assert len(received) > 0
        kind = "download_truncate" if fault == "truncate" else "download_drop"
        assert server.stats()["keys"]["demo"]["faults"] == {kind: 1}


async def test_slow_download_is_complete_and_counted() -> None:
    config = fast_config(faults=faulty(slow=1.0, slow_bytes_per_s=200_000))
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        url = await _completed_url(client)
        chunks = 0
        body = bytearray()
        async with s.get(url) as resp:
            async for chunk in resp.content.iter_any():
                chunks += 1
                body += chunk
            assert len(body) == int(resp.headers["Content-Length"])
        Image.open(io.BytesIO(bytes(body))).load()
        assert chunks > 1
        assert server.stats()["keys"]["demo"]["faults"] == {"download_slow": 1}


async def test_failed_tasks_have_no_image_and_are_refunded() -> None:
    config = fast_config(keys=[KeyConfig(credits=3.0)], faults=faulty(task_failed=1.0))
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        data = await client.wait(await client.submit(seed=1))
        assert data["status"] == "FAILED"
        assert data["generated"] == []
        assert data["has_nsfw"] == [False]
        stats = server.stats()["keys"]["demo"]
        assert stats["tasks_failed"] == 1
        assert stats["tasks_moderated"] == 0
        assert stats["credits_remaining"] == 3.0
        assert stats["credits_charged"] == 0.0


async def _fault_pattern(seed: int, order: list[int]) -> dict[int, list[int]]:
    """Per prompt, the statuses of three submits each, sent concurrently in ``order``."""
    faults = FaultConfig(seed=seed, submit=EndpointFaults(error_503=0.5))
    config = fast_config(
        keys=[KeyConfig(max_active=1000, submits_per_minute=10_000)], faults=faults
    )
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)

        async def three(i: int) -> list[int]:
            statuses = []
            for _ in range(3):
                resp = await client.submit_raw({"prompt": f"item {i}", "seed": i})
                statuses.append(resp.status)
            return statuses

        results = await asyncio.gather(*(three(i) for i in order))
        return dict(zip(order, results, strict=True))


async def test_fixed_seed_repeats_faults_whatever_the_arrival_order() -> None:
    order = list(range(30))
    first = await _fault_pattern(7, order)
    again = await _fault_pattern(7, list(reversed(order)))
    other = await _fault_pattern(8, order)
    assert first == again
    assert first != other
    flat = [status for statuses in first.values() for status in statuses]
    assert set(flat) == {200, 503}


def test_decisions_are_pure_and_rates_roughly_hold() -> None:
    assert decide(1, "poll_503", "t", 0, 0.0) is False
    assert decide(1, "poll_503", "t", 0, 1.0) is True
    assert unit(1, "k", "id", 3) == unit(1, "k", "id", 3)
    hits = sum(decide(1, "k", f"id{i}", 0, 0.25) for i in range(4000))
    assert 800 < hits < 1200


def test_latency_model_median_and_p95() -> None:
    model = LatencyModel.from_config(LatencyConfig(median_s=1.0, p95_s=2.5, floor_s=0.2, cap_s=3.0))
    assert model.duration(0.5) == pytest.approx(1.0)
    assert model.duration(0.95) == pytest.approx(2.5, rel=1e-3)
    assert model.duration(1e-9) == 0.2
    assert model.duration(1 - 1e-9) == 3.0


def test_production_latency_preset_is_the_measured_shape_and_can_be_overridden() -> None:
    from pipeline.errors import ConfigError
    from pipeline.sim.config import SimConfig

    preset = SimConfig.from_dict({"latency": {"preset": "production"}}).latency
    model = LatencyModel.from_config(preset)
    assert model.duration(0.5) == pytest.approx(2.7)
    assert model.duration(0.95) == pytest.approx(29.0, rel=1e-3)
    assert model.duration(1 - 1e-9) == 120.0
    # A setting beside the preset wins; the rest stay the preset's.
    capped = SimConfig.from_dict({"latency": {"preset": "production", "cap_s": 60.0}}).latency
    assert (capped.median_s, capped.p95_s, capped.cap_s) == (2.7, 29.0, 60.0)
    with pytest.raises(ConfigError, match=r"latency\.preset = 'prod'.*production"):
        SimConfig.from_dict({"latency": {"preset": "prod"}}, source="sim.toml")
