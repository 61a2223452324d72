"""Helpers of the reliability tests that need root: ``chattr`` (immutable even for root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pipeline_helpers import KLEIN_BATCH, cli_env


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a real tmpfs / sets chattr +i")


def chattr(flag: str, path: Path) -> None:
    """``chattr +i`` / ``-i``: immutable even for root (unlike chmod)."""
    needs_root()
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr {flag} is not supported here: {done.stderr.strip()}")


def validate(manifest: Path) -> subprocess.CompletedProcess[str]:
    """``klein-batch validate MANIFEST`` as a user runs it."""
    return subprocess.run(
        [KLEIN_BATCH, "validate", str(manifest)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
