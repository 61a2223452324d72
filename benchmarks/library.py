"""The image library across nights: a second night pays only for what changed.

    .venv/bin/python -m benchmarks.library                  # 2,000 rows, 5% changed
    .venv/bin/python -m benchmarks.library --rows 500 --changed 0.1
    .venv/bin/python -m benchmarks.library --index 1000000  # the index at a million images

Three nights of ``klein-batch run`` (each its own process, as cron would start it) against
one simulated standard key (its own process), each into a new dated folder and all with
one library (``--library nightly/library``, what a ``{date}`` output defaults to):

1. the catalog, first time: every row is sent;
2. the same catalog again: nothing should be sent (0 accepted submits, from the
   simulator's ``/_sim/stats``), and the night should take a small share of the first's;
3. the catalog with ``--changed`` of its prompts edited: exactly those rows should be sent.

``--index N`` measures the index alone instead: a library of N synthetic entries (16
sorted segments, as compaction leaves them) is opened, and the time, the peak memory it
adds and the lookups per second are recorded beside the nights' figures.

Writes ``benchmarks/library.json``, which ``python -m benchmarks.run --render`` adds to
RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import SimSettings, Simulator
from pipeline.library import INDEX, INDEX_SCHEMA, Library

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "library.json"
KEY = "library-bench-key"
KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")
#: A standard key and tasks of about a second, as in the other scenarios.
SETTINGS = SimSettings(
    tier="standard", max_active=24, submits_per_minute=3600, median_s=1.0, p95_s=2.0
)


def write_catalog(path: Path, rows: int, changed: set[int]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "sku", "prompt", "output_format"])
        for i in range(rows):
            prompt = f"studio product photo of item {i} on a light grey seamless background"
            if i in changed:
                prompt += ", new season colourway"
            writer.writerow([f"item-{i:05d}", f"SKU{i:06d}", prompt, "jpeg"])


def night(sim: Simulator, manifest: Path, out: Path, library: Path) -> dict[str, Any]:
    """One night as cron runs it; figures from outside the process (the simulator)."""
    before = sim.stats()["submits_accepted"]
    command = [
        KLEIN_BATCH,
        "run",
        str(manifest),
        "--api-url",
        sim.url,
        "--tier",
        SETTINGS.tier,
        "--out",
        str(out),
        "--library",
        str(library),
        "--progress",
        "off",
    ]
    env = {**os.environ, "FREEPIK_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"night into {out} exited {result.returncode}: {result.stderr[-2000:]}")
    summary = json.loads((out / "run.json").read_text())
    return {
        "out": out.name,
        "wall_s": round(wall, 2),
        "submits_accepted": sim.stats()["submits_accepted"] - before,
        "succeeded": summary["counts"]["succeeded"],
        "reused": summary.get("reused_rows", 0),
        "credits": summary["credits"],
    }


def index_scale(entries: int) -> dict[str, Any]:
    """Open a library of ``entries`` index entries; what it costs, as a run pays it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="klein-library-index-") as tmp:
        root = Path(tmp)
        fps = sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(entries))
        for prefix in "0123456789abcdef":
            mine = [fp for fp in fps if fp[0] == prefix]
            n = len(mine)
            table = pa.table(
                {
                    "fingerprint": mine,
                    "format": ["jpeg"] * n,
                    "bytes": [180_000] * n,
                    "sha256": mine,
                    "width": [1024] * n,
                    "height": [1024] * n,
                    "task_id": [f"task-{fp[:32]}" for fp in mine],
                    "cost_credits": [1.05] * n,
                    "created_at": [0.0] * n,
                },
                schema=INDEX_SCHEMA,
            )
            (root / INDEX / prefix).mkdir(parents=True)
            pq.write_table(table, root / INDEX / prefix / "segment.parquet", compression="zstd")
        size = sum(path.stat().st_size for path in (root / INDEX).rglob("*.parquet"))
        probes = fps[: min(100_000, entries)]
        del fps
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.monotonic()
        library = asyncio.run(Library.open(str(root), dialect="klein"))
        open_s = time.monotonic() - started
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        started = time.monotonic()
        found = sum(library.lookup(fp) is not None for fp in probes)
        lookup_s = time.monotonic() - started
    return {
        "entries": entries,
        "segments_mb": round(size / 1e6, 1),
        "open_s": round(open_s, 2),
        "peak_rss_added_mb": round(peak_mb),
        "lookups_per_s": round(len(probes) / lookup_s),
        "found": found == len(probes),
        "load": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--changed", type=float, default=0.05, help="share of rows edited")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--index", type=int, help="measure the index at N entries instead")
    args = parser.parse_args(argv)
    if args.index:
        figures = index_scale(args.index)
        kept = json.loads(args.out.read_text()) if args.out.exists() else {}
        kept["index"] = figures | {
            "command": shlex.join(["python", "-m", "benchmarks.library", *(argv or sys.argv[1:])])
        }
        args.out.write_text(json.dumps(kept, indent=2) + "\n")
        print(json.dumps(figures))
        return 0 if figures["found"] else 1
    edited = set(range(0, args.rows, max(1, round(1 / args.changed))))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="klein-library-bench-") as tmp:
        work = Path(tmp)
        base, changed = work / "catalog.csv", work / "catalog-edited.csv"
        write_catalog(base, args.rows, set())
        write_catalog(changed, args.rows, edited)
        library = work / "nightly" / "library"
        with Simulator(SETTINGS, work, KEY, cpus=[]) as sim:
            nights = [
                night(sim, base, work / "nightly" / "2026-12-01", library),
                night(sim, base, work / "nightly" / "2026-12-02", library),
                night(sim, changed, work / "nightly" / "2026-12-03", library),
            ]
    first, same, edit = nights
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks.library", *(argv or sys.argv[1:])]),
        "nproc": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "rows": args.rows,
        "changed_rows": len(edited),
        "sim": SETTINGS.describe(),
        "nights": nights,
        "unchanged_time_ratio": round(same["wall_s"] / first["wall_s"], 3),
        "changed_sent_exactly": edit["submits_accepted"] == len(edited),
        **({"index": previous["index"]} if "index" in previous else {}),
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for entry in nights:
        print(json.dumps(entry))
    print(
        f"unchanged night: {same['submits_accepted']} submits, "
        f"{results['unchanged_time_ratio']:.1%} of the first night's time; "
        f"{len(edited)} rows changed: {edit['submits_accepted']} submits; "
        f"load {results['load_before']} -> {results['load_after']}"
    )
    ok = same["submits_accepted"] == 0 and results["changed_sent_exactly"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
