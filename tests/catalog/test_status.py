"""`klein-batch status DEST` on a run going in another process, a finished one, a killed one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from catalog_helpers import clean_env, run

from pipeline.contract import KLEIN_MODEL
from pipeline.errors import ConfigError
from pipeline.sim import SimConfig, SimServer
from pipeline.status import RunStatus, read_status, render_json

KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")
SLOW_SIM = """
[[keys]]
max_active = 2
submits_per_minute = 6000
[latency]
median_s = 0.4
p95_s = 0.5
"""


def _start(tmp_path: Path, rows: int) -> tuple[subprocess.Popen[str], Path]:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,title\n" + "".join(f"p{i},product {i}\n" for i in range(rows)), encoding="utf-8"
    )
    config = tmp_path / "sim.toml"
    config.write_text(SLOW_SIM, encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            KLEIN_BATCH,
            "run",
            str(manifest),
            "--out",
            str(out),
            "--sim-config",
            str(config),
            "--max-active",
            "2",
            "--prompt-template",
            "photo of {title}",
            "--vary",
            "seed=1,2",
            "--max-credits",
            "500",
            "--progress",
            "off",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    return proc, out


def _wait_for_progress(out: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            found = read_status(out)
        except ConfigError:
            found = None
        if found is not None and found.done >= 1 and found.total is not None:
            return
        time.sleep(0.1)
    raise AssertionError("the run made no progress")


def test_status_of_a_run_going_in_another_process_and_after_it_finished(
    tmp_path: Path,
) -> None:
    proc, out = _start(tmp_path, rows=8)
    try:
        _wait_for_progress(out, proc)
        going = read_status(out)
        assert going.state == "running"
        assert going.total == 16  # 8 rows x 2 seeds
        assert 1 <= going.done < 16
        assert going.in_flight + going.pending + going.done == 16
        assert going.max_credits == 500
        # Paused while `status` starts and reads (a few seconds on a busy machine, longer
        # than the rest of this run): what it must see is a run that is still going.
        proc.send_signal(signal.SIGSTOP)
        try:
            text = subprocess.run(
                [KLEIN_BATCH, "status", str(out)], capture_output=True, text=True, check=False
            )
        finally:
            proc.send_signal(signal.SIGCONT)
        assert text.returncode == 1  # not finished yet
        assert text.stdout.startswith(f"{out}: running · run ")
        assert "progress  " in text.stdout
        assert "ETA" in text.stdout
        assert "budget 500.00" in text.stdout
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    done = read_status(out)
    assert done.state == "finished"
    assert done.done == done.counts["succeeded"] == 16
    assert done.in_flight == done.pending == 0
    each = SimConfig().price(KLEIN_MODEL).credits(1024, 1024)
    assert done.credits_run == done.credits_output == pytest.approx(16 * each)
    as_json = subprocess.run(
        [KLEIN_BATCH, "status", str(out), "--json"], capture_output=True, text=True, check=False
    )
    assert as_json.returncode == 0
    figures = json.loads(as_json.stdout)
    assert figures["state"] == "finished"
    assert figures["counts"]["succeeded"] == 16
    assert figures["images_per_s"] > 0


def test_status_of_a_killed_run_says_stopped_and_how_to_resume(tmp_path: Path) -> None:
    proc, out = _start(tmp_path, rows=40)
    try:
        _wait_for_progress(out, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    found = read_status(out)
    assert found.state == "stopped"
    assert found.done < 80
    assert "run the same command again to resume" in (found.note or "")
    assert "stopped" in found.render()


def test_status_of_an_in_process_run_and_of_nothing(tmp_path: Path, sim: SimServer) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="no such output folder"):
        read_status(out)
    out.mkdir()
    with pytest.raises(ConfigError, match="nothing has run into this folder yet"):
        read_status(out)
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt\na,red mug\nb,\n", encoding="utf-8")
    run(manifest, out, sim)
    found = read_status(out)
    assert found.state == "finished"  # a rejected row is an outcome, not unfinished work
    assert found.counts["succeeded"] == 1
    assert found.counts["rejected"] == 1
    assert found.total == 2
    assert found.notices == [] and found.api_outages == 0
    assert "note " not in found.render() and "api " not in found.render()


def test_status_repeats_the_manifests_notes(tmp_path: Path, sim: SimServer) -> None:
    """A column the run does not read (a spreadsheet's ``Width``) is named in the summary's
    ``note:``; whoever checks a nightly job reads ``status``, not the job's terminal."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,Width\na,red mug,1200\n", encoding="utf-8")
    out = tmp_path / "out"
    summary = run(manifest, out, sim)
    assert summary.notices, "the manifest's Width column is not noted"

    found = read_status(out)

    assert found.notices == summary.notices
    assert f"  note      {summary.notices[0]}" in found.render()
    assert json.loads(render_json(found))["notices"] == summary.notices


def test_status_of_a_budget_stopped_run_counts_images_not_skipped_rows(
    tmp_path: Path, sim: SimServer
) -> None:
    """After the run, status's rate is run.json's: images made, not rows that reached an end."""
    rows = pl.DataFrame({"id": [f"p{i}" for i in range(8)], "prompt": ["mug"] * 8})
    out = tmp_path / "out"
    summary = run(rows, out, sim, max_credits=3.0)  # 2 images fit in 3 credits, 6 rows skipped
    assert summary.counts["succeeded"] == 2 and summary.counts["skipped"] == 6

    status = read_status(out)

    # Every row has its outcome, but the budget skipped some: "stopped: budget", not finished.
    assert status.state == "stopped: budget"
    assert "2 of 8 images made (25%)" in (status.note or "")
    made = json.loads((out / "run.json").read_text())
    # Both are images over the run's time: 2 images, whatever the 6 skipped rows did.
    assert status.images_per_s * status.elapsed_s == pytest.approx(2, rel=0.05)
    assert made["images_per_s"] * made["elapsed_s"] == pytest.approx(2, rel=0.05)


class _Killed(BaseException):
    """A kill -9 at one exact point: nothing after it runs (no ``except Exception``)."""


def test_a_run_killed_before_its_report_is_not_finished(
    tmp_path: Path, sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end used to be journaled before report.html was written: a kill in between left
    no report.html and a status of "finished", exit 0."""

    def killed(*args: object, **kwargs: object) -> None:
        raise _Killed

    monkeypatch.setattr("pipeline.run.write_html_report", killed)
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt\na,red mug\nb,blue mug\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(_Killed):
        run(manifest, out, sim)
    assert not (out / "report.html").exists()
    assert read_status(out).state != "finished"  # this process lives on: "running"
    monkeypatch.undo()
    run(manifest, out, sim)  # the rerun writes it
    assert (out / "report.html").exists() and read_status(out).state == "finished"


def test_a_run_waiting_for_its_last_tasks_shows_no_eta_from_its_rate() -> None:
    """The journal says 3 rows are left and all 3 are tasks in flight: the run ends when the
    slowest ends, which the rate (0.5 images/s: "6s") does not tell."""
    status = RunStatus(
        dest="out/night", run_id="r1", manifest="m.csv", state="running", started_at=0.0,
        total=100, counts={"succeeded": 97}, in_flight=3, images_per_s=0.5, eta_s=6.0,
    )  # fmt: skip
    assert "ETA ? (waiting for the last 3 tasks, in flight)" in status.render()
    status.in_flight, status.pending = 2, 1  # a row not yet submitted: the rate still says
    assert "ETA 6s" in status.render()
