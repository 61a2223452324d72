"""The API goes away mid-run (its listener closed, its connections cut) and comes back.

Before the host gate (``pipeline/gate.py``) every row retried on its own and a 40 s outage
failed 342 of 500 rows. Now rows wait at the gate while one request at a time checks
whether the API is back: an outage fails no row and pays for nothing twice, and one that
lasts longer than ``--api-outage-wait`` stops the run cleanly (exit 69, tested through the
CLI in ``test_outage_cli``), rows not sent left to do.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    statuses,
    write_catalog,
)

from pipeline.cli import EXIT_UNAVAILABLE
from pipeline.errors import ApiUnreachable
from pipeline.run import arun_manifest
from pipeline.sim import KeyConfig, LatencyConfig, SimServer
from pipeline.status import RunStatus, read_status
from pipeline.summary import ExitCode

#: Tasks long enough that the run is still going when the API goes away.
SLOW = LatencyConfig(median_s=0.3, p95_s=0.6)


@contextmanager
def outage_after(
    server: SimServer, accepted: int, down_s: float | None
) -> Iterator[dict[str, float]]:
    """Take ``server`` down once it accepted ``accepted`` submits, for ``down_s`` seconds
    (None: until the block ends), from a thread: the run goes on in the test's loop."""
    seen: dict[str, float] = {}
    done = threading.Event()

    def run() -> None:
        while not done.is_set() and key_stats(server)["submits_accepted"] < accepted:
            time.sleep(0.01)
        if done.is_set():
            return
        server.go_down()
        seen["down_at"] = time.monotonic()
        if down_s is not None and not done.wait(down_s):
            server.come_back()
            seen["up_at"] = time.monotonic()

    thread = threading.Thread(target=run, name="outage", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(timeout=30)
        if "down_at" in seen and "up_at" not in seen:
            server.come_back()


@pytest.mark.parametrize("dialect", ["klein", "bfl"])
def test_an_outage_mid_run_fails_no_row_and_pays_nothing_twice(
    dialect: str, start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    """Dialect bfl polls and downloads from a regional host: two gates, both closed."""
    rows = 80
    server = start_sim(latency=SLOW, keys=[KeyConfig(max_active=8)])
    manifest = write_catalog(tmp_path / "in", rows)
    out = tmp_path / "out"
    options = fast_options(max_active=8, dialect=dialect)

    with outage_after(server, accepted=24, down_s=5.0) as seen:
        summary = run_against(server, manifest, out, options=options)

    assert "up_at" in seen, "the run ended before the outage did"
    table = check_output(out, rows, summary, dialect=dialect)
    assert statuses(table) == {"succeeded": rows}
    assert summary.exit_code == 0
    assert table["attempts"].max() <= 2  # waiting at the gate spent no attempt
    stats = key_stats(server)
    # A submit cut off as the API went down may have been taken: only those are paid twice.
    assert stats["duplicate_submits"] <= summary.ambiguous_submits
    assert stats["submits_accepted"] == rows + stats["duplicate_submits"]
    # The gates closed (bfl's regional host's too: one outage) and waited out most of it.
    assert summary.api_outages == 1
    assert summary.api_unreachable_s > 2.0
    written = json.loads((out / "run.json").read_text())
    assert written["api_unreachable_s"] == summary.api_unreachable_s
    assert written["api_outages"] == summary.api_outages
    # report.html says so at the top, where whoever checks the night looks first.
    assert "the API did not answer for " in (out / "report.html").read_text()
    assert (
        written["errors"].get("submit cannot connect", 0)
        + sum(count for name, count in written["errors"].items() if name.startswith("poll "))
        > 0
    )


def test_status_says_a_run_is_waiting_for_the_api_and_after_it_how_long_it_did(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    """`klein-batch status` from another process (here a thread reading the journal) during
    the outage and after the run: not merely "no activity for a while"."""
    rows = 60
    server = start_sim(latency=SLOW, keys=[KeyConfig(max_active=8)])
    manifest = write_catalog(tmp_path / "in", rows)
    out = tmp_path / "out"
    seen: dict[str, RunStatus] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and key_stats(server)["submits_accepted"] < 16:
            time.sleep(0.01)
        server.go_down()
        try:
            deadline = time.monotonic() + 20
            while not done.is_set() and time.monotonic() < deadline:
                found = read_status(out)
                if found.api_down_s is not None and found.api_down_s >= 1.0:
                    seen["down"] = found
                    return
                time.sleep(0.05)
        finally:
            server.come_back()

    watcher = threading.Thread(target=watch, name="status", daemon=True)
    watcher.start()
    try:
        summary = run_against(server, manifest, out, options=fast_options(max_active=8))
    finally:
        done.set()
        watcher.join(timeout=30)

    assert "down" in seen, "status never said the API was not answering"
    down = seen["down"]
    assert down.state == "running"
    assert "  api       not answering for " in down.render()
    assert statuses(check_output(out, rows, summary)) == {"succeeded": rows}
    after = read_status(out)
    assert after.state == "finished"
    assert after.api_down_s is None
    assert after.api_outages == summary.api_outages == 1
    assert after.api_unreachable_s == pytest.approx(summary.api_unreachable_s)
    assert "  api       did not answer for " in after.render()


def test_an_api_that_stays_away_stops_the_run_with_rows_left_to_do(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    """Longer than ``api_outage_wait_s``: ``ApiUnreachable``, after the outputs are written
    (rows not sent ``skipped`` as not submitted, none ``failed``); the same call, with the API
    back, finishes every row and pays for none twice."""
    rows = 60
    server = start_sim(latency=SLOW, keys=[KeyConfig(max_active=8)])
    manifest = write_catalog(tmp_path / "in", rows)
    out = tmp_path / "out"
    options = fast_options(api_outage_wait_s=2.0, max_active=8)

    with outage_after(server, accepted=16, down_s=None), pytest.raises(ApiUnreachable) as caught:
        run_against(server, manifest, out, options=options)

    message = str(caught.value)
    assert f"the API at {server.url} has not answered for 2 s" in message
    assert "run the same command again" in message
    # A workflow tells it apart and reports the run without reading the files.
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    stopped = caught.value.summary
    assert stopped is not None and stopped.state == "stopped: api unreachable"
    table = pl.read_parquet(out / "manifest.parquet")
    assert table.height == rows
    assert sum(stopped.counts.values()) == rows
    assert "failed" not in statuses(table)
    left = table.filter(pl.col("status") != "succeeded")
    assert left.height > 0
    assert left["reason"].str.contains("run again").all()
    written = json.loads((out / "run.json").read_text())
    assert written["api_outages"] == 1
    assert written["api_unreachable_s"] > 1.0
    accepted_before = key_stats(server)["submits_accepted"]

    again = run_against(server, manifest, out, options=fast_options(max_active=8))

    table = check_output(out, rows, again)
    assert statuses(table) == {"succeeded": rows}
    stats = key_stats(server)
    assert stats["duplicate_submits"] <= written["ambiguous_submits"] + again.ambiguous_submits
    assert stats["submits_accepted"] == rows + stats["duplicate_submits"]
    assert accepted_before <= stats["submits_accepted"]


def test_an_api_down_from_the_start_stops_the_run_and_says_so(tmp_path: Path) -> None:
    """No answer at all: the rows are not failed one by one (before the gate, each spent its
    attempts and ended failed "cannot connect"); the run stops, every row left to do."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    manifest = write_catalog(tmp_path / "in", 3)
    options = fast_options(api_outage_wait_s=1.0)
    with pytest.raises(ApiUnreachable, match="connection refused"):
        asyncio.run(
            arun_manifest(
                manifest, tmp_path / "out", api_url=dead, api_key=SIM_KEY, options=options
            )
        )
    table = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert statuses(table) == {"skipped": 3}
    assert table["reason"].str.starts_with("not submitted").all()
    written = json.loads((tmp_path / "out" / "run.json").read_text())
    assert written["errors"]["submit cannot connect"] >= 3
    assert written["api_outages"] == 1


def test_the_cli_exits_69_with_one_line_and_the_same_command_finishes_the_run(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    rows = 60
    server = start_sim(latency=SLOW, keys=[KeyConfig(max_active=8)])
    manifest = write_catalog(tmp_path / "in", rows)
    out = tmp_path / "out"
    command = [
        KLEIN_BATCH, "run", str(manifest), "--out", str(out), "--api-url", server.url,
        "--max-active", "8", "--api-outage-wait", "2", "--progress", "off",
    ]  # fmt: skip

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=cli_env(FREEPIK_API_KEY=SIM_KEY),
            timeout=120,  # a hang fails here
        )

    with outage_after(server, accepted=16, down_s=None) as seen:
        first = run()

    assert "down_at" in seen, first.stderr
    assert first.returncode == EXIT_UNAVAILABLE, first.stderr
    assert "Traceback" not in first.stderr
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: the API at {server.url} has not answered for 2 s (last error: connection "
        "refused); nothing is lost: run the same command again to go on (rows not sent are "
        "still to do, tasks in flight are polled, none is paid for twice)"
    ]
    assert "stopping the run" not in first.stderr  # said once, as the error
    table = pl.read_parquet(out / "manifest.parquet")
    assert "failed" not in statuses(table)
    assert table.filter(pl.col("status") == "skipped").height > 0
    written = json.loads((out / "run.json").read_text())
    assert written["api_unreachable_s"] > 0
    # run.json says why the run stopped and the exit code it really ended with.
    assert written["state"] == "stopped: api unreachable"
    assert written["exit_code"] == EXIT_UNAVAILABLE

    again = run()

    assert again.returncode == 0, again.stderr
    table = check_output(out, rows)
    assert statuses(table) == {"succeeded": rows}
    stats = key_stats(server)
    assert stats["submits_accepted"] == rows + stats["duplicate_submits"]
    assert (
        stats["duplicate_submits"]
        <= json.loads((out / "run.json").read_text())["ambiguous_submits"]
    )
