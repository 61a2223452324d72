"""The ledger across real processes: acks survive kill -9, readers never block the writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ledger_helpers import make_row

from pipeline.ledger import Action, Ledger

REPO = Path(__file__).resolve().parents[2]

_PRELUDE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipeline.contract import RowStatus
    from pipeline.ledger import Ledger
    from pipeline.rows import ImageRequest, Outcome, Row

    def row(i):
        return Row(i, f"key-{i}", ImageRequest(f"p{i}", "square_1_1", "1k", i, 2, "jpeg"))

    def say(text):
        sys.stdout.write(text + "\\n")
        sys.stdout.flush()
    """
)


def _spawn(body: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(body), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def _expect(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdout is not None
    got = proc.stdout.readline().strip()
    if got != line:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"child said {got!r}, expected {line!r}; stderr:\n{err}")


_ACK_THEN_WAIT = """
    ledger = Ledger.open(Path(sys.argv[1]))
    ledger.start_run("run-1", {"manifest": "catalog.csv"})
    ledger.plan([row(i) for i in range(3)])
    ledger.record_intent("key-0")
    ledger.record_ack("key-0", "task-0", "http://127.0.0.1:9/p/0", 10.0, 1.05)
    ledger.record_outcome(Outcome(0, "key-0", RowStatus.SUCCEEDED, task_id="task-0"))
    ledger.record_intent("key-1")
    ledger.record_ack("key-1", "task-1", "http://127.0.0.1:9/p/1", 11.0, 1.05)
    ledger.record_intent("key-2")
    say("ACKED")
    time.sleep(60)
"""


def test_acks_survive_kill_9_and_are_polled_not_resubmitted(ledger_path: Path) -> None:
    proc = _spawn(_ACK_THEN_WAIT, str(ledger_path))
    try:
        _expect(proc, "ACKED")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    with Ledger.open(ledger_path) as ledger:
        ledger.start_run("run-2", {"manifest": "catalog.csv"})
        planned = ledger.plan([make_row(i) for i in range(3)])
        actions = {p.row.key: (p.action, p.task_id) for p in planned}
        # Both acks were committed before the kill; the outcome recorded after the first
        # ack rode along with the next commit.
        assert actions["key-0"] == (Action.DONE, None)
        assert actions["key-1"] == (Action.POLL, "task-1")
        # The intent after the last commit was never acked: resubmitted, counted ambiguous.
        assert actions["key-2"] == (Action.SUBMIT, None)
        assert ledger.ambiguous_submits() == 1


_WRITER = """
    ledger = Ledger.open(Path(sys.argv[1]))
    ledger.start_run("run-1", {})
    rows = [row(i) for i in range(4000)]
    ledger.plan(rows)
    for r in rows[:2000]:
        ledger.record_intent(r.key)
        ledger.record_ack(r.key, f"task-{r.index}", "http://127.0.0.1:9/p", 1.0, 0.5)
    say("PHASE1")
    sys.stdin.readline()
    for r in rows[2000:]:
        ledger.record_intent(r.key)
        ledger.record_ack(r.key, f"task-{r.index}", "http://127.0.0.1:9/p", 1.0, 0.5)
    for r in rows:
        ledger.record_outcome(Outcome(r.index, r.key, RowStatus.SUCCEEDED, queued_at=0.0,
                                      finished_at=2.0, cost_credits=0.5))
        if r.index % 500 == 0:
            ledger.flush()
    ledger.close()
    say("DONE")
"""


def test_a_reader_in_another_process_never_blocks_the_writer(ledger_path: Path) -> None:
    proc = _spawn(_WRITER, str(ledger_path))
    assert proc.stdin is not None
    try:
        _expect(proc, "PHASE1")
        with Ledger.open(ledger_path, readonly=True) as reader:
            assert reader.run_id == "run-1"
            phase1 = reader.counts()
            assert (phase1["in_flight"], phase1["pending"]) == (2000, 2000)
            # Hold a read snapshot open while the writer commits thousands of times.
            reader._conn.execute("BEGIN")
            assert reader.counts() == phase1
            proc.stdin.write("go\n")
            proc.stdin.flush()
            _expect(proc, "DONE")
            assert reader.counts() == phase1  # a snapshot, not a torn read
            reader._conn.execute("COMMIT")
            final = reader.counts()
            assert final["succeeded"] == 4000
            assert reader.credits() == pytest.approx(2000.0)
            with pytest.raises(Exception, match="readonly"):
                reader._conn.execute("DELETE FROM run_rows")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
