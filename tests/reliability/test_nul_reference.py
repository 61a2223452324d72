"""A NUL byte in a reference path is a rejected row, not an internal error (issue 15, item 8).

``validate`` exited 70 with a traceback and ``run`` marked the row ``failed: internal
error``. Both go through ``ReferenceStore``, which now refuses the spec with a message
naming the file, row and column; the valid rows still run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import polars as pl
from PIL import Image
from pipeline_helpers import KLEIN_BATCH, SIM_KEY, cli_env, key_stats
from reliability_helpers import validate

from pipeline.sim import SimServer


def _manifest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "ref.png")
    frame = pl.DataFrame(
        {
            "id": ["good", "nul"],
            "prompt": ["a red mug", "a blue mug"],
            "input_image": ["ref.png", "ref\x00.png"],
        }
    )
    path = folder / "catalog.parquet"  # Parquet keeps the NUL as it is
    frame.write_parquet(path)
    return path


def test_a_nul_in_a_reference_path_is_rejected_by_validate_and_run(
    sim: SimServer, tmp_path: Path
) -> None:
    manifest = _manifest(tmp_path / "in")
    checked = validate(manifest)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr
    assert "NUL byte" in checked.stdout + checked.stderr

    out = tmp_path / "out"
    done = subprocess.run(
        [KLEIN_BATCH, "run", str(manifest), "--out", str(out), "--api-url", sim.url],
        capture_output=True,
        text=True,
        env=cli_env(FREEPIK_API_KEY=SIM_KEY),
        timeout=240,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    table = pl.read_parquet(out / "manifest.parquet")
    assert table["status"].to_list() == ["succeeded", "rejected"]
    reason = table["reason"][1]
    assert "row 2, column input_image" in reason and "NUL byte" in reason, reason
    assert key_stats(sim)["submits_accepted"] == 1
