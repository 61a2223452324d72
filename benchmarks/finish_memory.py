"""Peak memory of each step that ends a run (``_Run.finish``), at 10,000 rows and at a
million, without waiting 90 minutes for a million-row run.

A real run of ``--rows`` rows against the simulator (the sweep's manifest, the ``scale``
tier, 0.1 s tasks) writes a journal. A copy of that output is grown in SQL to
``--grow-to`` rows: every task and run row again under a suffixed key, so each row joins a
finished task with the real request and outcome JSON the join parses. Each step of
``finish`` then runs over the original and over the grown copy, in a fresh process each
time, with the kernel's high-water mark (``VmHWM``) reset before the step, so a step's
peak is its own and not an earlier step's.

    python -m benchmarks.finish_memory             # 10,000 rows and a million: about 4 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, SimSettings, Simulator, status_kb
from benchmarks.run import klein_batch_bin, write_big_manifest

KEY = "finish-memory-key"
SIM = SimSettings("scale", 96, 14400, 0.1, 0.25)


def _own_mb(field: str) -> float:
    return (status_kb(os.getpid(), field) or 0) / 1024


def _reset_peak() -> None:
    """``VmHWM`` starts again from the current ``VmRSS`` (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


async def measure_steps(out: Path, manifest: Path) -> list[dict[str, Any]]:
    """Each step of ``finish`` over the finished output ``out``: RSS before, peak, after."""
    from pipeline import run
    from pipeline.html_report import write_html_report
    from pipeline.ledger import Ledger
    from pipeline.output_manifest import write_output_manifest
    from pipeline.product_exports import open_manifest
    from pipeline.report import latency_percentiles
    from pipeline.storage import open_sink
    from pipeline.summary import RunSummary

    ledger = Ledger.open(out / ".klein" / "ledger.sqlite")
    sink = open_sink(str(out))
    reader = open_manifest(manifest)
    summary = RunSummary(
        run_id="finish-memory",
        manifest=str(manifest),
        output=str(out),
        dialect="klein",
        tier=SIM.tier,
        max_active=SIM.max_active,
        submits_per_minute=SIM.submits_per_minute,
        total_rows=0,
    )

    def counts() -> None:
        summary.counts = ledger.counts()  # as finish does: the report shows them

    steps: list[tuple[str, Callable[[], object]]] = [
        ("manifest.parquet", lambda: write_output_manifest(reader, ledger, sink)),
        ("counts", counts),
        ("merged lines", lambda: run._merged_lines(reader)),
        ("latency percentiles", lambda: latency_percentiles(ledger.iter_latencies())),
        ("credits", ledger.credits),
        ("destination credits", ledger.destination_credits),
        ("ambiguous submits", ledger.ambiguous_submits),
        ("report.html", lambda: write_html_report(sink, summary)),
    ]
    found = []
    for name, step in steps:
        before = _own_mb("VmRSS")
        _reset_peak()
        result = step()
        if isinstance(result, Awaitable):
            await result
        found.append(
            {
                "step": name,
                "before_mb": round(before, 1),
                "peak_mb": round(_own_mb("VmHWM"), 1),
                "after_mb": round(_own_mb("VmRSS"), 1),
            }
        )
    ledger.close()
    return found


def grow(out: Path, rows: int) -> None:
    """Copy every task and run row of ``out``'s journal until it holds ``rows`` rows."""
    conn = sqlite3.connect(out / ".klein" / "ledger.sqlite", isolation_level=None)
    try:
        planned = conn.execute("SELECT COUNT(*) FROM run_rows").fetchone()[0]
        last_task = conn.execute("SELECT MAX(id) FROM tasks").fetchone()[0]
        fields = conn.execute("PRAGMA table_info(tasks)")
        columns = [row[1] for row in fields if row[1] not in ("id", "key")]
        names = ", ".join(columns)
        conn.execute("BEGIN")
        for copy in range(1, rows // planned):
            conn.execute(
                f"INSERT INTO tasks(key, {names}) SELECT key || '~{copy}', {names} "
                f"FROM tasks WHERE id <= {last_task}"
            )
            conn.execute(
                "INSERT INTO run_rows(idx, key, dup_of, retry, rejection) "
                f"SELECT idx + {copy * planned}, key || '~{copy}', dup_of, retry, rejection "
                f"FROM run_rows WHERE idx < {planned}"
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def real_run(root: Path, rows: int) -> Path:
    """A finished output of ``rows`` rows, run against the simulator."""
    manifest = root / f"manifest-{rows}.csv"
    write_big_manifest(manifest, rows)
    out = root / f"out-{rows}"
    with Simulator(SIM, root, KEY, cpus=[]) as sim:
        command = [*klein_batch_bin(), "run", str(manifest), "--api-url", sim.url]
        command += ["--out", str(out), "--tier", SIM.tier, "--progress", "off"]
        env = {**os.environ, "FREEPIK_API_KEY": KEY, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        subprocess.run(command, check=True, env=env, cwd=REPO)
    return manifest


def measured_in_child(out: Path, manifest: Path) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "benchmarks.finish_memory", "--measure", str(out)]
    done = subprocess.run(
        [*command, str(manifest)], check=True, capture_output=True, text=True, cwd=REPO
    )
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows of the real run")
    parser.add_argument("--grow-to", type=int, default=1_000_000, help="rows of the copy")
    parser.add_argument("--repeat", type=int, default=3, help="measurements of each size")
    parser.add_argument("--measure", nargs=2, metavar=("OUT", "MANIFEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        out, manifest = (Path(value) for value in args.measure)
        print(json.dumps(asyncio.run(measure_steps(out, manifest))))
        return
    with tempfile.TemporaryDirectory(prefix="finish-memory-") as tmp:
        root = Path(tmp)
        print(f"real run of {args.rows:,} rows ...", flush=True)
        small_manifest = real_run(root, args.rows)
        grown = root / f"out-{args.grow_to}"
        small = root / f"out-{args.rows}"
        shutil.copytree(small, grown, ignore=shutil.ignore_patterns("images"))
        # The images are only read (the report's thumbnails): linked, not copied.
        shutil.copytree(small / "images", grown / "images", copy_function=os.link)
        grow(grown, args.grow_to)
        big_manifest = root / f"manifest-{args.grow_to}.csv"
        write_big_manifest(big_manifest, args.grow_to)
        for rows, out, manifest in (
            (args.rows, root / f"out-{args.rows}", small_manifest),
            (args.grow_to, grown, big_manifest),
        ):
            runs = [measured_in_child(out, manifest) for _ in range(args.repeat)]
            print(f"\n{rows:,} rows, runs: {args.repeat} (MB; median, min-max of peaks)")
            for at, step in enumerate(runs[0]):
                peaks = [r[at]["peak_mb"] for r in runs]
                rise = [r[at]["peak_mb"] - r[at]["before_mb"] for r in runs]
                print(
                    f"  {step['step']:<22} peak {statistics.median(peaks):6.1f} "
                    f"({min(peaks):.1f}-{max(peaks):.1f}), "
                    f"+{statistics.median(rise):.1f} over the RSS before it"
                )
            finish = [max(step["peak_mb"] for step in r) for r in runs]
            print(f"  whole finish: peak {min(finish):.1f}-{max(finish):.1f} MB")


if __name__ == "__main__":
    main()
