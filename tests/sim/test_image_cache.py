"""The simulators of one process share their image cache: an image is rendered once, however
many of them serve it (a test suite's, a notebook's), and the cache stays within its bound
when their threads use it at once."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import aiohttp
import pytest
from sim_helpers import Client, fast_config

from pipeline.sim import SimServer, images
from pipeline.sim.results import ImageCache, shared_cache


async def test_two_simulators_in_one_process_render_an_image_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    renders: list[str] = []
    render = images.render_image

    def counted(**kwargs: Any) -> bytes:
        renders.append(kwargs["prompt"])
        return render(**kwargs)

    monkeypatch.setattr(images, "render_image", counted)
    prompt = f"a mug no other test asks for {uuid.uuid4()}"
    served = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with SimServer(fast_config()) as server:
                client = Client(server, session)
                done = await client.wait(await client.submit(prompt=prompt, seed=7))
                status, body, _ = await client.download(done["generated"][0])
                assert status == 200
                served.append(body)
    assert served[0] == served[1] and served[0][:2] == b"\xff\xd8"
    assert renders == [prompt]


def test_a_cache_of_no_bytes_is_its_own_and_keeps_nothing() -> None:
    nothing = shared_cache(0)
    assert nothing is not shared_cache(0)
    nothing.put(("key",), b"image")
    assert nothing.get(("key",)) is None
    assert shared_cache(1) is shared_cache(2)
    assert shared_cache(1).max_bytes >= 2


def test_threads_sharing_a_cache_keep_it_within_its_bound() -> None:
    cache = ImageCache(20_000)

    def churn(worker: int) -> None:
        for i in range(3_000):
            key = (worker, i % 97)
            if cache.get(key) is None:
                cache.put(key, bytes(100 + (i * 37) % 900))

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = sum(len(data) for data in cache._items.values())
    assert cache.bytes == held <= cache.max_bytes
    assert held > 0
