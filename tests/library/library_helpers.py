"""Checks of a library folder as a whole: what every test of it relies on."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from pipeline.library import Library


def open_library(root: Path | str, dialect: str = "klein") -> Library:
    return asyncio.run(Library.open(str(root), dialect=dialect))


def library_images(root: Path) -> list[Path]:
    """The library's images (not their records, not report.html's thumbnails)."""
    return sorted(
        p
        for p in (root / "objects").rglob("*")
        if p.suffix in (".png", ".jpg") and not p.name.endswith(".thumb.jpg")
    )


def check_library(root: Path) -> int:
    """Every index entry's image exists and is the bytes its entry and record describe;
    no temp file is left; returns the number of images."""
    library = open_library(root)
    images = library_images(root)
    assert not [p for p in root.rglob(".*") if p.is_file()], "temp files left behind"
    for image in images:
        fp = image.stem
        entry = library.lookup(fp)
        assert entry is not None, f"{image} has no index entry"
        data = image.read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256
        assert len(data) == entry.bytes
        record = json.loads((image.parent / f"{fp}.json").read_text())
        assert record["sha256"] == entry.sha256 and record["fingerprint"] == fp
        assert record["task_id"]
    assert len(library) >= len(images)
    return len(images)
