"""`klein-batch run s3://... --out s3://...` as a user runs it, including kill -9 and a
resume on a machine that has nothing local (the work dir deleted)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from s3_helpers import catalog_csv, png, read_s3_parquet

from pipeline.sim import SimConfig, SimServer
from pipeline.sim.config import KeyConfig, LatencyConfig

KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")
SECRETS = ("klein-test-secret-key", "klein-test-access-key")


def cli_env(work_root: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FREEPIK_API_KEY", "BFL_API_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    }
    env["KLEIN_BATCH_WORK_DIR"] = str(work_root)
    env.update(extra)
    return env


def put_catalog(s3_client: Any, bucket: str, rows: int) -> str:
    s3_client.put_object(Bucket=bucket, Key="in/shots/red.png", Body=png((200, 30, 30)))
    s3_client.put_object(Bucket=bucket, Key="library/blue.png", Body=png((30, 30, 200)))
    s3_client.put_object(
        Bucket=bucket, Key="in/catalog.csv", Body=catalog_csv(bucket, rows).encode()
    )
    return f"s3://{bucket}/in/catalog.csv"


def test_cli_runs_s3_to_s3_with_the_endpoint_flag(
    bucket: str, s3_client: Any, moto_url: str, work_root: Path, tmp_path: Path
) -> None:
    manifest = put_catalog(s3_client, bucket, 6)
    out = f"s3://{bucket}/out/cli"
    sim_toml = tmp_path / "sim.toml"
    sim_toml.write_text("[latency]\nmedian_s = 0.05\np95_s = 0.1\n", encoding="utf-8")
    result = subprocess.run(
        [
            KLEIN_BATCH,
            "run",
            manifest,
            "--out",
            out,
            "--sim-config",
            str(sim_toml),
            "--s3-endpoint-url",
            moto_url,
        ],
        capture_output=True,
        text=True,
        env=cli_env(work_root),
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 rows: 6 succeeded" in result.stdout
    assert f"output: {out}" in result.stdout
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr
    manifest_out = read_s3_parquet(f"{out}/manifest.parquet", moto_url)
    assert manifest_out["status"].to_list() == ["succeeded"] * 6
    run_json = s3_client.get_object(Bucket=bucket, Key="out/cli/run.json")
    assert run_json["ContentType"] == "application/json"
    body = run_json["Body"].read().decode()
    assert '"succeeded": 6' in body
    for secret in SECRETS:
        assert secret not in body


def test_cli_errors_for_s3_mistakes_are_one_line(
    bucket: str, moto_url: str, work_root: Path, tmp_path: Path
) -> None:
    cases = [
        (
            [
                "run",
                f"s3://{bucket}/nope.csv",
                "--out",
                "out",
                "--sim",
                "--s3-endpoint-url",
                moto_url,
            ],
            "nope.csv: no such object",
        ),
        (
            [
                "run",
                f"s3://{bucket}/x.csv",
                "--out",
                "out",
                "--sim",
                "--s3-endpoint-url",
                "ftp://host",
            ],
            "--s3-endpoint-url 'ftp://host' is not allowed",
        ),
        (
            [
                "run",
                "s3://klein-missing-bucket/x.csv",
                "--out",
                "out",
                "--sim",
                "--s3-endpoint-url",
                moto_url,
            ],
            "bucket 'klein-missing-bucket' does not exist",
        ),
    ]
    for args, message in cases:
        result = subprocess.run(
            [KLEIN_BATCH, *args],
            capture_output=True,
            text=True,
            env=cli_env(work_root),
            timeout=60,
            cwd=tmp_path,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.slow
def test_kill_9_then_resume_from_s3_alone(
    bucket: str, s3_client: Any, moto_url: str, work_root: Path, tmp_path: Path
) -> None:
    rows = 48
    manifest = put_catalog(s3_client, bucket, rows)
    out = f"s3://{bucket}/out/crash"
    slow = SimConfig(keys=[KeyConfig(max_active=4)], latency=LatencyConfig(median_s=0.4, p95_s=0.6))
    with SimServer.in_thread(slow) as sim:
        args = [
            KLEIN_BATCH,
            "run",
            manifest,
            "--out",
            out,
            "--api-url",
            sim.url,
            "--max-active",
            "4",
            "--s3-endpoint-url",
            moto_url,
            "--progress",
            "off",
        ]
        env = cli_env(work_root, FREEPIK_API_KEY=slow.keys[0].key, KLEIN_BATCH_SYNC_S="0.2")
        proc = subprocess.Popen(
            args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 60
            parts: list[str] = []
            while time.monotonic() < deadline and len(parts) < 3:
                listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="out/crash/.klein/parts/")
                parts = [item["Key"] for item in listed.get("Contents", [])]
                time.sleep(0.1)
            assert len(parts) >= 3, "no partial manifests appeared while the run went"
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        # Records written before the crash: readable right away, no manifest.parquet yet.
        recorded = pl.concat(
            [read_s3_parquet(f"s3://{bucket}/{key}", moto_url) for key in sorted(parts)]
        )
        assert recorded.height >= 1
        assert set(recorded["status"]) == {"succeeded"}
        assert "Contents" not in s3_client.list_objects_v2(
            Bucket=bucket, Prefix="out/crash/manifest.parquet"
        )
        shutil.rmtree(work_root)  # a fresh machine: only S3 knows what happened
        known = _acknowledged_in_snapshot(s3_client, bucket, tmp_path / "snapshot.sqlite")
        before = sum(key["submits_accepted"] for key in sim.stats()["keys"].values())

        again = subprocess.run(
            args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        stats = sim.stats()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed:" in again.stdout
    final = read_s3_parquet(f"{out}/manifest.parquet", moto_url)
    assert final["row"].to_list() == list(range(1, rows + 1))  # every row exactly once
    assert set(final["status"]) == {"succeeded"}
    for row in final.iter_rows(named=True):
        key = row["output_uri"].removeprefix(f"s3://{bucket}/")
        assert s3_client.head_object(Bucket=bucket, Key=key)["ContentLength"] == row["bytes"]
    # Rows recorded in S3 before the kill were not generated again, and no task the journal's
    # snapshot in S3 knew was paid for again: the rerun submitted only rows it did not know.
    # (How many that is depends on how far the snapshot lagged at the kill: copied every
    # 0.2 s here, less often when a copy is slow on a loaded machine.)
    accepted = sum(key["submits_accepted"] for key in stats["keys"].values())
    assert accepted - before <= rows - known, (before, known, stats)


def _acknowledged_in_snapshot(s3_client: Any, bucket: str, local: Path) -> int:
    """Tasks acknowledged in the journal's snapshot in S3 (0 before the first one)."""
    try:
        s3_client.download_file(bucket, "out/crash/.klein/ledger.sqlite", str(local))
    except Exception:  # no snapshot yet
        return 0
    with contextlib.closing(sqlite3.connect(local)) as db:
        return int(db.execute("SELECT COUNT(task_id) FROM tasks").fetchone()[0])


@pytest.mark.slow
def test_kill_9_before_any_snapshot_then_resume_elsewhere_pays_no_acknowledged_task_again(
    bucket: str, s3_client: Any, moto_url: str, work_root: Path, tmp_path: Path
) -> None:
    """The journal's snapshot goes to S3 every 30 s here, so a machine lost before its first
    one leaves none; its acknowledgements went up every 0.1 s. Another machine resuming
    from S3 alone polls those tasks instead of paying for them again (before: every task
    acknowledged since the last snapshot, here half the manifest, was paid twice)."""
    rows = 48
    manifest = put_catalog(s3_client, bucket, rows)
    out = f"s3://{bucket}/out/lost"
    slow = SimConfig(keys=[KeyConfig(max_active=4)], latency=LatencyConfig(median_s=0.4, p95_s=0.6))
    with SimServer.in_thread(slow) as sim:
        args = [KLEIN_BATCH, "run", manifest, "--out", out, "--api-url", sim.url]
        args += ["--max-active", "4", "--s3-endpoint-url", moto_url, "--progress", "off"]
        env = cli_env(
            work_root,
            FREEPIK_API_KEY=slow.keys[0].key,
            KLEIN_BATCH_SYNC_S="30",
            KLEIN_BATCH_ACK_SYNC_S="0.1",
        )
        proc = subprocess.Popen(
            args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 60
            acked = 0
            while time.monotonic() < deadline and acked < rows // 2:
                listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="out/lost/.klein/acks/")
                acked = sum(
                    s3_client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().count(b"\n")
                    for item in listed.get("Contents", [])
                )
                time.sleep(0.05)
            assert acked >= rows // 2, "no acknowledgements reached the output"
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert "Contents" not in s3_client.list_objects_v2(
            Bucket=bucket, Prefix="out/lost/.klein/ledger.sqlite"
        )  # lost before its first snapshot
        shutil.rmtree(work_root)  # another machine: only S3 knows what happened
        again = subprocess.run(
            args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        stats = sim.stats()
    assert again.returncode == 0, again.stdout + again.stderr
    final = read_s3_parquet(f"{out}/manifest.parquet", moto_url)
    assert final["row"].to_list() == list(range(1, rows + 1))
    assert set(final["status"]) == {"succeeded"}
    accepted = sum(key["submits_accepted"] for key in stats["keys"].values())
    # Paid again: at most the submits in the air at the kill and the acks of its last 0.1 s.
    assert accepted <= rows + 4 + 2, stats
    assert "Contents" not in s3_client.list_objects_v2(
        Bucket=bucket, Prefix="out/lost/.klein/acks/"
    )  # removed once the manifest was published
