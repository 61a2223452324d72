"""The long variant of the chaos matrix, on demand: every fault at once on a big run.

``KLEIN_SOAK=1 .venv/bin/pytest -s tests/chaos/test_soak.py`` (or ``-m soak``);
``KLEIN_SOAK_ROWS`` sets the size (default 20,000). It prints the figures recorded in
``benchmarks/RESULTS.md`` ("Soak") and writes them to ``$KLEIN_SOAK_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import polars as pl
import pytest
from chaos_helpers import CHAOS_KEY, check_run, sim_config, sim_process, write_catalog
from test_fault_matrix import MATRIX

from pipeline.run import RunOptions, run_manifest

pytestmark = [pytest.mark.soak, pytest.mark.timeout(7200)]

ROWS = int(os.environ.get("KLEIN_SOAK_ROWS", "20000"))


def test_soak_every_fault_at_once(tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path / "catalog", ROWS)
    out = tmp_path / "out"
    settings, _ = MATRIX["everything-at-once"]
    started = time.monotonic()
    with sim_process(sim_config(**settings)) as sim:
        summary = run_manifest(
            manifest,
            out,
            api_url=sim.url,
            api_key=CHAOS_KEY,
            tier="enterprise",
            options=RunOptions(expected_latency_s=0.05),
        )
        stats = sim.key_stats()
    elapsed = time.monotonic() - started
    done = check_run(manifest, out)
    by_status = dict(done.group_by("status").len().iter_rows())
    lost = ROWS - done.filter(pl.col("status").is_not_null()).height
    figures = {
        "rows": ROWS,
        "by_status": by_status,
        "faults_injected": sum(stats["faults"].values()) + stats["rate_limited"],
        "faults": {**stats["faults"], "rate_limited_429": stats["rate_limited"]},
        "tasks_failed": stats["tasks_failed"],
        "tasks_moderated": stats["tasks_moderated"],
        "downloads_expired": stats["downloads_expired"],
        "ambiguous_submits": summary.ambiguous_submits,
        "duplicate_submits": stats["duplicate_submits"],
        "rows_lost": lost,
        "elapsed_s": round(elapsed, 1),
    }
    assert lost == 0
    assert stats["duplicate_submits"] <= summary.ambiguous_submits
    print("\nsoak figures:", json.dumps(figures, indent=2, sort_keys=True))
    report = os.environ.get("KLEIN_SOAK_REPORT")
    if report:
        Path(report).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
