"""A nightly catalog into S3 on two workers, one of them lost mid-shard: what was paid twice.

    .venv/bin/python -m benchmarks.s3_night_lost_worker [--rows 150] [--shard-size 10]
        [--repeat 1]

A trial rather than a ratio: it starts moto's S3 server, a local Prefect server
(PostgreSQL when installed) with two process workers that keep their journals in work
dirs of their own (two machines), the repository's deployments and a simulated key of 6
active tasks (median 3 s, p95 5 s). It runs the catalog flow with runners on the pool into
``s3://night/nightly``, and once a runner on a worker is mid-shard (its journal written in
the last second, then 3 s more for acknowledgements in the air), kills that worker and
every process under it with SIGKILL. The surviving runners take the lost shard over from
its S3 snapshot and its ack files (``pipeline/remote_journal.py``). Printed per run: when
the worker was killed, the flow's exit and wall time, the simulator's accepted submits and
duplicates (paid twice), what the run.json says it spent and what the key was charged,
and how many acknowledged tasks the takeover took in from ack files instead of paying.
Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.ports import free_port
from benchmarks.prefect_pool import (
    BIN,
    REPO,
    SHARD_DEPLOYMENT,
    lose_machine,
    prefect_pool,
    shared_key_toml,
    sim_stats,
    simulator,
)

KEY = "sk-s3-night-lost-worker-1f2e"
SIM_TOML = shared_key_toml(KEY, 6, median_s=3.0, p95_s=5.0)
CONFIG_TOML = 'tier = "six"\n[tiers.six]\nmax_active = 6\nsubmits_per_minute = 900\n'
PROMPTS = ("red mug on white", "blue tote bag", "brass desk lamp", "linen notebook")


def write_manifest(path: Path, rows: int) -> Path:
    lines = ["id,prompt,sku"]
    lines += [f"s{n:04d},{PROMPTS[n % len(PROMPTS)]} {n},SKU{n}" for n in range(1, rows + 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def one_night(folder: Path, rows: int, shard_size: int, endpoint: str) -> dict[str, Any]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"night-{folder.name}"
    s3.create_bucket(Bucket=bucket)
    manifest = write_manifest(folder / "catalog.csv", rows)
    (folder / "klein.toml").write_text(CONFIG_TOML, encoding="utf-8")
    (folder / "pool").mkdir(parents=True)
    with (
        prefect_pool(folder / "pool", KEY, own_work_dirs=True) as pool,
        simulator(folder / "sim", SIM_TOML, pool["base"]) as sim_url,
    ):
        command = [
            str(BIN / "python"), "-m", "flows.catalog", str(manifest),
            "--out", f"s3://{bucket}/nightly", "--api-url", sim_url,
            "--config", str(folder / "klein.toml"), "--shard-size", str(shard_size),
            "--parallel-shards", "3", "--api-key-block", "freepik-api-key",
            "--shard-deployment", SHARD_DEPLOYMENT, "--s3-endpoint-url", endpoint,
        ]  # fmt: skip
        env = pool["client"] | {"KLEIN_BATCH_WORK_DIR": str(folder / "work-parent")}
        with (folder / "flow.log").open("wb") as log:
            flow = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=log)
            started = time.monotonic()
            lost: tuple[str, float, int] | None = None
            while lost is None and time.monotonic() - started < 240:
                for name, worker in pool["workers"].items():
                    journals = list((folder / "pool" / f"work-{name}").glob("*/ledger.sqlite"))
                    if journals and time.time() - max(j.stat().st_mtime for j in journals) < 1:
                        time.sleep(3)  # acknowledgements in the air, no snapshot of them yet
                        accepted = sim_stats(sim_url)["submits_accepted"]
                        lose_machine(worker.pid)
                        lost = (name, time.monotonic() - started, accepted)
                        break
                time.sleep(0.3)
            code = flow.wait(timeout=900)
            wall = time.monotonic() - started
        stats = sim_stats(sim_url)
    run = json.loads(s3.get_object(Bucket=bucket, Key="nightly/run.json")["Body"].read())
    logs = [(folder / "flow.log").read_text(errors="replace")]
    logs += [p.read_text(errors="replace") for p in (folder / "pool").glob("worker-*.log")]
    adopted = sum(
        int(line.split(" tasks acknowledged after")[0].rsplit(" ", 1)[-1])
        for text in logs
        for line in text.splitlines()
        if " tasks acknowledged after the journal's last snapshot" in line
    )
    return {
        "lost": lost[0] if lost else None,
        "killed_at_s": round(lost[1], 1) if lost else None,
        "accepted_at_kill": lost[2] if lost else None,
        "exit": code,
        "wall_s": round(wall, 1),
        "rows": rows,
        "submits_accepted": stats["submits_accepted"],
        "paid_twice": stats["submits_accepted"] - rows,
        "duplicate_submits": stats["duplicate_submits"],
        "acks_taken_in": adopted,
        "run_json_credits": run["credits"],
        "charged": stats.get("credits_charged"),
        "succeeded": run["counts"]["succeeded"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=150)
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    os.environ.update(
        AWS_ACCESS_KEY_ID="trial", AWS_SECRET_ACCESS_KEY="trial", AWS_DEFAULT_REGION="us-east-1"
    )
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        with tempfile.TemporaryDirectory(prefix="klein-s3-night-") as scratch:
            for number in range(1, args.repeat + 1):
                folder = Path(scratch) / f"n{number}"
                folder.mkdir()
                result = one_night(folder, args.rows, args.shard_size, f"http://127.0.0.1:{port}")
                print(json.dumps(result), flush=True)
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
