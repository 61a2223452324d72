"""An input at ``DEST/manifest.parquet`` is refused before anything is sent (issue 15, item 6).

The output manifest the run is about to write would overwrite it, and the rerun would read
that output as its input and pay again under new keys. Whatever the spelling: the path
itself, a symbolic link to it, a hard link to it, or the output reached through a linked
folder. (S3: ``tests/s3/test_s3_run.py``.)
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
from pipeline_helpers import key_stats, run_against

from pipeline.errors import KleinError
from pipeline.sim import SimServer


def test_the_output_manifest_as_input_is_refused_however_it_is_reached(
    sim: SimServer, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    own = dest / "manifest.parquet"
    pl.DataFrame({"id": ["a", "b"], "prompt": ["a red mug", "a blue vase"]}).write_parquet(own)
    before = own.read_bytes()
    (tmp_path / "linked.parquet").symlink_to(own)
    os.link(own, tmp_path / "hard.parquet")
    (tmp_path / "dest-link").symlink_to(dest, target_is_directory=True)

    ways: list[tuple[Path, Path]] = [
        (own, dest),
        (tmp_path / "linked.parquet", dest),
        (tmp_path / "hard.parquet", dest),
        (own, tmp_path / "dest-link"),
        (tmp_path / "dest-link" / "manifest.parquet", dest),
    ]
    for manifest, out in ways:
        with pytest.raises(KleinError, match="is the output manifest this run writes"):
            run_against(sim, manifest, out)
    assert key_stats(sim)["submits_accepted"] == 0
    assert own.read_bytes() == before  # the input is untouched
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.parquet"]


def test_a_copy_of_the_output_manifest_elsewhere_is_an_input_like_any_other(
    sim: SimServer, tmp_path: Path
) -> None:
    """Only that one file is refused: the same table copied out of DEST runs."""
    copy = tmp_path / "in" / "manifest.parquet"
    copy.parent.mkdir()
    pl.DataFrame({"id": ["a"], "prompt": ["a red mug"]}).write_parquet(copy)
    summary = run_against(sim, copy, tmp_path / "dest")
    assert summary.counts["succeeded"] == 1
