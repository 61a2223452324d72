"""Sharing one key: pipeline jobs and an interactive app on one simulated 24-slot key.

    .venv/bin/python -m benchmarks.sharing                    # 1, 2 and 4 jobs x both modes
    .venv/bin/python -m benchmarks.sharing --jobs 2 --delivery webhooks --repeat 3

Each job is its own process (``benchmarks/sharing_job.py``), as scheduled jobs would be, and
so is the simulator; the app (a request every two seconds or so, sometimes two at once,
never polled) runs here. After a warm-up the simulator's counters are read over a window:
the jobs' 429s as a share of their submits, the key's slots busy against the 24 the tier
allows (1.0 is the limit), each job's images, and the app's accepted requests.
``tests/sharing`` asserts the two-job case; this measures the rest side by side and writes
``benchmarks/sharing.json``, which ``python -m benchmarks.run --render`` adds to RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import shlex
import signal
import string
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from benchmarks.harness import SimSettings, Simulator
from pipeline.contract import KLEIN_PATH

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
JOB = HERE / "sharing_job.py"
RESULTS = HERE / "sharing.json"
KEY = "sharing-test-key"
SLOTS = 24
ROWS = 3000
HOOK_SECRET = "sharing-test-webhook-secret"
#: Tasks of about a second: what sharing costs is the time between a task finishing on the
#: server and its job noticing, so that stays small against a task's duration.
SETTINGS = SimSettings(
    tier="standard",
    max_active=SLOTS,
    submits_per_minute=100_000,
    median_s=1.0,
    p95_s=2.0,
    webhook_secret=HOOK_SECRET,
)


@dataclass
class App:
    """An interactive client: a task now and then, sometimes two at once, never polled."""

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
                            raise RuntimeError(f"the app got HTTP {r.status}")


@dataclass
class Figures:
    """What one scenario measured over its window, from the simulator's counters."""

    jobs: int
    delivery: str
    window_s: float
    submits: int
    refused_429: int
    occupancy: float
    per_job: list[int]
    app_accepted: int
    app_refused: int
    peak_active: int
    polls_per_image: float
    webhooks_sent: int
    #: Reads of the task list per image (the jobs' together; with polling only).
    lists_per_image: float = 0.0
    exit_codes: list[int | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def refused_share(self) -> float:
        return self.refused_429 / max(self.submits, 1)

    @property
    def fairness(self) -> float:
        """The least-served job's images over the best-served one's (1.0 is an even split)."""
        return min(self.per_job) / max(max(self.per_job), 1)

    def line(self) -> str:
        return (
            f"{self.jobs} job(s), {self.delivery}: submits {self.submits}, 429s "
            f"{self.refused_429} ({self.refused_share:.2%}), occupancy {self.occupancy:.1%}, "
            f"images per job {self.per_job}, app {self.app_accepted} accepted / "
            f"{self.app_refused} refused, peak active {self.peak_active}, "
            f"polls per image {self.polls_per_image:.1f}, lists per image "
            f"{self.lists_per_image:.2f}"
        )


def simulator(workdir: Path) -> Simulator:
    """The simulator in its own process on 127.0.0.1 (a free port), not pinned to a CPU."""
    return Simulator(SETTINGS, workdir, KEY, cpus=[])


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


async def measure(
    sim: Simulator,
    workdir: Path,
    jobs: int,
    delivery: str,
    warmup_s: float = 15.0,
    window_s: float = 40.0,
    debug: list[str] | None = None,
) -> Figures:
    """Start ``jobs`` jobs and the app on ``sim``'s key, read the counters over the
    window after ``warmup_s``, then stop the jobs with SIGINT as Ctrl-C would.

    The jobs start together with every slot free, so the first to submit fills the key and
    the others join a full one: the warm-up is when sharing has to even that out.
    """
    env = {
        k: v for k, v in os.environ.items() if k not in ("BFL_API_KEY", "FREEPIK_WEBHOOK_SECRET")
    }
    env["FREEPIK_API_KEY"] = KEY
    if delivery == "webhooks":
        env["FREEPIK_WEBHOOK_SECRET"] = HOOK_SECRET
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    procs: list[tuple[asyncio.subprocess.Process, Path]] = []
    for n in range(jobs):
        name = string.ascii_lowercase[n]
        manifest = workdir / f"{name}.csv"
        write_manifest(manifest, name)
        progress = workdir / f"{name}.progress"
        progress.touch()
        with (workdir / f"{name}.err").open("w") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *(debug or []), str(JOB), str(manifest),
                str(workdir / name), sim.url, str(progress), delivery,
                env=env, stdout=asyncio.subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        procs.append((proc, progress))
    app = App()
    stop = asyncio.Event()
    app_task = asyncio.create_task(app.run(sim.url, stop))
    try:
        await asyncio.sleep(warmup_s)
        start, t0 = await asyncio.to_thread(sim.stats), time.time()
        app0 = (app.accepted, app.refused)
        await asyncio.sleep(window_s)
        end, t1 = await asyncio.to_thread(sim.stats), time.time()
        app1 = (app.accepted, app.refused)
    finally:
        stop.set()
        await app_task
        for proc, _ in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
        # Ctrl-C must end a job promptly, whatever it was waiting for (a slot, a pause).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p, _ in procs)), 60)
        for proc, _ in procs:
            if proc.returncode is None:
                proc.kill()

    app_accepted, app_refused = app1[0] - app0[0], app1[1] - app0[1]
    per_job = [done_at(progress, t1) - done_at(progress, t0) for _, progress in procs]
    sent = end["submits_accepted"] + end["submits_refused"]
    sent -= start["submits_accepted"] + start["submits_refused"]
    return Figures(
        jobs=jobs,
        delivery=delivery,
        window_s=round(t1 - t0, 2),
        submits=int(sent - app_accepted - app_refused),
        refused_429=int(end["rate_limited"] - start["rate_limited"] - app_refused),
        occupancy=(end["occupancy_s"] - start["occupancy_s"]) / (SLOTS * (t1 - t0)),
        per_job=per_job,
        app_accepted=app_accepted,
        app_refused=app_refused,
        peak_active=int(end["max_active"]),
        polls_per_image=(end["polls"] - start["polls"]) / max(sum(per_job), 1),
        webhooks_sent=int(end["webhooks_sent"] - start["webhooks_sent"]),
        lists_per_image=(end["list_calls"] - start["list_calls"]) / max(sum(per_job), 1),
        exit_codes=[proc.returncode for proc, _ in procs],
        errors=[progress.with_suffix(".err").read_text(encoding="utf-8") for _, progress in procs],
    )


async def _scenario(jobs: int, delivery: str, warmup_s: float, window_s: float) -> Figures:
    with tempfile.TemporaryDirectory(prefix="klein-sharing-") as tmp, simulator(Path(tmp)) as sim:
        return await measure(sim, Path(tmp), jobs, delivery, warmup_s, window_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="1,2,4", help="job counts, comma-separated (1,2,4)")
    parser.add_argument("--delivery", default="polling,webhooks", help="polling, webhooks or both")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each scenario (1)")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=40.0, help="seconds measured")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    combos = [
        (int(jobs), delivery)
        for delivery in args.delivery.split(",")
        for jobs in args.jobs.split(",")
    ]
    runs = []
    for jobs, delivery in combos:
        for _ in range(args.repeat):
            figures = asyncio.run(_scenario(jobs, delivery, args.warmup, args.window))
            print(figures.line(), flush=True)
            record = asdict(figures)
            del record["errors"]  # stderr of the jobs: for a failing test, not for a report
            runs.append(record)
    args.out.write_text(
        json.dumps(
            {
                "command": shlex.join(
                    ["python", "-m", "benchmarks.sharing", *(argv or sys.argv[1:])]
                ),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "nproc": os.cpu_count(),
                "slots": SLOTS,
                "runs": runs,
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {args.out}; render RESULTS.md with: .venv/bin/python -m benchmarks.run --render")
    return 0


if __name__ == "__main__":
    sys.exit(main())
