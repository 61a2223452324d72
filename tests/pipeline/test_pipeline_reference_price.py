"""Reference megapixels are billed: every cost a run records, and its budget, include them.

The API charges each input (reference) megapixel on top of the output's (contract:
``input_mp``). A task in flight when a run is interrupted is collected by the rerun; it
used to be recorded at the price of its request alone, and counted so by the rerun's
budget, which then let ``--max-credits`` be passed (audit 19: 101.5 charged against a cap
of 100). The simulator's ``credits_charged`` is the truth these tests hold the run to.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import polars as pl
import pytest
from PIL import Image
from pipeline_helpers import SimProcess, capped_run, ctrl_c_when, run_cli, write_catalog
from test_pipeline_resume import in_flight

from pipeline.contract import KLEIN_MODEL
from pipeline.sim import SimConfig

ROWS = 40
#: A 4 MP reference: 0.40 credits on top of each 1k square's 1.40, so a price without it is
#: visibly short (a 1024 x 1024 text-to-image and this image-to-image differ by 0.40).
REF_SIDE = 2000
PRICE = SimConfig().price(KLEIN_MODEL)
WITH_REF = round(PRICE.credits(1024, 1024, REF_SIDE * REF_SIDE), 2)
WITHOUT_REF = round(PRICE.credits(1024, 1024), 2)
#: Room for 16 images with their reference; 21 at the price without it.
CAP = 30.0
SIM_TOML = """
[latency]
median_s = 0.5
p95_s = 0.9

[[keys]]
name = "demo"
key = "sim-demo-key"
max_active = 12
"""


def catalog_with_reference(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (REF_SIDE, REF_SIDE), (180, 40, 40)).save(buffer, "PNG")
    (folder / "ref.png").write_bytes(buffer.getvalue())
    return write_catalog(folder, ROWS, extra={"input_image": ["ref.png"] * ROWS})


@pytest.mark.slow
def test_tasks_collected_after_ctrl_c_cost_their_reference_and_the_budget_holds(
    sim_process: SimProcess, tmp_path: Path
) -> None:
    assert WITH_REF - WITHOUT_REF >= 0.39  # the reference is what this test is about
    manifest = catalog_with_reference(tmp_path / "in")
    out = tmp_path / "out"
    ledger = out / ".klein" / "ledger.sqlite"
    command = capped_run(manifest, out, sim_process.url, CAP)
    code, _ = ctrl_c_when(command, lambda: in_flight(ledger) >= 5, "acknowledged tasks in flight")
    assert code == 130
    left_in_flight = in_flight(ledger)
    assert left_in_flight >= 5  # the rerun collects these: the case under test

    rerun = run_cli(command)
    assert "Traceback" not in rerun.stderr
    time.sleep(0.2)  # let the simulator settle its counters
    charged = round(float(sim_process.stats()["credits_charged"]), 2)
    table = pl.read_parquet(out / "manifest.parquet")
    made = table.filter(pl.col("status") == "succeeded")
    # Every image, collected after the interrupt or not, records what the API charged it.
    assert set(made["cost_credits"].to_list()) == {WITH_REF}
    assert round(float(table["cost_credits"].sum()), 2) == pytest.approx(charged)
    # ...and the budget held across the resume, as the API counts it.
    assert charged <= CAP + 1e-6
    assert made.height == int(CAP // WITH_REF)
