"""What a catalog flow run shows in the Prefect UI: progress, a shard table, a summary.

Built only from counts, timings, limits and output locations; never from parameters or
settings as a whole, so nothing secret can ride along.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from uuid import UUID

from pipeline.contract import RowStatus
from pipeline.summary import RunSummary

log = logging.getLogger(__name__)

SHARDS_KEY = "klein-catalog-shards"
SUMMARY_KEY = "klein-catalog-summary"


def link(uri: str) -> str:
    """A clickable address: ``file://`` for local paths, the URI itself otherwise."""
    if "://" in uri:
        return uri
    return Path(uri).resolve().as_uri()


async def start_progress(total_rows: int, shards: int) -> UUID:
    from prefect.artifacts import acreate_progress_artifact

    return await acreate_progress_artifact(
        progress=0.0,
        description=f"Catalog: {total_rows:,} rows in {shards:,} shards; rows finished in %",
    )


async def update_progress(artifact_id: UUID, done_rows: int, total_rows: int) -> None:
    """Move the progress bar; while the Prefect server cannot be reached (restarting), the
    bar waits for the next shard: a night never fails for its progress bar (measured: a
    server down 120 s failed the night's run here, with ConnectError)."""
    from prefect.artifacts import aupdate_progress_artifact

    from flows.queue import unreachable

    percent = 100.0 if total_rows == 0 else round(100.0 * done_rows / total_rows, 2)
    try:
        await aupdate_progress_artifact(artifact_id=artifact_id, progress=min(percent, 100.0))
    except Exception as exc:
        if not unreachable(exc):
            raise
        log.warning("progress not updated: the Prefect server cannot be reached (%s)", exc)


def shard_row(info: dict[str, Any]) -> dict[str, Any]:
    summary = info.get("summary") or {}
    counts = summary.get("counts") or {}
    row: dict[str, Any] = {
        "shard": info["index"],
        "rows": summary.get("total_rows", 0),
        "worker": info.get("worker") or "local",
        "share": info.get("occupy"),
    }
    for status in RowStatus:
        row[str(status)] = counts.get(str(status), 0)
    row["images_per_s"] = summary.get("images_per_s", 0.0)
    row["credits"] = summary.get("credits", 0.0)
    row["seconds"] = summary.get("elapsed_s", 0.0)
    return row


async def publish_table(shards: list[dict[str, Any]]) -> None:
    from prefect.artifacts import acreate_table_artifact

    await acreate_table_artifact(
        table=[shard_row(info) for info in sorted(shards, key=lambda s: s["index"])],
        key=SHARDS_KEY,
        description="One line per shard: its rows, where it ran, what happened to them",
    )


def summary_markdown(
    summary: RunSummary,
    *,
    manifest_uri: str,
    run_json_uri: str,
    images_uri: str,
    shards: int,
    share: str,
    failed_shards: list[int],
    report_uri: str | None = None,
) -> str:
    counts = summary.counts
    lines = [
        f"# Catalog run `{summary.run_id}`",
        "",
        f"**{summary.total_rows:,} rows** from `{summary.manifest}` in {shards:,} shards "
        f"({share}; {summary.max_active} for the key, tier {summary.tier}).",
        "",
        "| status | rows |",
        "|---|---:|",
    ]
    lines += [f"| {status} | {counts.get(str(status), 0):,} |" for status in RowStatus]
    p50 = "n/a" if summary.latency_p50_s is None else f"{summary.latency_p50_s:.2f} s"
    p95 = "n/a" if summary.latency_p95_s is None else f"{summary.latency_p95_s:.2f} s"
    lines += [
        "",
        f"- throughput: **{summary.images_per_s:.2f} images/s** over "
        f"{summary.elapsed_s:.1f} s (new images only)",
        f"- latency queue to done: p50 {p50}, p95 {p95}",
        f"- credits: {summary.credits:,.2f}; submits {summary.submits:,}, retries "
        f"{summary.retries:,}, rate-limited (429) {summary.rate_limited:,}",
    ]
    if summary.resumed_rows:
        lines.append(f"- resumed: {summary.resumed_rows:,} rows were done or in flight before")
    if summary.changed_rows:
        lines.append(f"- {summary.changed_warning()}")
    if summary.ambiguous_submits:
        lines.append(
            f"- warning: {summary.ambiguous_submits:,} submits lost their response "
            "(each may have been charged; counted over every run into this output)"
        )
    if failed_shards:
        shown = ", ".join(str(n) for n in failed_shards)
        lines.append(f"- **shards that did not finish: {shown}**; run the flow again to resume")
    lines += [
        "",
        "Outputs:",
        f"- [output manifest]({link(manifest_uri)}) `{manifest_uri}`",
        f"- [run summary]({link(run_json_uri)}) `{run_json_uri}`",
        f"- [images]({link(images_uri)}) `{images_uri}`",
    ]
    if report_uri:
        # The page people look at: contact sheet, problems, throughput (pipeline/html_report.py).
        lines.append(f"- [report.html]({link(report_uri)}) `{report_uri}`")
    return "\n".join(lines) + "\n"


async def publish_summary(markdown: str) -> None:
    from prefect.artifacts import acreate_markdown_artifact

    await acreate_markdown_artifact(
        markdown=markdown,
        key=SUMMARY_KEY,
        description="Counts, throughput and links to the outputs",
    )
