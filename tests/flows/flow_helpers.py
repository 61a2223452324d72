"""Manifests and a local S3 for the flow tests."""

from __future__ import annotations

import contextlib
import csv
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from pipeline import s3

PROMPTS = [
    "red mug on white",
    "blue mug on white",
    "green mug on oak",
    "black sneaker, studio",
    "white sneaker, street",
    "tan tote bag",
    "olive crossbody bag",
    "steel bottle",
    "amber candle",
    "brass desk lamp",
    "linen notebook",
]


def write_catalog(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A CSV manifest of (id, prompt, sku) rows; an empty prompt makes a rejected row."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prompt", "sku"])
        writer.writerows(rows)
    return path


def signal_when(
    command: list[str],
    env: dict[str, str],
    ready: Callable[[], int],
    sig: signal.Signals = signal.SIGINT,
    again_after_s: float | None = None,
) -> tuple[int, str, int]:
    """Run ``command``, press Ctrl-C (or send ``sig``) once ``ready()`` is not 0 (at most 2
    minutes), and ``again_after_s`` later once more if given (people press it twice);
    return its exit code, its output and what ``ready()`` said then."""
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        seen = 0
        for _ in range(1200):
            seen = ready()
            if seen:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert seen, "never ready"
        proc.send_signal(sig)
        if again_after_s is not None:
            time.sleep(again_after_s)
            proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, output, seen


def journal_submits(journals: Iterable[Path]) -> tuple[int, int]:
    """(acknowledged tasks, submits still waiting for their answer) in these journals (a
    run's ``.klein/ledger.sqlite``, a flow's shards'); one not there yet counts nothing."""
    acked = waiting = 0
    for path in journals:
        if not path.exists():
            continue
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            a, w = conn.execute(
                "SELECT COUNT(task_id), COALESCE(SUM(intent_pending), 0) FROM tasks"
            ).fetchone()
        except sqlite3.OperationalError:  # its tables are not there yet
            a = w = 0
        finally:
            conn.close()
        acked, waiting = acked + a, waiting + w
    return acked, waiting


@contextlib.contextmanager
def moto_bucket(
    monkeypatch: pytest.MonkeyPatch, work_dir: Path, *, access: str, secret: str, prefix: str
) -> Iterator[str]:
    """A fresh bucket on moto's server (127.0.0.1), with boto3's environment pointed at it."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("KLEIN_BATCH_WORK_DIR", str(work_dir))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    s3.reset_clients()
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=name)
    try:
        yield name
    finally:
        s3.reset_clients()
        server.stop()
