"""Shared checks for the end-to-end tests: manifests in, the whole output verified.

``check_output`` is the heart of every test here: whatever the simulator did to a run, the
output must account for every input row exactly once, in input order, and every image the
manifest calls succeeded must be on disk, decode, and match what the manifest records.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image

from pipeline.contract import RowStatus, bfl_size, output_size
from pipeline.output_manifest import FIXED_SCHEMA
from pipeline.retry import RetryPolicy
from pipeline.run import RunOptions, arun_manifest
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer
from pipeline.summary import RunSummary

REPO = Path(__file__).resolve().parents[2]
KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")
SIM_KEY = KeyConfig().key
TERMINAL = {str(status) for status in RowStatus}
#: Fast tasks: a test is about what happens to rows, not about waiting for them.
FAST = LatencyConfig(median_s=0.05, p95_s=0.1)
#: The production policy's shape with shorter waits, so a fault's retries cost milliseconds.
QUICK_RETRY = RetryPolicy(initial_backoff_s=0.02, max_backoff_s=0.5, max_elapsed_s=60.0)


def sim_config(**changes: Any) -> SimConfig:
    """A simulator with fast tasks and one key (standard tier unless ``keys`` says otherwise)."""
    config = SimConfig(latency=LatencyConfig(median_s=FAST.median_s, p95_s=FAST.p95_s))
    for name, value in changes.items():
        setattr(config, name, value)
    config.validate()
    return config


def fast_options(**changes: Any) -> RunOptions:
    options = RunOptions(
        expected_latency_s=FAST.median_s, progress_interval_s=0.05, retry=QUICK_RETRY
    )
    for name, value in changes.items():
        setattr(options, name, value)
    return options


def write_catalog(
    folder: Path,
    n: int,
    *,
    name: str = "catalog.csv",
    prompt: str | Sequence[str] = "studio photo of mug {i}",
    extra: dict[str, Sequence[str]] | None = None,
    output_format: str = "jpeg",
) -> Path:
    """A CSV manifest of ``n`` distinct rows with ids, a SKU column and any ``extra`` columns."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = {
        "id": [f"item-{i:04d}" for i in range(n)],
        "sku": [f"SKU{i:05d}" for i in range(n)],
        "prompt": [prompt.format(i=i) for i in range(n)] if isinstance(prompt, str) else prompt,
        "output_format": [output_format] * n,
        **(extra or {}),
    }
    path = folder / name
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for values in zip(*columns.values(), strict=True):
            writer.writerow(values)
    return path


def run_against(
    server: SimServer,
    manifest: Any,
    out: Path,
    *,
    key: str = SIM_KEY,
    options: RunOptions | None = None,
) -> RunSummary:
    """``run_manifest`` against an already running simulator (its counters stay readable)."""
    return asyncio.run(
        arun_manifest(
            manifest, out, api_url=server.url, api_key=key, options=options or fast_options()
        )
    )


def key_stats(server: SimServer, name: str = "demo") -> dict[str, Any]:
    return server.stats()["keys"][name]


#: ``check_output`` decodes every PNG and this share of JPEGs at full size, the other JPEGs
#: at 1/8 scale (as tests/chaos does).
FULL_DECODE_EVERY = 20


def check_output(
    out: Path, n_rows: int, summary: RunSummary | None = None, *, dialect: str = "klein"
) -> pl.DataFrame:
    """Everything a data team relies on, checked row by row and image by image.

    ``dialect`` picks the size table: dialect bfl caps a 2k square to fit 4 MP.
    """
    size_of = bfl_size if dialect == "bfl" else output_size
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert manifest.height == n_rows
    assert manifest["row"].to_list() == list(range(1, n_rows + 1))
    assert manifest.columns[: len(FIXED_SCHEMA)] == FIXED_SCHEMA.names
    assert set(manifest["status"].to_list()) <= TERMINAL
    not_ok = manifest.filter(pl.col("status") != "succeeded")
    assert not_ok["reason"].null_count() == 0, not_ok.select("row", "status", "reason")
    assert all(reason.strip() for reason in not_ok["reason"].to_list())
    images = out / "images"
    stored = {p.name for p in images.iterdir()} if images.exists() else set()
    succeeded = manifest.filter(pl.col("status") == "succeeded")
    assert succeeded["reason"].null_count() == succeeded.height
    for record in succeeded.iter_rows(named=True):
        path = Path(record["output_uri"])
        assert path.parent == images.resolve(), record
        assert path.name == f"{record['key']}.{'jpg' if record['format'] == 'jpeg' else 'png'}"
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        assert len(data) == record["bytes"]
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if image.format == "JPEG" and record["row"] % FULL_DECODE_EVERY:
                # At 1/8 scale every entropy-coded block is still read (a cut file fails to
                # load), at about a quarter of a full decode's CPU.
                image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
            assert image.format == {"jpeg": "JPEG", "png": "PNG"}[record["output_format"]]
            assert size == (record["width"], record["height"])
            assert size == size_of(record["aspect_ratio"], record["resolution"])
        assert record["format"] == record["output_format"]
        if record["reused_from"] is None:
            assert record["task_id"]
            assert record["cost_credits"] > 0
        else:  # copied from the library: no task of this run made it, nothing was paid
            assert record["task_id"] is None
            assert record["cost_credits"] == 0
        assert record["seed"] is not None
        assert record["finished_at"] >= record["queued_at"]
    # No image the manifest does not account for (a stale or duplicated file).
    assert stored == {Path(uri).name for uri in succeeded["output_uri"].to_list()}
    report = json.loads((out / "run.json").read_text(encoding="utf-8"))
    counts = dict(manifest.group_by("status").len().iter_rows())
    assert {k: v for k, v in report["counts"].items() if v} == counts
    assert report["total_rows"] == n_rows
    if summary is not None:
        assert summary.counts == report["counts"]
        assert summary.total_rows == n_rows
    return manifest


def statuses(manifest: pl.DataFrame) -> dict[str, int]:
    return dict(manifest.group_by("status").len().iter_rows())


# --- the pipeline and the simulator as real processes ---------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FREEPIK_API_KEY", "BFL_API_KEY")}
    env.update(extra)
    return env


class SimProcess:
    """``python -m pipeline.sim`` in its own process, so it outlives a killed pipeline."""

    def __init__(self, config_toml: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.sim", "--config", str(config_toml), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"the simulator did not start: {line}{self.proc.stderr.read()}")
        self.url = line.rsplit(" ", 1)[1].strip()

    def stats(self, name: str = "demo") -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.url + "/_sim/stats", timeout=10) as response:
            return json.loads(response.read())["keys"][name]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(predicate: Any, timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; a generous deadline only guards against a hang."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def capped_run(manifest: Path, out: Path, url: str, cap: float) -> list[str]:
    """``klein-batch run`` on 12 slots under ``--max-credits cap``, progress off."""
    return [
        *(KLEIN_BATCH, "run", str(manifest), "--out", str(out), "--api-url", url),
        *("--max-active", "12", "--progress", "off", "--max-credits", f"{cap:g}"),
    ]


def ctrl_c_when(
    command: Sequence[str], ready: Any, what: str, before: Any = None
) -> tuple[int, str]:
    """Run ``command`` on the simulator's key, press Ctrl-C once ``ready()`` holds (after
    ``before()``, if given, checked the moment before), and return its exit code and
    stderr; it is killed should it not end within a minute."""
    proc = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(FREEPIK_API_KEY=SIM_KEY),
    )
    try:
        wait_for(ready, what=what)
        if before is not None:
            before()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr


def run_cli(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` on the simulator's key to its end (three minutes at most)."""
    return subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        env=cli_env(FREEPIK_API_KEY=SIM_KEY),
        timeout=180,
    )
