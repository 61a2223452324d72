"""Dialect A over real HTTP: shapes, sizes, validation, auth, lookup, moderation."""

from __future__ import annotations

import io
import json

import aiohttp
import pytest
from PIL import Image
from sim_helpers import KEY, Client, fast_config, price, reference_b64, second_key

from pipeline.contract import ASPECT_RATIOS, KLEIN_PATH, output_size
from pipeline.sim import KeyConfig, LatencyConfig, ModerationConfig, SimConfig, SimServer


@pytest.mark.parametrize(
    ("aspect_ratio", "resolution", "fmt"),
    [
        ("square_1_1", "1k", "jpeg"),
        ("widescreen_16_9", "2k", "png"),
        ("social_story_9_16", "1k", "png"),
        ("portrait_2_3", "2k", "jpeg"),
        ("vertical_1_2", "1k", "jpeg"),
    ],
)
async def test_submit_poll_download_gives_image_of_exact_size(
    client: Client, aspect_ratio: str, resolution: str, fmt: str
) -> None:
    task_id = await client.submit(
        prompt="a teapot", seed=7, aspect_ratio=aspect_ratio, resolution=resolution,
        output_format=fmt,
    )  # fmt: skip
    data = await client.wait(task_id)
    assert data["task_id"] == task_id
    assert data["status"] == "COMPLETED"
    assert data["has_nsfw"] == [False]
    assert len(data["generated"]) == 1
    status, body, resp = await client.download(data["generated"][0])
    assert status == 200
    assert resp.headers["Content-Type"] == ("image/png" if fmt == "png" else "image/jpeg")
    assert int(resp.headers["Content-Length"]) == len(body)
    image = Image.open(io.BytesIO(body))
    assert image.format == ("PNG" if fmt == "png" else "JPEG")
    assert image.size == output_size(aspect_ratio, resolution)


async def test_every_preset_has_its_contract_size(client: Client) -> None:
    for aspect_ratio in ASPECT_RATIOS:
        task_id = await client.submit(prompt="a lamp", seed=1, aspect_ratio=aspect_ratio)
        data = await client.wait(task_id)
        _, body, _ = await client.download(data["generated"][0])
        assert Image.open(io.BytesIO(body)).size == output_size(aspect_ratio, "1k")


async def test_same_inputs_give_same_bytes_and_seed_changes_them(client: Client) -> None:
    async def image(**body: object) -> bytes:
        data = await client.wait(await client.submit(**body))
        return (await client.download(data["generated"][0]))[1]

    first = await image(prompt="a vase", seed=11)
    again = await image(prompt="a vase", seed=11)
    other = await image(prompt="a vase", seed=12)
    with_ref = await image(prompt="a vase", seed=11, input_image=reference_b64())
    assert first == again
    assert first != other
    assert first != with_ref


async def test_status_moves_created_in_progress_completed() -> None:
    now = [1_000_000.0]
    config = SimConfig(latency=LatencyConfig(median_s=10.0, p95_s=10.0, queued_fraction=0.5))
    async with SimServer(config, clock=lambda: now[0]) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        task_id = await client.submit(seed=1)
        seen = []
        for step in (1.0, 5.0, 4.5):
            seen.append((await (await client.poll(task_id)).json())["data"])
            now[0] += step
        seen.append((await (await client.poll(task_id)).json())["data"])
        assert [d["status"] for d in seen] == ["CREATED", "CREATED", "IN_PROGRESS", "COMPLETED"]
        assert [d["generated"] for d in seen[:3]] == [[], [], []]
        assert [d["has_nsfw"] for d in seen[:3]] == [[], [], []]
        assert seen[3]["generated"][0].startswith(server.url + "/_sim/results/")


async def test_list_returns_this_keys_tasks_with_status(client: Client) -> None:
    ids = [await client.submit(seed=i) for i in range(3)]
    async with client.session.get(client.server.url + KLEIN_PATH, headers=client.headers) as r:
        assert r.status == 200
        listed = (await r.json())["data"]
    assert [t["task_id"] for t in listed] == ids
    assert all(t["status"] in ("CREATED", "IN_PROGRESS", "COMPLETED") for t in listed)


async def test_magnific_header_is_accepted(client: Client) -> None:
    resp = await client.submit_raw({"prompt": "x"}, headers={"x-magnific-api-key": KEY})
    assert resp.status == 200


@pytest.mark.parametrize("headers", [{}, {"x-freepik-api-key": "wrong"}, {"x-key": KEY}])
async def test_missing_or_bad_key_is_401(client: Client, headers: dict[str, str]) -> None:
    resp = await client.submit_raw({"prompt": "x"}, headers=headers)
    assert resp.status == 401
    body = await resp.json()
    assert "API key" in body["message"]
    assert KEY not in json.dumps(body)
    poll = await client.session.get(f"{client.server.url}{KLEIN_PATH}/abc", headers=headers)
    assert poll.status == 401


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", ""),
        ("prompt", "   "),
        ("prompt", 5),
        ("aspect_ratio", "square"),
        ("aspect_ratio", ["square_1_1"]),
        ("resolution", "4k"),
        ("seed", -1),
        ("seed", 4_294_967_296),
        ("seed", 1.5),
        ("seed", True),
        ("seed", "12"),
        ("safety_tolerance", 6),
        ("safety_tolerance", 2.0),
        ("output_format", "webp"),
        ("input_image", "not base64!"),
        ("input_image_2", "aGVsbG8="),  # valid base64 of b"hello": not an image
        ("input_image_4", 7),
        ("webhook_url", "ftp://127.0.0.1/hook"),
        ("webhook_url", "http://example.com/hook"),
        ("webhook_url", "not a url"),
    ],
)
async def test_bad_field_is_400_naming_it(client: Client, field: str, value: object) -> None:
    body: dict[str, object] = {"prompt": "a chair", "seed": 1, field: value}
    resp = await client.submit_raw(body)
    assert resp.status == 400
    payload = await resp.json()
    assert [p["name"] for p in payload["invalid_params"]] == [field]
    assert field in payload["message"]
    assert payload["invalid_params"][0]["reason"]


async def test_missing_prompt_and_several_bad_fields_are_all_named(client: Client) -> None:
    resp = await client.submit_raw({"seed": -5, "resolution": "8k"})
    names = {p["name"] for p in (await resp.json())["invalid_params"]}
    assert resp.status == 400
    assert names == {"prompt", "seed", "resolution"}


async def test_non_json_body_is_400(client: Client) -> None:
    async with client.session.post(
        client.server.url + KLEIN_PATH, data=b"prompt=x", headers=client.headers
    ) as resp:
        assert resp.status == 400
        assert "JSON" in (await resp.json())["message"]
    resp = await client.submit_raw(["prompt", "x"])
    assert resp.status == 400


async def test_unknown_fields_ignored_and_jpeg_default(client: Client) -> None:
    task_id = await client.submit(prompt="a cup", seed=2, colour_grade="warm", steps=4)
    data = await client.wait(task_id)
    assert data["generated"][0].split("?")[0].endswith(".jpg")


async def test_jpeg_reference_and_four_references_accepted(client: Client) -> None:
    task_id = await client.submit(
        prompt="a bag", seed=3, input_image=reference_b64("JPEG"),
        input_image_2=reference_b64(colour=(0, 0, 255)), input_image_3=reference_b64(),
        input_image_4=reference_b64(colour=(0, 255, 0)),
    )  # fmt: skip
    data = await client.wait(task_id)
    assert data["status"] == "COMPLETED"


async def test_unknown_task_and_other_keys_task_are_404() -> None:
    config = fast_config(keys=[KeyConfig(), second_key()])
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        mine = Client(server, s)
        theirs = Client(server, s, key="sim-other-key")
        task_id = await mine.submit(seed=1)
        assert (await mine.poll(task_id)).status == 200
        for who, tid in ((theirs, task_id), (mine, "00000000-0000-4000-8000-000000000000")):
            resp = await who.poll(tid)
            assert resp.status == 404
            assert "not found" in (await resp.json())["message"]


@pytest.mark.parametrize(
    ("prompt", "tolerance", "moderated"),
    [
        ("a NUDE statue", 2, True),
        ("nsfw, a vase", 4, True),
        ("a nude statue", 5, False),
        ("a nudebranch fish", 0, False),  # whole words only
        ("a garden", 0, False),
    ],
)
async def test_moderation_by_word_and_tolerance(
    prompt: str, tolerance: int, moderated: bool
) -> None:
    config = fast_config(keys=[KeyConfig(credits=10.0)])
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        data = await client.wait(
            await client.submit(prompt=prompt, seed=1, safety_tolerance=tolerance)
        )
        stats = server.stats()["keys"]["demo"]
        if moderated:
            assert data["status"] == "FAILED"
            assert data["has_nsfw"] == [True]
            assert data["generated"] == []
            assert stats["tasks_moderated"] == 1
            assert stats["credits_remaining"] == 10.0  # refunded
        else:
            assert data["status"] == "COMPLETED"
            assert data["has_nsfw"] == [False]
            assert stats["credits_remaining"] == pytest.approx(10.0 - price(config))


async def test_random_moderation_rate_and_custom_words() -> None:
    config = fast_config(moderation=ModerationConfig(words=["banana"], pass_tolerance=3, rate=1.0))
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        data = await client.wait(await client.submit(prompt="a garden", seed=1))
        assert data["status"] == "FAILED"
        assert data["has_nsfw"] == [True]
        assert server.stats()["keys"]["demo"]["faults"] == {"moderation_random": 1}
    config.moderation.rate = 0.0
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        low = await client.wait(await client.submit(prompt="Banana!", safety_tolerance=2))
        high = await client.wait(await client.submit(prompt="Banana!", safety_tolerance=3))
        assert (low["status"], high["status"]) == ("FAILED", "COMPLETED")


async def test_oversized_reference_and_body_are_refused() -> None:
    config = fast_config(max_reference_bytes=1000)
    async with SimServer(config) as server, aiohttp.ClientSession() as s:
        client = Client(server, s)
        big = reference_b64()
        resp = await client.submit_raw({"prompt": "x", "input_image": big + "A" * 4000})
        assert resp.status == 400
        assert (await resp.json())["invalid_params"][0]["name"] == "input_image"
        resp = await client.submit_raw({"prompt": "x" * (config.max_body_bytes() + 10)})
        assert resp.status == 413
        assert "larger than" in (await resp.json())["message"]
        assert server.stats()["keys"]["demo"]["submits_refused"] == 2
