"""Resume: a real ``klein-batch run`` killed mid-run, then run again to the end.

The simulator runs in its own process so it outlives the pipeline and remembers every task;
the pipeline is killed once the ledger holds acknowledged tasks that have not finished. The
rerun must poll those tasks, not pay for them again, and finish every row.
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
from pipeline_helpers import (
    KLEIN_BATCH,
    SIM_KEY,
    SimProcess,
    check_output,
    cli_env,
    statuses,
    wait_for,
    write_catalog,
)

ROWS = 120
SIM_TOML = """
[latency]
median_s = 0.4
p95_s = 0.8

[[keys]]
name = "demo"
key = "sim-demo-key"
max_active = 12
"""


def acked(ledger: Path) -> dict[str, tuple[str, str | None]]:
    """key -> (task id, final status or None) for every acknowledged task in the ledger."""
    if not ledger.exists():
        return {}
    conn = sqlite3.connect(f"{ledger.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT key, task_id, status FROM tasks WHERE task_id IS NOT NULL"
        ).fetchall()
    except sqlite3.OperationalError:  # the run has not created its tables yet
        return {}
    finally:
        conn.close()
    return {key: (task_id, status) for key, task_id, status in rows}


def in_flight(ledger: Path) -> int:
    return sum(1 for _, status in acked(ledger).values() if status is None)


def run_command(manifest: Path, out: Path, url: str, progress: str = "off") -> list[str]:
    return [
        *(KLEIN_BATCH, "run", str(manifest), "--out", str(out), "--api-url", url),
        *("--max-active", "12", "--progress", progress),
    ]


def start_run(manifest: Path, out: Path, url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        run_command(manifest, out, url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(FREEPIK_API_KEY=SIM_KEY),
    )


def interrupt_mid_run(
    proc: subprocess.Popen[str], ledger: Path, signum: int
) -> tuple[str, str, dict[str, tuple[str, str | None]]]:
    try:
        # Mid-run: some rows done, some tasks acknowledged and still running on the server.
        wait_for(
            lambda: sum(1 for _, s in acked(ledger).values() if s) >= 10 and in_flight(ledger) >= 5,
            what="acknowledged tasks in flight",
        )
        proc.send_signal(signum)
        started = time.monotonic()
        out, err = proc.communicate(timeout=60)
        print(f"exited {time.monotonic() - started:.2f} s after the signal")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out, err, acked(ledger)


def rerun_and_check(
    manifest: Path,
    out: Path,
    sim: SimProcess,
    before: dict[str, tuple[str, str | None]],
    progress: str = "off",
) -> tuple[pl.DataFrame, str]:
    stats_before = sim.stats()
    rerun = subprocess.run(
        run_command(manifest, out, sim.url, progress),
        capture_output=True,
        text=True,
        env=cli_env(FREEPIK_API_KEY=SIM_KEY),
        timeout=180,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "Traceback" not in rerun.stderr
    table = check_output(out, ROWS)
    assert statuses(table) == {"succeeded": ROWS}
    stats = sim.stats()
    report = json.loads((out / "run.json").read_text())
    # Every task acknowledged before the interruption was collected, not submitted again.
    final = dict(zip(table["key"].to_list(), table["task_id"].to_list(), strict=True))
    for key, (task_id, _) in before.items():
        assert final[key] == task_id, key
    unfinished = ROWS - sum(1 for _, status in before.values() if status)
    assert report["resumed_rows"] >= sum(1 for _, status in before.values() if status)
    # The rerun submitted only rows never acknowledged; at most the lost answers repeat.
    new_submits = stats["submits_accepted"] - stats_before["submits_accepted"]
    assert (
        new_submits
        <= unfinished
        - sum(1 for _, s in before.values() if s is None)
        + (report["ambiguous_submits"])
    )
    assert stats["duplicate_submits"] <= report["ambiguous_submits"]
    assert stats["submits_accepted"] == ROWS + stats["duplicate_submits"]
    # The rate counts what this run finished (resumed in-flight tasks included), never the
    # rows earlier runs finished: so it is never negative and matches the run's new images.
    new_images = ROWS - sum(1 for _, status in before.values() if status == "succeeded")
    assert report["images_per_s"] * report["elapsed_s"] == pytest.approx(new_images, rel=0.01)
    return table, rerun.stdout


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_finishes_without_paying_twice(
    sim_process: SimProcess, tmp_path: Path
) -> None:
    manifest = write_catalog(tmp_path / "in", ROWS)
    out = tmp_path / "out"
    ledger = out / ".klein" / "ledger.sqlite"
    proc = start_run(manifest, out, sim_process.url)

    _, _, before = interrupt_mid_run(proc, ledger, signal.SIGKILL)

    assert proc.returncode == -signal.SIGKILL
    assert any(status is None for _, status in before.values())
    # A killed run wrote no output manifest for this run; the rerun writes the whole of it.
    _, progress = rerun_and_check(manifest, out, sim_process, before, progress="plain")
    # Its credits include the tasks the killed run paid for and it collected: said so, since
    # they stand beside its own submits (a rerun of in-flight tasks only: "submits 0").
    report = json.loads((out / "run.json").read_text())
    in_flight_at_kill = sum(1 for _, status in before.values() if status is None)
    finished_here = ROWS - sum(1 for _, status in before.values() if status is not None)
    each = report["credits"] / finished_here  # every image is the same size: one price
    assert report["credits_acked_earlier"] == pytest.approx(each * in_flight_at_kill, abs=0.01)
    assert "of it for tasks an earlier run submitted: collected, not paid again" in progress
    rates = [float(rate) for rate in re.findall(r"(-?[0-9.]+) img/s", progress)]
    assert rates, progress
    assert min(rates) >= 0, progress  # resumed in-flight rows are not "done before"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code"),
    # SIGTERM (systemd, Kubernetes, Prefect) is handled as Ctrl-C is (issue 15).
    [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_exits_130_and_the_rerun_resumes(
    sim_process: SimProcess, tmp_path: Path, signum: int, code: int
) -> None:
    manifest = write_catalog(tmp_path / "in", ROWS)
    out = tmp_path / "out"
    ledger = out / ".klein" / "ledger.sqlite"
    proc = start_run(manifest, out, sim_process.url)

    _, err, before = interrupt_mid_run(proc, ledger, signum)

    assert proc.returncode == code, err
    assert "run the same command again to resume" in err
    assert "Traceback" not in err
    assert (out / "run.json").is_file() and (out / "report.html").is_file()
    # An interrupted run still accounts for every row: unfinished ones are skipped, saying why.
    partial = check_output(out, ROWS)
    skipped = partial.filter(pl.col("status") == "skipped")
    assert skipped.height > 0
    assert skipped["reason"].str.contains("run again").all()
    before = acked(ledger)
    rerun_and_check(manifest, out, sim_process, before)


#: Tasks of about 6 s (none under 4): a killed run's whole key is still running when its
#: rerun starts, and the rerun's only work is to notice them end.
SLOW_TASKS_TOML = """
[latency]
median_s = 6.0
p95_s = 7.0
cap_s = 8.0

[[keys]]
name = "demo"
key = "sim-demo-key"
max_active = 12
"""


@pytest.mark.slow
def test_a_rerun_that_only_collects_a_killed_runs_tasks_asks_about_them_calmly(
    tmp_path: Path,
) -> None:
    """A rerun with nothing left to submit has learned no task time of its own: it must not
    take its first guess (under half a second) for the tasks' time and ask the API about
    them several times a second until the last ends (a killed run's rerun asked the task
    list 671 times in 90 s for 16 tasks on the production latency shape)."""
    config = tmp_path / "sim.toml"
    config.write_text(SLOW_TASKS_TOML, encoding="utf-8")
    sim = SimProcess(config)
    try:
        rows = 12
        manifest = write_catalog(tmp_path / "in", rows)
        out = tmp_path / "out"
        ledger = out / ".klein" / "ledger.sqlite"
        proc = start_run(manifest, out, sim.url)
        try:
            wait_for(lambda: in_flight(ledger) == rows, what="every row's task acknowledged")
        finally:
            proc.kill()
            proc.wait()
        before = sim.stats()
        started = time.monotonic()
        rerun = subprocess.run(
            run_command(manifest, out, sim.url, progress="plain"),
            capture_output=True,
            text=True,
            env=cli_env(FREEPIK_API_KEY=SIM_KEY),
            timeout=120,
        )
        seconds = time.monotonic() - started
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert statuses(check_output(out, rows)) == {"succeeded": rows}
        after = sim.stats()
    finally:
        sim.stop()
    assert after["submits_accepted"] == before["submits_accepted"]  # nothing paid again
    lists = after["list_calls"] - before["list_calls"]
    polls = after["polls"] - before["polls"]
    print(f"rerun: {seconds:.1f} s, {lists} task lists, {polls} polls ({rows} tasks)")
    # The list comes about once a second (the drain's spacing). Before: 169 requests in
    # 7.2 s, the list asked every 40 ms from the median's first guess (about 130 lists).
    assert lists <= 2 * seconds + 4, f"{lists} lists, {polls} polls"
    # The polls are the usual back-off's (half a task's age from when the rerun took it up,
    # until the list answers): about 3 a task on an idle machine, and in a fresh clone's
    # busy suite 153 for the 12 (8 lists), the back-off's most over these 8 s.
    assert polls <= 14 * rows, f"{lists} lists, {polls} polls"
    # Its progress says what it waits for (a line every 5 s), not an ETA from a rate.
    assert re.search(r"ETA \? \((the last task|last \d+ tasks), running", rerun.stdout), (
        rerun.stdout
    )
