"""A first data row larger than a CSV read block is one clear line (issue 15, item 9).

pyarrow reads the first block when the reader opens, so a first row over the block size
(32 MB) escaped the row-size message as a "straddling object" traceback (exit 70).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline_helpers import KLEIN_BATCH, cli_env

from pipeline.manifest import _CSV_BLOCK_BYTES


def test_a_first_row_over_the_block_size_stops_with_one_line(tmp_path: Path) -> None:
    manifest = tmp_path / "huge.csv"
    with manifest.open("w", encoding="utf-8") as handle:
        handle.write("id,prompt\n")
        handle.write('a,"' + "x" * (2 * _CSV_BLOCK_BYTES + (1 << 20)) + '"\n')
        handle.write("b,a red mug\n")
    for command in (
        ["validate", str(manifest)],
        ["run", str(manifest), "--sim", "--out", str(tmp_path / "out")],
    ):
        done = subprocess.run(
            [KLEIN_BATCH, *command], capture_output=True, text=True, env=cli_env(), timeout=240
        )
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "a single row is larger than" in lines[0] and "row 1 or later" in lines[0]


def test_a_later_row_over_the_block_size_is_named_before_the_file_is_parsed(
    tmp_path: Path,
) -> None:
    """The byte scan that sizes the read blocks finds the oversized row, so pyarrow (whose
    read-ahead thread, still running at exit, got the process aborted) never opens it."""
    from pipeline.errors import ManifestError
    from pipeline.manifest import ManifestReader

    manifest = tmp_path / "late.csv"
    with manifest.open("w", encoding="utf-8") as handle:
        handle.write('id,prompt\nr1,a red mug\nr2,"a ""quoted"" mug\nwith a newline"\nr3,a cup\n')
        handle.write('r4,"' + "x" * (_CSV_BLOCK_BYTES + 10) + '"\n')
    try:
        for _ in ManifestReader(manifest).batches():
            pass
    except ManifestError as exc:
        message = str(exc)
    else:
        raise AssertionError("an oversized row was read")
    assert "a single row is larger than 16 MB (row 4 or later)" in message, message
