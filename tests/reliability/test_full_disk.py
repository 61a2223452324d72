"""A full disk ends the run at once, with a clear message and exit 74, the journal intact.

Issue 15, item 2: on a 3 MB tmpfs the journal's COMMIT failed inside the engine and the
process never ended. These runs use real small tmpfs mounts (root only; skipped with the
reason otherwise) and the real CLI in a subprocess against the simulator: the subprocess
timeout is the hang detector. The rerun, with room made, polls every acknowledged task.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
from pipeline_helpers import KLEIN_BATCH, SIM_KEY, cli_env, key_stats, sim_config, write_catalog

from pipeline.cli import EXIT_STORAGE
from pipeline.ledger import LEDGER_RELPATH, RESERVE_NAME
from pipeline.sim import LatencyConfig, SimServer


def _cli(manifest: Path, out: Path, url: str) -> list[str]:
    return [KLEIN_BATCH, "run", str(manifest), "--out", str(out), "--api-url", url]


def _run_to_end(manifest: Path, out: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _cli(manifest, out, url),
        capture_output=True,
        text=True,
        env=cli_env(FREEPIK_API_KEY=SIM_KEY),
        timeout=240,  # a hang fails here
    )


def _journal_ok(out: Path) -> tuple[int, int]:
    """(integrity check passed, acknowledged tasks) of the journal, read as `status` does."""
    path = out / LEDGER_RELPATH
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        (check,) = conn.execute("PRAGMA integrity_check").fetchone()
        (acked,) = conn.execute("SELECT COUNT(*) FROM tasks WHERE task_id IS NOT NULL").fetchone()
    finally:
        conn.close()
    assert check == "ok"
    return 1, int(acked)


def _remount(point: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)


def test_an_output_on_a_full_3mb_tmpfs_exits_74_and_the_rerun_pays_nothing_twice(
    start_sim: Callable[..., SimServer], tmpfs: Callable[..., Path], tmp_path: Path
) -> None:
    sim = start_sim()
    n = 60  # ~65 KB per image: the disk fills after a few dozen
    manifest = write_catalog(tmp_path / "in", n)
    out = tmpfs("3m")

    first = _run_to_end(manifest, out, sim.url)

    assert first.returncode == EXIT_STORAGE, first.stderr
    # Whichever fills the disk first, an image or the journal, names it.
    assert "No space left on device" in first.stderr or "disk full" in first.stderr
    assert "run the same command again" in first.stderr
    assert "Traceback" not in first.stderr
    _, acked = _journal_ok(out)
    assert acked == key_stats(sim)["submits_accepted"] > 0  # every paid task journaled

    _remount(out, "64m")
    again = _run_to_end(manifest, out, sim.url)

    assert again.returncode == 0, again.stderr
    assert key_stats(sim)["submits_accepted"] == n  # acknowledged tasks polled, not re-paid
    assert key_stats(sim)["duplicate_submits"] == 0
    table = pl.read_parquet(out / "manifest.parquet")
    assert table["status"].to_list() == ["succeeded"] * n


def _fill(folder: Path) -> None:
    """Take every free byte of the file system under ``folder``."""
    # Unbuffered, and the OSError caught outside the file's block: closing a buffered file on
    # a full disk flushes its remainder and raised ENOSPC past the suppress (a flaky CI run).
    with contextlib.suppress(OSError), (folder / "filler").open("wb", buffering=0) as handle:
        while True:
            handle.write(bytes(1 << 16))


def test_a_journal_whose_commit_fails_on_a_full_disk_ends_the_run_and_keeps_every_ack(
    start_sim: Callable[..., SimServer], tmpfs: Callable[..., Path], tmp_path: Path
) -> None:
    # Tasks of ~0.4 s, so the run is mid-flight when the journal's disk fills up.
    sim = start_sim(sim_config(latency=LatencyConfig(median_s=0.4, p95_s=0.6)))
    n = 400
    manifest = write_catalog(tmp_path / "in", n)
    out = tmp_path / "out"
    journal = tmpfs("8m", out / ".klein")  # the journal alone (its WAL grows to ~4 MB)

    run = subprocess.Popen(
        _cli(manifest, out, sim.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(FREEPIK_API_KEY=SIM_KEY),
    )
    try:
        while key_stats(sim)["submits_accepted"] < 30 and run.poll() is None:
            time.sleep(0.05)
        assert (journal / RESERVE_NAME).is_file()
        _fill(journal)
        _, stderr = run.communicate(timeout=240)  # a hang fails here
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()

    assert run.returncode == EXIT_STORAGE, stderr
    assert "cannot write the run journal" in stderr
    assert "database or disk is full" in stderr
    assert "Traceback" not in stderr
    assert not (journal / RESERVE_NAME).exists()  # given up to record the last acks
    _, acked = _journal_ok(out)
    paid = key_stats(sim)["submits_accepted"]
    assert acked == paid < n  # stopped early, and every paid task is in the journal
    # run.json (on the output's own disk) says why the run stopped, and its real exit code.
    written = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert (written["state"], written["exit_code"]) == (
        "stopped: output not writable",
        EXIT_STORAGE,
    )

    (journal / "filler").unlink()
    again = _run_to_end(manifest, out, sim.url)

    sizes = {p.name: p.stat().st_size for p in journal.rglob("*") if p.is_file()}
    assert again.returncode == 0, (again.stderr, sizes)
    assert key_stats(sim)["submits_accepted"] == n
    assert key_stats(sim)["duplicate_submits"] == 0
    assert (journal / RESERVE_NAME).is_file()  # laid down again for the next full disk
