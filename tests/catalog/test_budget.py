"""--max-credits: spend plus in-flight cost never passes the budget; a higher one continues."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from catalog_helpers import accepted, charged, clean_env, fast_sim, output, run

from pipeline.contract import KLEIN_MODEL
from pipeline.report import format_summary
from pipeline.sim import EndpointFaults, FaultConfig, SimConfig, SimServer
from pipeline.status import read_status

KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")
#: What the simulator (default prices) charges for one square 1k image.
EACH = SimConfig().price(KLEIN_MODEL).credits(1024, 1024)
#: How many of those a budget of 3 credits pays for.
FITS = int(3.0 // EACH)
#: Six square 1k images: 6 x EACH credits in all.
ROWS = pl.DataFrame(
    {"id": [f"p{i}" for i in range(6)], "prompt": [f"product {i}" for i in range(6)]}
)


def test_a_budget_below_the_cost_stops_then_a_higher_one_continues(
    tmp_path: Path, sim: SimServer
) -> None:
    out = tmp_path / "out"
    first = run(ROWS, out, sim, max_credits=3.0)
    assert 0 < FITS < 6
    assert first.counts["succeeded"] == FITS  # FITS x EACH fits in 3, one more would not
    assert first.counts["skipped"] == 6 - FITS
    assert first.credits == pytest.approx(FITS * EACH)
    assert charged(sim) == pytest.approx(FITS * EACH)
    assert first.exit_code == 1
    skipped = output(out).filter(pl.col("status") == "skipped")
    assert skipped.height == 6 - FITS
    assert all(reason.startswith("budget: --max-credits 3 reached") for reason in skipped["reason"])
    assert "rerun with a higher --max-credits" in skipped["reason"][0]

    second = run(ROWS, out, sim, max_credits=100.0)
    assert second.counts["succeeded"] == 6
    assert second.resumed_rows == FITS
    assert accepted(sim) == 6  # the ones done before were not paid again
    done = output(out)
    assert done["status"].to_list() == ["succeeded"] * 6
    # Total spend across both runs is the sum of the images' costs, as the API charged.
    assert done["cost_credits"].sum() == pytest.approx(6 * EACH)
    assert charged(sim) == pytest.approx(6 * EACH)


def test_the_budget_counts_what_the_output_already_spent(tmp_path: Path, sim: SimServer) -> None:
    out = tmp_path / "out"
    run(ROWS.head(3), out, sim)  # 3 x EACH spent into this output, no budget
    later = run(ROWS, out, sim, max_credits=round(4 * EACH, 2))
    assert later.counts["succeeded"] == 4  # 3 x EACH + EACH = the budget: exactly one more fits
    assert charged(sim) == pytest.approx(4 * EACH)


def test_moderated_and_failed_tasks_release_their_reservation(tmp_path: Path) -> None:
    rows = pl.DataFrame(
        {
            "id": ["a", "b", "c"],
            # The simulator moderates "nude" at the default safety tolerance; not charged.
            "prompt": ["nude statue", "red mug", "blue mug"],
        }
    )
    with SimServer.in_thread(fast_sim()) as sim:
        summary = run(rows, tmp_path / "out", sim, max_credits=round(2 * EACH, 2))
        assert summary.counts["moderated"] == 1
        assert summary.counts["succeeded"] == 2  # the moderated one's EACH came back
        assert charged(sim) == pytest.approx(2 * EACH)


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
    run(manifest, out, sim, max_credits=3.0)  # FITS images, the rest skipped

    dry = subprocess.run(
        [KLEIN_BATCH, "run", str(manifest), "--sim", "--out", str(out), "--dry-run", *budget],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )

    assert dry.returncode == 0, dry.stderr
    rest, spent = 6 - FITS, FITS * EACH
    assert f"in DEST     {FITS} done by an earlier run, 0 in flight" in dry.stdout
    assert f"To send: {rest} images" in dry.stdout
    assert f"Estimated cost: {rest * EACH:.2f} credits" in dry.stdout
    left = f"({spent:.2f} already spent or in flight in this output, {100 - spent:.2f} left)"
    assert f"{left} covers" in dry.stdout
    before = accepted(sim)
    rerun = run(manifest, out, sim, max_credits=100.0)
    assert accepted(sim) - before == rest
    assert rerun.credits == pytest.approx(rest * EACH)


def test_a_budget_stops_at_whole_products_and_says_stopped_budget(
    tmp_path: Path, sim: SimServer
) -> None:
    """4 products x 3 styles: 2.5 products' worth makes two whole products, not 7 or 8 halves."""
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
        max_credits=round(2.5 * 3 * EACH, 2),
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
    product = f"this product's images cost {3 * EACH:.2f} together"
    assert all(product in reason for reason in skipped)
    assert json.loads((out / "run.json").read_text())["state"] == "stopped: budget"
    status = subprocess.run(
        [KLEIN_BATCH, "status", str(out)], capture_output=True, text=True, env=clean_env()
    )
    assert status.returncode == 1
    assert f"{out}: stopped: budget" in status.stdout
    assert "stopped the run: 6 of 12 images made (50%)" in status.stdout


def test_a_budget_stop_counts_the_share_made_over_rows_that_can_make_an_image(
    tmp_path: Path, sim: SimServer
) -> None:
    """Two rows rejected (no prompt) and a budget for two images of eight: "2 of 8 images
    made (25%)", in the summary, `status` and report.html alike. It said "2 of 10 (20%)",
    as if a higher --max-credits would make the two rejected rows' images too."""
    rows = pl.DataFrame(
        {"id": [f"p{i}" for i in range(10)], "prompt": [f"mug {i}" for i in range(8)] + ["", ""]}
    )
    out = tmp_path / "out"
    summary = run(rows, out, sim, max_credits=round(2.5 * EACH, 2))
    assert summary.counts["succeeded"] == 2 and summary.counts["rejected"] == 2
    assert summary.stopped == "budget"
    expected = "2 of 8 images made (25%); 2 rejected rows left out"

    assert format_summary(summary).splitlines()[0] == (
        f"stopped: budget · {expected}; rerun with a higher --max-credits to continue"
    )
    status = subprocess.run(
        [KLEIN_BATCH, "status", str(out)], capture_output=True, text=True, env=clean_env()
    )
    assert f"stopped the run: {expected}; rerun" in status.stdout
    assert f"stopped: budget · {expected} · rerun" in (out / "report.html").read_text()


def test_a_submit_whose_answer_was_lost_counts_and_is_not_sent_past_the_budget(
    tmp_path: Path,
) -> None:
    # Every submit's answer is cut after its task was created and charged: the client can
    # never know whether it paid. A budget of one image's price must not pay for a second.
    faults = FaultConfig(seed=1, submit=EndpointFaults(drop=1.0))
    with SimServer.in_thread(fast_sim(faults=faults)) as sim:
        summary = run(ROWS.head(1), tmp_path / "out", sim, max_credits=EACH)
        assert accepted(sim) == 1  # sent once: a second send could have passed the budget
        assert charged(sim) == pytest.approx(EACH)
    assert summary.counts["failed"] == 1
    assert summary.ambiguous_submits == 1
    (reason,) = output(tmp_path / "out")["reason"].to_list()
    assert "--max-credits leaves no room to send the row again" in reason


def test_a_submit_whose_answer_was_lost_goes_again_when_the_budget_has_room(
    tmp_path: Path,
) -> None:
    # Half the answers are cut; room for every row twice over: the rows whose answer was
    # lost go again, and every image is made.
    faults = FaultConfig(seed=1, submit=EndpointFaults(drop=0.5))
    budget = round(2 * len(ROWS) * EACH, 2)
    with SimServer.in_thread(fast_sim(faults=faults)) as sim:
        summary = run(ROWS, tmp_path / "out", sim, max_credits=budget)
        sent, paid = accepted(sim), charged(sim)
    assert summary.counts["succeeded"] == len(ROWS)
    assert sent > len(ROWS)  # some answers were lost, and those rows went again
    assert paid <= budget + 1e-6


def test_a_budget_full_of_reservations_fails_a_row_whose_answer_was_lost(
    tmp_path: Path,
) -> None:
    # Room for three images, all three reserved at once: a lost answer cannot go again.
    # The rows the budget then stops say part of it went on answers that never came.
    faults = FaultConfig(seed=1, submit=EndpointFaults(drop=0.5))
    budget = round(3 * EACH, 2)
    with SimServer.in_thread(fast_sim(faults=faults)) as sim:
        summary = run(ROWS, tmp_path / "out", sim, max_credits=budget)
        sent, paid = accepted(sim), charged(sim)
    assert paid <= budget + 1e-6
    rows = output(tmp_path / "out")
    lost = rows.filter(pl.col("status") == "failed")["reason"].to_list()
    assert lost and all("--max-credits leaves no room to send the row again" in r for r in lost)
    made = summary.counts["succeeded"]
    assert made + len(lost) == sent  # each lost answer counted at its price, never sent again
    # klein-batch status says it too.
    status = read_status(tmp_path / "out")
    assert status.credits_unanswered == round(len(lost) * EACH, 2)
    assert f"{len(lost) * EACH:.2f} of it for submits whose answer never came" in status.render()
    stopped = rows.filter(pl.col("status") == "skipped")["reason"].to_list()
    assert stopped
    for reason in stopped:
        assert reason.startswith("budget: --max-credits 4.2 reached (4.20 credits"), reason
        assert f"({len(lost) * EACH:.2f} of them for submits whose answer never came" in reason
