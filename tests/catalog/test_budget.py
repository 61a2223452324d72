"""--max-credits: spend plus in-flight cost never passes the budget; a higher one continues."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from catalog_helpers import accepted, charged, clean_env, fast_sim, output, run

from pipeline.sim import SimServer

KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")
#: Six square 1k images at 1.05 credits each: 6.30 credits in all.
ROWS = pl.DataFrame(
    {"id": [f"p{i}" for i in range(6)], "prompt": [f"product {i}" for i in range(6)]}
)


def test_a_budget_below_the_cost_stops_then_a_higher_one_continues(
    tmp_path: Path, sim: SimServer
) -> None:
    out = tmp_path / "out"
    first = run(ROWS, out, sim, max_credits=3.0)
    assert first.counts["succeeded"] == 2  # 2 x 1.05 fits in 3, a third would not
    assert first.counts["skipped"] == 4
    assert first.credits == pytest.approx(2.1)
    assert charged(sim) == pytest.approx(2.1)
    assert first.exit_code == 1
    skipped = output(out).filter(pl.col("status") == "skipped")
    assert skipped.height == 4
    assert all(reason.startswith("budget: --max-credits 3 reached") for reason in skipped["reason"])
    assert "rerun with a higher --max-credits" in skipped["reason"][0]

    second = run(ROWS, out, sim, max_credits=100.0)
    assert second.counts["succeeded"] == 6
    assert second.resumed_rows == 2
    assert accepted(sim) == 6  # the two done before were not paid again
    done = output(out)
    assert done["status"].to_list() == ["succeeded"] * 6
    # Total spend across both runs is the sum of the images' costs, as the API charged.
    assert done["cost_credits"].sum() == pytest.approx(6.3)
    assert charged(sim) == pytest.approx(6.3)


def test_the_budget_counts_what_the_output_already_spent(tmp_path: Path, sim: SimServer) -> None:
    out = tmp_path / "out"
    run(ROWS.head(3), out, sim)  # 3.15 credits spent into this output, no budget
    later = run(ROWS, out, sim, max_credits=4.2)
    assert later.counts["succeeded"] == 4  # 3.15 + 1.05 = 4.2: exactly one more fits
    assert charged(sim) == pytest.approx(4.2)


def test_moderated_and_failed_tasks_release_their_reservation(tmp_path: Path) -> None:
    rows = pl.DataFrame(
        {
            "id": ["a", "b", "c"],
            # The simulator moderates "nude" at the default safety tolerance; not charged.
            "prompt": ["nude statue", "red mug", "blue mug"],
        }
    )
    with SimServer.in_thread(fast_sim()) as sim:
        summary = run(rows, tmp_path / "out", sim, max_credits=2.1)
        assert summary.counts["moderated"] == 1
        assert summary.counts["succeeded"] == 2  # the moderated one's 1.05 came back
        assert charged(sim) == pytest.approx(2.1)


def test_a_zero_budget_sends_nothing(tmp_path: Path, sim: SimServer) -> None:
    summary = run(ROWS, tmp_path / "out", sim, max_credits=0)
    assert summary.counts["skipped"] == 6
    assert accepted(sim) == 0


def test_a_dry_run_into_a_stopped_output_prices_what_the_rerun_sends(
    tmp_path: Path, sim: SimServer
) -> None:
    """The plan's count and cost for the rerun are the rerun's own figures, to the cent."""
    manifest = tmp_path / "products.csv"
    ROWS.write_csv(manifest)
    budget = ("--max-credits", "100")
    out = tmp_path / "out"
    run(manifest, out, sim, max_credits=3.0)  # 2 images (2.10 credits), 4 skipped

    dry = subprocess.run(
        [KLEIN_BATCH, "run", str(manifest), "--sim", "--out", str(out), "--dry-run", *budget],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )

    assert dry.returncode == 0, dry.stderr
    assert "in DEST     2 done by an earlier run, 0 in flight" in dry.stdout
    assert "To send: 4 images" in dry.stdout
    assert "Estimated cost: 4.20 credits" in dry.stdout
    assert "(2.10 already spent or in flight in this output, 97.90 left) covers" in dry.stdout
    before = accepted(sim)
    rerun = run(manifest, out, sim, max_credits=100.0)
    assert accepted(sim) - before == 4
    assert rerun.credits == pytest.approx(4.2)


def test_a_budget_stops_at_whole_products_and_says_stopped_budget(
    tmp_path: Path, sim: SimServer
) -> None:
    """4 products x 3 styles at 1.05 each: 7 credits make two whole products, not 6 halves."""
    rows = pl.DataFrame(
        {"id": [f"p{i}" for i in range(4)], "title": [f"mug {i}" for i in range(4)]}
    )
    out = tmp_path / "out"
    summary = run(
        rows,
        out,
        sim,
        prompt_template="{title}, {style}",
        vary=["style=studio,loft,garden"],
        max_credits=7.0,
    )
    assert summary.counts["succeeded"] == 6 and summary.counts["skipped"] == 6
    assert summary.stopped == "budget" and summary.state == "stopped: budget"
    done = output(out)
    per_product = (
        done.group_by("row")
        .agg((pl.col("status") == "succeeded").sum().alias("made"))
        .sort("row")["made"]
        .to_list()
    )
    assert sorted(per_product) == [0, 0, 3, 3]  # whole products only
    skipped = done.filter(pl.col("status") == "skipped")["reason"].to_list()
    assert all("this product's images cost 3.15 together" in reason for reason in skipped)
    assert json.loads((out / "run.json").read_text())["state"] == "stopped: budget"
    status = subprocess.run(
        [KLEIN_BATCH, "status", str(out)], capture_output=True, text=True, env=clean_env()
    )
    assert status.returncode == 1
    assert f"{out}: stopped: budget" in status.stdout
    assert "stopped the run: 6 of 12 images made (50%)" in status.stdout
