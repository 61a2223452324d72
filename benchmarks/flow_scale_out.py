"""The catalog deployment on two workers beside plain ``klein-batch run``, on one key.

    .venv/bin/python -m benchmarks.flow_scale_out [--rows 600] [--shard-size 150]
        [--parallel-shards 3] [--repeat 1]

One invocation starts a local Prefect server (PostgreSQL when installed), two process
workers, the repository's deployments and one simulated standard key (24 active tasks,
the simulator's default latency: median 1 s, p95 2.5 s), then alternates, on the same
manifest and the same key (its counters reset in between):

- ``klein-batch run MANIFEST --out DIR --tier standard`` as a user runs it;
- the ``nightly-catalog`` deployment, run on the pool (its parent flow run on a worker,
  runner flow runs of ``catalog-shard`` on both workers, ``flows/queue.py``).

Utilization is the simulator's busy slot-seconds over ``24 x wall``: for the plain run
its process's wall time, for the deployment the parent flow run's (start to end, as the
Prefect server recorded them). The ratio of the two is the figure of merit (issue 13: at
least 0.9). The machine's load average is recorded with every pair.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.prefect_pool import BIN, REPO, SHARD_DEPLOYMENT, runner_runs, sim_stats, work_pool

KEY = "sk-flow-scale-out-bench-7a1c"
TIER_ACTIVE = 24
SIM_TOML = f"""
[[keys]]
name = "shared"
key = "{KEY}"
tier = "standard"
"""
PROMPTS = (
    "a ceramic mug on a walnut table, soft daylight",
    "white sneakers on a pale grey background, studio light",
    "a leather backpack hanging on a hook, morning light",
    "a glass bottle of olive oil beside fresh basil",
    "a wool scarf folded on a linen sheet, overhead shot",
)


def load() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared: every figure needs it)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def write_manifest(path: Path, rows: int) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prompt", "sku"])
        for n in range(rows):
            writer.writerow([f"r{n:05d}", f"{PROMPTS[n % len(PROMPTS)]} (variant {n})", f"SKU{n}"])
    return path


def reset(sim_url: str) -> None:
    request = urllib.request.Request(f"{sim_url}/_sim/reset", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


def figures(stats: dict[str, Any], wall_s: float) -> dict[str, Any]:
    return {
        "wall_s": round(wall_s, 2),
        "utilization": round(stats["occupancy_s"] / (TIER_ACTIVE * wall_s), 3),
        "submits_accepted": stats["submits_accepted"],
        "submits_refused_429": stats["submits_refused"],
        "duplicate_submits": stats["duplicate_submits"],
        "max_active": stats["max_active"],
        "occupancy_s": round(stats["occupancy_s"], 1),
    }


def plain_run(manifest: Path, out: Path, pool: dict[str, Any]) -> dict[str, Any]:
    reset(pool["sim_url"])
    env = {k: v for k, v in pool["client"].items() if not k.startswith("PREFECT_")}
    env["FREEPIK_API_KEY"] = KEY
    command = [str(BIN / "klein-batch"), "run", str(manifest), "--out", str(out)]
    command += ["--api-url", pool["sim_url"], "--tier", "standard"]
    started = time.monotonic()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - started
    if done.returncode != 0:
        said = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"klein-batch run exited {done.returncode}: {said}")
    return figures(sim_stats(pool["sim_url"]), wall)


def deployment_run(
    manifest: Path, out: Path, pool: dict[str, Any], shard_size: int, parallel: int
) -> dict[str, Any]:
    reset(pool["sim_url"])
    parameters = {
        "manifest": str(manifest),
        # The run specification (pipeline/spec.py), as a deployment's parameters carry it.
        "spec": {"out": str(out), "api_url": pool["sim_url"], "tier": "standard"},
        "shard_size": shard_size,
        "parallel_shards": parallel,
        "api_key_block": "freepik-api-key",
        "shard_deployment": SHARD_DEPLOYMENT,
    }
    script = (
        "import asyncio, json, sys\n"
        "from prefect.deployments.flow_runs import arun_deployment\n"
        "run = asyncio.run(arun_deployment('generate-catalog/nightly-catalog', "
        "parameters=json.loads(sys.argv[1]), timeout=None, poll_interval=1))\n"
        "print(json.dumps({'id': str(run.id), 'state': run.state.type.value, "
        "'start': run.start_time.timestamp(), 'end': run.end_time.timestamp()}))\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "python"), "-c", script, json.dumps(parameters)],
        env=pool["client"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"deployment run failed: {done.stderr[-2000:]}")
    parent = json.loads(done.stdout.strip().splitlines()[-1])
    if parent["state"] != "COMPLETED":
        raise RuntimeError(f"the parent flow run ended {parent['state']}")
    result = figures(sim_stats(pool["sim_url"]), parent["end"] - parent["start"])
    result["wall_with_dispatch_s"] = round(wall, 2)
    summary = json.loads((out / "run.json").read_text())
    workers: dict[str, int] = {}
    for shard in summary.get("shards", []):
        workers[str(shard.get("worker"))] = workers.get(str(shard.get("worker")), 0) + 1
    result["shards_by_runner"] = workers
    result["parent_timeline"] = timeline(pool["api"], parent["id"], parent["start"])
    result["runners"] = {
        name: run["state_type"] for name, run in sorted(runner_runs(pool["api"]).items())
    }
    return result


def timeline(api: str, run_id: str, start: float) -> list[str]:
    """The parent's log lines, seconds from its start: where its wall time went."""
    body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    request = urllib.request.Request(
        f"{api}/logs/filter",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        logs = json.loads(answer.read())
    lines = []
    for entry in logs:
        at = datetime.fromisoformat(entry["timestamp"]).timestamp() - start
        lines.append(f"{at:7.2f} s  {entry['message'].splitlines()[0][:110]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--shard-size", type=int, default=150)
    parser.add_argument("--parallel-shards", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "flow_scale_out.json")
    args = parser.parse_args()
    pairs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="klein-flow-bench-") as tmp:
        work = Path(tmp)
        manifest = write_manifest(work / "catalog.csv", args.rows)
        with work_pool(work, SIM_TOML, KEY) as pool:
            for attempt in range(args.repeat):
                before = load()
                plain = plain_run(manifest, work / f"plain-{attempt}", pool)
                flow = deployment_run(
                    manifest,
                    work / f"flow-{attempt}",
                    pool,
                    args.shard_size,
                    args.parallel_shards,
                )
                pair = {
                    "load_before": before,
                    "load_after": load(),
                    "plain_run": plain,
                    "deployment": flow,
                    "ratio": round(flow["utilization"] / plain["utilization"], 3),
                }
                pairs.append(pair)
                print(json.dumps(pair, indent=2), flush=True)
            database = "postgresql" if pool["database"] else "sqlite"
    report = {
        "command": "python -m benchmarks.flow_scale_out "
        f"--rows {args.rows} --shard-size {args.shard_size} "
        f"--parallel-shards {args.parallel_shards} --repeat {args.repeat}",
        "prefect_database": database,
        "cpus": os.cpu_count(),
        "pairs": pairs,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    ratios = [pair["ratio"] for pair in pairs]
    print(f"utilization ratio deployment/plain: {ratios}")


if __name__ == "__main__":
    main()
