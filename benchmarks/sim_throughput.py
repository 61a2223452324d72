"""How many 1k JPEGs the simulator renders, and serves end to end, per second on one core.

The simulator must never be the bottleneck of a pipeline benchmark: the target is at least
200 images per second of 1k JPEG on one core, HTTP included. Two measurements:

1. in-process: ``render_image`` for N distinct 1k JPEGs (all ten presets in turn), ms/image;
2. end to end: ``python -m pipeline.sim`` in its own process, pinned to CPU 0 when
   ``taskset`` exists, driven from this process (pinned to another CPU when there is one)
   over 127.0.0.1: submit -> poll -> download for N distinct prompts on an enterprise-tier
   key with a small task latency. Reports images/s and the server's CPU time per image.

    .venv/bin/python benchmarks/sim_throughput.py --images 2000

Everything stops by itself (``--timeout``); the server is terminated on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.contract import ASPECT_RATIOS, KLEIN_KEY_HEADERS, KLEIN_PATH  # noqa: E402
from pipeline.sim.images import render_image  # noqa: E402

KEY = "bench-sim-throughput-key"
PRESETS = sorted(ASPECT_RATIOS)
CONFIG = f"""
retry_after = "seconds"

[[keys]]
name = "bench"
key = "{KEY}"
tier = "enterprise"

[latency]
median_s = {{median}}
p95_s = {{p95}}
floor_s = 0.0
queued_fraction = 0.1
"""


def prompt(index: int) -> str:
    """Distinct prompts, so no image is ever served from the simulator's cache."""
    subjects = ("leather handbag", "ceramic mug", "running shoe", "desk lamp", "wrist watch")
    scenes = ("on marble", "in soft light", "on a beach", "studio shot", "floating")
    return f"{subjects[index % 5]} {scenes[index // 5 % 5]} variant {index}"


# --- 1. in-process rendering ----------------------------------------------------------------


def bench_render(images: int, fmt: str) -> tuple[float, float]:
    """(mean ms per image, median of 10 batch means): process CPU time, all presets in turn."""
    for i in range(min(200, images)):  # warm the mask and glyph caches
        width, height = ASPECT_RATIOS[PRESETS[i % len(PRESETS)]]
        render_image(prompt=prompt(-1 - i), seed=i, width=width, height=height, fmt=fmt)
    batch = max(1, images // 10)
    means = []
    for start in range(0, images, batch):
        began = time.process_time()
        count = 0
        for i in range(start, min(images, start + batch)):
            width, height = ASPECT_RATIOS[PRESETS[i % len(PRESETS)]]
            render_image(prompt=prompt(i), seed=i, width=width, height=height, fmt=fmt)
            count += 1
        means.append((time.process_time() - began) * 1000 / count)
    return statistics.fmean(means), statistics.median(means)


# --- 2. end to end against the simulator process --------------------------------------------


@dataclass
class Load:
    done: int = 0
    failed: int = 0
    submits: int = 0
    polls: int = 0
    downloads: int = 0
    refused_429: int = 0
    other_errors: int = 0
    bytes: int = 0
    latencies: list[float] = field(default_factory=list)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def start_server(
    config: Path, log: Path
) -> tuple[asyncio.subprocess.Process, str, bool, asyncio.Task[None]]:
    """Start the simulator and read its announced URL; stderr goes to ``log`` (a full pipe
    would stall the server mid-benchmark), stdout keeps being drained for the same reason."""
    pinned = shutil.which("taskset") is not None
    command = [sys.executable, "-m", "pipeline.sim", "--config", str(config), "--port", "0"]
    if pinned:
        command = ["taskset", "-c", "0", *command]
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    assert process.stdout is not None
    stdout = process.stdout
    try:
        line = await asyncio.wait_for(stdout.readline(), timeout=30)
    except TimeoutError:
        line = b""
    found = re.search(rb"(http://127\.0\.0\.1:\d+)", line)
    if not found:
        if process.returncode is None:
            process.kill()
        await process.wait()
        logged = await asyncio.to_thread(log.read_text, errors="replace")
        error = logged.strip().splitlines()[-5:]
        said = [part for part in (line.decode(errors="replace").strip(), *error) if part]
        raise SystemExit("the simulator did not start: " + " / ".join(said or ["no output"]))

    async def drain() -> None:
        while await stdout.read(65536):
            pass

    return process, found.group(1).decode(), pinned, asyncio.create_task(drain())


async def stop_server(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()


def retry_after(value: str | None) -> float:
    try:
        return min(5.0, max(0.01, float(value or "")))
    except ValueError:
        return 0.05


async def one_image(
    session: aiohttp.ClientSession, base: str, index: int, load: Load, poll_s: float
) -> None:
    headers = {KLEIN_KEY_HEADERS[0]: KEY}
    body = {
        "prompt": prompt(index),
        "seed": index,
        "aspect_ratio": PRESETS[index % len(PRESETS)],
        "resolution": "1k",
        "output_format": "jpeg",
    }
    began = time.perf_counter()
    while True:
        load.submits += 1
        async with session.post(f"{base}{KLEIN_PATH}", json=body, headers=headers) as response:
            if response.status == 429:
                load.refused_429 += 1
                await asyncio.sleep(retry_after(response.headers.get("Retry-After")))
                continue
            if response.status != 200:
                load.other_errors += 1
                load.failed += 1
                return
            task_id = (await response.json())["data"]["task_id"]
            break
    while True:
        await asyncio.sleep(poll_s)
        load.polls += 1
        async with session.get(f"{base}{KLEIN_PATH}/{task_id}", headers=headers) as response:
            if response.status != 200:
                load.other_errors += 1
                continue
            data = (await response.json())["data"]
        if data["status"] == "COMPLETED":
            break
        if data["status"] == "FAILED":
            load.failed += 1
            return
    load.downloads += 1
    async with session.get(data["generated"][0]) as response:
        image = await response.read()
    if response.status != 200 or not image.startswith(b"\xff\xd8"):
        load.other_errors += 1
        load.failed += 1
        return
    load.bytes += len(image)
    load.done += 1
    load.latencies.append(time.perf_counter() - began)


async def drive(
    base: str, first: int, images: int, concurrency: int, poll_s: float, load: Load
) -> None:
    queue = iter(range(first, first + images))

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in queue:
            await one_image(session, base, index, load, poll_s)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


async def bench_server(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, float]]:
    """(table rows, raw figures): images/s end to end and CPU per image on both sides."""
    load = Load()
    timed_out = False
    with tempfile.TemporaryDirectory(prefix="sim-bench-") as tmp:
        config = Path(tmp) / "sim.toml"
        config.write_text(CONFIG.format(median=args.latency, p95=args.latency * 2.5))
        process, base, pinned, drainer = await start_server(config, Path(tmp) / "sim.log")
        try:
            warm = Load()
            await asyncio.wait_for(
                drive(base, 10_000_000, args.warmup, args.concurrency, args.poll, warm),
                args.timeout,
            )
            cpu_before = cpu_seconds(process.pid)
            client_before = time.process_time()
            began = time.perf_counter()
            try:
                await asyncio.wait_for(
                    drive(base, 0, args.images, args.concurrency, args.poll, load), args.timeout
                )
            except TimeoutError:
                timed_out = True  # report what finished in time
            elapsed = time.perf_counter() - began
            client_cpu = time.process_time() - client_before
            cpu_after = cpu_seconds(process.pid)
        finally:
            await stop_server(process)
            drainer.cancel()
    rate = load.done / elapsed
    figures: dict[str, float] = {"images_per_s": round(rate, 1), "images": load.done}
    where = "CPU 0" if pinned else "unpinned CPUs"
    setup = f"{args.concurrency} in flight, latency median {args.latency * 1000:.0f} ms"
    rows = {
        f"end to end, 1k JPEG (simulator on {where}, enterprise key, {setup})": (
            f"**{rate:.0f} images/s** ({load.done} in {elapsed:.1f} s"
            + (f", stopped by --timeout {args.timeout:.0f} s)" if timed_out else ")")
        ),
        "failed / other errors / 429s": (
            f"{load.failed} / {load.other_errors} / {load.refused_429}"
        ),
        "requests: submits / polls / downloads": (
            f"{load.submits} / {load.polls} / {load.downloads}"
        ),
        "mean image size": f"{load.bytes / max(1, load.done) / 1024:.0f} KiB",
    }
    if load.latencies:
        ordered = sorted(load.latencies)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        rows["submit-to-downloaded latency p50 / p95"] = (
            f"{statistics.median(ordered) * 1000:.0f} / {p95 * 1000:.0f} ms"
        )
    if cpu_before is not None and cpu_after is not None and load.done:
        cpu_ms = (cpu_after - cpu_before) * 1000 / load.done
        rows["simulator CPU per image (render + HTTP)"] = (
            f"{cpu_ms:.2f} ms (= {1000 / cpu_ms:.0f} images/s per core)"
        )
        figures["simulator_cpu_ms_per_image"] = round(cpu_ms, 3)
    if load.done:
        # When this is close to 1000 / images/s, the load generator, not the simulator, is
        # what limits the end-to-end figure.
        rows["load generator CPU per image"] = f"{client_cpu * 1000 / load.done:.2f} ms"
        figures["load_generator_cpu_ms_per_image"] = round(client_cpu * 1000 / load.done, 3)
    return rows, figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images per measurement")
    parser.add_argument("--png-images", type=int, default=100, help="1k PNGs to render (0: skip)")
    parser.add_argument("--concurrency", type=int, default=128, help="tasks in flight")
    parser.add_argument("--latency", type=float, default=0.02, help="task median latency (s)")
    parser.add_argument("--poll", type=float, default=0.05, help="poll interval (s)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed images first")
    parser.add_argument("--timeout", type=float, default=300, help="give up after (s)")
    parser.add_argument("--render-only", action="store_true", help="skip the server")
    parser.add_argument(
        "--json", type=Path, help="also write the table and the raw figures here (JSON)"
    )
    args = parser.parse_args()
    if args.images < 1:
        parser.error("--images must be at least 1")

    rows: dict[str, str] = {}
    figures: dict[str, float] = {}
    mean, median = bench_render(args.images, "jpeg")
    figures["render_jpeg_ms_per_image"] = round(mean, 3)
    rows[f"in-process render + encode, 1k JPEG ({args.images} images, all presets)"] = (
        f"**{mean:.2f} ms/image** (median batch {median:.2f} ms; {1000 / mean:.0f} images/s)"
    )
    if args.png_images:
        mean, median = bench_render(args.png_images, "png")
        rows[f"in-process render + encode, 1k PNG ({args.png_images} images)"] = (
            f"{mean:.2f} ms/image (median batch {median:.2f} ms)"
        )
    if not args.render_only:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if len(cpus) > 1 and hasattr(os, "sched_setaffinity"):
            # Keep the load generator off the simulator's core.
            os.sched_setaffinity(0, [cpu for cpu in cpus if cpu != 0])
        served, measured = asyncio.run(bench_server(args))
        rows.update(served)
        figures.update(measured)

    print("| measure | result |")
    print("|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value} |")
    if args.json:
        args.json.write_text(json.dumps({"table": rows, "figures": figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
