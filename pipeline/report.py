"""How a finished run reports itself: ``run.json`` for machines, a few lines for people.

Both are rendered from the same ``RunSummary`` so the CLI's last lines, the JSON file and
the Python API's return value can never disagree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np

from pipeline.contract import RowStatus
from pipeline.storage import Sink
from pipeline.summary import RunSummary, budget_made, stop_advice

RUN_JSON_RELPATH = "run.json"


def _percentile(ordered: np.ndarray, fraction: float) -> float:
    # Linear interpolation between closest ranks (numpy's default), so p50 of an even
    # count is the midpoint and small samples do not jump between neighbours.
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = math.ceil(position)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def latency_percentiles(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Median and 95th percentile of latencies; ``(None, None)`` when nothing finished.

    The values are taken into one numpy array (8 bytes each) and sorted in place: a
    million-row run's latencies as a sorted Python list of floats were about 40 MB at the
    end of the run, and a filtered copy plus a sorted copy of the array 23 MB (issue 16).
    """
    found = np.fromiter((math.nan if v is None else v for v in values), dtype=np.float64)
    finite = np.isfinite(found)
    if not finite.all():
        found = found[finite]
    del finite
    if not len(found):
        return None, None
    found.sort()
    return _percentile(found, 0.50), _percentile(found, 0.95)


async def write_run_json(sink: Sink, summary: RunSummary) -> str:
    """Store the summary as pretty ``run.json`` beside the outputs; returns its URI."""
    text = json.dumps(summary.to_dict(), indent=2, sort_keys=False, default=str) + "\n"
    return await sink.put(RUN_JSON_RELPATH, text.encode("utf-8"), "application/json")


def _earlier(summary: RunSummary) -> str:
    """Said beside a rerun's credits: the tasks an earlier run paid for, collected here."""
    if summary.credits_acked_earlier <= 0:
        return ""
    return (
        f" ({summary.credits_acked_earlier:,.2f} of it for tasks an earlier run submitted:"
        " collected, not paid again)"
    )


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def outage_warning(summary: RunSummary) -> str:
    """The run's API outages in one line (``pipeline/gate.py``): the summary's and
    report.html's."""
    times = "once" if summary.api_outages == 1 else f"{summary.api_outages:,} times"
    return (
        f"warning: the API did not answer for {_seconds(summary.api_unreachable_s)} in all "
        f"({times}); rows waited for it instead of failing"
    )


def format_summary(summary: RunSummary) -> str:
    """The CLI's closing lines: what happened to every row, how fast, at what cost, where."""
    counts = summary.counts
    parts = [f"{counts.get(status, 0):,} {status}" for status in RowStatus]
    others = sorted(name for name in counts if name not in set(RowStatus))
    parts += [f"{counts[name]:,} {name}" for name in others if counts[name]]
    lines = [
        f"{summary.total_rows:,} rows: " + ", ".join(parts),
        f"time {_seconds(summary.elapsed_s)}, {summary.images_per_s:.2f} images/s; "
        f"latency p50 {_seconds(summary.latency_p50_s)}, p95 {_seconds(summary.latency_p95_s)}",
        f"credits {summary.credits:,.2f}{_earlier(summary)}; submits {summary.submits:,}, "
        f"retries {summary.retries:,}, rate-limited (429) {summary.rate_limited:,}",
    ]
    if summary.stopped:
        made = budget_made(
            summary.succeeded, summary.images_asked, summary.counts.get(RowStatus.REJECTED, 0)
        )
        lines.insert(0, f"stopped: {summary.stopped} · {made}; {stop_advice(summary.stopped)}")
    if summary.reused_rows:
        lines.append(f"library: {summary.reused_rows:,} images reused (not sent, no cost)")
    if summary.resumed_rows:
        lines.append(f"resumed: {summary.resumed_rows:,} rows were already done or in flight")
    if summary.changed_rows:
        lines.append(summary.changed_warning())
    lines += [f"note: {notice}" for notice in summary.notices]
    if summary.api_outages:
        lines.append(outage_warning(summary))
    if summary.ambiguous_submits:
        lines.append(
            f"warning: {summary.ambiguous_submits:,} submits lost their response "
            "(each may have been charged; counted over every run into this output)"
        )
    if summary.errors:
        top = sorted(summary.errors.items(), key=lambda item: (-item[1], item[0]))[:5]
        lines.append("errors: " + ", ".join(f"{name} x{count:,}" for name, count in top))
    lines.append(f"output: {summary.output} (manifest.parquet, run.json, report.html, images/)")
    return "\n".join(lines)
