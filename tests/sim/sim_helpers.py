"""Test helpers: a fast simulator config and a small client that speaks dialect A."""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass
from typing import Any

import aiohttp
from PIL import Image

from pipeline.contract import KLEIN_MODEL, KLEIN_PATH
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer

KEY = "sim-demo-key"


def fast_config(**changes: Any) -> SimConfig:
    """Defaults with tasks that finish in tens of milliseconds."""
    config = SimConfig(latency=LatencyConfig(median_s=0.05, p95_s=0.08))
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def price(config: SimConfig, width: int = 1024, height: int = 1024) -> float:
    """What ``config``'s simulator charges dialect A for one image of that size."""
    return config.price(KLEIN_MODEL).credits(width, height)


def reference_b64(fmt: str = "PNG", colour: tuple[int, int, int] = (200, 30, 30)) -> str:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, fmt)
    return base64.b64encode(out.getvalue()).decode()


@dataclass
class Client:
    """Just enough of a dialect A client to drive the simulator over real HTTP."""

    server: SimServer
    session: aiohttp.ClientSession
    key: str = KEY

    @property
    def headers(self) -> dict[str, str]:
        return {"x-freepik-api-key": self.key}

    async def submit_raw(self, body: Any, **kw: Any) -> aiohttp.ClientResponse:
        headers = kw.pop("headers", self.headers)
        resp = await self.session.post(
            self.server.url + KLEIN_PATH, json=body, headers=headers, **kw
        )
        await resp.read()
        return resp

    async def submit(self, **body: Any) -> str:
        body.setdefault("prompt", "a red shoe on white")
        resp = await self.submit_raw(body)
        assert resp.status == 200, await resp.text()
        data = (await resp.json())["data"]
        assert data["status"] == "CREATED"
        return data["task_id"]

    async def poll(self, task_id: str) -> aiohttp.ClientResponse:
        resp = await self.session.get(
            f"{self.server.url}{KLEIN_PATH}/{task_id}", headers=self.headers
        )
        await resp.read()
        return resp

    async def wait(self, task_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Poll until the task is final; return the poll body's data."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            resp = await self.poll(task_id)
            assert resp.status == 200, await resp.text()
            data = (await resp.json())["data"]
            if data["status"] in ("COMPLETED", "FAILED"):
                return data
            assert loop.time() < deadline, f"task {task_id} still {data['status']}"
            await asyncio.sleep(0.02)

    async def download(self, url: str) -> tuple[int, bytes, aiohttp.ClientResponse]:
        async with self.session.get(url) as resp:
            return resp.status, await resp.read(), resp

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(self.server.url + "/_sim/stats") as resp:
            assert resp.status == 200
            return await resp.json()


def second_key(**changes: Any) -> KeyConfig:
    key = KeyConfig(name="other", key="sim-other-key")
    for name, value in changes.items():
        setattr(key, name, value)
    return key
