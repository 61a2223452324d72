"""The simulators of one process share their image cache: an image is rendered once, however
many of them serve it (a test suite's, a notebook's), and the cache stays within its bound
when their threads use it at once. With ``image_dir``, simulators of other processes read
back what one rendered."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
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


#: A fresh simulator process serving ``argv[2]`` (seed 7) with its images kept in
#: ``argv[1]`` and no memory cache; with ``argv[3] == "no"`` it may not render anything.
_SERVE_ONCE = """
import asyncio, sys
import aiohttp
from sim_helpers import Client, fast_config
from pipeline.sim import SimServer, images

def refused(**kwargs):
    raise AssertionError("rendered again")

async def main(folder, prompt, render):
    if render == "no":
        images.render_image = refused
    config = fast_config(image_dir=folder, image_cache_bytes=0)
    async with aiohttp.ClientSession() as session, SimServer(config) as server:
        client = Client(server, session)
        done = await client.wait(await client.submit(prompt=prompt, seed=7))
        status, body, _ = await client.download(done["generated"][0])
        assert status == 200, status
        sys.stdout.buffer.write(body)

asyncio.run(main(*sys.argv[1:]))
"""


def test_simulators_of_other_processes_read_back_an_image_from_image_dir(
    tmp_path: Path,
) -> None:
    """One process renders and keeps the image; a second one, forbidden to render, serves
    the same bytes from the folder, which holds the whole image and nothing else."""
    folder = tmp_path / "images"
    prompt = f"a teapot no other test asks for {uuid.uuid4()}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    served = []
    for render in ("yes", "no"):
        done = subprocess.run(
            [sys.executable, "-c", _SERVE_ONCE, str(folder), prompt, render],
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        served.append(done.stdout)
    assert served[0] == served[1] and served[0][:2] == b"\xff\xd8"
    kept = list(folder.iterdir())
    assert len(kept) == 1 and kept[0].suffix == ".jpg"
    assert kept[0].read_bytes() == served[0]


async def test_an_unusable_image_dir_only_costs_renders(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = fast_config(image_dir=str(blocker / "images"), image_cache_bytes=0)
    async with aiohttp.ClientSession() as session, SimServer(config) as server:
        client = Client(server, session)
        done = await client.wait(await client.submit(prompt="a mug", seed=3))
        status, body, _ = await client.download(done["generated"][0])
    assert status == 200 and body[:2] == b"\xff\xd8"
    assert blocker.read_text() == "not a folder"
