"""The long variant of the chaos matrix, on demand: every fault at once on a big run.

``KLEIN_SOAK=1 .venv/bin/pytest -s tests/chaos/test_soak.py`` (or ``-m soak``);
``KLEIN_SOAK_ROWS`` sets the size (default 20,000). It prints its figures and writes them
to ``benchmarks/soak.json`` (``$KLEIN_SOAK_REPORT`` names another file), which
``benchmarks/report.py`` renders into ``benchmarks/RESULTS.md`` ("Chaos soak").
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
REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.json"


def _command() -> str:
    """The command that reproduces this run, as RESULTS.md shows it."""
    rows = f"KLEIN_SOAK_ROWS={ROWS} " if "KLEIN_SOAK_ROWS" in os.environ else ""
    return (
        f"KLEIN_SOAK=1 {rows}KLEIN_SOAK_REPORT=benchmarks/soak.json "
        ".venv/bin/python -m pytest -s -p no:cacheprovider tests/chaos/test_soak.py"
    )


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
        "command": _command(),
        "rows": ROWS,
        "rows_processed": done.height,
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
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    assert lost == 0
    assert stats["duplicate_submits"] <= summary.ambiguous_submits
    print("\nsoak figures:", json.dumps(figures, indent=2, sort_keys=True))
    report = Path(os.environ.get("KLEIN_SOAK_REPORT") or REPORT)
    report.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
