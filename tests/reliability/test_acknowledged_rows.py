"""A row the API acknowledged keeps its task id, cost and submit time whatever happens next.

Issue 15, item 1: an internal error after the submit (a bug of ours, an images folder
that refuses writes) used to end rows ``failed`` with no task id and cost 0, and
``--retry-failed`` then paid for them again. Now every way a row ends after its ack goes
through one place in the engine that keeps them, a storage error stops the run instead
of failing rows one by one, and the rerun (or ``--retry-failed``) polls those tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from pipeline_helpers import SIM_KEY, check_output, fast_options, key_stats, write_catalog
from reliability_helpers import chattr

from pipeline.errors import StorageError
from pipeline.ledger import LEDGER_RELPATH, Ledger
from pipeline.run import arun_manifest
from pipeline.sim import SimServer
from pipeline.storage import LocalSink
from pipeline.summary import ExitCode


def _run(sim: SimServer, manifest: Path, out: Path | LocalSink, **options: object):
    return asyncio.run(
        arun_manifest(
            manifest,
            out,
            api_url=sim.url,
            api_key=SIM_KEY,
            options=fast_options(**options),
        )
    )


def _journaled_tasks(out: Path) -> dict[str, str]:
    with Ledger.open(out / LEDGER_RELPATH, readonly=True) as ledger:
        rows = ledger._conn.execute("SELECT key, task_id FROM tasks WHERE task_id IS NOT NULL")
        return dict(rows.fetchall())


def test_an_immutable_images_folder_stops_the_run_and_the_rerun_polls_what_was_paid(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    sim = start_sim()
    n = 60
    manifest = write_catalog(tmp_path / "in", n)
    out = tmp_path / "out"
    images = out / "images"
    images.mkdir(parents=True)
    chattr("+i", images)  # root writes nowhere in it (chmod would not stop root)
    try:
        with pytest.raises(
            StorageError, match=r"cannot write .*images.*Operation not permitted"
        ) as caught:
            _run(sim, manifest, out)
    finally:
        chattr("-i", images)
    assert caught.value.exit_code == ExitCode.STORAGE
    assert caught.value.summary is not None
    assert caught.value.summary.state == "stopped: output not writable"

    paid = key_stats(sim)["submits_accepted"]
    assert paid > 0
    journaled = _journaled_tasks(out)
    assert len(journaled) == paid  # every acknowledged task is in the journal
    first = pl.read_parquet(out / "manifest.parquet")  # written although the run stopped
    assert first.height == n
    assert first.filter(pl.col("status") == "failed").height == 0  # no row failed for it
    in_flight = first.filter(pl.col("task_id").is_not_null())
    assert dict(zip(in_flight["key"], in_flight["task_id"], strict=True)) == journaled
    assert in_flight["submitted_at"].null_count() == 0

    again = _run(sim, manifest, out)

    assert again.counts["succeeded"] == n
    assert key_stats(sim)["submits_accepted"] == n  # the acknowledged ones were polled
    assert key_stats(sim)["duplicate_submits"] == 0
    assert again.ambiguous_submits == 0
    done = check_output(out, n, again)
    collected = done.filter(pl.col("key").is_in(list(journaled)))
    assert dict(zip(collected["key"], collected["task_id"], strict=True)) == journaled


class _BuggySink(LocalSink):
    """A real output folder whose image writes hit a bug of ours (not a storage error)."""

    async def put(self, relpath: str, data: bytes, content_type: str) -> str:
        if relpath.startswith("images/"):
            raise RuntimeError("a bug between download and store")
        return await super().put(relpath, data, content_type)


def test_an_internal_error_after_the_ack_keeps_task_cost_and_time_and_retry_polls(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    sim = start_sim()
    n = 12
    manifest = write_catalog(tmp_path / "in", n)
    out = tmp_path / "out"

    first = _run(sim, manifest, _BuggySink(out))

    assert first.counts["failed"] == n
    assert key_stats(sim)["submits_accepted"] == n
    failed = pl.read_parquet(out / "manifest.parquet")
    assert failed["reason"].str.starts_with("internal error: RuntimeError").all()
    assert failed["task_id"].null_count() == 0
    assert failed["submitted_at"].null_count() == 0
    assert (failed["cost_credits"] > 0).all()  # completed tasks are charged: said so
    assert first.credits > 0

    again = _run(sim, manifest, out, retry_failed=True)

    assert again.counts["succeeded"] == n
    assert key_stats(sim)["submits_accepted"] == n  # collected by task id, not paid again
    assert again.submits == 0
    done = check_output(out, n, again)
    assert done["task_id"].to_list() == failed["task_id"].to_list()
    assert done["submitted_at"].to_list() == failed["submitted_at"].to_list()
