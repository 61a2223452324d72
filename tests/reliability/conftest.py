"""Reliability tests reuse the end-to-end helpers and simulator fixtures of tests/pipeline.

Some need root (a real small tmpfs, ``chattr +i``); ``tmpfs`` mounts one per test and
skips with the reason when this process may not mount.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))

from reliability_helpers import needs_root
from sim_fixtures import sim, start_sim  # noqa: F401 (fixtures, found by name)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, Path | None], Path]]:
    """Mount a real tmpfs of the given size (``"3m"``) at a fresh folder; unmounted after."""
    needs_root()
    mounted: list[Path] = []

    def mount(size: str, where: Path | None = None) -> Path:
        point = where or tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        point.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["chattr", "-R", "-i", str(point)], capture_output=True, check=False)
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", str(point)], capture_output=True, check=True)
