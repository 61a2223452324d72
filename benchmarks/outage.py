"""A run through an API outage: the simulator down for a while mid-run, then back.

The audit's scenario (500 rows, the API gone for 40 s five seconds into the run, the
standard tier, the default retry policy) measures what an outage costs a run::

    python -m benchmarks.outage --rows 500 --down 40

It prints the rows by status, the submits the simulator accepted (one per row unless a
submit was cut off after it was sent: ``duplicates`` and ``ambiguous``), how long the
API was unreachable as the run saw it, and the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import tempfile
import threading
import time
from pathlib import Path

from pipeline.run import RunOptions, arun_manifest
from pipeline.sim import SimConfig, SimServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--down", type=float, default=40.0, help="seconds the API is away")
    parser.add_argument("--after", type=float, default=5.0, help="seconds into the run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="klein-outage-") as folder:
        root = Path(folder)
        manifest = root / "catalog.csv"
        with manifest.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "prompt"])
            writer.writerows(
                [f"item-{i:05d}", f"studio photo of mug {i}"] for i in range(args.rows)
            )
        with SimServer.in_thread(SimConfig()) as sim:

            def outage() -> None:
                time.sleep(args.after)
                sim.go_down()
                time.sleep(args.down)
                sim.come_back()

            threading.Thread(target=outage, name="outage", daemon=True).start()
            started = time.monotonic()
            summary = asyncio.run(
                arun_manifest(
                    manifest,
                    root / "out",
                    api_url=sim.url,
                    api_key=sim.config.keys[0].key,
                    options=RunOptions(),
                )
            )
            wall = time.monotonic() - started
            key = sim.stats()["keys"][sim.config.keys[0].name]
    shown = ", ".join(f"{count} {status}" for status, count in summary.counts.items() if count)
    print(f"{args.rows} rows, API down {args.down:g} s from {args.after:g} s: {shown}")
    print(
        f"submits accepted {key['submits_accepted']}, duplicates {key['duplicate_submits']}, "
        f"ambiguous {summary.ambiguous_submits}; API unreachable {summary.api_unreachable_s:.1f} s "
        f"({summary.api_outages} outages); retries {summary.retries}; wall {wall:.1f} s"
    )


if __name__ == "__main__":
    main()
