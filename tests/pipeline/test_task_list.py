"""The task list as a batch poll (dialect A): when it is asked, and runs that lean on it.

The runs are real HTTP against the simulator in a thread. Their tasks take 0.4 s (median)
on 24 slots, so about 60 end a second: slow enough for the list to keep up
(``task_list.plan``), unlike the 50 ms tasks of most other pipeline tests, whose runs never
ask it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pipeline_helpers import (
    check_output,
    fast_options,
    key_stats,
    run_against,
    statuses,
    write_catalog,
)

from pipeline import task_list
from pipeline.providers import ProtocolError
from pipeline.providers.klein import KleinProvider
from pipeline.run import RunOptions
from pipeline.sim import EndpointFaults, FaultConfig, LatencyConfig, SimServer

ROWS = 150
LATENCY = LatencyConfig(median_s=0.4, p95_s=1.0)


def test_a_list_is_read_whatever_odd_entries_it_holds() -> None:
    """Entries that are no task (not an object, no string id, a status that is no string)
    are skipped or taken as running, never a crash of the run's list reader."""
    provider = KleinProvider("http://127.0.0.1:9", "sk-test")
    listed = provider.read_list(
        {
            "data": [
                {"task_id": "a", "status": "COMPLETED"},
                {"task_id": "b", "status": "IN_PROGRESS"},
                {"status": "COMPLETED", "task_id": "c", "extra": [1]},
                {"task_id": "d", "status": "FAILED"},
                {"task_id": "e", "status": ["COMPLETED"]},
                {"task_id": "f"},
                {"task_id": 7, "status": "COMPLETED"},
                {"status": "COMPLETED"},
                ["task_id", "g"],
                "h",
                None,
            ]
        }
    )
    assert listed.entries == 11
    assert [task_id for task_id in "abcdefgh" if listed.has_ended(task_id)] == ["a", "c", "d"]
    assert sorted(listed.running()) == ["b", "e", "f"]
    with pytest.raises(ProtocolError):
        provider.read_list({"data": {"task_id": "a"}})


def test_a_well_formed_list_reads_the_same_as_an_odd_one() -> None:
    """Every entry an object with an id and a status (what the API sends) is read by the
    quick path; its verdicts are those of the entry-by-entry reader, ids that are no
    string included (listed, never taken for ours)."""
    provider = KleinProvider("http://127.0.0.1:9", "sk-test")
    entries = [
        {"task_id": "a", "status": "COMPLETED"},
        {"task_id": "b", "status": "IN_PROGRESS"},
        {"task_id": "c", "status": "FAILED", "extra": {"k": 1}},
        {"task_id": "d", "status": None},
        {"task_id": 7, "status": "COMPLETED"},
        {"task_id": "e", "status": "CREATED"},
    ]
    quick = provider.read_list({"data": entries})
    odd = provider.read_list({"data": [*entries, "not a task"]})
    for listed in (quick, odd):
        assert [t for t in "abcdef" if listed.has_ended(t)] == ["a", "c"]
        assert sorted(listed.running()) == ["b", "d", "e"]
        assert not listed.has_ended("7")
    assert (quick.entries, odd.entries) == (6, 7)


def test_a_short_list_of_slow_endings_is_asked_about_once_per_ending() -> None:
    step = task_list.plan(20.0, 800)
    assert step.useful
    assert step.wait_s == pytest.approx(task_list.PER_ENDING / 20.0)
    # Its size sets the floor: 2,000 entries are read at most ten times a second.
    step = task_list.plan(20.0, 2_000)
    assert step.useful and step.wait_s == pytest.approx(0.1)


def test_a_list_too_long_for_the_endings_is_measured_again_later() -> None:
    step = task_list.plan(20.0, 24_000)
    assert not step.useful and step.too_long
    assert not task_list.plan(20.0, task_list.OVERSIZED, tail_s=0.1).useful


def test_endings_faster_than_any_list_leave_it_unasked() -> None:
    # The scale tier: 96 slots of 0.5 s tasks end about 190 times a second.
    step = task_list.plan(190.0, 10)
    assert not step.useful and not step.too_long


def test_the_run_s_last_tasks_are_listed_often_and_failures_back_off() -> None:
    # Two tasks left, a second each: asked at the engine's drain spacing, not every 1.25 s.
    assert task_list.plan(2.0, 100, tail_s=0.4).wait_s == 0.4
    assert task_list.plan(20.0, 100, tail_s=0.4).wait_s == task_list.PER_ENDING / 20.0
    waits = [task_list.plan(20.0, 100, failures=n).wait_s for n in range(12)]
    assert waits == sorted(waits) and waits[1] == pytest.approx(2 * waits[0])
    top = min(waits[0] * 2**task_list.MAX_BACKOFF_STEPS, task_list.MAX_WAIT_S)
    assert waits[-1] == pytest.approx(top) and max(waits) <= task_list.MAX_WAIT_S


def test_the_list_tells_endings_so_tasks_are_polled_about_once_and_probed_less(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    """The same manifest with the list and without it, each against a simulator of its own."""
    stats, summaries = {}, {}
    for use in (True, False):
        server = start_sim(latency=LATENCY)
        manifest = write_catalog(tmp_path / f"in-{use}", ROWS)
        out = tmp_path / f"out-{use}"
        summary = run_against(server, manifest, out, options=options(task_list=use))
        check_output(out, ROWS, summary)
        stats[use], summaries[use] = key_stats(server), summary
        assert stats[use]["duplicate_submits"] == 0
    listed, polled = stats[True], stats[False]
    assert listed["list_calls"] > 0 and polled["list_calls"] == 0
    assert summaries[True].task_lists == listed["list_calls"] and summaries[False].task_lists == 0
    # Without the list a task is first polled at the 85th percentile of the task times and
    # again as it ages (1.8 polls per task here); with it, once it is known done, after the
    # first burst (1.25 per task, the list's own requests apart).
    assert listed["polls"] < 0.85 * polled["polls"], (listed, polled)
    assert listed["polls"] < 1.5 * ROWS, listed
    # Slots known free are taken without a probe: fewer submits are refused.
    assert listed["submits_refused"] < polled["submits_refused"], (listed, polled)


def test_a_key_s_worth_of_rows_submitted_before_the_list_answers_is_polled_once_each(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    """24 rows on 24 slots, submitted at once: every task's poll is planned before the list
    first answers, and once it does they are put off to it as later tasks are, so each is
    polled about once (when the list shows it ended) instead of as planned on top of the
    lists (70 polls and 37 lists for the README's 20-row demo before)."""
    rows = 24
    server = start_sim(latency=LATENCY)
    manifest = write_catalog(tmp_path / "in", rows)

    summary = run_against(server, manifest, tmp_path / "out", options=options())

    table = check_output(tmp_path / "out", rows, summary)
    assert statuses(table) == {"succeeded": rows}
    stats = key_stats(server)
    assert stats["list_calls"] > 0 and stats["duplicate_submits"] == 0
    assert stats["polls"] <= 1.25 * rows, stats


def options(**changes: object) -> RunOptions:
    """Quick retries, and the task times known from the start."""
    return fast_options(expected_latency_s=LATENCY.median_s, **changes)


@pytest.mark.parametrize(
    "faults",
    [
        EndpointFaults(error_503=0.3, error_500=0.2),
        EndpointFaults(drop=0.5),
    ],
    ids=["errors", "dropped"],
)
def test_a_failing_list_loses_no_row_and_pays_once(
    faults: EndpointFaults, start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    server = start_sim(latency=LATENCY, faults=FaultConfig(seed=21, list=faults))
    manifest = write_catalog(tmp_path / "in", ROWS)

    summary = run_against(server, manifest, tmp_path / "out", options=options())

    table = check_output(tmp_path / "out", ROWS, summary)
    assert statuses(table) == {"succeeded": ROWS}
    stats = key_stats(server)
    assert sum(v for k, v in stats["faults"].items() if k.startswith("list_")) > 0
    assert stats["duplicate_submits"] == 0
    assert stats["submits_accepted"] == ROWS


def test_lost_submit_answers_beside_the_list_lose_no_row_and_pay_once(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    """A tenth of the submit answers are cut after the task was made: those tasks are ours
    but nameless, and the list's count of tasks we cannot name gives their slots back
    (``SlotController.unnamed_ended``, tested in tests/limits); the run still ends every
    row once and only an ambiguous submit may be sent again."""
    drops = FaultConfig(seed=22, submit=EndpointFaults(drop=0.1))
    server = start_sim(latency=LATENCY, faults=drops)
    manifest = write_catalog(tmp_path / "in", ROWS)

    summary = run_against(server, manifest, tmp_path / "out", options=options())

    table = check_output(tmp_path / "out", ROWS, summary)
    assert statuses(table) == {"succeeded": ROWS}
    stats = key_stats(server)
    assert stats["faults"]["submit_drop"] > 0 and stats["list_calls"] > 0
    assert summary.ambiguous_submits >= stats["faults"]["submit_drop"]
    assert stats["duplicate_submits"] <= summary.ambiguous_submits
    assert stats["submits_accepted"] == ROWS + stats["duplicate_submits"]


def test_a_list_that_stops_answering_mid_run_hands_its_tasks_back_to_polls(
    start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    """Every list fails from a second into the run on: the tasks whose first poll the list
    had put off are polled as usual again, and every row ends once."""
    server = start_sim(latency=LATENCY)
    manifest = write_catalog(tmp_path / "in", ROWS)
    listed_before: list[int] = []

    def break_the_list() -> None:
        listed_before.append(key_stats(server)["list_calls"])
        server.sim.state.config.faults.list.error_503 = 1.0

    timer = threading.Timer(1.0, break_the_list)
    timer.start()
    try:
        summary = run_against(server, manifest, tmp_path / "out", options=options())
    finally:
        timer.cancel()

    table = check_output(tmp_path / "out", ROWS, summary)
    assert statuses(table) == {"succeeded": ROWS}
    assert listed_before and listed_before[0] > 0, "the list was never asked before it broke"
    stats = key_stats(server)
    assert stats["faults"].get("list_503", 0) > 0
    assert stats["duplicate_submits"] == 0
    # Once the list is gone, polls find the endings: more than one per task on average.
    assert stats["polls"] > ROWS
