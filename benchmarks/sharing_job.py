"""One pipeline job of the sharing scenario (``benchmarks/sharing.py``), run as its own process.

    python benchmarks/sharing_job.py MANIFEST OUT API_URL PROGRESS_FILE [polling|webhooks]

The key comes from $FREEPIK_API_KEY as in production; with ``webhooks`` the job runs its
receiver on 127.0.0.1 (a free port) and verifies deliveries with $FREEPIK_WEBHOOK_SECRET.
Every progress snapshot is appended to PROGRESS_FILE as a JSON line with a wall-clock time,
so the scenario can count what this job finished inside its measuring window. SIGINT ends the
run the way Ctrl-C does (exit 130).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from pipeline import run_manifest
from pipeline.run import RunOptions
from pipeline.summary import ProgressSnapshot


def main(
    manifest: str, out: str, api_url: str, progress_path: str, delivery: str = "polling"
) -> int:
    logging.basicConfig(level=os.environ.get("JOB_LOG", "WARNING"))
    with open(progress_path, "a", encoding="utf-8") as progress:

        def record(snapshot: ProgressSnapshot) -> None:
            done = sum(snapshot.counts.values())
            progress.write(json.dumps({"t": time.time(), "done": done}) + "\n")
            progress.flush()

        try:
            summary = run_manifest(
                manifest,
                out,
                api_url=api_url,
                max_active=24,
                submits_per_minute=20_000,
                on_progress=record,
                options=RunOptions(
                    expected_latency_s=1.0,
                    progress_interval_s=0.2,
                    webhook_listen="127.0.0.1:0" if delivery == "webhooks" else None,
                ),
            )
        except KeyboardInterrupt:
            return 130
    return int(summary.exit_code)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
