"""Credentials in URLs are used, never written down (issue 15, item 5).

An ``--api-url`` of ``http://user:password@host`` (a proxy in front of the API) used to
put the password in the journal's poll URLs, and from there into an S3 output's journal
snapshot. Here a real Basic-auth proxy on 127.0.0.1 stands before the simulator: the run
must authenticate through it, a resumed run must poll through it again (the credentials
come from the run's API URL, not from disk), and no byte of the password or of its Basic
header may be in any file of the output (the SQLite journal and its WAL included).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import polars as pl
import pytest
from aiohttp import web
from pipeline_helpers import SIM_KEY, fast_options, key_stats, sim_config, write_catalog

from pipeline.ledger import LEDGER_RELPATH, Ledger
from pipeline.run import arun_manifest
from pipeline.sim import LatencyConfig, SimServer
from pipeline.urls import redact_credentials, with_credentials_of, without_credentials

PASSWORD = "Pw-in-the-url-7f3a91"
BASIC = base64.b64encode(f"kbuser:{PASSWORD}".encode()).decode()


@pytest.fixture
async def proxy(start_sim: Callable[..., SimServer]) -> AsyncIterator[tuple[str, SimServer]]:
    """``http://kbuser:PASSWORD@127.0.0.1:PORT``, forwarding to a simulator only with auth."""
    # Tasks of about 4 s: a run that gives up after 0.2 s sees none finish unless its timer
    # fires 3.8 s late (at 0.8 s, a starved event loop on a busy machine saw two finish).
    sim = start_sim(sim_config(latency=LatencyConfig(median_s=4.0, p95_s=4.5)))
    session = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Basic {BASIC}":
            return web.json_response({"message": "proxy authentication required"}, status=401)
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "authorization")
        }
        async with session.request(
            request.method, sim.url + request.path_qs, data=await request.read(), headers=headers
        ) as answer:
            body = await answer.read()
            return web.Response(body=body, status=answer.status, content_type=answer.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://kbuser:{PASSWORD}@127.0.0.1:{port}", sim
    finally:
        await runner.cleanup()
        await session.close()


def _leaks(folder: Path) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if PASSWORD.encode() in data or BASIC.encode() in data:
                found.append(str(path.relative_to(folder)))
    return found


async def test_a_password_in_the_api_url_is_used_but_never_stored(
    proxy: tuple[str, SimServer], tmp_path: Path
) -> None:
    api_url, sim = proxy
    n = 6
    manifest = write_catalog(tmp_path / "in", n)
    out = tmp_path / "out"

    # Tasks take ~4 s; giving up after 0.2 s leaves every row acknowledged, not collected.
    first = await arun_manifest(
        manifest, out, api_url=api_url, api_key=SIM_KEY, options=fast_options(task_timeout_s=0.2)
    )
    assert first.counts["failed"] == n
    with Ledger.open(out / LEDGER_RELPATH, readonly=True) as ledger:
        urls = [u for (u,) in ledger._conn.execute("SELECT poll_url FROM tasks")]
    assert len(urls) == n and all(u.startswith("http://127.0.0.1:") for u in urls), urls
    assert _leaks(out) == []

    again = await arun_manifest(
        manifest, out, api_url=api_url, api_key=SIM_KEY, options=fast_options(retry_failed=True)
    )

    assert again.counts["succeeded"] == n  # polled through the proxy: credentials restored
    assert key_stats(sim)["submits_accepted"] == n
    assert _leaks(out) == []
    info = pl.read_parquet(out / "manifest.parquet")
    assert info["task_id"].null_count() == 0


def test_the_url_helpers_strip_mask_and_restore() -> None:
    assert without_credentials("https://u:p4ssw0rd@h.example:8443/v1?x=1") == (
        "https://h.example:8443/v1?x=1"
    )
    assert redact_credentials("GET https://u:p4ssw0rd@h/x failed; token https://t0ken@h/y") == (
        "GET https://u:***@h/x failed; token https://***@h/y"
    )
    base = "http://u:p4ssw0rd@127.0.0.1:9/v1/ai/text-to-image/flux-2-klein"
    assert (
        with_credentials_of("http://127.0.0.1:9/v1/x/1", base)
        == "http://u:p4ssw0rd@127.0.0.1:9/v1/x/1"
    )
    # Another origin never gets them.
    assert with_credentials_of("http://127.0.0.1:10/v1/x/1", base) == "http://127.0.0.1:10/v1/x/1"
    assert with_credentials_of("https://cdn.example/x", base) == "https://cdn.example/x"
