"""Both dialects through the same end-to-end scenarios, over real HTTP against the simulator.

The engine is dialect-free, so each scenario runs once per dialect: what differs (sizes,
statuses, error bodies, cost at submit, the absolute ``polling_url``) lives in the provider
modules and must give the same rows, statuses and costs either way.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from pipeline_helpers import (
    KLEIN_BATCH,
    check_output,
    cli_env,
    fast_options,
    key_stats,
    run_against,
    statuses,
    write_catalog,
)

from pipeline.contract import ASPECT_RATIOS, KLEIN_MODEL, bfl_size, output_size
from pipeline.providers.bfl import DEFAULT_MODEL, MODELS
from pipeline.sim import FaultConfig, KeyConfig, ModerationConfig, SimConfig, SimServer

DIALECTS = ["klein", "bfl"]


def sim_price(config: SimConfig, dialect: str, width: int, height: int) -> float:
    """What ``config``'s simulator charges for one image the pipeline sends in ``dialect``."""
    model = MODELS[DEFAULT_MODEL] if dialect == "bfl" else KLEIN_MODEL
    return config.price(model).credits(width, height)


def poll_urls(out: Path) -> list[str]:
    conn = sqlite3.connect(out / ".klein" / "ledger.sqlite")
    try:
        rows = conn.execute("SELECT poll_url FROM tasks WHERE poll_url IS NOT NULL")
        return [url for (url,) in rows]
    finally:
        conn.close()


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_preset_and_resolution_succeeds(dialect: str, sim: SimServer, tmp_path: Path) -> None:
    presets = list(ASPECT_RATIOS)
    n = 2 * len(presets)
    manifest = write_catalog(
        tmp_path / "in",
        n,
        extra={
            "aspect_ratio": [presets[i % len(presets)] for i in range(n)],
            "resolution": ["2k" if i >= len(presets) else "1k" for i in range(n)],
        },
    )
    out = tmp_path / "out"
    summary = run_against(sim, manifest, out, options=fast_options(dialect=dialect))

    table = check_output(out, n, summary, dialect=dialect)
    assert statuses(table) == {"succeeded": n}
    for record in table.iter_rows(named=True):
        width, height = record["width"], record["height"]
        assert record["cost_credits"] == sim_price(sim.config, dialect, width, height)
    square_2k = table.filter(
        (pl.col("aspect_ratio") == "square_1_1") & (pl.col("resolution") == "2k")
    )
    expected = (2000, 2000) if dialect == "bfl" else (2048, 2048)
    assert square_2k.select("width", "height").row(0) == expected
    assert bfl_size("square_1_1", "2k") == (2000, 2000)
    stats = key_stats(sim)
    assert stats["credits_charged"] == pytest.approx(table["cost_credits"].sum(), abs=0.01)
    assert summary.credits == pytest.approx(stats["credits_charged"], abs=0.01)
    urls = poll_urls(out)
    assert len(urls) == n
    if dialect == "bfl":
        # The simulator's polling_url names its regional listener: kept exactly as given.
        regional = f"{sim.regional_url}/v1/get_result?id="
        assert all(url.startswith(regional) for url in urls), urls[:3]
    assert stats["polls"] >= n


@pytest.mark.parametrize("dialect", DIALECTS)
def test_moderated_and_failed_tasks_end_once_and_are_not_charged(
    dialect: str, start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    server = start_sim(
        moderation=ModerationConfig(words=["forbidden"], pass_tolerance=4, rate=0.1),
        faults=FaultConfig(seed=5, task_failed=0.1),
    )
    n = 150
    prompts = [f"mug {i} with forbidden print" if i % 5 == 0 else f"mug {i}" for i in range(n)]
    manifest = write_catalog(tmp_path / "in", n, prompt=prompts)
    out = tmp_path / "out"
    summary = run_against(server, manifest, out, options=fast_options(dialect=dialect))

    table = check_output(out, n, summary, dialect=dialect)
    counts = statuses(table)
    stats = key_stats(server)
    assert counts.get("moderated", 0) == stats["tasks_moderated"]
    # The simulator counts moderated tasks among its failed ones.
    assert counts.get("failed", 0) == stats["tasks_failed"] - stats["tasks_moderated"] > 0
    assert counts["succeeded"] + counts["moderated"] + counts["failed"] == n
    # Every prompt with the word is moderated before generation (Request Moderated in bfl).
    by_word = table.filter(pl.col("prompt").str.contains("forbidden"))
    assert set(by_word["status"].to_list()) == {"moderated"}
    not_done = table.filter(pl.col("status") != "succeeded")
    assert not_done["cost_credits"].sum() == 0
    assert not_done["task_id"].null_count() == 0
    failed = table.filter(pl.col("status") == "failed")
    word = "Error" if dialect == "bfl" else "FAILED"
    assert failed["reason"].str.contains(word).all(), failed["reason"].to_list()
    assert stats["credits_charged"] == pytest.approx(table["cost_credits"].sum(), abs=0.01)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_out_of_credits_skips_the_rest(
    dialect: str, start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    size = (bfl_size if dialect == "bfl" else output_size)("square_1_1", "1k")
    price = sim_price(SimConfig(), dialect, *size)
    server = start_sim(keys=[KeyConfig(credits=round(4.5 * price, 2))])
    rows = 12
    out = tmp_path / "out"
    summary = run_against(
        server, write_catalog(tmp_path / "in", rows), out, options=fast_options(dialect=dialect)
    )

    table = check_output(out, rows, summary, dialect=dialect)
    assert statuses(table) == {"succeeded": 4, "skipped": rows - 4}
    skipped = table.filter(pl.col("status") == "skipped")
    assert skipped["reason"].str.contains("out of credits").all()
    assert skipped["reason"].str.contains("HTTP 402").all()
    # The FastAPI body's detail reaches the reason (bfl), as dialect A's message does.
    assert skipped["reason"].str.contains("credits").all()
    assert summary.credits == pytest.approx(4 * price, abs=0.01)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_transient_faults_and_429s_lose_no_row(
    dialect: str, start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    from pipeline.sim import EndpointFaults

    faults = FaultConfig(
        seed=9,
        submit=EndpointFaults(error_503=0.1),
        poll=EndpointFaults(error_500=0.1, drop=0.05),
        download=EndpointFaults(error_503=0.1),
        truncate=0.05,
    )
    # The client believes it has 12 slots, the key has 6: the server's 429s pace it.
    server = start_sim(keys=[KeyConfig(max_active=6)], faults=faults, retry_after="mixed")
    rows = 120
    out = tmp_path / "out"
    summary = run_against(
        server,
        write_catalog(tmp_path / "in", rows),
        out,
        options=fast_options(dialect=dialect, max_active=12),
    )
    table = check_output(out, rows, summary, dialect=dialect)
    assert statuses(table) == {"succeeded": rows}
    stats = key_stats(server)
    assert stats["max_active"] <= 6
    assert stats["rate_limited"] > 0 and summary.rate_limited > 0
    assert summary.retries > 0


def test_cli_runs_dialect_bfl_against_the_bundled_simulator(tmp_path: Path) -> None:
    import subprocess

    manifest = write_catalog(
        tmp_path / "in", 6, extra={"resolution": ["2k", "1k", "1k", "1k", "1k", "1k"]}
    )
    out = tmp_path / "out"
    args = [KLEIN_BATCH, "run", str(manifest), "--out", str(out), "--sim", "--dialect", "bfl"]
    # The plan prices the rows as klein 9B, at the sizes dialect B sends.
    nine = SimConfig().price(MODELS["klein-9b"])
    sizes = [bfl_size("square_1_1", "2k")] + [bfl_size("square_1_1", "1k")] * 5
    estimate = round(sum(nine.credits(w, h) for w, h in sizes), 2)
    assert estimate > round(sum(sim_price(SimConfig(), "bfl", w, h) for w, h in sizes), 2)
    plan = subprocess.run(
        [*args, "--model", "klein-9b", "--dry-run"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plan.returncode == 0, plan.stderr
    assert f"Estimated cost: {estimate:.2f} credits" in plan.stdout
    done = subprocess.run(
        [*args, "--model", "klein-9b", "--progress", "off"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "6 succeeded" in done.stdout
    table = check_output(out, 6, dialect="bfl")
    assert table.filter(pl.col("resolution") == "2k")["width"].to_list() == [2000]
    assert table["cost_credits"].sum() == pytest.approx(estimate)  # what the plan said
    report = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert report["dialect"] == "bfl"

    wrong = subprocess.run(
        [*args, "--model", "klein-99b", "--progress", "off"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        "error: --model 'klein-99b' is not allowed; expected one of klein-4b, klein-9b "
        "(dialect bfl)"
    ]
    assert "Traceback" not in wrong.stderr


def test_cli_dialect_bfl_takes_the_key_from_bfl_api_key(sim: SimServer, tmp_path: Path) -> None:
    import subprocess

    manifest = write_catalog(tmp_path / "in", 3)
    args = [
        KLEIN_BATCH, "run", str(manifest), "--out", str(tmp_path / "out"),
        "--api-url", sim.url, "--dialect", "bfl", "--progress", "off",
    ]  # fmt: skip
    missing = subprocess.run(
        args, env=cli_env(FREEPIK_API_KEY="sim-demo-key"), capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert "BFL_API_KEY" in missing.stderr and "Traceback" not in missing.stderr
    done = subprocess.run(
        args, env=cli_env(BFL_API_KEY="sim-demo-key"), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert key_stats(sim)["submits_accepted"] == 3
