"""Errors of the client's own (a bug, a library's surprise) at each stage of a row.

One stage at a time raises an exception no handler expects on a tenth of its calls. The
run must still end (a row's error must not keep its slot counted for good), account for
every row, and a plain rerun must pay for nothing again: a row whose task was acknowledged
keeps it, and a submit whose answer was lost is left for ``--retry-failed``.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from pipeline_helpers import SIM_KEY, fast_options, key_stats, write_catalog

from pipeline import engine, ledger, storage
from pipeline.providers import klein
from pipeline.run import arun_manifest
from pipeline.sim import KeyConfig, SimServer

ROWS = 120
SLOTS = 8

#: stage -> (owner, attribute): where the error is raised.
STAGES: dict[str, tuple[Any, str]] = {
    "reading-an-answer": (engine, "_read_json"),
    "parsing-a-submit": (klein.KleinProvider, "parse_submit"),
    "parsing-a-poll": (klein.KleinProvider, "parse_poll"),
    "polling": (engine.Engine, "_poll"),
    "downloading": (engine.Engine, "_download_once"),
    "verifying": (engine, "inspect_image"),
    "storing": (storage.LocalSink, "put"),
    "journaling-an-ack": (ledger.Ledger, "record_ack"),
}


def _failing(real: Callable[..., Any], rng: random.Random, where: str) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(real):

        async def failing_async(*args: Any, **kwargs: Any) -> Any:
            if rng.random() < 0.1:
                raise RuntimeError(f"a bug in {where}")
            return await real(*args, **kwargs)

        return failing_async

    def failing(*args: Any, **kwargs: Any) -> Any:
        if rng.random() < 0.1:
            raise RuntimeError(f"a bug in {where}")
        return real(*args, **kwargs)

    return failing


async def _run(server: SimServer, manifest: Path, out: Path, **changes: Any) -> Any:
    options = fast_options(max_active=SLOTS, submits_per_minute=100_000, **changes)
    run = arun_manifest(manifest, out, api_url=server.url, api_key=SIM_KEY, options=options)
    return await asyncio.wait_for(run, timeout=60)  # a stalled run fails here, not in CI's


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_error_of_ours_ends_its_row_not_the_run(
    stage: str,
    start_sim: Callable[..., SimServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = start_sim(keys=[KeyConfig(max_active=SLOTS, submits_per_minute=100_000)])
    manifest = write_catalog(tmp_path / "in", ROWS)
    out = tmp_path / "out"
    owner, name = STAGES[stage]
    monkeypatch.setattr(owner, name, _failing(getattr(owner, name), random.Random(7), name))
    summary = asyncio.run(_run(server, manifest, out))
    monkeypatch.undo()

    table = pl.read_parquet(out / "manifest.parquet")
    assert table["row"].to_list() == list(range(1, ROWS + 1))
    failed = table.filter(pl.col("status") == "failed")
    assert failed.height > 0 and summary.counts["failed"] == failed.height
    assert failed["reason"].str.contains(f"a bug in {name}").all(), failed["reason"]
    assert failed.height + summary.counts["succeeded"] == ROWS
    paid = key_stats(server)["submits_accepted"]
    assert paid <= ROWS

    again = asyncio.run(_run(server, manifest, out))
    assert key_stats(server)["submits_accepted"] == paid  # nothing paid again
    assert again.counts["succeeded"] == summary.counts["succeeded"]
    assert again.counts["failed"] == failed.height  # left for --retry-failed
    if stage == "journaling-an-ack":
        # Acknowledged, then the error: the row keeps its task id and cost (what
        # --retry-failed does with them: the test below).
        assert failed["task_id"].null_count() == 0
        assert (failed["cost_credits"] > 0).all()


@pytest.mark.parametrize("dialect", ["klein", "bfl"])
def test_a_task_whose_ack_was_never_journaled_is_not_paid_for_again(
    dialect: str,
    start_sim: Callable[..., SimServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--retry-failed collects it where the task's poll address follows from its id
    (dialect A's), and says why it cannot where it does not (BFL's, one per cluster)."""
    server = start_sim(keys=[KeyConfig(max_active=SLOTS, submits_per_minute=100_000)])
    manifest = write_catalog(tmp_path / "in", ROWS)
    out = tmp_path / "out"
    real = ledger.Ledger.record_ack
    monkeypatch.setattr(ledger.Ledger, "record_ack", _failing(real, random.Random(7), "ack"))
    first = asyncio.run(_run(server, manifest, out, dialect=dialect))
    monkeypatch.undo()
    unjournaled = first.counts["failed"]
    assert unjournaled > 0
    paid = key_stats(server)["submits_accepted"]
    assert paid == ROWS  # every row was acknowledged once

    retried = asyncio.run(_run(server, manifest, out, dialect=dialect, retry_failed=True))
    assert key_stats(server)["submits_accepted"] == paid  # not one paid again
    table = pl.read_parquet(out / "manifest.parquet")
    if dialect == "klein":
        assert retried.counts["succeeded"] == ROWS
        assert table["status"].to_list() == ["succeeded"] * ROWS
        assert (table["cost_credits"] > 0).all()  # what each was charged, kept
    else:
        assert retried.counts["failed"] == unjournaled
        lost = table.filter(pl.col("status") == "failed")
        assert lost.height == unjournaled and lost["task_id"].null_count() == 0
        assert lost["reason"].str.contains("its image cannot be collected").all()
        assert (lost["cost_credits"] > 0).all()
