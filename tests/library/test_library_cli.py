"""``--library``, ``library = ...``, ``{date}`` and ``--no-library`` through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from library_helpers import library_images

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "manifests" / "examples" / "catalog.csv"
KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")


def klein_batch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FREEPIK_API_KEY", "BFL_API_KEY")}
    result = subprocess.run(
        [KLEIN_BATCH, *args], capture_output=True, text=True, env=env, timeout=300, cwd=cwd
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def submits(out: Path) -> int:
    return int(json.loads((out / "run.json").read_text())["submits"])


def test_a_dated_output_keeps_its_library_beside_the_dated_folders(tmp_path: Path) -> None:
    first = klein_batch(
        "run", str(CATALOG), "--sim", "--out", str(tmp_path / "nightly" / "{date}"), cwd=tmp_path
    )
    assert first.returncode == 0, first.stdout + first.stderr
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    night = tmp_path / "nightly" / today
    assert submits(night) == 20
    library = tmp_path / "nightly" / "library"
    assert len(library_images(library)) == 20
    # report.html's thumbnails (made while verifying each JPEG) are kept too, so a night
    # of copies need not decode them again.
    jpegs = [image for image in library_images(library) if image.suffix == ".jpg"]
    assert len(list((library / "objects").rglob("*.thumb.jpg"))) == len(jpegs) > 0

    # The next night (another folder), with the library named in a config file.
    config = tmp_path / "nightly.toml"
    config.write_text('library = "nightly/library"\n', encoding="utf-8")
    dry = klein_batch(
        "run",
        str(CATALOG),
        "--sim",
        "--out",
        str(tmp_path / "next"),
        "--config",
        str(config),
        "--dry-run",
        cwd=tmp_path,
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "in library  20" in dry.stdout and "To send: 0 images" in dry.stdout
    second = klein_batch(
        "run",
        str(CATALOG),
        "--sim",
        "--out",
        str(tmp_path / "next"),
        "--config",
        str(config),
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "library: 20 images reused" in second.stdout
    assert submits(tmp_path / "next") == 0
    manifest = pl.read_parquet(tmp_path / "next" / "manifest.parquet")
    assert manifest["reused_from"].null_count() == 0
    assert manifest["cost_credits"].sum() == 0

    # --no-library: the same dated output pays in full and adds nothing to the library.
    third = klein_batch(
        "run",
        str(CATALOG),
        "--sim",
        "--out",
        str(tmp_path / "other" / "{date}"),
        "--no-library",
        cwd=tmp_path,
    )
    assert third.returncode == 0, third.stdout + third.stderr
    assert submits(tmp_path / "other" / today) == 20
    assert not (tmp_path / "other" / "library").exists()


def test_a_bad_library_setting_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("library = 3\n", encoding="utf-8")
    result = klein_batch(
        "run",
        str(CATALOG),
        "--sim",
        "--out",
        str(tmp_path / "o"),
        "--config",
        str(config),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert f"{config}: setting library = 3 is not allowed; expected a string" in result.stderr
