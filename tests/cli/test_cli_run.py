"""`klein-batch run --sim` end to end: the README's demo, as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "manifests" / "examples" / "catalog.csv"
KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("FREEPIK_API_KEY", "BFL_API_KEY")}


def test_demo_run_writes_one_output_row_per_input_row(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [KLEIN_BATCH, "run", str(CATALOG), "--out", str(out), "--sim"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=240,
        cwd=tmp_path,
    )
    written = out / "manifest.parquet"
    reasons = (
        pl.read_parquet(written).filter(pl.col("status") != "succeeded").select("key", "reason")
        if written.exists()
        else None
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{reasons}"
    assert "Traceback" not in result.stderr
    # stdout is a pipe, not a terminal: plain progress lines, no escape codes.
    progress = [line for line in result.stdout.splitlines() if line.startswith("progress ")]
    assert progress, result.stdout
    assert progress[-1].startswith("progress 20/20 (100.0%) · succeeded 20 · failed 0")
    assert "\x1b[" not in result.stdout
    assert "20 rows: 20 succeeded" in result.stdout
    manifest = pl.read_parquet(out / "manifest.parquet")
    inputs = pl.read_csv(CATALOG, infer_schema=False)
    assert manifest.height == inputs.height == 20
    assert sorted(manifest["key"].to_list()) == sorted(inputs["id"].to_list())
    assert set(manifest["status"].to_list()) == {"succeeded"}
    assert len(list((out / "images").iterdir())) == 20


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path: Path) -> None:
    slow = tmp_path / "slow.toml"
    slow.write_text("[latency]\nmedian_s = 30.0\np95_s = 40.0\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [KLEIN_BATCH, "run", str(CATALOG), "--out", str(out), "--sim-config", str(slow)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        assert proc.stdout is not None
        # The first progress line means the run is under way (tasks being submitted).
        assert proc.stdout.readline().startswith("progress ")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert f"interrupted: finished and acknowledged tasks are recorded in {out}" in err
    assert "run the same command again to resume" in err
    assert f"klein-batch run {CATALOG} --out {out} --sim-config {slow}" in err
    assert "Traceback" not in err


def test_the_resume_hint_masks_a_password_in_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hint repeats the command line, and stderr lands in cron mail and journald."""
    from pipeline.cli import _resume_hint

    argv = ["klein-batch", "run", "m.csv", "--api-url", "https://kb:s3cr3tPW@api.example"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", "out"])
    hint = _resume_hint("out")
    assert "s3cr3tPW" not in hint
    assert "klein-batch run m.csv --api-url https://kb:***@api.example --out out" in hint
    assert "with the URL's password where it shows ***" in hint
    monkeypatch.setattr(sys, "argv", ["klein-batch", "run", "m.csv", "--out", "out"])
    assert "***" not in _resume_hint("out")


def test_sim_key_gets_the_limits_the_run_asks_for(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.run import simulator_for
    from pipeline.sim import SimServer
    from pipeline.spec import RunSpec

    toml = tmp_path / "k.toml"
    toml.write_text(
        'sim = true\ntier = "nightly"\n[tiers.nightly]\nmax_active = 30\n'
        "submits_per_minute = 500\n",
        encoding="utf-8",
    )
    config = simulator_for(load_config(toml))
    assert config is not None
    with SimServer.in_thread(config) as sim:
        demo = sim.stats()["keys"]["demo"]
    assert (demo["max_active_limit"], demo["submits_per_minute_limit"]) == (30, 500)
    scale = simulator_for(RunSpec(sim=True, tier="scale"))
    assert scale is not None and scale.keys[0].tier == "scale"
    assert simulator_for(RunSpec(api_url="https://api.example.com")) is None


def test_run_summary_records_the_chosen_limits(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            KLEIN_BATCH,
            "run",
            str(CATALOG),
            "--out",
            str(out),
            "--sim",
            "--tier",
            "trial",
            "--submits-per-minute",
            "90",
            "--limit",
            "2",
            "--progress",
            "off",
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert (summary["max_active"], summary["submits_per_minute"]) == (2, 90)
    assert summary["rate_limited"] == 0
    assert pl.read_parquet(out / "manifest.parquet").height == 2
    assert "progress " not in result.stdout
