"""Planning from the ledger: every state a key can be in, across runs and within one."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from ledger_helpers import make_row

from pipeline.contract import RowStatus
from pipeline.errors import ConfigError
from pipeline.ledger import SCHEMA_VERSION, Action, Ledger
from pipeline.rows import Outcome, Rejection, Row


def _finish(ledger: Ledger, row: Row, status: RowStatus, **fields: object) -> Outcome:
    outcome = Outcome(
        index=row.index,
        key=row.key,
        status=status,
        request=row.request,
        task_id=f"task-{row.key}",
        attempts=1,
        queued_at=100.0,
        submitted_at=101.0,
        finished_at=104.0,
        **fields,  # type: ignore[arg-type]
    )
    ledger.record_outcome(outcome)
    ledger.flush()
    return outcome


def test_new_rows_are_submitted(ledger: Ledger, rows: Callable[..., list[Row]]) -> None:
    planned = ledger.plan(rows(0, 1, 2))
    assert [p.action for p in planned] == [Action.SUBMIT] * 3
    assert all(p.task_id is None and p.previous is None and p.attempts == 0 for p in planned)
    assert ledger.counts()["pending"] == 3


def test_acknowledged_unfinished_rows_are_polled_never_resubmitted(
    ledger_path: Path, rows: Callable[..., list[Row]]
) -> None:
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-1", {})
        ledger.plan(rows(0, 1))
        ledger.record_intent("key-0")
        ledger.record_ack("key-0", "task-a", "http://127.0.0.1:9/poll/a", 50.0, 1.05)
        assert ledger.counts()["in_flight"] == 1
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-2", {})
        first, second = ledger.plan(rows(0, 1), retry_failed=True)
    assert first.action is Action.POLL
    assert (first.task_id, first.poll_url, first.attempts) == (
        "task-a",
        "http://127.0.0.1:9/poll/a",
        1,
    )
    assert second.action is Action.SUBMIT


@pytest.mark.parametrize(
    ("status", "retry_failed", "api_ended", "expected"),
    [
        (RowStatus.SUCCEEDED, False, False, Action.DONE),
        (RowStatus.SUCCEEDED, True, False, Action.DONE),
        (RowStatus.MODERATED, True, True, Action.DONE),
        (RowStatus.FAILED, False, False, Action.DONE),
        # The API failed the task itself: --retry-failed pays for a new one.
        (RowStatus.FAILED, True, True, Action.SUBMIT),
        # Ended on our side after the ack (a bug, a full disk, polls failing): the task may
        # have been charged, so --retry-failed collects it by its id instead.
        (RowStatus.FAILED, True, False, Action.POLL),
    ],
)
def test_finished_rows_by_status_and_retry_failed(
    ledger_path: Path, status: RowStatus, retry_failed: bool, api_ended: bool, expected: Action
) -> None:
    row = make_row(0)
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-1", {})
        ledger.plan([row])
        ledger.record_intent(row.key)
        ledger.record_ack(row.key, "task-1", "http://127.0.0.1:9/p", 101.0, None)
        recorded = _finish(
            ledger,
            row,
            status,
            reason="boom" if status != "succeeded" else None,
            resubmit_on_retry=api_ended,
        )
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-2", {})
        (planned,) = ledger.plan([row], retry_failed=retry_failed)
    assert planned.action is expected
    assert planned.previous is not None
    assert planned.previous.status == status
    assert planned.previous.reason == recorded.reason
    assert planned.previous.task_id == "task-key-0"
    if expected is Action.POLL:
        assert (planned.task_id, planned.submitted_at) == ("task-1", 101.0)


def test_rejected_or_skipped_outcomes_do_not_settle_a_key(ledger: Ledger) -> None:
    row = make_row(0)
    acked = make_row(1)
    ledger.plan([row, acked])
    ledger.record_outcome(Outcome(0, row.key, RowStatus.SKIPPED, reason="out of credits"))
    ledger.record_intent(acked.key)
    ledger.record_ack(acked.key, "task-1", "http://127.0.0.1:9/p", 5.0, None)
    ledger.record_outcome(Outcome(1, acked.key, RowStatus.SKIPPED, reason="stopped"))
    ledger.flush()
    ledger.start_run("run-2", {})
    first, second = ledger.plan([row, acked])
    assert first.action is Action.SUBMIT
    # A paid task stays polled whatever the engine noted about the row.
    assert (second.action, second.task_id) == (Action.POLL, "task-1")


def test_retried_failed_row_counts_pending_until_it_finishes_again(ledger_path: Path) -> None:
    row = make_row(0)
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-1", {})
        ledger.plan([row])
        _finish(ledger, row, RowStatus.FAILED, reason="FAILED by the provider")
        assert ledger.counts()["failed"] == 1
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-2", {})
        ledger.plan([row], retry_failed=True)
        assert ledger.counts()["failed"] == 0
        assert ledger.counts()["pending"] == 1
        ledger.record_intent(row.key)
        ledger.record_ack(row.key, "task-2", "http://127.0.0.1:9/p2", 200.0, 1.05)
        assert ledger.counts()["in_flight"] == 1
        _finish(ledger, row, RowStatus.FAILED, reason="FAILED again")
        assert ledger.counts()["failed"] == 1
        assert ledger.counts()["pending"] == 0


def test_duplicate_key_within_a_run_names_the_first_row(ledger: Ledger) -> None:
    first = make_row(0, key="sku-1")
    other = make_row(1)
    again = make_row(2, key="sku-1")
    planned = ledger.plan([first, other, again])
    assert [p.action for p in planned] == [Action.SUBMIT, Action.SUBMIT, Action.DUPLICATE]
    assert planned[2].duplicate_of == 0
    # In a later batch of the same run too.
    (later,) = ledger.plan([make_row(7, key="sku-1")])
    assert later.action is Action.DUPLICATE
    assert later.duplicate_of == 0
    # Planning the same row again is not a duplicate of itself.
    assert ledger.plan([first])[0].action is Action.SUBMIT


def test_key_done_in_an_earlier_run_at_another_row_is_done_not_duplicate(
    ledger_path: Path,
) -> None:
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-1", {})
        ledger.plan([make_row(0, key="sku-1")])
        _finish(ledger, make_row(0, key="sku-1"), RowStatus.SUCCEEDED)
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-2", {})
        planned = ledger.plan([make_row(0, key="new"), make_row(5, key="sku-1")])
        assert [p.action for p in planned] == [Action.SUBMIT, Action.DONE]
        (outcome,) = ledger.outcomes_for(5, 6)
    assert outcome.index == 5
    assert outcome.status is RowStatus.SUCCEEDED


def test_intent_without_ack_is_resubmitted_and_counted_ambiguous(ledger_path: Path) -> None:
    row = make_row(0)
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-1", {})
        ledger.plan([row])
        ledger.record_intent(row.key)
        ledger.flush()
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-2", {})
        (planned,) = ledger.plan([row])
        assert planned.action is Action.SUBMIT
        assert planned.attempts == 1
        assert ledger.ambiguous_submits() == 1
        ledger.record_intent(row.key)
        ledger.record_ack(row.key, "task-9", "http://127.0.0.1:9/p9", 5.0, None)
        assert ledger.ambiguous_submits() == 1


def test_answered_refusals_are_not_ambiguous(ledger: Ledger) -> None:
    row = make_row(0)
    ledger.plan([row])
    for _ in range(3):  # three 429s, then accepted
        ledger.record_intent(row.key)
        ledger.record_refused(row.key)
    ledger.record_intent(row.key)
    ledger.record_ack(row.key, "task-1", "http://127.0.0.1:9/p", 5.0, None)
    assert ledger.ambiguous_submits() == 0
    assert ledger.plan([row])[0].attempts == 4


def test_outcomes_for_covers_every_mapped_row_in_order(ledger: Ledger) -> None:
    done, flying, waiting, dup = make_row(0), make_row(1), make_row(2), make_row(4, key="key-0")
    ledger.plan([done, flying, waiting, dup])
    ledger.record_rejections(
        [
            Rejection(3, "catalog.csv row 4, column seed: '-3' is not allowed", "seed", None, "p"),
            Rejection(4, "catalog.csv row 5: key 'key-0' repeats row 1", "id", "key-0", "q"),
        ]
    )
    _finish(ledger, done, RowStatus.SUCCEEDED, output_uri="/out/images/key-0.jpg", bytes=10)
    ledger.record_intent(flying.key)
    ledger.record_ack(flying.key, "task-f", "http://127.0.0.1:9/f", 101.0, None)

    outcomes = ledger.outcomes_for(0, 10)
    assert [o.index for o in outcomes] == [0, 1, 2, 3, 4]
    assert [o.status for o in outcomes] == [
        RowStatus.SUCCEEDED,
        RowStatus.SKIPPED,
        RowStatus.SKIPPED,
        RowStatus.REJECTED,
        RowStatus.REJECTED,
    ]
    assert outcomes[0].output_uri == "/out/images/key-0.jpg"
    assert outcomes[0].request == done.request
    assert outcomes[1].task_id == "task-f"
    # Its id is in task_id, not in the reason (report.html groups problems by reason).
    assert "still running when the run stopped" in (outcomes[1].reason or "")
    assert "task-f" not in (outcomes[1].reason or "")
    assert outcomes[2].request == waiting.request
    assert outcomes[3].reason and "column seed" in outcomes[3].reason
    assert outcomes[3].extra == {"column": "seed", "prompt": "p"}
    assert outcomes[4].key == "key-0"
    assert [o.index for o in ledger.outcomes_for(1, 3)] == [1, 2]
    counts = ledger.counts()
    assert (counts["succeeded"], counts["in_flight"], counts["pending"], counts["rejected"]) == (
        1,
        1,
        1,
        2,
    )


def test_outcome_round_trips_every_field(ledger: Ledger) -> None:
    row = make_row(0)
    ledger.plan([row])
    sent = Outcome(
        index=0,
        key=row.key,
        status=RowStatus.SUCCEEDED,
        request=row.request,
        reference_digests=("a" * 64, "b" * 64),
        task_id="t",
        output_uri="/o/images/key-0.jpg",
        sha256="c" * 64,
        width=1024,
        height=1024,
        format="jpeg",
        bytes=12345,
        attempts=2,
        queued_at=1.5,
        submitted_at=2.5,
        finished_at=9.25,
        cost_credits=1.05,
        extra={"polls": 2},
    )
    ledger.record_outcome(sent)
    ledger.flush()
    (got,) = ledger.outcomes_for(0, 1)
    assert got == sent


def test_credits_and_latencies_count_only_this_runs_work(ledger_path: Path) -> None:
    a, b, c = make_row(0), make_row(1), make_row(2)
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-1", {})
        ledger.plan([a, b, c])
        _finish(ledger, a, RowStatus.SUCCEEDED, cost_credits=1.05)
        assert ledger.credits() == pytest.approx(1.05)
        assert ledger.latencies() == [pytest.approx(4.0)]
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-2", {})
        ledger.plan([a, b, c])
        ledger.record_intent(b.key)
        ledger.record_ack(b.key, "task-b", "http://127.0.0.1:9/b", 3.0, 0.5)
        _finish(ledger, c, RowStatus.MODERATED, cost_credits=0.0, reason="moderated")
        assert ledger.credits() == pytest.approx(0.5)
        assert ledger.latencies() == []
        assert ledger.counts()["succeeded"] == 1  # done earlier, still one of this run's rows


def test_start_run_resets_the_row_map_and_records_the_run(ledger_path: Path) -> None:
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-1", {"manifest": "a.csv"})
        ledger.plan([make_row(i) for i in range(5)])
        ledger.start_run("run-2", {"manifest": "b.csv", "tier": "trial"})
        ledger.plan([make_row(0)])
        assert sum(ledger.counts().values()) == 1
    conn = sqlite3.connect(ledger_path)
    runs = dict(conn.execute("SELECT run_id, info FROM runs"))
    conn.close()
    assert set(runs) == {"run-1", "run-2"}
    assert '"tier": "trial"' in runs["run-2"]


def test_schema_version_is_recorded_and_a_newer_one_refused(ledger_path: Path) -> None:
    Ledger.open(ledger_path).close()
    conn = sqlite3.connect(ledger_path)
    assert conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        Ledger.open(ledger_path)


def test_unusable_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no ledger at"):
        Ledger.open(tmp_path / "missing.sqlite", readonly=True)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ConfigError, match="cannot use the run ledger"):
        Ledger.open(junk)


def test_reading_before_any_run_is_a_clear_error(ledger_path: Path) -> None:
    with Ledger.open(ledger_path) as ledger, pytest.raises(RuntimeError, match="start_run"):
        ledger.counts()


@pytest.mark.parametrize("retry_failed", [False, True])
def test_earlier_work_read_only_agrees_with_the_plan(ledger_path: Path, retry_failed: bool) -> None:
    """`run --dry-run` into an existing DEST leaves out exactly what the rerun will not send."""
    new, acked, skipped, *finished = (make_row(i) for i in range(7))
    statuses = (RowStatus.SUCCEEDED, RowStatus.MODERATED, RowStatus.FAILED, RowStatus.FAILED)
    reasons = (None, "no", "no", "polling failed after retries: poll failed: 503")
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-1", {})
        ledger.plan([new, acked, skipped, *finished])
        ledger.record_intent(acked.key)
        ledger.record_ack(acked.key, "task-a", "http://127.0.0.1:9/p/a", 5.0, 1.05)
        ledger.record_outcome(Outcome(skipped.index, skipped.key, RowStatus.SKIPPED, reason="x"))
        for row, status, reason in zip(finished, statuses, reasons, strict=True):
            ledger.record_intent(row.key)
            ledger.record_ack(row.key, f"task-{row.key}", "http://127.0.0.1:9/p", 6.0, None)
            # The API failed finished[2]'s task; finished[3]'s result never reached us.
            _finish(ledger, row, status, reason=reason, resubmit_on_retry=reason == "no")
        ledger.flush()
    rows = [new, acked, skipped, *finished]
    with Ledger.open(ledger_path, readonly=True) as reader:
        earlier = reader.earlier_work([row.key for row in rows], retry_failed=retry_failed)
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-2", {})
        planned = ledger.plan(rows, retry_failed=retry_failed)
    expected = {Action.DONE: "done", Action.POLL: "in_flight"}
    from_plan = {p.row.key: expected[p.action] for p in planned if p.action in expected}
    assert earlier == from_plan
    assert earlier[acked.key] == "in_flight" and new.key not in earlier
    # A row whose task the API failed is submitted again.
    assert (finished[2].key in earlier) is not retry_failed
    # ... unless only its result never arrived: then its task is polled again, not re-paid.
    unfetched = next(p for p in planned if p.row.key == finished[3].key)
    if retry_failed:
        assert unfetched.action is Action.POLL and unfetched.task_id == f"task-{finished[3].key}"
        assert earlier[finished[3].key] == "in_flight"


def test_an_outcome_names_the_task_when_no_ack_was_recorded(
    ledger_path: Path, rows: Callable[..., list[Row]]
) -> None:
    """A row that ended with a task id the journal never saw acknowledged (its outcome
    carries it) keeps that id in ``tasks.task_id``: ``--retry-failed`` polls the task,
    and an ack of the same task for another key is reported as a shared task."""
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-1", {})
        (row,) = ledger.plan(rows(0))
        _finish(ledger, row.row, RowStatus.FAILED, reason="polling failed after retries")
        ledger.start_run("run-2", {})
        ledger.plan(rows(1))
        assert ledger.record_ack("key-1", "task-key-0", "http://127.0.0.1:9/p", 1.0, None) == (
            "key-0"
        )
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-3", {})
        (again,) = ledger.plan(rows(0), retry_failed=True)
    assert (again.action, again.task_id) == (Action.POLL, "task-key-0")


def test_counts_keep_a_state_this_version_does_not_name(ledger: Ledger) -> None:
    """The counts are one pass of sums over the known states (no sort of every row); a
    row in a state a newer version wrote is still counted, not lost from the totals."""
    rows = [make_row(i) for i in range(3)]
    ledger.plan(rows)
    _finish(ledger, rows[0], RowStatus.SUCCEEDED)
    _finish(ledger, rows[1], RowStatus.SUCCEEDED)
    ledger._conn.execute("UPDATE tasks SET status = 'archived' WHERE key = ?", (rows[1].key,))
    counts = ledger.counts()
    assert counts["succeeded"] == 1
    assert counts["archived"] == 1
    assert counts["pending"] == 1
    assert sum(counts.values()) == 3
    assert set(counts) >= {status.value for status in RowStatus} | {"pending", "in_flight"}
