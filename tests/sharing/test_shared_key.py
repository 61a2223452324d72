"""Two pipeline jobs and an interactive client on one simulator key.

Each job is its own process, as two scheduled jobs would be, and so is the simulator; the
third client (standing in for an interactive app: a request every two seconds or so,
sometimes two at once, never polled) lives in the test and grabs slots at random moments.
After a warm-up (the second job starts with every slot taken by the first, and AIMD needs a
few cycles to even the shares out) the test reads the simulator's counters over 40 s (long
enough that a few 429s more or less do not decide the 2% bound): 429s must stay under 2%
of the jobs' submits, the key's slots must be at least 90% busy,
and each job must get at least half the images the other gets. Both jobs are then stopped
with SIGINT, as Ctrl-C would, and must exit promptly (130) without a traceback.

Tasks take about a second (median 1 s, p95 2 s): what a job loses to the key being shared
is the time between a task finishing on the server and the job noticing, so the scenario
keeps that small against a task's duration even on a loaded CI machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from pipeline.contract import KLEIN_PATH

HERE = Path(__file__).resolve().parent
KEY = "sharing-test-key"
SLOTS = 24
WARMUP_S = 15.0
WINDOW_S = 40.0
ROWS = 3000
DEBUG = [os.environ["DBG"]] if os.environ.get("DBG") else []
CONFIG = f"""
retry_after = "seconds"

[[keys]]
name = "shared"
key = "{KEY}"
tier = "standard"
max_active = {SLOTS}
submits_per_minute = 100000

[latency]
median_s = 1.0
p95_s = 2.0
"""


@dataclass
class Grabber:
    """An interactive client: a task now and then, sometimes a few at once, never polled."""

    accepted: int = 0
    refused: int = 0

    async def run(self, url: str, stop: asyncio.Event, seed: int = 7) -> None:
        rng = random.Random(seed)
        headers = {"x-freepik-api-key": KEY}
        async with aiohttp.ClientSession() as session:
            n = 0
            while not stop.is_set():
                await asyncio.sleep(rng.expovariate(0.5))
                for _ in range(rng.choice((1, 1, 1, 2))):
                    n += 1
                    body = {"prompt": f"interactive request {n}", "seed": n}
                    async with session.post(url + KLEIN_PATH, json=body, headers=headers) as r:
                        await r.read()
                        if r.status == 200:
                            self.accepted += 1
                        elif r.status == 429:
                            self.refused += 1
                        else:
                            raise AssertionError(f"grabber got HTTP {r.status}")


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "sim.toml"
    config.write_text(CONFIG, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sim", "--config", str(config), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, f"simulator did not start: {line}{proc.stderr.read() if proc.stderr else ''}"
        yield match.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def write_manifest(path: Path, job: str) -> None:
    lines = ["id,prompt"] + [f"{job}-{i},{job} product {i} on white" for i in range(ROWS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def done_at(progress: Path, when: float) -> int:
    """Rows the job had finished at wall-clock time ``when`` (from its progress lines)."""
    done = 0
    for line in progress.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry["t"] <= when:
            done = max(done, entry["done"])
    return done


async def stats(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/_sim/stats") as response:
        return (await response.json())["keys"]["shared"]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("KLEIN_SHARING") != "1",
    reason="on demand (KLEIN_SHARING=1): near its 2% / 90% bounds it fails about one run in four",
)
async def test_two_jobs_and_a_grabber_share_a_key_politely(simulator: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BFL_API_KEY"}
    env["FREEPIK_API_KEY"] = KEY
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    jobs: list[tuple[asyncio.subprocess.Process, Path]] = []
    for name in ("a", "b"):
        manifest = tmp_path / f"{name}.csv"
        write_manifest(manifest, name)
        progress = tmp_path / f"{name}.progress"
        progress.touch()
        with (tmp_path / f"{name}.err").open("w") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *DEBUG, str(HERE / "job.py"), str(manifest),
                str(tmp_path / name), simulator, str(progress),
                env=env, stdout=asyncio.subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        jobs.append((proc, progress))
    grabber = Grabber()
    stop = asyncio.Event()
    grabbing = asyncio.create_task(grabber.run(simulator, stop))
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.sleep(WARMUP_S)
            start, t0 = await stats(session, simulator), time.time()
            grab0 = (grabber.accepted, grabber.refused)
            await asyncio.sleep(WINDOW_S)
            end, t1 = await stats(session, simulator), time.time()
            grab1 = (grabber.accepted, grabber.refused)
    finally:
        stop.set()
        await grabbing
        for proc, _ in jobs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
        # Ctrl-C must end a job promptly, whatever it was waiting for (a slot, a pause).
        await asyncio.wait_for(asyncio.gather(*(proc.wait() for proc, _ in jobs)), 60)

    for proc, progress in jobs:
        err = progress.with_suffix(".err").read_text(encoding="utf-8")
        assert proc.returncode == 130, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    grab_accepted = grab1[0] - grab0[0]
    grab_refused = grab1[1] - grab0[1]
    submits = (
        end["submits_accepted"] + end["submits_refused"]
        - start["submits_accepted"] - start["submits_refused"]
        - grab_accepted - grab_refused
    )  # fmt: skip
    refused_429 = end["rate_limited"] - start["rate_limited"] - grab_refused
    occupancy = (end["occupancy_s"] - start["occupancy_s"]) / (SLOTS * (t1 - t0))
    per_job = [done_at(p, t1) - done_at(p, t0) for _, p in jobs]
    report = (
        f"jobs' submits {submits}, their 429s {refused_429} ({refused_429 / max(submits, 1):.2%}), "
        f"occupancy {occupancy:.1%}, images per job {per_job}, grabber {grab_accepted} "
        f"accepted / {grab_refused} refused, peak active {end['max_active']}"
    )
    print(report)
    assert end["max_active"] <= SLOTS
    assert submits > 0 and all(n > 0 for n in per_job), report
    assert refused_429 < 0.02 * submits, report
    assert occupancy >= 0.90, report
    assert min(per_job) >= 0.5 * max(per_job), report
