"""Answers of the API are bounded and cross-checked before they are acted on (issue 15,
item 10), each against a fake API on 127.0.0.1 (``fake_api.py``).

- Polls answered with 2 MB are not read past 1 MB (the row ends failed, keeping its task
  id, and ``--retry-failed`` would poll it); a 500 KB error message is stored cut to 2,000
  characters.
- A submit answered 200 with an HTML page may have been charged: one submit per row, the
  row ends ``failed`` saying so, counted in ``ambiguous_submits``; a rerun sends nothing.
- One task id handed to two rows: the later row does not get the earlier row's image.
- The key echoed transformed (in task ids, in an error message) is stored nowhere, and
  tasks whose ids hold it are still polled by a rerun.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import logging
from pathlib import Path
from urllib.parse import quote

import polars as pl
import pytest
from aiohttp import web
from fake_api import fake_api, square_jpeg
from pipeline_helpers import write_catalog

from pipeline.engine import MAX_ANSWER_BYTES
from pipeline.ledger import MAX_REASON_CHARS
from pipeline.masking import SecretMask

KEY = "fake-key-123456"


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

    manifest = write_catalog(tmp_path / "in", 4, prompt=["a mug", "refuse this", "a cup", "a jug"])
    async with fake_api(submit, poll) as api:
        summary = await api.run(manifest, tmp_path / "out", KEY)

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


async def test_an_html_page_with_status_200_is_submitted_once(tmp_path: Path) -> None:
    """A proxy's page with 200 on submit: perhaps charged, so never sent again unasked."""

    async def submit(_: web.Request) -> web.Response:
        return web.Response(text="<html><body>Welcome!</body></html>", content_type="text/html")

    async def poll(_: web.Request) -> web.Response:
        raise AssertionError("nothing was acknowledged: nothing to poll")

    manifest = write_catalog(tmp_path / "in", 3)
    out = tmp_path / "out"
    async with fake_api(submit, poll) as api:
        summary = await api.run(manifest, out, KEY)
        assert api.submits == 3  # one per row: a 200 is never retried
        await api.run(manifest, out, KEY)  # a plain rerun leaves them to the user
        assert api.submits == 3

    table = pl.read_parquet(out / "manifest.parquet")
    assert table["status"].to_list() == ["failed"] * 3
    assert table["reason"].str.contains("HTTP 200").all()
    assert table["reason"].str.contains("text/html answer that is not JSON").all()
    assert table["reason"].str.contains("may have charged").all()
    assert (table["cost_credits"] > 0).all()  # counted: budgets stay on the safe side
    assert summary.ambiguous_submits == 3
    assert json.loads((out / "run.json").read_text())["ambiguous_submits"] == 3


async def test_one_task_id_for_two_rows_gives_the_later_row_no_image(tmp_path: Path) -> None:
    async def submit(_: web.Request) -> web.Response:
        return web.json_response({"data": {"task_id": "task-same", "status": "CREATED"}})

    async def poll(request: web.Request) -> web.Response:
        image = str(request.url.with_path("/image.jpg"))
        return web.json_response(
            {"data": {"status": "COMPLETED", "generated": [image], "has_nsfw": [False]}}
        )

    manifest = write_catalog(tmp_path / "in", 2, prompt=["a red mug", "a blue vase"])
    out = tmp_path / "out"
    async with fake_api(submit, poll) as api:
        await api.run(manifest, out, KEY)
        assert api.submits == 2

    table = pl.read_parquet(out / "manifest.parquet").sort("status", descending=True)
    assert table["status"].to_list() == ["succeeded", "failed"]
    first, later = table.row(0, named=True), table.row(1, named=True)
    assert later["task_id"] == "task-same" and later["cost_credits"] > 0  # kept
    assert "task-same" in later["reason"] and first["key"] in later["reason"]
    assert later["output_uri"] is None
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{first['key']}.jpg"]


async def test_answers_the_standard_library_reads_are_read_alike(tmp_path: Path) -> None:
    """The engine reads answers with orjson, which refuses a byte-order mark, UTF-16 and
    NaN; json.loads reads them, and so did the engine before: an API answering so still
    gets one submit per row and every row's image."""
    ids = itertools.count()

    async def submit(_: web.Request) -> web.Response:
        body = json.dumps({"data": {"task_id": f"task-{next(ids)}", "status": "CREATED"}})
        return web.Response(body=b"\xef\xbb\xbf" + body.encode(), content_type="application/json")

    polls: collections.Counter[str] = collections.Counter()

    async def poll(request: web.Request) -> web.Response:
        task = request.match_info["task"]
        polls[task] += 1
        if polls[task] == 1:  # still running, with a float the API could not compute
            body = '{"data": {"status": "IN_PROGRESS", "progress": NaN}}'
            return web.Response(body=body.encode(), content_type="application/json")
        image = str(request.url.with_path("/image.jpg"))
        data = {"data": {"status": "COMPLETED", "generated": [image], "has_nsfw": [False]}}
        return web.Response(body=json.dumps(data).encode("utf-16"), content_type="application/json")

    manifest = write_catalog(tmp_path / "in", 3, prompt=["a mug", "a cup", "a jug"])
    async with fake_api(submit, poll) as api:
        summary = await api.run(manifest, tmp_path / "out", KEY)
        assert api.submits == 3

    table = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert table["status"].to_list() == ["succeeded"] * 3, table["reason"].to_list()
    assert sorted(table["task_id"].to_list()) == ["task-0", "task-1", "task-2"]
    assert min(polls.values()) >= 2  # the NaN answer was read as running, not as broken
    assert summary.counts["succeeded"] == 3


ECHO_KEY = "kb-Echo-9f3eQ2xVw7"
ECHO_B64 = base64.b64encode(ECHO_KEY.encode()).decode()


async def test_a_key_echoed_transformed_is_stored_nowhere_and_tasks_are_still_polled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Task ids holding the key upper-cased, base64-encoded or verbatim, and an error that
    quotes it in another case: no output holds any of them, and a ``--retry-failed`` rerun
    still polls (not pays for) the tasks by their real ids."""
    caplog.set_level(logging.DEBUG)
    issued = {
        "upper": f"t-{ECHO_KEY.upper()}-0",
        "base64": f"t-{ECHO_B64}-1",
        "plain": f"t-{ECHO_KEY}-2",
    }
    submitted: collections.Counter[str] = collections.Counter()
    ready = False

    async def submit(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        submitted[prompt] += 1
        if prompt == "refuse":
            said = f"no such key {ECHO_KEY.swapcase()}"
            return web.json_response({"message": said}, status=400)
        return web.json_response({"data": {"task_id": issued[prompt], "status": "CREATED"}})

    async def poll(request: web.Request) -> web.Response:
        if request.match_info["task"] not in issued.values():
            return web.json_response({"message": "task not found"}, status=404)
        if not ready:
            return web.json_response({"message": "busy"}, status=503)
        image = str(request.url.with_path("/image.jpg"))
        return web.json_response(
            {"data": {"status": "COMPLETED", "generated": [image], "has_nsfw": [False]}}
        )

    manifest = write_catalog(tmp_path / "in", 4, prompt=[*issued, "refuse"])
    out = tmp_path / "out"
    async with fake_api(submit, poll) as api:
        await api.run(manifest, out, ECHO_KEY)
        first = pl.read_parquet(out / "manifest.parquet")
        ready = True
        await api.run(manifest, out, ECHO_KEY, retry_failed=True)

    assert first["status"].to_list() == ["failed", "failed", "failed", "rejected"]
    table = pl.read_parquet(out / "manifest.parquet")
    assert table["status"].to_list() == ["succeeded"] * 3 + ["rejected"]
    assert [submitted[prompt] for prompt in issued] == [1, 1, 1]  # polled, never paid again
    assert table["task_id"].to_list()[:3] == [
        "t-{api-key:upper}-0",
        "t-{api-key:base64}-1",
        "t-{api-key}-2",
    ]
    assert table["reason"][3].endswith("no such key ***")
    echoes = (ECHO_KEY.lower(), ECHO_B64.encode())
    for path in out.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            if blob[:4] == b"PAR1":
                blob += repr(pl.read_parquet(path).rows()).encode()
            assert echoes[0].encode() not in blob.lower() and echoes[1] not in blob, path
    ours = [record for record in caplog.records if record.name.startswith("pipeline")]
    assert ours  # DEBUG logging was on (retries are logged)
    logged = "\n".join(record.getMessage() for record in ours)
    assert echoes[0] not in logged.lower() and ECHO_B64 not in logged


def test_the_secret_mask_seals_what_a_rerun_needs_and_masks_the_rest() -> None:
    mask = SecretMask.of_run("http://kbuser:pa55word-9@127.0.0.1:9", ECHO_KEY, "whsec_abcdefgh")
    url = f"https://api.example/v1/get_result?id=7&k={quote(ECHO_KEY)}&b={ECHO_B64}"
    sealed = mask.seal(url)
    assert ECHO_KEY not in sealed and ECHO_B64 not in sealed
    assert mask.unseal(sealed) == url  # the rerun polls the very same URL
    hexed = ECHO_KEY.encode().hex()
    said = f"{ECHO_KEY.lower()} {hexed} {ECHO_KEY.title()} pa55word-9 whsec_abcdefgh"
    assert mask.mask(said) == "*** *** *** *** ***"
    # Mixed case cannot be restored: sealed as *** for good, never back into a key.
    assert mask.unseal(mask.seal(f"t-{ECHO_KEY.title()}")) == "t-***"
    # Another run's key restores its own secret, never this one's.
    other = SecretMask.of_run("http://127.0.0.1:9", "kb-Other-key-42")
    assert ECHO_KEY not in other.unseal(sealed)
    assert not SecretMask.of_run("http://127.0.0.1:9", "short")  # too short to mask


async def test_any_2xx_submit_is_an_acknowledgement_or_an_ambiguous_submit(
    tmp_path: Path,
) -> None:
    """201 and 202 with a task id are acknowledgements (polled, never sent again); a 204, or
    a 202 naming no task, may have been charged: sent once, counted as ambiguous."""
    answers = {
        "created": (201, {"data": {"task_id": "task-201", "status": "CREATED"}}),
        "accepted": (202, {"data": {"task_id": "task-202", "status": "CREATED"}}),
        "queued": (202, {"status": "queued"}),
        "nothing": (204, None),
    }
    submitted: collections.Counter[str] = collections.Counter()

    async def submit(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        submitted[prompt] += 1
        status, body = answers[prompt]
        if body is None:
            return web.Response(status=status)
        return web.json_response(body, status=status)

    async def poll(request: web.Request) -> web.Response:
        image = str(request.url.with_path("/image.jpg"))
        return web.json_response(
            {"data": {"status": "COMPLETED", "generated": [image], "has_nsfw": [False]}},
            status=202 if request.match_info["task"] == "task-202" else 200,
        )

    manifest = write_catalog(tmp_path / "in", 4, prompt=list(answers))
    out = tmp_path / "out"
    async with fake_api(submit, poll) as api:
        summary = await api.run(manifest, out, KEY)
        await api.run(manifest, out, KEY)  # a plain rerun sends nothing again

    assert list(submitted.values()) == [1, 1, 1, 1]
    table = pl.read_parquet(out / "manifest.parquet")
    assert table["status"].to_list() == ["succeeded", "succeeded", "failed", "failed"]
    assert table["task_id"].to_list()[:2] == ["task-201", "task-202"]
    assert table["reason"][2].startswith("the API accepted the submit (HTTP 202)")
    assert table["reason"][3].startswith("the API accepted the submit (HTTP 204)")
    assert summary.ambiguous_submits == 2


async def test_retry_after_values_that_mean_nothing_are_no_hint(tmp_path: Path) -> None:
    """``Retry-After: ²`` on an accepted submit made the row an internal error with no task id,
    and ``--retry-failed`` paid for it again; junk, negative and non-ASCII figures are ignored."""
    ids = itertools.count()
    polls: collections.Counter[str] = collections.Counter()
    junk = ["\u00b2", "-5", "1e9", "NaN", "\u0663", "Fri, 99 Foo 2026"]

    async def submit(_: web.Request) -> web.Response:
        n = next(ids)
        body = {"data": {"task_id": f"task-{n}", "status": "CREATED"}}
        return web.json_response(body, headers={"Retry-After": junk[n % len(junk)]})

    async def poll(request: web.Request) -> web.Response:
        task = request.match_info["task"]
        polls[task] += 1
        said = {"Retry-After": junk[polls[task] % len(junk)]}
        if polls[task] == 1:
            return web.json_response({"message": "busy"}, status=503, headers=said)
        image = str(request.url.with_path("/image.jpg"))
        body = {"data": {"status": "COMPLETED", "generated": [image], "has_nsfw": [False]}}
        return web.json_response(body, headers=said)

    manifest = write_catalog(tmp_path / "in", 3)
    async with fake_api(submit, poll) as api:
        await api.run(manifest, tmp_path / "out", KEY)
        assert api.submits == 3

    table = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert table["status"].to_list() == ["succeeded"] * 3, table["reason"].to_list()


async def test_an_error_page_streaming_without_end_on_download_is_not_read(
    tmp_path: Path,
) -> None:
    """A result URL answering 500 with a body that never ends: the answer stands for its
    status, its body is not read (it was, into memory, until the request timed out)."""
    image = square_jpeg()
    sent: collections.Counter[str] = collections.Counter()

    async def submit(_: web.Request) -> web.Response:
        return web.json_response({"data": {"task_id": "task-0", "status": "CREATED"}})

    async def poll(request: web.Request) -> web.StreamResponse:
        if request.match_info["task"] == "task-0":
            url = str(request.url.with_path(request.path + "-result"))
            body = {"data": {"status": "COMPLETED", "generated": [url], "has_nsfw": [False]}}
            return web.json_response(body)
        sent["downloads"] += 1
        if sent["downloads"] > 1:
            return web.Response(body=image, content_type="image/jpeg")
        flood = web.StreamResponse(status=500)
        await flood.prepare(request)
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(64):
                await flood.write(chunk)
                sent["bytes"] += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client went away: what this test wants
        return flood

    manifest = write_catalog(tmp_path / "in", 1)
    async with fake_api(submit, poll) as api:
        await api.run(manifest, tmp_path / "out", KEY)

    table = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert table["status"].to_list() == ["succeeded"], table["reason"].to_list()
    assert sent["downloads"] == 2
    assert sent["bytes"] < 32 << 20, sent  # read in full before: all 64 MB


async def test_a_redirected_submit_is_not_followed(tmp_path: Path) -> None:
    """A 302 on submit: followed, it became a GET of another task's poll answer, whose
    task the row took for its own (and got that task's image)."""

    async def submit(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(request.url) + "/task-other")

    async def poll(request: web.Request) -> web.Response:
        image = str(request.url.with_path("/image.jpg"))
        data = {"task_id": "task-other", "status": "COMPLETED", "generated": [image]}
        return web.json_response({"data": {**data, "has_nsfw": [False]}})

    manifest = write_catalog(tmp_path / "in", 1)
    async with fake_api(submit, poll) as api:
        await api.run(manifest, tmp_path / "out", KEY)
        assert api.submits == 1

    table = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert table["status"].to_list() == ["rejected"]
    assert table["task_id"].null_count() == 1 and "HTTP 302" in table["reason"][0]
    assert not (tmp_path / "out" / "images").exists() or not any(
        (tmp_path / "out" / "images").iterdir()
    )


async def test_a_new_task_the_api_calls_unknown_for_a_moment_is_not_paid_again(
    tmp_path: Path,
) -> None:
    """A 404 on the first polls of a task just acknowledged (a replica not yet aware of it)
    ended the row as forgotten, and ``--retry-failed`` submitted it again."""
    polls: collections.Counter[str] = collections.Counter()

    async def submit(_: web.Request) -> web.Response:
        return web.json_response({"data": {"task_id": "task-lag", "status": "CREATED"}})

    async def poll(request: web.Request) -> web.Response:
        polls["task-lag"] += 1
        if polls["task-lag"] <= 2:
            return web.json_response({"message": "Not found"}, status=404)
        image = str(request.url.with_path("/image.jpg"))
        body = {"data": {"status": "COMPLETED", "generated": [image], "has_nsfw": [False]}}
        return web.json_response(body)

    manifest = write_catalog(tmp_path / "in", 1)
    async with fake_api(submit, poll) as api:
        await api.run(manifest, tmp_path / "out", KEY)
        assert api.submits == 1

    table = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert table["status"].to_list() == ["succeeded"], table["reason"].to_list()
    assert table["task_id"].to_list() == ["task-lag"] and polls["task-lag"] == 3
