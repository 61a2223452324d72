"""Each fault the simulator can inject, alone, on a few hundred rows.

Whatever goes wrong, every row ends in exactly one terminal state, no row is lost, every
image called succeeded is verified on disk, and the only submits the simulator may see
twice are those whose answer the client never received (``ambiguous_submits``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from pipeline_helpers import (
    SIM_KEY,
    check_output,
    fast_options,
    key_stats,
    run_against,
    statuses,
    write_catalog,
)

from pipeline import engine
from pipeline.engine import KeyState
from pipeline.retry import RetryPolicy
from pipeline.run import arun_manifest
from pipeline.sim import EndpointFaults, FaultConfig, KeyConfig, ModerationConfig, SimServer

ROWS = 200

FAULTS: dict[str, tuple[FaultConfig, str]] = {
    "submit-503": (FaultConfig(seed=1, submit=EndpointFaults(error_503=0.25)), "submit_503"),
    "submit-500": (FaultConfig(seed=2, submit=EndpointFaults(error_500=0.25)), "submit_500"),
    "submit-drop": (FaultConfig(seed=3, submit=EndpointFaults(drop=0.2)), "submit_drop"),
    "poll-503": (FaultConfig(seed=4, poll=EndpointFaults(error_503=0.2)), "poll_503"),
    "poll-500": (FaultConfig(seed=5, poll=EndpointFaults(error_500=0.2)), "poll_500"),
    "poll-drop": (FaultConfig(seed=6, poll=EndpointFaults(drop=0.2)), "poll_drop"),
    "download-503": (FaultConfig(seed=7, download=EndpointFaults(error_503=0.2)), "download_503"),
    "download-500": (FaultConfig(seed=8, download=EndpointFaults(error_500=0.2)), "download_500"),
    "download-drop": (FaultConfig(seed=9, download=EndpointFaults(drop=0.2)), "download_drop"),
    "truncated": (FaultConfig(seed=10, truncate=0.25), "download_truncate"),
    "slow": (FaultConfig(seed=11, slow=0.1, slow_bytes_per_s=4_000_000), "download_slow"),
    "task-failed": (FaultConfig(seed=12, task_failed=0.15), "task_failed"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_one_fault_alone(name: str, start_sim: Callable[..., SimServer], tmp_path: Path) -> None:
    faults, counter = FAULTS[name]
    server = start_sim(faults=faults)
    manifest = write_catalog(tmp_path / "in", ROWS)
    out = tmp_path / "out"
    key = KeyState()

    summary = run_against(server, manifest, out, options=fast_options(key_state=key))

    table = check_output(out, ROWS, summary)
    stats = key_stats(server)
    assert stats["faults"].get(counter, 0) > 0, f"the fault {counter} never fired: {stats}"
    assert stats["duplicate_submits"] <= summary.ambiguous_submits
    if name == "submit-drop":
        # Every dropped answer is counted; the task it created is the only possible duplicate.
        assert summary.ambiguous_submits >= stats["faults"]["submit_drop"] > 0
    else:
        assert summary.ambiguous_submits == 0
        assert stats["duplicate_submits"] == 0
    counts = statuses(table)
    if name == "task-failed":
        failed = table.filter(pl.col("status") == "failed")
        assert failed.height == stats["tasks_failed"] > 0
        assert set(failed["reason"].to_list()) == {"the API reported the task FAILED"}
        assert failed["output_uri"].null_count() == failed.height
        assert counts["succeeded"] == ROWS - failed.height
    else:
        # Transient faults at these rates are all absorbed by the retry loop.
        assert counts == {"succeeded": ROWS}, table.filter(pl.col("status") != "succeeded")
    if name.startswith(("poll", "download", "truncated", "submit-5")):
        assert summary.retries > 0
    # Alone on the key, whatever the faults: a task whose submit answer was lost still holds
    # a slot, so no 429 is taken for another client (which halves the window, stops probing
    # and polls every task early: benchmarks/notes.md, issue 16's scale-faults).
    assert key.slots is not None
    assert key.slots.refused_contention == 0, stats


def test_moderation_by_word_and_tolerance(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    server = start_sim(moderation=ModerationConfig(words=["forbidden"], pass_tolerance=4))
    n = 120
    # Every third row mentions the word; half of those are lenient enough to pass.
    prompts = [f"mug {i} with forbidden print" if i % 3 == 0 else f"mug {i}" for i in range(n)]
    tolerance = [str(4 if i % 6 == 0 else 1) for i in range(n)]
    manifest = write_catalog(
        tmp_path / "in", n, extra={"safety_tolerance": tolerance}, prompt=prompts
    )

    summary = run_against(server, manifest, tmp_path / "out")

    table = check_output(tmp_path / "out", n, summary)
    expected = {i for i in range(n) if i % 3 == 0 and i % 6 != 0}
    moderated = table.filter(pl.col("status") == "moderated")
    assert set((moderated["row"] - 1).to_list()) == expected
    assert moderated["reason"].str.contains("moderated").all()
    assert moderated["cost_credits"].sum() == 0
    assert statuses(table) == {"succeeded": n - len(expected), "moderated": len(expected)}
    stats = key_stats(server)
    assert stats["tasks_moderated"] == len(expected)


def test_random_moderation(start_sim: Callable[..., SimServer], tmp_path: Path) -> None:
    server = start_sim(moderation=ModerationConfig(rate=0.2), faults=FaultConfig(seed=13))
    summary = run_against(server, write_catalog(tmp_path / "in", ROWS), tmp_path / "out")

    table = check_output(tmp_path / "out", ROWS, summary)
    counts = statuses(table)
    assert counts["moderated"] == key_stats(server)["tasks_moderated"] > 0
    assert counts["succeeded"] + counts["moderated"] == ROWS


@pytest.mark.serial  # 3 s result URLs: a starved event loop would let them expire
def test_slow_downloads_hold_back_submits_instead_of_letting_results_expire(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    """Tasks finish far faster than their images can be fetched; result URLs live 3 s.

    A client that keeps submitting while downloads lag piles up paid results that expire in
    its queue (a 60-slot key lets hundreds queue). The engine stops submitting while 32
    finished tasks wait for their images and the oldest has waited a second (or a key's
    worth wait), so every result is fetched in time.
    """
    rows = 600
    server = start_sim(
        faults=FaultConfig(seed=21, slow=1.0, slow_bytes_per_s=100_000),
        result_ttl_s=3.0,
        keys=[KeyConfig(max_active=60, submits_per_minute=100_000)],
    )
    summary = run_against(
        server,
        write_catalog(tmp_path / "in", rows),
        tmp_path / "out",
        options=fast_options(max_active=60, submits_per_minute=100_000),
    )
    table = check_output(tmp_path / "out", rows, summary)
    stats = key_stats(server)
    assert stats["downloads_expired"] == 0, stats
    assert statuses(table) == {"succeeded": rows}


def test_an_image_lost_after_its_task_completed_still_counts_as_paid(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    """Every download fails: the API charged each completed task all the same.

    Budgets, the summary and the manifest must count those credits (a rerun that pays again
    is then visible as such), and the failed rows keep what identifies their task.
    """
    rows = 12
    server = start_sim(faults=FaultConfig(seed=22, download=EndpointFaults(error_503=1.0)))
    retry = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)
    summary = run_against(
        server, write_catalog(tmp_path / "in", rows), tmp_path / "out",
        options=fast_options(retry=retry),
    )  # fmt: skip
    table = check_output(tmp_path / "out", rows, summary)
    assert statuses(table) == {"failed": rows}
    assert all(r.startswith("download failed after retries") for r in table["reason"])
    charged = key_stats(server)["credits_charged"]
    assert charged > 0
    assert table["cost_credits"].sum() == pytest.approx(charged)
    assert summary.credits == pytest.approx(charged)
    for column in ("task_id", "submitted_at"):
        assert table[column].null_count() == 0, column


def test_submit_answers_lost_to_an_error_of_ours_do_not_stall_the_run(
    start_sim: Callable[..., SimServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More submit answers than the key has slots end in an error no handler expects (a
    library's bug, say) after the simulator took and charged their tasks.

    Each such row ends ``failed``, counted as an ambiguous submit and charged (it may have
    been), and is not sent again; its slot is held only as long as a task lasts. Before,
    each one kept a slot counted "in the air" for good: with a key's worth of them no
    submit was allowed again and the run waited for ever.
    """
    rows, slots, broken = 40, 6, 9
    server = start_sim(keys=[KeyConfig(max_active=slots, submits_per_minute=100_000)])
    real = engine._read_json
    left = [broken]

    async def failing(response: Any) -> Any:
        if response.method == "POST" and response.status == 200 and left[0] > 0:
            left[0] -= 1
            await real(response)  # the answer arrived (the task exists) ...
            raise RuntimeError("a bug reading the answer")  # ... and was lost to a bug
        return await real(response)

    monkeypatch.setattr(engine, "_read_json", failing)
    options = fast_options(max_active=slots, submits_per_minute=100_000)
    summary = asyncio.run(
        asyncio.wait_for(
            arun_manifest(
                write_catalog(tmp_path / "in", rows),
                tmp_path / "out",
                api_url=server.url,
                api_key=SIM_KEY,
                options=options,
            ),
            timeout=60,
        )
    )
    table = check_output(tmp_path / "out", rows, summary)
    assert statuses(table) == {"succeeded": rows - broken, "failed": broken}
    failed = table.filter(pl.col("status") == "failed")
    assert failed["reason"].str.contains("RuntimeError").all()
    assert failed["reason"].str.contains("may have charged").all()
    assert (failed["cost_credits"] > 0).all()
    assert summary.ambiguous_submits == broken
    stats = key_stats(server)
    assert stats["submits_accepted"] == rows  # each row sent once: none paid twice


def test_retries_draw_no_number_from_the_programs_random_module(
    start_sim: Callable[..., SimServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script or notebook that seeded ``random`` for its own reasons keeps its sequence:
    the run's retry jitter comes from a generator of its own (``pipeline.retry.JITTER``)."""
    import random
    import sys

    callers: list[str] = []
    for name in ("random", "uniform", "randint", "choice", "shuffle", "sample", "gauss"):
        real = getattr(random, name)

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            callers.append(sys._getframe(1).f_globals.get("__name__", "?"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(random, name, spy)
    faults, counter = FAULTS["poll-503"]
    server = start_sim(faults=faults)
    summary = run_against(
        server, write_catalog(tmp_path / "in", 40), tmp_path / "out", options=fast_options()
    )
    assert key_stats(server)["faults"].get(counter, 0) > 0  # so the run retried
    check_output(tmp_path / "out", 40, summary)
    ours = [name for name in callers if name.split(".")[0] in ("pipeline", "flows")]
    assert not ours, ours
