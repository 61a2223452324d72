"""Input columns named like the output manifest's own are kept, renamed (issue 15, item 7).

An extra column ``__row`` crashed the run after its images were paid for (exit 70) and,
as an integer Parquet column, silently replaced the output's row numbers; ``validate``
said all was well. Every name the pipeline keeps for itself (``pipeline/reserved.py``:
the output's columns and the working columns ``__index``, ``__error``, ``__row``) now
renames a clashing input column to ``input_<name>``, in CSV and Parquet, with and
without a variation matrix, and ``validate`` agrees.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import polars as pl
import pytest
from pipeline_helpers import KLEIN_BATCH, SIM_KEY, cli_env, key_stats, run_against
from reliability_helpers import validate

from pipeline.output_manifest import FIXED_COLUMNS
from pipeline.reserved import WORKING_COLUMNS
from pipeline.sim import SimServer

N = 6
CLASHING = [*sorted(WORKING_COLUMNS), "row", "status", "key", "task_id"]


def _frame() -> pl.DataFrame:
    data: dict[str, list[object]] = {
        "id": [f"item-{i}" for i in range(N)],
        "prompt": [f"a mug, view {i}" for i in range(N)],
    }
    for number, name in enumerate(CLASHING):
        # Integers: an integer ``__row`` is what used to replace the output's row numbers.
        data[name] = [1000 * (number + 1) + i for i in range(N)]
    return pl.DataFrame(data)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_clashing_input_columns_are_renamed_and_the_run_completes(
    sim: SimServer, tmp_path: Path, kind: str
) -> None:
    frame = _frame()
    manifest = tmp_path / f"catalog.{kind}"
    frame.write_csv(manifest) if kind == "csv" else frame.write_parquet(manifest)
    out = tmp_path / "out"

    checked = validate(manifest)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr

    summary = run_against(sim, manifest, out)

    assert summary.counts["succeeded"] == N
    table = pl.read_parquet(out / "manifest.parquet")
    assert table.columns[: len(FIXED_COLUMNS)] == list(FIXED_COLUMNS)
    assert table["row"].to_list() == list(range(1, N + 1))  # the output's own numbers
    for name in CLASHING:
        assert table[f"input_{name}"].cast(pl.Int64).to_list() == frame[name].to_list(), name
    assert key_stats(sim)["submits_accepted"] == N


def test_a_variation_matrix_keeps_its_row_numbers_beside_an_input_row_column(
    sim: SimServer, tmp_path: Path
) -> None:
    manifest = tmp_path / "catalog.parquet"
    _frame().write_parquet(manifest)
    out = tmp_path / "out"
    done = subprocess.run(
        [
            *(KLEIN_BATCH, "run", str(manifest), "--out", str(out), "--api-url", sim.url),
            *("--vary", "aspect_ratio=square_1_1,widescreen_16_9", "--progress", "off"),
        ],
        capture_output=True,
        text=True,
        env=cli_env(FREEPIK_API_KEY=SIM_KEY),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    table = pl.read_parquet(out / "manifest.parquet")
    assert table["row"].to_list() == [r for r in range(1, N + 1) for _ in range(2)]
    base = 1000 * (CLASHING.index("__row") + 1)
    assert table["input___row"].to_list() == [base + i for i in range(N) for _ in range(2)]


def test_names_are_renamed_until_free() -> None:
    from pipeline.reserved import renamed

    assert renamed("status", {"status", "input_status"}) == "input_input_status"
    assert renamed("sku", {"status"}) == "sku"
