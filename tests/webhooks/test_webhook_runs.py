"""Whole runs in webhook mode, both dialects, against the simulator over real HTTP.

With a receiver, tasks end when their verified webhook arrives, so polls per image fall to
near zero (read from the simulator's own counters, never from timing). When the simulator
loses, delays or duplicates deliveries, every row still ends exactly once: a lost webhook
costs a late poll, never a row. The signing secret appears in no log line and no file the
run writes.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from pipeline_helpers import check_output, fast_options, statuses, write_catalog

from pipeline.run import arun_manifest
from pipeline.sim import FaultConfig, KeyConfig, SimServer
from pipeline.summary import RunSummary

SECRET = "whsec_a2xlaW4tYmF0Y2gtd2ViaG9vay10ZXN0LXNlY3JldA=="
DIALECTS = ["klein", "bfl"]


def run_with_webhooks(
    server: SimServer, manifest: Path, out: Path, dialect: str, **options: Any
) -> RunSummary:
    opts = fast_options(dialect=dialect, webhook_listen="127.0.0.1:0", **options)
    return asyncio.run(
        arun_manifest(
            manifest,
            out,
            api_url=server.url,
            api_key=KeyConfig().key,
            options=opts,
            webhook_secret=SECRET,
        )
    )


def polls_per_image(server: SimServer) -> float:
    stats = server.stats()["keys"]["demo"]
    return stats["polls"] / max(1, stats["submits_accepted"])


@pytest.mark.parametrize("dialect", DIALECTS)
def test_webhooks_replace_polling(dialect: str, start_sim: Any, tmp_path: Path) -> None:
    rows = 150
    manifest = write_catalog(tmp_path / "in", rows)
    polled = start_sim(keys=[KeyConfig(webhook_secret=SECRET)])
    baseline = asyncio.run(
        arun_manifest(
            manifest,
            tmp_path / "polled",
            api_url=polled.url,
            api_key=KeyConfig().key,
            options=fast_options(dialect=dialect),
        )
    )
    check_output(tmp_path / "polled", rows, baseline, dialect=dialect)
    hooked = start_sim(keys=[KeyConfig(webhook_secret=SECRET)])
    summary = run_with_webhooks(hooked, manifest, tmp_path / "hooked", dialect)

    table = check_output(tmp_path / "hooked", rows, summary, dialect=dialect)
    assert statuses(table) == {"succeeded": rows}
    with_hooks, without = polls_per_image(hooked), polls_per_image(polled)
    assert without >= 1.0
    # Polling would cost about one poll per image; a safety poll only goes out when a task
    # is overdue and its webhook not yet handled, which a CPU shared with the parallel suite
    # makes more frequent (0.21-0.41 seen at load 7-10, 0.0-0.1 alone).
    assert with_hooks <= 0.5 and with_hooks < without / 2, (with_hooks, without)
    assert summary.webhooks >= 0.8 * rows
    assert summary.webhook_receiver["accepted"] >= summary.webhooks  # also in run.json
    assert hooked.stats()["keys"]["demo"]["webhooks_sent"] >= rows
    assert hooked.stats()["keys"]["demo"]["webhooks_failed"] == 0


@pytest.mark.parametrize("dialect", DIALECTS)
def test_lost_late_and_duplicated_webhooks_lose_no_row(
    dialect: str, start_sim: Any, tmp_path: Path
) -> None:
    rows = 300
    faults = FaultConfig(
        seed=17,
        webhook_lost=0.15,
        webhook_late=0.15,
        webhook_late_s=0.5,
        webhook_duplicate=0.2,
        task_failed=0.05,
    )
    server = start_sim(keys=[KeyConfig(webhook_secret=SECRET)], faults=faults)
    manifest = write_catalog(tmp_path / "in", rows)
    out = tmp_path / "out"
    summary = run_with_webhooks(server, manifest, out, dialect)

    table = check_output(out, rows, summary, dialect=dialect)
    counts = statuses(table)
    stats = server.stats()["keys"]["demo"]
    assert counts["succeeded"] + counts.get("failed", 0) == rows
    assert counts.get("failed", 0) == stats["tasks_failed"] > 0
    assert stats["submits_accepted"] == rows and stats["duplicate_submits"] == 0
    for fault in ("webhook_lost", "webhook_late", "webhook_duplicate"):
        assert stats["faults"].get(fault, 0) > 0, stats["faults"]
    # Lost deliveries were made up for by polls; the rest ended by webhook.
    assert stats["polls"] >= stats["faults"]["webhook_lost"] * (1 if dialect == "bfl" else 0)
    assert 0 < summary.webhooks < rows
    assert polls_per_image(server) < 1.0


def test_the_webhook_secret_never_leaves_the_process(
    start_sim: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_sim(keys=[KeyConfig(webhook_secret=SECRET)])
    manifest = write_catalog(tmp_path / "in", 20)
    out = tmp_path / "out"
    # Polls first at four times a second's 85th percentile: under a loaded parallel run
    # the simulator's deliveries (a thread of this process) lost the race to polls due
    # at 0.2 s, and no task ended by webhook.
    with caplog.at_level(logging.DEBUG):
        summary = run_with_webhooks(server, manifest, out, "klein", expected_latency_s=1.0)
        bfl = run_with_webhooks(
            server, manifest, tmp_path / "out-bfl", "bfl", expected_latency_s=1.0
        )
    check_output(out, 20, summary)
    check_output(tmp_path / "out-bfl", 20, bfl, dialect="bfl")
    assert summary.webhooks > 0 and bfl.webhooks > 0
    assert SECRET not in caplog.text
    for folder in (out, tmp_path / "out-bfl"):
        for path in folder.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in repr(summary.to_dict())
