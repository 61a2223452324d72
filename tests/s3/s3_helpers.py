"""A fault-injecting HTTP proxy for S3 tests: 500/503 answers and dropped uploads, on demand.

It sits on 127.0.0.1 between boto3 and moto and forwards requests verbatim (bodies,
signatures, checksums), except the ones it is told to spoil:

- ``fail_next(n, status)``: the next ``n`` requests are answered ``status`` with an S3 XML
  error body, without reaching moto (an S3 that is down for a while);
- ``drop_next_puts(n, after=True)``: the next ``n`` PUT/POST requests lose their
  connection without an answer, after moto stored the data (``after=True``: the client
  cannot know it arrived) or before (``after=False``: it never arrived);
- ``error_rate`` / ``drop_rate``: each request independently, from a seeded RNG, so a
  flaky S3 misbehaves the same way on every run.
"""

from __future__ import annotations

import asyncio
import io
import random
import threading
from collections import Counter
from types import TracebackType
from typing import Any

import aiohttp
import polars as pl
from aiohttp import web
from PIL import Image

#: Dummy AWS credentials for moto (it accepts any); never printed.
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "klein-test-access-key",
    "AWS_SECRET_ACCESS_KEY": "klein-test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
_ERROR_CODES = {500: "InternalError", 503: "ServiceUnavailable"}


class _Dropped(Exception):
    pass


class FaultyProxy:
    """Starts in a thread on an ephemeral port of 127.0.0.1; use as a context manager."""

    def __init__(
        self,
        upstream: str,
        *,
        error_rate: float = 0.0,
        drop_rate: float = 0.0,
        seed: int = 7,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.error_rate = error_rate
        self.drop_rate = drop_rate
        self.counts: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._fail: list[int] = []
        self._drops: list[bool] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.url = ""

    # -- the plan ----------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._fail.extend([status] * n)

    def drop_next_puts(self, n: int, *, after: bool = True) -> None:
        with self._lock:
            self._drops.extend([after] * n)

    def _decide(self, method: str) -> str | int | None:
        with self._lock:
            if self._fail:
                return self._fail.pop(0)
            uploading = method in ("PUT", "POST")
            if uploading and self._drops:
                return "drop-after" if self._drops.pop(0) else "drop-before"
            roll = self._random.random()
            if roll < self.error_rate:
                return self._random.choice((500, 503))
            if uploading and roll < self.error_rate + self.drop_rate:
                return self._random.choice(("drop-after", "drop-before"))
        return None

    # -- serving -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self._decide(request.method)
        if isinstance(fault, int):
            self.counts[f"error {fault}"] += 1
            code = _ERROR_CODES[fault]
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected by the test proxy</Message></Error>"
            )
            return web.Response(status=fault, body=xml.encode(), content_type="application/xml")
        if fault == "drop-before":
            self.counts["dropped before"] += 1
            raise _Dropped
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        ) as upstream:
            payload = await upstream.read()
            status = upstream.status
            out_headers = [
                (k, v)
                for k, v in upstream.headers.items()
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"
            ]
            length = upstream.headers.get("Content-Length")
        if fault == "drop-after":
            self.counts["dropped after"] += 1
            raise _Dropped
        self.counts["forwarded"] += 1
        response = web.StreamResponse(status=status)
        for key, value in out_headers:
            response.headers.add(key, value)
        if request.method == "HEAD" and length is not None:
            response.headers["Content-Length"] = length
            await response.prepare(request)
            return response
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload)
        await response.write_eof()
        return response

    @web.middleware
    async def _dropper(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Dropped:
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError from None

    async def _serve(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(middlewares=[self._dropper], client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()
        await self._session.close()

    def __enter__(self) -> FaultyProxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._serve(),), daemon=True
        )
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault-injecting proxy did not start")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


# --- test data ---------------------------------------------------------------------------


def png(colour: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def catalog_csv(bucket: str, rows: int) -> str:
    lines = ["id,prompt,input_image,sku,output_format"]
    for i in range(rows):
        if i % 3 == 0:
            ref = "shots/red.png"  # relative to the manifest's folder in S3
        elif i % 3 == 1:
            ref = f"s3://{bucket}/library/blue.png"  # an absolute S3 reference
        else:
            ref = ""
        fmt = "png" if i % 4 == 0 else "jpeg"
        lines.append(f"p{i:03d},product shot {i} on white,{ref},SKU-{i:05d},{fmt}")
    return "\n".join(lines) + "\n"


def read_s3_parquet(uri: str, endpoint: str) -> pl.DataFrame:
    """What a data team does: polars straight from the S3 object."""
    return pl.read_parquet(
        uri,
        storage_options={
            "aws_endpoint_url": endpoint,
            "aws_region": "us-east-1",
            "aws_allow_http": "true",
        },
    )
