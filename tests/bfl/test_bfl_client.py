"""Dialect B's client against a server the simulator's authors did not write.

A small fake of Black Forest Labs' API, written from the contract alone, answers every
status the client must handle (including ``Failed`` and statuses it does not know), hands
out a ``polling_url`` on a *different* server (as a regional host would be), FastAPI error
bodies, a 429 without ``Retry-After`` and a delivery URL that has already expired, so the
client must re-poll for a fresh one.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from aiohttp import web
from PIL import Image
from pipeline_helpers import check_output, fast_options, write_catalog

from pipeline.contract import bfl_size
from pipeline.providers import ProtocolError
from pipeline.providers.bfl import BflProvider
from pipeline.run import arun_manifest

KEY = "fake-bfl-key"
#: Poll answers per prompt word, in order; the last one repeats.
SCRIPTS: dict[str, list[str]] = {
    "ok": ["Pending", "Queued", "Ready"],
    "stale": ["Ready"],
    "failed": ["Pending", "Failed"],
    "error": ["Error"],
    "reqmod": ["Request Moderated"],
    "contentmod": ["Pending", "Content Moderated"],
    "gone": ["Task not found"],
}


@dataclass
class FakeBfl:
    """Submit on one server, polls and deliveries on another (the regional host)."""

    submit_url: str = ""
    regional_url: str = ""
    tasks: dict[str, str] = field(default_factory=dict)
    polls: Counter[str] = field(default_factory=Counter)
    deliveries: Counter[str] = field(default_factory=Counter)
    hits: Counter[str] = field(default_factory=Counter)
    refused_once: bool = False
    keyless_polls: int = 0
    keyed_downloads: int = 0

    async def submit(self, request: web.Request) -> web.Response:
        self.hits["submit"] += 1
        if request.headers.get("x-key") != KEY:
            return web.json_response({"detail": "Invalid API key"}, status=403)
        body = await request.json()
        if not self.refused_once:
            self.refused_once = True
            return web.json_response({"detail": "Too many active tasks"}, status=429)
        if "bad" in body["prompt"]:
            return web.json_response(
                {"detail": [{"loc": ["body", "width"], "msg": "must be a multiple of 16",
                             "type": "value_error"}]},
                status=422,
            )  # fmt: skip
        word = body["prompt"].split()[0]
        assert (body["width"], body["height"]) == bfl_size("square_1_1", "1k")
        task_id = f"t{len(self.tasks)}-{word}"
        self.tasks[task_id] = word
        return web.json_response(
            {
                "id": task_id,
                "polling_url": f"{self.regional_url}/v1/get_result?id={task_id}",
                "cost": 0.42,
                "input_mp": 0,
                "output_mp": 1.05,
            }
        )

    async def poll(self, request: web.Request) -> web.Response:
        if request.headers.get("x-key") != KEY:
            self.keyless_polls += 1
            return web.json_response({"detail": "Not authenticated"}, status=401)
        task_id = request.query["id"]
        script = SCRIPTS[self.tasks[task_id]]
        n = self.polls[task_id]
        self.polls[task_id] += 1
        status = script[min(n, len(script) - 1)]
        result = None
        if status == "Ready":
            result = {"sample": f"{self.regional_url}/delivery/{task_id}?v={n}", "seed": 1}
        progress = 0.5 if status == "Pending" else None
        return web.json_response(
            {"id": task_id, "status": status, "result": result, "progress": progress}
        )

    async def deliver(self, request: web.Request) -> web.Response:
        if "x-key" in request.headers:
            self.keyed_downloads += 1
        task_id = request.match_info["task_id"]
        self.deliveries[task_id] += 1
        if self.tasks[task_id] == "stale" and self.deliveries[task_id] == 1:
            # A signed delivery URL past its 10 minutes: refused until the task is re-polled.
            return web.Response(status=403, text="Request has expired")
        buffer = io.BytesIO()
        Image.new("RGB", bfl_size("square_1_1", "1k"), (200, 40, 40)).save(buffer, "JPEG")
        return web.Response(body=buffer.getvalue(), content_type="image/jpeg")


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def fake() -> AsyncIterator[FakeBfl]:
    fake = FakeBfl()
    main, regional = web.Application(), web.Application()
    main.router.add_post("/v1/flux-2-klein-4b", fake.submit)
    regional.router.add_get("/v1/get_result", fake.poll)
    regional.router.add_get("/delivery/{task_id}", fake.deliver)
    runners = []
    for app, attr in ((main, "submit_url"), (regional, "regional_url")):
        runner, url = await _serve(app)
        runners.append(runner)
        setattr(fake, attr, url)
    yield fake
    for runner in runners:
        await runner.cleanup()


async def test_every_status_of_a_foreign_server(fake: FakeBfl, tmp_path: Path) -> None:
    words = ["ok", "stale", "failed", "error", "reqmod", "contentmod", "gone", "bad"]
    prompts = [f"{word} mug {i}" for i, word in enumerate(words)]
    manifest = write_catalog(tmp_path / "in", len(words), prompt=prompts)
    out = tmp_path / "out"
    summary = await arun_manifest(
        manifest, out, api_url=fake.submit_url, api_key=KEY, options=fast_options(dialect="bfl")
    )
    table = check_output(out, len(words), summary, dialect="bfl")
    got = {
        r["prompt"].split()[0]: (r["status"], r["reason"], r["cost_credits"])
        for r in table.iter_rows(named=True)
    }
    assert got["ok"] == ("succeeded", None, 0.42)  # the cost the API named at submit
    assert got["stale"] == ("succeeded", None, 0.42)
    assert got["failed"] == ("failed", "the API reported the task Failed", 0.0)
    assert got["error"] == ("failed", "the API reported the task Error", 0.0)
    assert got["reqmod"] == ("moderated", "moderated by the API (Request Moderated)", 0.0)
    assert got["contentmod"] == ("moderated", "moderated by the API (Content Moderated)", 0.0)
    assert got["gone"][0] == "failed" and "Task not found" in got["gone"][1]
    assert got["bad"][0] == "rejected"
    assert got["bad"][1] == (
        "the API refused the request: HTTP 422: invalid request (width: must be a multiple of 16)"
    )
    # Polls went to the polling_url's host, with the key; deliveries never carry the key.
    ok_task = next(t for t, w in fake.tasks.items() if w == "ok")
    assert fake.polls[ok_task] >= 3  # Pending and the unknown "Queued" were not final
    stale_task = next(t for t, w in fake.tasks.items() if w == "stale")
    assert fake.polls[stale_task] == 2 and fake.deliveries[stale_task] == 2
    assert fake.keyless_polls == 0 and fake.keyed_downloads == 0
    assert fake.hits["submit"] == len(words) + 1  # one 429, retried
    assert summary.rate_limited == 1
    assert table.filter(pl.col("status") == "succeeded")["width"].to_list() == [1024, 1024]


def test_provider_reads_fastapi_errors_and_rejects_bad_answers() -> None:
    provider = BflProvider("https://api.bfl.ai/", "k", model="klein-9b")
    assert provider.submit_url() == "https://api.bfl.ai/v1/flux-2-klein-9b"
    assert provider.error_message(402, {"detail": "Insufficient credits"}) == (
        "HTTP 402: Insufficient credits"
    )
    body: dict[str, Any] = {
        "detail": [
            {"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"},
            {"loc": ["body", "height"], "msg": "too small", "type": "value_error"},
        ]
    }
    assert provider.error_message(422, body) == (
        "HTTP 422: invalid request (prompt: Field required; height: too small)"
    )
    assert provider.error_message(500, "<html>oops</html>") == "HTTP 500"
    for bad in ({"id": "x"}, {"id": "x", "polling_url": "/v1/get_result?id=x"}, ["x"]):
        with pytest.raises(ProtocolError):
            provider.parse_submit(bad)
    with pytest.raises(ProtocolError):
        provider.parse_poll({"id": "x", "status": "Ready", "result": None})
    assert provider.parse_poll({"id": "x", "status": "Someday"}).phase == "pending"
    hidden = BflProvider("https://api.bfl.ai", "key-abc123", webhook_secret="hook-xyz789")
    assert "abc123" not in repr(hidden) and "xyz789" not in repr(hidden)
