"""How a run that ends early says so: Ctrl-C, SIGTERM, a refused key, a budget.

A real ``klein-batch run`` against the simulator in its own process, stopped by real
signals. Before these tests run.json and report.html said ``finished`` after Ctrl-C (exit
code 1 recorded, 130 returned), rows not read yet at the interrupt were missing from
run.json's counts and from ``klein-batch status``'s total, a second Ctrl-C abandoned writing
the outputs, and the last progress line showed a rate no summary had.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest
from pipeline_helpers import KLEIN_BATCH, SIM_KEY, SimProcess, cli_env, wait_for, write_catalog

#: Rows of the large manifest: a few of its 2,000-row batches are still unread when the run
#: is interrupted, and its wind-down (the output manifest joins every row) takes a while.
ROWS = 6_000
SIM_TOML = """
[latency]
median_s = 1.5
p95_s = 2.5

[[keys]]
name = "demo"
key = "sim-demo-key"
max_active = 12
"""


def acked(ledger: Path) -> int:
    """Tasks the API acknowledged, as the journal holds them (read-only)."""
    if not ledger.exists():
        return 0
    conn = sqlite3.connect(f"{ledger.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM tasks WHERE task_id IS NOT NULL").fetchone()[0]
    except sqlite3.OperationalError:  # the run has not created its tables yet
        return 0
    finally:
        conn.close()


def ambiguous(ledger: Path) -> int:
    """Submits whose answer never came (each may have been accepted), as journaled."""
    conn = sqlite3.connect(f"{ledger.resolve().as_uri()}?mode=ro", uri=True)
    try:
        query = "SELECT COALESCE(SUM(lost_acks + intent_pending), 0) FROM tasks"
        return int(conn.execute(query).fetchone()[0])
    finally:
        conn.close()


#: Rows whose wind-down (the output manifest joins every one) lasts well over a second, so
#: a second Ctrl-C 0.1 s after the first finds it under way even on an idle machine (6,000
#: rows took about 0.3 s, and a CI run's second Ctrl-C came after the outputs were written).
LONG_WIND_DOWN_ROWS = 60_000


def ctrl_c_twice(proc: subprocess.Popen[str], ledger: Path) -> None:
    """Once tasks are in flight, Ctrl-C, and again a tenth of a second later."""
    wait_for(lambda: acked(ledger) >= 12, what="tasks acknowledged")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)


def start(
    manifest: Path, out: Path, url: str, *extra: str, key: str = SIM_KEY
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(KLEIN_BATCH, "run", str(manifest), "--out", str(out), "--api-url", url),
            *("--max-active", "12", *extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(FREEPIK_API_KEY=key),
    )


def status(out: Path) -> dict[str, object]:
    result = subprocess.run(
        [KLEIN_BATCH, "status", str(out), "--json"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def last_rate(progress: str) -> str:
    rates = re.findall(r"([0-9.]+) img/s", progress)
    assert rates, progress
    return rates[-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "reason"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_is_said_in_run_json_report_and_status_with_every_row_counted(
    sim_process: SimProcess, tmp_path: Path, signum: int, code: int, reason: str
) -> None:
    manifest = write_catalog(tmp_path / "in", ROWS)
    out = tmp_path / "out"
    ledger = out / ".klein" / "ledger.sqlite"
    proc = start(manifest, out, sim_process.url, "--progress", "plain")
    try:
        wait_for(lambda: acked(ledger) >= 12, what="tasks acknowledged")
        # While it runs, status counts against the whole manifest: "not started" is every
        # row not done and not in flight, the rows not read yet included.
        wait_for(lambda: status(out)["total"] == ROWS, what="the total counted")
        live = status(out)
        assert live["state"] == "running"
        assert live["done"] + live["in_flight"] + live["pending"] == ROWS, live
        proc.send_signal(signum)
        stdout, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    report = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert report["state"] == f"stopped: {reason}"
    assert report["stopped"] == reason
    assert report["exit_code"] == code
    # The rows not read at the interrupt are skipped in manifest.parquet: run.json agrees.
    table = pl.read_parquet(out / "manifest.parquet")
    assert table.height == ROWS
    counts = dict(table.group_by("status").len().iter_rows())
    assert {k: v for k, v in report["counts"].items() if v} == counts
    assert report["total_rows"] == ROWS
    assert counts["skipped"] > ROWS // 2  # most rows were never read: the test's premise
    # Rows whose task was still running (1.5 s tasks, stopped right after 12 acks) share one
    # reason, their ids in task_id: report.html groups problems by reason (one per row
    # before: "38 reasons").
    running = table.filter(pl.col("task_id").is_not_null() & (pl.col("status") == "skipped"))
    assert running.height > 0
    assert running["reason"].unique().to_list() == [
        "not finished: its task (task_id) was still running when the run stopped; run again "
        "to collect it, without paying again"
    ]
    html = (out / "report.html").read_text(encoding="utf-8")
    banner = re.search(r'id="state">([^<]*)<', html)
    assert banner is not None
    assert banner.group(1).startswith(f"stopped: {reason} · ")
    assert "run the same command again to resume" in banner.group(1)
    assert "finished" not in banner.group(1)
    after = status(out)
    assert after["state"] == f"stopped: {reason}"
    assert after["total"] == ROWS
    assert after["done"] + after["in_flight"] + after["pending"] == ROWS, after
    assert "run the same command again" in str(after["note"])
    # The last progress line has the summary's figures.
    assert f"stopped: {reason} · " in stdout.splitlines()[-1]
    assert last_rate(stdout) == f"{report['images_per_s']:.2f}"


@pytest.mark.slow
def test_ctrl_c_twice_still_writes_every_output(sim_process: SimProcess, tmp_path: Path) -> None:
    """A double Ctrl-C is common: the second one is acknowledged, the outputs still written."""
    manifest = write_catalog(tmp_path / "in", LONG_WIND_DOWN_ROWS)
    out = tmp_path / "out"
    ledger = out / ".klein" / "ledger.sqlite"
    proc = start(manifest, out, sim_process.url, "--progress", "off")
    try:
        ctrl_c_twice(proc, ledger)
        _, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    for name in ("manifest.parquet", "run.json", "report.html"):
        assert (out / name).is_file(), name
    assert "still writing manifest.parquet, run.json and report.html" in err
    assert "Traceback" not in err
    assert pl.read_parquet(out / "manifest.parquet").height == LONG_WIND_DOWN_ROWS
    assert json.loads((out / "run.json").read_text())["state"] == "stopped: interrupted"
    assert status(out)["state"] == "stopped: interrupted"


@pytest.mark.slow
def test_a_third_ctrl_c_quits_at_once_and_loses_no_acknowledged_task(
    sim_process: SimProcess, tmp_path: Path
) -> None:
    manifest = write_catalog(tmp_path / "in", LONG_WIND_DOWN_ROWS)
    out = tmp_path / "out"
    ledger = out / ".klein" / "ledger.sqlite"
    proc = start(manifest, out, sim_process.url, "--progress", "off")
    try:
        ctrl_c_twice(proc, ledger)
        assert proc.stderr is not None
        # The first press may say first that it waits for submits in the air.
        said = [proc.stderr.readline()]
        while said[-1] and not said[-1].startswith("still writing") and len(said) < 3:
            said.append(proc.stderr.readline())
        assert said[-1].startswith("still writing"), said
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = finish(proc, timeout=30)
        quit_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.startswith("quitting without writing the outputs"), err
    assert quit_in < 5
    assert not (out / "report.html").exists()
    # Every task the API accepted is in the journal: the rerun polls it, never pays again
    # (a submit cut off by the first Ctrl-C is journaled as possibly paid, not lost).
    accepted = sim_process.stats()["submits_accepted"]
    assert acked(ledger) <= accepted <= acked(ledger) + ambiguous(ledger)
    assert status(out)["state"] == "stopped"  # its end was not recorded: a kill, as said


@pytest.mark.slow
def test_a_budget_stop_ends_on_the_summary_rate(tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path / "in", 300)
    out = tmp_path / "out"
    result = subprocess.run(
        [KLEIN_BATCH, "run", str(manifest), "--out", str(out), "--sim", "--max-credits", "20"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=240,
    )
    assert result.returncode == 1, result.stderr
    report = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert report["state"] == "stopped: budget"
    assert report["counts"]["skipped"] > 200
    progress = "\n".join(line for line in result.stdout.splitlines() if "img/s" in line)
    # The rows the budget skipped at once are not images made per second.
    assert last_rate(progress) == f"{report['images_per_s']:.2f}"


@pytest.mark.slow
def test_a_refused_key_is_said_in_run_json_and_status(
    sim_process: SimProcess, tmp_path: Path
) -> None:
    manifest = write_catalog(tmp_path / "in", 50)
    out = tmp_path / "out"
    proc = start(manifest, out, sim_process.url, "--progress", "plain", key="wrong")
    stdout, err = finish(proc)
    assert proc.returncode == 2, err
    assert "refused the key" in err
    report = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert report["state"] == "stopped: key refused"
    assert report["exit_code"] == 2
    assert report["counts"]["skipped"] == 50
    assert last_rate(stdout) == f"{report['images_per_s']:.2f}" == "0.00"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="state">stopped: key refused · ' in html
    found = status(out)
    assert found["state"] == "stopped: key refused"
    assert found["total"] == 50
