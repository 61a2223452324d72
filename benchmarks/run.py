"""The benchmark suite: every contender on the same manifests against the same simulator.

    .venv/bin/python -m benchmarks.run            # the whole suite (about 20 minutes on 2 cores)
    .venv/bin/python -m benchmarks.run --quick    # a smoke run of every part (under 2 minutes)

For each scenario and contender a fresh simulator process starts on 127.0.0.1 (pinned to
CPU 0 when there are two or more), the contender runs in its own process (pinned to the
other CPUs) and the figures are taken from the simulator's counters and the kernel's
account of the contender process (``benchmarks/harness.py``). The simulator's own
capacity (``benchmarks/sim_throughput.py``) is measured in the same run, so a reader sees
whether a ceiling is the tier's or the simulator's. Writes ``benchmarks/results.json``
(raw figures) and ``benchmarks/RESULTS.md`` (tables, the machine, the date, the command,
the chaos soak's figures from ``benchmarks/soak.json`` when present, and the discussion in
``benchmarks/notes.md``); ``--render`` rewrites RESULTS.md from results.json alone. Every
process is stopped by a timeout if it hangs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import datetime
import json
import os
import platform
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    REPO,
    Figures,
    SimSettings,
    Simulator,
    measure,
    run_process,
    wait_sampling,
)
from benchmarks.report import render

HERE = Path(__file__).resolve().parent
PRESETS = (
    "square_1_1",
    "widescreen_16_9",
    "portrait_2_3",
    "social_post_4_5",
    "classic_4_3",
)
SUBJECTS = ("leather handbag", "ceramic mug", "running shoe", "desk lamp", "wrist watch")
SCENES = ("on marble", "in soft light", "on a beach", "studio shot", "floating")


@dataclass(slots=True)
class Scenario:
    name: str
    sim: SimSettings
    #: Rows each contender runs (contenders left out do not run in this scenario).
    rows: dict[str, int]
    note: str = ""
    #: CPU spinners running through the scenario, on every CPU (the simulator's too): a
    #: machine busy with other work, as a shared CI runner or a worker running other jobs.
    busy: int = 0
    figures: list[Figures] = field(default_factory=list)

    def description(self) -> str:
        said = self.sim.describe()
        if self.busy:
            said += f"; the machine kept busy by {self.busy} CPU spinners (load about +{self.busy})"
        return said


def scenarios(quick: bool) -> list[Scenario]:
    """Row counts sized so the suite fits its time budget (20 minutes on 2 shared cores).

    The webhook contender runs where polls matter most (the standard tier); Prefect's
    contenders pay 15-25 s of start-up per run, so they run fewer scenarios and rows.
    """

    def rows(
        vendor: int,
        naive: int,
        prefect: int,
        klein: int,
        flow: int = 0,
        webhook: int = 0,
        probes: int = 0,
    ) -> dict[str, int]:
        counts = {"vendor-sample": vendor, "naive-async": naive, "prefect-map": prefect}
        counts["klein-batch"] = klein
        counts["klein-batch-probes"] = probes
        counts["klein-batch-webhook"] = webhook
        counts["klein-batch-flow"] = flow
        return {name: count for name, count in counts.items() if count}

    standard = SimSettings("standard", 24, 3600, 1.0, 2.5)
    scale = SimSettings("scale", 96, 14400, 0.5, 1.25)
    # The real API's shape (klein 9B measured by a third party): queueing dominates.
    production = SimSettings(
        "standard", 24, 3600, 2.7, 29.0, latency_preset="production", cap_s=120.0
    )
    if quick:
        # A smoke run of every part but Prefect (its first start alone takes ~30 s here).
        return [
            Scenario("standard", standard, rows(4, 120, 0, 120, webhook=120)),
            Scenario("scale", scale, rows(0, 300, 0, 300)),
            Scenario("scale-busy", scale, rows(0, 300, 0, 300), busy=BUSY_SPINNERS),
            Scenario("standard-faults", with_faults(standard), rows(0, 120, 0, 120)),
        ]
    return [
        Scenario("standard", standard, rows(20, 800, 300, 800, flow=800, webhook=800, probes=800)),
        Scenario("scale", scale, rows(20, 2000, 500, 2000, flow=2000, probes=2000)),
        Scenario("scale-busy", scale, rows(0, 2000, 0, 2000), busy=BUSY_SPINNERS),
        Scenario("standard-faults", with_faults(standard), rows(0, 400, 0, 400, probes=400)),
        Scenario("scale-faults", with_faults(scale), rows(0, 1200, 0, 1200, flow=1200)),
        # Left out of --quick: one run takes 2-4 minutes, most of it the slowest tasks.
        Scenario("production", production, rows(0, 400, 0, 400, probes=400)),
    ]


#: Spinners of the busy scenario: as many as this machine's two cores, so every process of
#: the benchmark (simulator and client) shares its CPU with one that never sleeps.
BUSY_SPINNERS = 2


@contextlib.contextmanager
def spinners(count: int) -> Iterator[None]:
    """``count`` processes that only burn CPU, unpinned, for the length of the block."""
    spinning = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for process in spinning:
            process.kill()
            process.wait()


def with_faults(settings: SimSettings) -> SimSettings:
    """The same API on a bad day: 5% 503s and 2% dropped connections on every endpoint
    (the task list too)."""
    return SimSettings(**{**_fields(settings), "error_503": 0.05, "drop": 0.02})


def _fields(settings: SimSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in SimSettings.__slots__}


# --- manifests --------------------------------------------------------------------------------


def write_manifest(path: Path, rows: int) -> None:
    """Distinct 1k JPEG requests over five presets: nothing is served from a cache."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prompt", "aspect_ratio", "resolution", "seed", "output_format"])
        for i in range(rows):
            writer.writerow(
                [
                    f"sku-{i:07d}",
                    f"{SUBJECTS[i % 5]} {SCENES[i // 5 % 5]}, product photo, variant {i}",
                    PRESETS[i % len(PRESETS)],
                    "1k",
                    i,
                    "jpeg",
                ]
            )


def write_big_manifest(path: Path, rows: int) -> None:
    """The sweep's manifests, written with polars (a million rows in a second or two)."""
    import polars as pl

    index = pl.int_range(0, rows, eager=True)
    frame = pl.DataFrame({"i": index}).select(
        pl.format("sku-{}", pl.col("i").cast(pl.String).str.zfill(7)).alias("id"),
        pl.format("{} {}, product photo, variant {}", *_cycled_names(), pl.col("i")).alias(
            "prompt"
        ),
        pl.col("i")
        .mod(len(PRESETS))
        .replace_strict(dict(enumerate(PRESETS)))
        .alias("aspect_ratio"),
        pl.lit("1k").alias("resolution"),
        pl.col("i").alias("seed"),
        pl.lit("jpeg").alias("output_format"),
    )
    frame.write_csv(path)


def _cycled_names() -> list[Any]:
    import polars as pl

    subject = pl.col("i").mod(5).replace_strict(dict(enumerate(SUBJECTS)))
    scene = (pl.col("i") // 5).mod(5).replace_strict(dict(enumerate(SCENES)))
    return [subject, scene]


# --- contenders -------------------------------------------------------------------------------


def klein_batch_bin() -> list[str]:
    script = Path(sys.executable).with_name("klein-batch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


def flows_available() -> bool:
    """Contender (e) needs the Prefect flow ``flows.catalog.generate_catalog`` (issue 4)."""
    try:
        from flows.catalog import generate_catalog  # noqa: F401
    except ImportError:
        return False
    return True


def webhooks_available() -> bool:
    """The webhook contender needs ``klein-batch run --webhook-listen`` (the webhook issue)."""
    import subprocess

    try:
        shown = subprocess.run(
            [*klein_batch_bin(), "run", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--webhook-listen" in shown.stdout


def available(contender: str) -> bool:
    if contender == "klein-batch-flow":
        return flows_available()
    if contender == "klein-batch-webhook":
        return webhooks_available()
    return True


def command_for(
    contender: str, manifest: Path, url: str, out: Path, sim: SimSettings, rows: int
) -> list[str]:
    common = [str(manifest), "--api-url", url, "--out", str(out)]
    if contender in ("klein-batch", "klein-batch-webhook", "klein-batch-probes"):
        # The webhook contender receives task endings on a free loopback port; it still
        # polls, on its own slower schedule, in case a delivery is lost. The probes one
        # never reads the task list: what klein-batch did without it, side by side.
        hooks = {
            "klein-batch-webhook": ["--webhook-listen", "127.0.0.1:0"],
            "klein-batch-probes": ["--no-task-list"],
        }.get(contender, [])
        return [
            *klein_batch_bin(),
            "run",
            *common,
            "--tier",
            sim.tier,
            "--limit",
            str(rows),
            "--progress",
            "plain",
            *hooks,
        ]
    if contender == "klein-batch-flow":
        # Its own command line (``python -m flows.catalog``), defaults for shards. The
        # Prefect home is shared by the whole suite, and an existing global concurrency
        # limit is respected as it is: a fresh name per run gets the tier's own slots.
        limits = ["--tier", sim.tier, "--limit", str(rows)]
        lease = ["--concurrency-limit", f"bench-{sim.tier}-{secrets.token_hex(4)}"]
        return [sys.executable, "-m", "flows.catalog", *common, *limits, *lease]
    module = {
        "vendor-sample": "vendor_sample",
        "naive-async": "naive_async",
        "prefect-map": "prefect_map",
    }[contender]
    return [
        sys.executable,
        "-m",
        f"benchmarks.contenders.{module}",
        *common,
        "--max-active",
        str(sim.max_active),
        "--limit",
        str(rows),
    ]


def contender_env(
    prefect_home: Path, key: str, webhook_secret: str | None = None
) -> dict[str, str]:
    """A clean environment: the benchmark key, ephemeral Prefect, nothing of the caller's."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PREFECT_", "FREEPIK_", "BFL_", "AWS_"))
    }
    # An installed package has its bytecode compiled (pip and uv do it at install); with
    # this set and a checkout's stale or missing caches, every contender process compiled
    # the pipeline's modules again (about 0.09 s of CPU per run).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(
        FREEPIK_API_KEY=key,
        PYTHONPATH=str(REPO),
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    if webhook_secret:
        env["FREEPIK_WEBHOOK_SECRET"] = webhook_secret
    return env


def warm_prefect(prefect_home: Path, log_dir: Path) -> None:
    """Create Prefect's local database once, untimed: a user's machine has it already, and
    its first-time migrations (tens of seconds on one core) are not per-run overhead."""
    code = "from prefect import flow\nflow(lambda: None, name='warm-up')()\n"
    _, reaper, _ = run_process(
        [sys.executable, "-c", code],
        env=contender_env(prefect_home, "unused"),
        log=log_dir / "prefect-warm-up.log",
        timeout_s=300,
        cpus=[],
    )
    reaper.join()


def expected_seconds(sim: SimSettings, rows: int, contender: str) -> float:
    """A generous upper bound on a contender's run, for its timeout."""
    import math

    sigma = math.log(sim.p95_s / sim.median_s) / 1.645
    mean = sim.median_s * math.exp(sigma * sigma / 2)
    if contender == "vendor-sample":
        return rows * (mean + 1.0) * 2 + 60
    # At least 50 images a second: short tasks are limited by the simulator, not the tier.
    return max(rows * mean / sim.max_active * 4, rows / 50) + 90


#: Whether each optional contender can run here, decided once per suite.
ready: dict[str, bool] = {}


def run_scenario(
    scenario: Scenario,
    cpus: tuple[list[int], list[int]],
    log_dir: Path,
    *,
    big: bool = False,
    prune_images: bool = False,
) -> None:
    """Each contender of ``scenario`` against a fresh simulator; ``big`` writes the manifest
    with polars (``write_big_manifest``: a million rows in seconds, not minutes);
    ``prune_images`` deletes images as they land (``harness.measure``)."""
    sim_cpus, client_cpus = cpus
    biggest = max(scenario.rows.values())
    with (
        tempfile.TemporaryDirectory(prefix=f"bench-{scenario.name}-") as tmp,
        spinners(scenario.busy),
    ):
        root = Path(tmp)
        manifest = root / "manifest.csv"
        (write_big_manifest if big else write_manifest)(manifest, biggest)
        for contender, rows in scenario.rows.items():
            if contender not in ready:
                ready[contender] = available(contender)
            if not ready[contender]:
                continue
            key = "bench-" + secrets.token_hex(12)
            settings = scenario.sim
            hook_secret = None
            if contender == "klein-batch-webhook":
                hook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
                settings = SimSettings(**{**_fields(settings), "webhook_secret": hook_secret})
            workdir = root / contender
            workdir.mkdir()
            out = workdir / "out"
            with Simulator(settings, workdir, key, sim_cpus) as sim:
                command = command_for(contender, manifest, sim.url, out, scenario.sim, rows)
                log = log_dir / f"{scenario.name}-{contender}.log"
                print(f"[{scenario.name}] {contender}: {rows} rows ...", flush=True)
                figures = measure(
                    contender,
                    command,
                    sim=sim,
                    rows=rows,
                    out=out,
                    env=contender_env(log_dir / "prefect-home", key, hook_secret),
                    log=log,
                    timeout_s=expected_seconds(scenario.sim, rows, contender),
                    cpus=client_cpus,
                    prune_images=prune_images,
                )
            print(
                f"    {figures.images}/{rows} images in {figures.wall_s:.1f} s, "
                f"utilization {figures.utilization:.3f} "
                f"(steady {figures.steady_utilization}), "
                f"{figures.polls_per_image} polls/image, {figures.cpu_s_per_1000} CPU s/1000, "
                f"{figures.peak_rss_mb:.0f} MB, first submit {figures.first_submit_s} s, "
                f"{figures.rate_limited} 429s",
                flush=True,
            )
            scenario.figures.append(figures)


# --- the manifest-size sweep ------------------------------------------------------------------

#: Disk a full run of the sweep takes per row: its journal (about 0.75 KB), manifest and
#: report rows, with a margin. The images themselves (61 KiB each, 60 GB at a million rows)
#: are deleted as they land, since the sweep measures the client's memory, not the disk.
#: Checked before starting, not after an hour when the disk fills.
FULL_RUN_BYTES_PER_ROW = 3_000


def _disk_shortfall(rows: int) -> str | None:
    """Why a full run of ``rows`` cannot fit in the temporary folder, or None if it can."""
    folder = Path(tempfile.gettempdir())
    free = shutil.disk_usage(folder).free
    needed = rows * FULL_RUN_BYTES_PER_ROW
    if free >= needed:
        return None
    return (
        f"needs about {needed / 1e9:.0f} GB free in {folder} for its journal and manifest, "
        f"{free / 1e9:.0f} GB are (TMPDIR chooses the folder)"
    )


def run_sweep(sizes: list[int], full_runs: list[int], cpus: list[int], log_dir: Path) -> dict:
    """Planning (``klein-batch run --dry-run``) at each size, and full runs where time allows."""
    results: dict[str, Any] = {"dry_run": [], "full_run": []}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = Path(tmp)
        for size in sizes:
            manifest = root / f"sweep-{size}.csv"
            write_big_manifest(manifest, size)
            command = [
                *klein_batch_bin(),
                "run",
                str(manifest),
                "--dry-run",
                "--api-url",
                "http://127.0.0.1:9",
                "--out",
                str(root / "dry"),
            ]
            env = contender_env(log_dir / "prefect-home", "unused")
            print(f"[sweep] dry run, {size} rows ...", flush=True)
            _, reaper, outcome = run_process(
                command,
                env=env,
                log=log_dir / f"sweep-dry-{size}.log",
                timeout_s=300,
                cpus=cpus,
            )
            wait_sampling(reaper, outcome, 0.05)
            wall = outcome["ended"] - outcome["started"]
            entry = {
                "rows": size,
                "manifest_mb": round(manifest.stat().st_size / 2**20, 1),
                "exit_code": outcome.get("exit_code"),
                "timed_out": outcome["timed_out"],
                "wall_s": round(wall, 3),
                "cpu_s": round(outcome["cpu_s"], 3),
                "cpu_us_per_row": round(outcome["cpu_s"] * 1e6 / size, 2),
                "peak_rss_mb": round(outcome["memory"].peak_mb, 1),
            }
            print(f"    {entry}", flush=True)
            results["dry_run"].append(entry)
            manifest.unlink()
        # The scale tier with short tasks (0.1 s median): the run's length is then the
        # simulator's (about 100-300 images/s on one core), and its memory is the client's
        # at that many rows. An enterprise key would measure the simulator, not the client.
        full = SimSettings("scale", 96, 14400, 0.1, 0.25)
        results["full_run_sim"] = full.describe()
        for size in full_runs:
            short = _disk_shortfall(size)
            if short:
                print(f"[sweep] full run, {size} rows: not run: {short}", flush=True)
                results.setdefault("full_run_skipped", []).append({"rows": size, "why": short})
                continue
            scenario = Scenario(f"sweep-full-{size}", full, {"klein-batch": size})
            run_scenario(
                scenario, (cpus_for_sim(), cpus), log_dir, big=size > 100_000, prune_images=True
            )
            results["full_run"].append(scenario.figures[0].as_dict())
    return results


# --- the simulator's own ceiling -------------------------------------------------------------


def run_sim_throughput(quick: bool, log_dir: Path) -> dict[str, Any]:
    """``benchmarks/sim_throughput.py`` in this run, on this machine and load.

    At the scale tier the ceiling (about 164 images/s) is close to what one simulator
    process serves on one core; this says whether a scale-tier figure is the client's
    or the simulator's.
    """
    images = 300 if quick else 2000
    target = log_dir / "sim-throughput.json"
    command = [
        sys.executable,
        str(HERE / "sim_throughput.py"),
        "--images",
        str(images),
        "--png-images",
        "0",
        "--json",
        str(target),
    ]
    print(f"[simulator] throughput, {images} images ...", flush=True)
    _, reaper, outcome = run_process(
        command,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        log=log_dir / "sim-throughput.log",
        timeout_s=300,
        cpus=[],
    )
    reaper.join()
    if outcome.get("exit_code") != 0 or not target.exists():
        return {"error": f"exit code {outcome.get('exit_code')}, see sim-throughput.log"}
    measured = json.loads(target.read_text())
    measured["command"] = shlex.join(["python", "benchmarks/sim_throughput.py", *command[2:-2]])
    print(f"    {measured['figures']}", flush=True)
    return measured


# --- the machine and the report --------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gb": round(ram_gb, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def source_commit() -> str | None:
    """The commit measured, with ``+changes`` when the tree differs from it; None outside git.

    The suite's own outputs do not count as changes: ``--merge`` starts from a
    ``results.json`` another run wrote, and the file is rewritten at the end anyway."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git(
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":!benchmarks/results.json",
            ":!benchmarks/RESULTS.md",
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" +changes" if changed else "")


def cpus_for_sim() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[:1] if len(cpus) > 1 else []


def cpus_for_client() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[1:] if len(cpus) > 1 else []


def merged(previous: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """``previous`` with the parts ``now`` ran replaced: scenarios by name, the simulator's
    ceiling and the sweep whole. The header (command, commit, machine) is the scenarios':
    it stays ``previous``'s unless scenarios ran now; the sweep carries its own stamp."""
    ran = {scenario["name"] for scenario in now["scenarios"]}
    result = dict(now if ran else previous)
    kept = [s for s in previous.get("scenarios", []) if s["name"] not in ran]
    order = [s["name"] for s in previous.get("scenarios", [])]
    scenarios = kept + now["scenarios"]
    scenarios.sort(key=lambda s: order.index(s["name"]) if s["name"] in order else len(order))
    result["scenarios"] = scenarios
    for part in ("sim_throughput", "sweep"):
        if part in now:
            result[part] = now[part]
        elif part in previous:
            result[part] = previous[part]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of every part")
    parser.add_argument(
        "--only", nargs="*", help="scenario names (and/or 'sweep', 'simulator') to run"
    )
    parser.add_argument("--contenders", nargs="*", help="contender names to run")
    parser.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md/results.json go")
    parser.add_argument("--render", action="store_true", help="only re-render RESULTS.md")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep what results.json has for the parts not run now (the million-row sweep "
        "takes over an hour: run it apart from the scenarios, each part stamped)",
    )
    parser.add_argument(
        "--sweep-sizes",
        nargs="*",
        type=int,
        help="manifest sizes of the sweep's dry runs (default 10,000, 100,000 and 1,000,000)",
    )
    parser.add_argument(
        "--sweep-full",
        nargs="*",
        type=int,
        help="manifest sizes of the sweep's real runs against the simulator, for peak "
        "memory (default 4,000; 10000 1000000 is the memory goal's pair: hours here)",
    )
    args = parser.parse_args()
    json_path = args.out / "results.json"
    if args.render:
        (args.out / "RESULTS.md").write_text(render(json.loads(json_path.read_text())))
        return 0

    began = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    print(f"logs in {log_dir}", flush=True)
    cpus = (cpus_for_sim(), cpus_for_client())
    results: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks.run", *sys.argv[1:]]),
        "quick": args.quick,
        "commit": source_commit(),
        "machine": machine(),
        "pinning": {"simulator": cpus[0] or "unpinned", "client": cpus[1] or "unpinned"},
        "flows_available": flows_available(),
        "webhooks_available": webhooks_available(),
        "scenarios": [],
    }
    chosen = []
    for scenario in scenarios(args.quick):
        if args.only and scenario.name not in args.only:
            continue
        if args.contenders:
            scenario.rows = {k: v for k, v in scenario.rows.items() if k in args.contenders}
        chosen.append(scenario)
    if any(name in s.rows for s in chosen for name in ("prefect-map", "klein-batch-flow")):
        started = time.monotonic()
        warm_prefect(log_dir / "prefect-home", log_dir)
        print(f"Prefect's local database created in {time.monotonic() - started:.0f} s", flush=True)
    if not args.only or "simulator" in args.only:
        results["sim_throughput"] = run_sim_throughput(args.quick, log_dir)
    for scenario in chosen:
        run_scenario(scenario, cpus, log_dir)
        results["scenarios"].append(
            {
                "name": scenario.name,
                "sim": _fields(scenario.sim),
                "busy": scenario.busy,
                "description": scenario.description(),
                "figures": [f.as_dict() for f in scenario.figures],
            }
        )
    if not args.only or "sweep" in args.only:
        sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
        full_runs = [] if args.quick else [4_000]
        if args.sweep_sizes is not None:
            sizes = args.sweep_sizes
        if args.sweep_full is not None:
            full_runs = args.sweep_full
        load_before = [round(x, 2) for x in os.getloadavg()]
        results["sweep"] = run_sweep(sizes, full_runs, cpus[1], log_dir)
        results["sweep"]["measured"] = {
            "command": results["command"],
            "commit": results["commit"],
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()],
        }
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.merge and json_path.exists():
        results = merged(json.loads(json_path.read_text()), results)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "RESULTS.md").write_text(render(results))
    print(f"wrote {json_path} and RESULTS.md in {time.monotonic() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
