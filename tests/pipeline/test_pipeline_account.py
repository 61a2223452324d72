"""What the account allows: a refused key (401), running out of credits (402), and
``--retry-failed`` paying again only for the rows that failed."""

from __future__ import annotations

import subprocess
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

from pipeline import ExitCode, KeyRefusedError
from pipeline.contract import cost_credits
from pipeline.sim import FaultConfig, KeyConfig, SimServer


def test_refused_key_says_so_in_one_line_and_exits_2(sim: SimServer, tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path / "in", 8)
    out = tmp_path / "out"
    result = subprocess.run(
        [KLEIN_BATCH, "run", str(manifest), "--out", str(out), "--api-url", sim.url],
        capture_output=True,
        text=True,
        env=cli_env(FREEPIK_API_KEY="not-the-key-4242"),
        timeout=120,
    )

    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: the API at {sim.url} refused the key in $FREEPIK_API_KEY")
    assert "HTTP 401" in errors[0]
    assert "not-the-key-4242" not in result.stdout + result.stderr
    # The output still accounts for every row.
    table = check_output(out, 8)
    assert statuses(table) == {"skipped": 8}
    assert table["reason"].str.contains("refused the key").all()
    assert key_stats(sim)["submits_accepted"] == 0


def test_refused_key_from_python_raises_with_the_summary(sim: SimServer, tmp_path: Path) -> None:
    with pytest.raises(KeyRefusedError) as caught:
        run_against(sim, write_catalog(tmp_path / "in", 3), tmp_path / "out", key="wrong")
    assert caught.value.summary is not None
    assert caught.value.summary.counts["skipped"] == 3
    assert caught.value.exit_code == ExitCode.CANNOT_START
    assert "wrong" not in str(caught.value)


def test_out_of_credits_skips_the_rest(start_sim: Callable[..., SimServer], tmp_path: Path) -> None:
    price = cost_credits(1024, 1024)
    server = start_sim(keys=[KeyConfig(credits=round(4.5 * price, 2))])
    rows = 12

    summary = run_against(server, write_catalog(tmp_path / "in", rows), tmp_path / "out")

    table = check_output(tmp_path / "out", rows, summary)
    assert statuses(table) == {"succeeded": 4, "skipped": rows - 4}
    skipped = table.filter(pl.col("status") == "skipped")
    assert skipped["reason"].str.contains("out of credits").all()
    assert skipped["reason"].str.contains("HTTP 402").all()
    assert key_stats(server)["submits_accepted"] == 4
    assert summary.exit_code == 1
    assert summary.credits == pytest.approx(4 * price, abs=0.01)


def test_retry_failed_resubmits_only_failed_rows(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    server = start_sim(faults=FaultConfig(seed=21, task_failed=0.3))
    manifest = write_catalog(tmp_path / "in", 40)
    out = tmp_path / "out"
    run_against(server, manifest, out)
    first = pl.read_parquet(out / "manifest.parquet")
    failed_keys = set(first.filter(pl.col("status") == "failed")["key"].to_list())
    assert failed_keys
    accepted = key_stats(server)["submits_accepted"]

    plain = run_against(server, manifest, out)  # a plain rerun leaves failed rows alone
    assert key_stats(server)["submits_accepted"] == accepted
    assert plain.counts["failed"] == len(failed_keys)

    summary = run_against(server, manifest, out, options=fast_options(retry_failed=True))

    table = check_output(out, 40, summary)
    assert key_stats(server)["submits_accepted"] == accepted + len(failed_keys)
    changed = table.join(first, on="key", suffix="_before").filter(
        pl.col("task_id") != pl.col("task_id_before")
    )
    assert set(changed["key"].to_list()) == failed_keys
    assert (changed["attempts"] >= 2).all()
