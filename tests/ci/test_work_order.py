"""The parallel run's scheduling rule (``tests/work_order.py``): what a worker gets next."""

from __future__ import annotations

from work_order import LONG_UNIT_S, next_unit

#: Longest first, as the workers sort: slow tests, then short ones, then a test that only
#: collects a background scenario's results (never a filler: early, it would wait on it).
QUEUE = ("pool-300s", "flow-ctrl-c-55s", "flow-spec-20s", "short-a", "prefect-short", "storm")
FILLERS = {"short-a", "prefect-short"}
PREFECT = {"flow-ctrl-c-55s", "flow-spec-20s", "prefect-short"}


def pick(running_s: float, may_start_prefect: bool = True, queue: tuple[str, ...] = QUEUE) -> str:
    return next_unit(
        queue,
        running_s=running_s,
        is_filler=FILLERS.__contains__,
        uses_prefect=PREFECT.__contains__,
        may_start_prefect=may_start_prefect,
    )


def test_a_worker_running_a_short_test_gets_the_longest_left() -> None:
    assert pick(running_s=0.0) == "pool-300s"
    assert pick(running_s=LONG_UNIT_S - 1) == "pool-300s"


def test_behind_a_long_test_goes_the_last_short_one_not_the_next_long_one() -> None:
    assert pick(running_s=LONG_UNIT_S) == "prefect-short"
    assert pick(running_s=300.0, may_start_prefect=False) == "short-a"


def test_without_a_short_test_left_a_long_one_goes_behind_it() -> None:
    assert pick(running_s=300.0, queue=("pool-300s", "flow-ctrl-c-55s", "storm")) == "pool-300s"


def test_a_worker_without_the_prefect_server_gets_other_work_while_there_is_some() -> None:
    queue = ("flow-ctrl-c-55s", "flow-spec-20s", "short-a")
    assert pick(running_s=0.0, queue=queue) == "flow-ctrl-c-55s"
    assert pick(running_s=0.0, may_start_prefect=False, queue=queue) == "short-a"
    # No other work left: one more server rather than a worker idling to the end.
    assert pick(running_s=0.0, may_start_prefect=False, queue=queue[:2]) == "flow-ctrl-c-55s"
