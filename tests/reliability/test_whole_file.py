"""Cache files (report thumbnails, the simulator's image folder) are written whole or not
at all: a reader finds the old file or the whole new one, and a failed write leaves no
temporary file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.whole_file import write_whole


def test_a_file_is_replaced_whole_and_nothing_else_is_left(tmp_path: Path) -> None:
    target = tmp_path / "thumb.jpg"
    target.write_bytes(b"old")
    write_whole(target, b"new image bytes")
    assert target.read_bytes() == b"new image bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["thumb.jpg"]


def test_a_write_that_fails_at_the_rename_raises_and_leaves_no_partial_file(
    tmp_path: Path,
) -> None:
    target = tmp_path / "taken.jpg"
    target.mkdir()  # a folder where the file should go: the temporary file is written,
    with pytest.raises(OSError):  # the rename onto the folder fails
        write_whole(target, b"image")
    assert [p.name for p in tmp_path.iterdir()] == ["taken.jpg"]
    assert target.is_dir() and not any(target.iterdir())
