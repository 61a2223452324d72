"""``klein-batch flow`` as a user runs it: a fresh process, in Prefect's ephemeral mode (the
first test) or against a running Prefect server (the session's, as a deployment's would be)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flow_helpers import journal_submits, signal_when

REPO = Path(__file__).resolve().parents[2]
KLEIN_BATCH = Path(sys.executable).with_name("klein-batch")

FAST_SIM = """
[[keys]]
name = "cli"
key = "sk-cli-flow-test-1234"
tier = "standard"

[latency]
median_s = 0.05
p95_s = 0.1
"""


def _env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """The process's environment: Prefect's ephemeral mode, or ``api_url``'s server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FREEPIK", "BFL"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


@pytest.mark.slow(seconds=40)  # starts Prefect's ephemeral server in a fresh process
def test_flow_command_runs_the_example_catalog_in_ephemeral_mode(tmp_path: Path) -> None:
    sim_toml = tmp_path / "sim.toml"
    sim_toml.write_text(FAST_SIM, encoding="utf-8")
    out = tmp_path / "out"
    done = subprocess.run(
        [
            str(KLEIN_BATCH),
            "flow",
            str(REPO / "manifests/examples/catalog.csv"),
            "--sim-config",
            str(sim_toml),
            "--out",
            str(out),
            "--shard-size",
            "8",
        ],
        env=_env(tmp_path / "prefect"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "20 rows: 20 succeeded" in done.stdout
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert manifest["row"].to_list() == list(range(1, 21))
    assert set(manifest["status"]) == {"succeeded"}
    summary = json.loads((out / "run.json").read_text())
    assert [s["shard"] for s in summary["shards"]] == [0, 1, 2]  # 20 rows, about 8 each
    assert sum(s["rows"] for s in summary["shards"]) == 20
    assert "sk-cli-flow-test-1234" not in done.stdout + done.stderr


def test_flow_command_names_a_bad_option_without_a_traceback(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("prompt\nred mug\n", encoding="utf-8")
    env = _env(tmp_path / "prefect")
    for args, message in (
        (["--sim", "--out", str(tmp_path / "o"), "--tier", "gold"], "--tier 'gold' is not allowed"),
        (["--sim", "--out", str(tmp_path / "o"), "--shard-size", "0"], "--shard-size 0"),
        (["--out", str(tmp_path / "o"), "--api-url", "https://api.example.com"], "FREEPIK_API_KEY"),
        (["--sim"], "--out DEST is required"),
    ):
        done = subprocess.run(
            [str(KLEIN_BATCH), "flow", str(manifest), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_a_manifest_mistake_in_the_flow_is_one_line_not_a_traceback(
    tmp_path: Path, prefect_server: str
) -> None:
    """Found in the manifest once the flow runs (it reads the manifest in a task): Prefect
    logged the task's and the flow's exception with a page of frames each (four
    tracebacks for a missing prompt column), where `klein-batch run` says one line. The
    run's logs keep the exception's words; the process exits 2 saying them."""
    pim = tmp_path / "pim.parquet"
    photos = pa.array([["https://cdn.example.com/a.jpg"]], pa.list_(pa.string()))
    pq.write_table(pa.table({"id": [1], "prompt": ["a mug"], "images": photos}), pim)
    for manifest, args, message in (
        (tmp_path / "no-prompt.csv", [], "no-prompt.csv: no 'prompt' column; found 'id', 'title'"),
        (
            pim,
            ["--reference-column", "images"],
            "pim.parquet: column 'images' (taken as input_image)",
        ),
    ):
        if manifest.suffix == ".csv":
            manifest.write_text("id,title\n1,mug\n", encoding="utf-8")
        done = subprocess.run(
            [str(KLEIN_BATCH), "flow", str(manifest), "--sim", "--out", str(tmp_path / "o"), *args],
            env=_env(tmp_path / "prefect", prefect_server),
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 2, output[-3000:]
        assert f"error: {message}" in done.stderr, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        assert "Finished in state Failed" in output  # Prefect's own record of it stays


def test_flow_command_takes_templates_variations_and_a_dry_run_from_a_shared_config(
    tmp_path: Path, prefect_server: str
) -> None:
    """A config file shared with `run` means the same to `flow`: nothing is dropped."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,title\na,Mug\nb,Bowl\nc,Cup\n", encoding="utf-8")
    config = tmp_path / "shared.toml"
    config.write_text(
        'prompt_template = "Photo of {title}, {style}"\n'
        'vary = ["style=studio,lifestyle"]\n'
        "max_credits = 10\n"
        "dry_run = true\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = ["flow", str(manifest), "--sim", "--out", str(out), "--config", str(config)]
    done = subprocess.run(
        [str(KLEIN_BATCH), *args, "--shard-size", "2"],
        env=_env(tmp_path / "prefect", prefect_server),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 rows x 2 variations" in done.stdout or "6 images" in done.stdout, done.stdout
    assert "Plan (dry run: nothing was sent)" in done.stdout
    assert "budget:   10 credits" in done.stdout
    assert "shards:   2 (by key)" in done.stdout
    assert not (out / "images").exists()  # nothing was sent


def _sixty_mugs_on_a_slow_key(tmp_path: Path, faults: str = "") -> list[str]:
    """``flow`` arguments for 60 rows on a simulator with two-second tasks (``faults``: a
    ``[faults]`` section of its TOML), into ``tmp_path / "out"``."""
    sim_toml = tmp_path / "sim.toml"
    sim_toml.write_text(
        FAST_SIM.replace("median_s = 0.05", "median_s = 2.0").replace("p95_s = 0.1", "p95_s = 3.0")
        + faults,
        encoding="utf-8",
    )
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,prompt\n" + "".join(f"r{n},mug number {n}\n" for n in range(60)), encoding="utf-8"
    )
    return ["flow", str(manifest), "--sim-config", str(sim_toml), "--out", str(tmp_path / "out")]


@pytest.mark.slow(seconds=60)  # two flow runs of 60 two-second tasks
def test_ctrl_c_stops_the_flow_without_retrying_its_shards_and_a_rerun_finishes(
    tmp_path: Path, prefect_server: str
) -> None:
    """One Ctrl-C ends `klein-batch flow` with 130, no shard retried (and paid) after it;
    the same command again finishes every row, the ones in flight at the Ctrl-C included."""
    out = tmp_path / "out"
    args = _sixty_mugs_on_a_slow_key(tmp_path)
    images = out / "images"

    def mid_run() -> int:  # shards are mid-run
        return int(images.is_dir() and len(list(images.iterdir())) >= 5)

    code, output, _ = signal_when(
        [str(KLEIN_BATCH), *args, "--shard-size", "15"],
        _env(tmp_path / "prefect", prefect_server),
        mid_run,
    )
    assert code == 130, output[-3000:]
    assert "run the same command again to resume" in output
    assert "Retry 1/" not in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    # `klein-batch status` sums the shards' journals of a flow's output.
    stopped = subprocess.run(
        [str(KLEIN_BATCH), "status", str(out), "--json"], capture_output=True, text=True
    )
    assert stopped.returncode == 1, stopped.stderr
    figures = json.loads(stopped.stdout)
    assert figures["state"] == "stopped" and figures["total"] == 60
    assert 5 <= figures["counts"]["succeeded"] < 60

    rerun = subprocess.run(
        [str(KLEIN_BATCH), *args, "--shard-size", "15"],
        env=_env(tmp_path / "prefect", prefect_server),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    done = pl.read_parquet(out / "manifest.parquet")
    assert done["row"].to_list() == list(range(1, 61))
    assert set(done["status"]) == {"succeeded"}, done.filter(pl.col("status") != "succeeded")
    status_command = [str(KLEIN_BATCH), "status", str(out)]
    finished = subprocess.run(status_command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert finished.stdout.startswith(f"{out}: finished · run catalog flow, 4 of 4 shards")
    assert "progress  60/60 (100.0%)" in finished.stdout


def _journal_submits(out: Path) -> tuple[int, int]:
    """(acknowledged tasks, submits still waiting for their answer) in a flow's journals."""
    return journal_submits(out.glob(".klein/shards/*/.klein/ledger.sqlite"))


def _stopped_while_submits_wait(
    tmp_path: Path, prefect_server: str, **signalling: Any
) -> tuple[int, str]:
    """Run sixty rows whose submits the simulator answers 1.5 s after charging them, send
    the signal (``signal_when``'s options) once three or more wait for their answers, and
    check that none is left waiting in the journals: each was answered and journaled, so
    the rerun polls it instead of paying again. The exit code and the output."""
    out = tmp_path / "out"
    args = _sixty_mugs_on_a_slow_key(tmp_path, "\n[faults]\nsubmit_answer_delay_s = 1.5\n")

    def submits_waiting() -> int:  # charged by the API, their answers not yet read
        waiting = _journal_submits(out)[1]
        return waiting if waiting >= 3 else 0

    code, output, waiting = signal_when(
        [str(KLEIN_BATCH), *args, "--shard-size", "15"],
        _env(tmp_path / "prefect", prefect_server),
        submits_waiting,
        **signalling,
    )
    acked, still_waiting = _journal_submits(out)
    assert waiting >= 3
    assert still_waiting == 0, output[-3000:]
    assert acked >= waiting
    return code, output


@pytest.mark.slow(seconds=30)
def test_ctrl_c_on_a_flow_journals_the_submits_in_the_air(
    tmp_path: Path, prefect_server: str
) -> None:
    """Ctrl-C lands while submits wait for their answers. Left to ``asyncio.run``'s
    clean-up, every task was cancelled at once and those tasks were never journaled (0
    acknowledged, 24 waiting): the rerun paid for their rows again. Now each shard stops
    as ``klein-batch run`` does."""
    code, output = _stopped_while_submits_wait(tmp_path, prefect_server)
    assert code == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "stopping: waiting up to 10 s for the answers to" in output


@pytest.mark.slow(seconds=30)
def test_a_second_ctrl_c_on_a_flow_still_journals_the_submits_in_the_air(
    tmp_path: Path, prefect_server: str
) -> None:
    """People press Ctrl-C twice. The second press, while the shards wait for the answers
    to their submits, must not cut that wait (as it does not for ``klein-batch run``:
    ``pipeline/run.py``'s ``_on_stop_signal``): it left 12 charged submits unjournaled,
    which the rerun paid for again."""
    code, output = _stopped_while_submits_wait(tmp_path, prefect_server, again_after_s=0.3)
    assert code == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "still stopping: each shard waits for the answers" in output, output[-3000:]


@pytest.mark.slow(seconds=30)
def test_sigterm_on_a_flow_journals_the_submits_in_the_air(
    tmp_path: Path, prefect_server: str
) -> None:
    """SIGTERM is how Prefect stops a flow run's process (a cancelled run on a worker). Its
    handler raised ``TerminationSignal`` out of the event loop, and ``asyncio.run``'s
    clean-up cancelled the submits on the wire: charged tasks never journaled (on a pool, a
    cancelled night: 34 charged, 30 journaled). Now the shards stop first, each waiting
    for its answers, and only then does the process end, by the signal, as before."""
    code, output = _stopped_while_submits_wait(tmp_path, prefect_server, sig=signal.SIGTERM)
    assert code == -signal.SIGTERM, output[-3000:]  # ended by the signal, as Prefect ends it
    assert "SIGTERM: stopping the shards running here first" in output, output[-3000:]
    assert "stopping: waiting up to 10 s for the answers to" in output
