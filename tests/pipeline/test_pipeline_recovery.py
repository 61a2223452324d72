"""Resuming when the API has moved on: expired result URLs, forgotten tasks, ``--sim`` reruns.

A kill between storing an image and committing its outcome leaves the image on disk and an
open task in the ledger. ``forget_outcomes`` recreates exactly that ledger state, so the
tests can then let the result URL expire or the simulator forget the task.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl
import pytest
from pipeline_helpers import (
    KLEIN_BATCH,
    SIM_KEY,
    check_output,
    cli_env,
    fast_options,
    key_stats,
    run_against,
    sim_config,
    statuses,
    wait_for,
    write_catalog,
)
from test_pipeline_resume import acked, in_flight

from pipeline.run import arun_manifest
from pipeline.sim import SimServer

ROWS = 20


def forget_outcomes(out: Path, keys: Sequence[str], *, drop_images: bool = False) -> None:
    """The ledger as a kill leaves it after the ack, before the outcome was committed."""
    conn = sqlite3.connect(out / ".klein" / "ledger.sqlite")
    with conn:
        conn.executemany(
            "UPDATE tasks SET status = NULL, outcome = NULL, finished_at = NULL, latency = NULL, "
            "credits = NULL, finished_run = NULL WHERE key = ?",
            [(key,) for key in keys],
        )
    conn.close()
    if drop_images:
        for key in keys:
            (out / "images" / f"{key}.jpg").unlink()


@pytest.mark.serial  # the first run must fetch every image within 0.2 s of its URL's expiry
def test_expired_url_of_a_resumed_row_takes_the_stored_image(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    server = start_sim(result_ttl_s=0.2)
    manifest = write_catalog(tmp_path / "in", ROWS)
    out = tmp_path / "out"
    run_against(server, manifest, out)
    first = pl.read_parquet(out / "manifest.parquet")
    lost = first["key"].to_list()[:5]
    forget_outcomes(out, lost)
    time.sleep(1.5)  # every result URL has expired now (whole-second expiry + 0.2 s)

    summary = run_against(server, manifest, out)

    table = check_output(out, ROWS, summary)
    assert statuses(table) == {"succeeded": ROWS}
    assert table.select("key", "sha256", "task_id").equals(first.select("key", "sha256", "task_id"))
    stats = key_stats(server)
    assert stats["downloads_expired"] >= len(lost)
    assert stats["submits_accepted"] == ROWS


def test_forgotten_task_takes_the_stored_image_or_fails_until_retry_failed(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    manifest = write_catalog(tmp_path / "in", ROWS)
    out = tmp_path / "out"
    with SimServer.in_thread(sim_config()) as first_server:
        # Tasks are polled where they were submitted: this server answers, then goes away.
        port = first_server.port
        run_against(first_server, manifest, out)
    first = pl.read_parquet(out / "manifest.parquet")
    keys = first["key"].to_list()
    forget_outcomes(out, keys[:3])
    forget_outcomes(out, keys[3:5], drop_images=True)
    # A new server on the same address knows none of the earlier tasks (404).
    fresh = start_sim(port=port)

    summary = run_against(fresh, manifest, out)

    table = check_output(out, ROWS, summary)
    assert statuses(table) == {"succeeded": ROWS - 2, "failed": 2}
    failed = table.filter(pl.col("status") == "failed")
    assert failed["key"].to_list() == keys[3:5]
    assert failed["reason"].str.contains("unknown to the API").all()
    assert failed["reason"].str.contains("--retry-failed").all()
    # A real API that forgot a task may still have charged it: nothing was sent again.
    assert key_stats(fresh)["submits_accepted"] == 0

    again = run_against(fresh, manifest, out, options=fast_options(retry_failed=True))

    assert statuses(check_output(out, ROWS, again)) == {"succeeded": ROWS}
    assert key_stats(fresh)["submits_accepted"] == 2


def test_api_url_credentials_never_reach_the_run_record(sim: SimServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    url = sim.url.replace("http://", "http://someone:hunter2@")
    manifest = write_catalog(tmp_path / "in", 3)
    summary = asyncio.run(
        arun_manifest(manifest, out, api_url=url, api_key=SIM_KEY, options=fast_options())
    )

    assert summary.counts["succeeded"] == 3
    conn = sqlite3.connect(out / ".klein" / "ledger.sqlite")
    (info,) = [json.loads(info) for (info,) in conn.execute("SELECT info FROM runs")]
    conn.close()
    assert info["api_url"] == sim.url
    for name in ("run.json", "manifest.parquet"):
        assert b"hunter2" not in (out / name).read_bytes()


def test_expired_result_urls_end_failed_with_a_reason(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    server = start_sim(result_ttl_s=0.01)
    # The client expects slow tasks, so its first poll comes long after every URL expired
    # (the task list, which would tell it the tasks ended in time, is not read).
    options = fast_options(expected_latency_s=2.5, max_active=ROWS, task_list=False)
    manifest = write_catalog(tmp_path / "in", ROWS)
    summary = run_against(server, manifest, tmp_path / "out", options=options)

    table = check_output(tmp_path / "out", ROWS, summary)
    counts = statuses(table)
    assert counts.get("succeeded", 0) + counts.get("failed", 0) == ROWS
    failed = table.filter(pl.col("status") == "failed")
    assert failed.height > 0
    assert failed["reason"].str.contains("expired").all(), failed["reason"].to_list()
    assert key_stats(server)["downloads_expired"] >= failed.height


def test_sim_rerun_after_ctrl_c_finishes(tmp_path: Path) -> None:
    """``--sim`` starts a fresh simulator per run; a rerun submits its in-flight rows again."""
    slow = tmp_path / "slow.toml"
    slow.write_text("[latency]\nmedian_s = 1.0\np95_s = 1.5\n", encoding="utf-8")
    manifest = write_catalog(tmp_path / "in", 40)
    out = tmp_path / "out"
    command = [KLEIN_BATCH, "run", str(manifest), "--out", str(out), "--sim-config", str(slow)]
    proc = subprocess.Popen(
        [*command, "--progress", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    ledger = out / ".klein" / "ledger.sqlite"
    try:
        wait_for(lambda: in_flight(ledger) >= 5, what="tasks in flight")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    open_tasks = {key for key, (_, status) in acked(ledger).items() if status is None}
    assert open_tasks

    rerun = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=120)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    table = check_output(out, 40)
    assert statuses(table) == {"succeeded": 40}
    resubmitted = table.filter(pl.col("key").is_in(list(open_tasks)))
    assert (resubmitted["attempts"] >= 2).all()
