"""Library tests reuse the end-to-end helpers of tests/pipeline (one way to check output)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))

from sim_fixtures import sim, start_sim  # noqa: F401 (fixtures, found by name)
