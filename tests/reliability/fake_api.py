"""A fake dialect-A API on 127.0.0.1 for the answers the simulator never gives.

Each test hands in its own submit and poll handlers (aiohttp); the fake serves them, plus
``/image.jpg`` (a real JPEG of the 1k square size, so a row can succeed), and counts the
submits it was sent.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from PIL import Image

from pipeline.retry import RetryPolicy
from pipeline.run import RunOptions, arun_manifest
from pipeline.summary import RunSummary

KLEIN = "/v1/ai/text-to-image/flux-2-klein"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Quick retries: a test is about what happens to rows, not about waiting for them.
QUICK = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, max_elapsed_s=1.0)


@dataclass
class FakeApi:
    url: str = ""
    submits: int = 0
    bodies: list[dict[str, object]] = field(default_factory=list)

    async def run(self, manifest: Path, out: Path, key: str, **options: object) -> RunSummary:
        opts = RunOptions(expected_latency_s=0.05, retry=QUICK)
        for name, value in options.items():
            setattr(opts, name, value)
        return await arun_manifest(manifest, out, api_url=self.url, api_key=key, options=opts)


def square_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1024, 1024), (200, 120, 40)).save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


@contextlib.asynccontextmanager
async def fake_api(submit: Handler, poll: Handler) -> AsyncIterator[FakeApi]:
    api = FakeApi()
    image = square_jpeg()

    async def counted(request: web.Request) -> web.StreamResponse:
        api.submits += 1
        api.bodies.append(await request.json())
        return await submit(request)

    async def serve_image(_: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/jpeg")

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post(KLEIN, counted)
    app.router.add_get(KLEIN + "/{task}", poll)
    app.router.add_get("/image.jpg", serve_image)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield api
    finally:
        await runner.cleanup()
