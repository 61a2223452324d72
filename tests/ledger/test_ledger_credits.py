"""What a destination has spent, as a budget counts it: finished, in flight, and unanswered.

A submit whose answer never came (a kill, a dropped connection, a run stopped with the
request out) may have been charged for a task nobody can name, and the row is sent again:
``destination_credits`` counts it at its journaled price, so a rerun's ``--max-credits``
holds as the API may count it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.contract import RowStatus, cost_credits
from pipeline.ledger import Ledger
from pipeline.rows import Outcome, Row

#: A price with a reference's megapixels: the contract's price for the size alone differs.
PRICE = 1.8


def _end(ledger: Ledger, row: Row, status: RowStatus, **fields: object) -> None:
    ledger.record_outcome(
        Outcome(index=row.index, key=row.key, status=status, request=row.request, **fields)  # type: ignore[arg-type]
    )
    ledger.flush()


def _sent_unanswered(ledger_path: Path, row: Row, price: float | None) -> None:
    """A run that sent ``row`` (journaling ``price``) and stopped before the answer came."""
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-1", {})
        ledger.plan([row])
        ledger.record_intent(row.key, price)


def test_an_unanswered_submit_counts_at_its_journaled_price(
    ledger: Ledger, rows: Callable[..., list[Row]]
) -> None:
    (row,) = rows(0)
    ledger.plan([row])
    assert ledger.destination_credits() == 0.0
    ledger.record_intent(row.key, PRICE)  # sent; the run stopped before the answer came
    assert ledger.destination_credits() == pytest.approx(PRICE)
    assert ledger.unanswered_credits() == pytest.approx(PRICE)
    assert ledger.ambiguous_submits() == 1


def test_a_row_sent_again_counts_both_sends(
    ledger_path: Path, rows: Callable[..., list[Row]]
) -> None:
    (row,) = rows(0)
    _sent_unanswered(ledger_path, row, PRICE)
    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-2", {})
        ledger.plan([row])
        ledger.record_intent(row.key, PRICE)  # the rerun sends it again...
        ledger.record_ack(row.key, "task-b", "http://127.0.0.1:9/b", 60.0, PRICE)
        # ...the first send may have been charged, the second will be.
        assert ledger.destination_credits() == pytest.approx(2 * PRICE)
        assert ledger.unanswered_credits() == pytest.approx(PRICE)
        _end(ledger, row, RowStatus.SUCCEEDED, task_id="task-b", cost_credits=PRICE)
        assert ledger.destination_credits() == pytest.approx(2 * PRICE)


def test_an_outcome_that_recorded_its_unanswered_submit_is_not_counted_twice(
    ledger: Ledger, rows: Callable[..., list[Row]]
) -> None:
    lost, timed_out = rows(0, 1)
    ledger.plan([lost, timed_out])
    ledger.record_intent(lost.key, PRICE)
    ledger.record_intent(timed_out.key, PRICE)
    # The engine's "answer lost to an error" outcome carries the price it may have cost.
    _end(ledger, lost, RowStatus.FAILED, cost_credits=PRICE, reason="answer lost")
    # "submit failed after 3 attempts" records no cost; its last send is still open.
    _end(ledger, timed_out, RowStatus.FAILED, reason="submit failed after 3 attempts")
    assert ledger.destination_credits() == pytest.approx(2 * PRICE)
    assert ledger.unanswered_credits() == pytest.approx(2 * PRICE)  # both perhaps charged


def test_a_journal_without_intent_prices_counts_the_published_price(
    ledger_path: Path, rows: Callable[..., list[Row]]
) -> None:
    (row,) = rows(0)
    _sent_unanswered(ledger_path, row, None)
    # A journal an older release wrote has no intent_cost column: it is added on open.
    with sqlite3.connect(ledger_path) as db:
        db.execute("ALTER TABLE tasks DROP COLUMN intent_cost")
    with Ledger.open(ledger_path) as ledger:
        assert ledger.destination_credits() == pytest.approx(cost_credits(1024, 1024))
        ledger.start_run("run-2", {})
        ledger.plan([row])
        ledger.record_intent(row.key, PRICE)
        # The same request both times: the price now journaled stands for both sends.
        assert ledger.destination_credits() == pytest.approx(2 * PRICE)
