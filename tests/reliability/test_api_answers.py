"""Answers of the API are bounded before they are stored or held (issue 15, item 10).

A fake API on 127.0.0.1 (aiohttp) acknowledges every submit, then answers polls with a
2 MB body, and refuses a row with a 500 KB error message. The poll answers are not read
past 1 MB (the row ends failed, keeping its task id, and ``--retry-failed`` would poll
it); a 500 KB error message is stored cut to 2,000 characters.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import polars as pl
from aiohttp import web
from pipeline_helpers import write_catalog

from pipeline.engine import MAX_ANSWER_BYTES
from pipeline.ledger import MAX_REASON_CHARS
from pipeline.retry import RetryPolicy
from pipeline.run import RunOptions, arun_manifest


async def test_huge_answers_are_not_read_and_huge_messages_not_stored(tmp_path: Path) -> None:
    ids = itertools.count()

    async def submit(request: web.Request) -> web.Response:
        body = await request.json()
        if "refuse" in body["prompt"]:
            # Under the answer bound, over what a reason may keep.
            return web.json_response({"message": "no: " + "x" * (500 << 10)}, status=400)
        return web.json_response({"data": {"task_id": f"task-{next(ids)}", "status": "CREATED"}})

    async def poll(request: web.Request) -> web.Response:
        return web.json_response({"data": {"status": "IN_PROGRESS", "pad": "y" * (2 << 20)}})

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/v1/ai/text-to-image/flux-2-klein", submit)
    app.router.add_get("/v1/ai/text-to-image/flux-2-klein/{task}", poll)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    manifest = write_catalog(tmp_path / "in", 4, prompt=["a mug", "refuse this", "a cup", "a jug"])
    try:
        summary = await arun_manifest(
            manifest,
            tmp_path / "out",
            api_url=url,
            api_key="fake-key-123456",
            options=RunOptions(
                expected_latency_s=0.05,
                retry=RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, max_elapsed_s=1.0),
            ),
        )
    finally:
        await runner.cleanup()

    table = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert table["status"].to_list() == ["failed", "rejected", "failed", "failed"]
    polled = table.filter(pl.col("status") == "failed")
    assert polled["task_id"].null_count() == 0  # acknowledged: kept, collected on a retry
    assert polled["reason"].str.contains("too large|larger than").all(), polled["reason"]
    refused = table["reason"][1]
    assert len(refused) < MAX_REASON_CHARS + 100
    assert "more characters not kept" in refused
    assert MAX_ANSWER_BYTES == 1 << 20
    assert summary.counts["rejected"] == 1
    assert (tmp_path / "out" / "run.json").stat().st_size < 100_000
