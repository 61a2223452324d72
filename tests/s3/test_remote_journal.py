"""The journal of an S3 output: which ledger a run trusts, snapshots, partial manifests."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import polars as pl
from s3_helpers import read_s3_parquet

from pipeline.contract import RowStatus
from pipeline.masking import SecretMask
from pipeline.remote_journal import RemoteJournal
from pipeline.rows import Outcome, Rejection
from pipeline.s3 import S3Sink


async def journal_run(journal: RemoteJournal, run_id: str, keys: list[str]) -> None:
    """A stand-in run: a rejection and a few outcomes recorded, then the journal closed."""
    with journal.open_ledger() as ledger:
        ledger.start_run(run_id, {"manifest": "catalog.csv"})
        journal.start(run_id)
        ledger.record_rejections([Rejection(index=0, reason="catalog.csv row 1: bad", key="r0")])
        for i, key in enumerate(keys, start=1):
            ledger.record_outcome(
                Outcome(index=i, key=key, status=RowStatus.SUCCEEDED, task_id=f"t-{key}")
            )
        await journal.close(published=False)


def finished_keys(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {key for (key,) in conn.execute("SELECT key FROM tasks WHERE status = 'succeeded'")}


async def test_a_fresh_output_starts_new_and_leaves_snapshot_parts_and_writer(
    bucket: str, s3_client: Any, endpoint: str, tmp_path: Path
) -> None:
    sink = S3Sink(f"s3://{bucket}/out")
    journal = await RemoteJournal.open(sink, work_dir=tmp_path / "a", interval_s=60)
    assert journal.source == "new"
    await journal_run(journal, "run-1", ["k1", "k2"])
    assert journal.snapshots == 1 and journal.parts == 1
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="out/.klein/")
    keys = sorted(item["Key"] for item in listed["Contents"])
    assert keys == [
        "out/.klein/ledger.generation",
        "out/.klein/ledger.sqlite",
        "out/.klein/parts/run-1/part-000001.parquet",
        "out/.klein/writer.json",
    ]
    part = read_s3_parquet(f"s3://{bucket}/out/.klein/parts/run-1/part-000001.parquet", endpoint)
    assert part.select("row", "key", "status").rows() == [
        (1, "r0", "rejected"),
        (2, "k1", "succeeded"),
        (3, "k2", "succeeded"),
    ]
    assert part.schema["finished_at"] == pl.Datetime("us", "UTC")


async def test_the_freshest_ledger_wins_local_or_the_outputs(bucket: str, tmp_path: Path) -> None:
    sink = S3Sink(f"s3://{bucket}/out")
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    a = await RemoteJournal.open(sink, work_dir=machine_a, interval_s=60)
    await journal_run(a, "run-1", ["k1"])

    again_a = await RemoteJournal.open(sink, work_dir=machine_a, interval_s=60)
    assert again_a.source == "local"  # it uploaded the output's snapshot itself

    b = await RemoteJournal.open(sink, work_dir=machine_b, interval_s=60)
    assert b.source == "remote"  # nothing local: resume from S3 alone
    assert finished_keys(b.ledger_path) == {"k1"}
    await journal_run(b, "run-2", ["k1", "k2"])

    back_on_a = await RemoteJournal.open(sink, work_dir=machine_a, interval_s=60)
    assert back_on_a.source == "remote"  # machine b ran since: its snapshot is newer
    assert finished_keys(back_on_a.ledger_path) == {"k1", "k2"}


async def test_partial_manifests_are_removed_once_the_final_one_is_published(
    bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    sink = S3Sink(f"s3://{bucket}/out")
    journal = await RemoteJournal.open(sink, work_dir=tmp_path / "a", interval_s=60)
    with journal.open_ledger() as ledger:
        ledger.start_run("run-1", {})
        journal.start("run-1")
        for i in range(3):
            ledger.record_outcome(Outcome(index=i, key=f"k{i}", status=RowStatus.SUCCEEDED))
            await journal.sync()
        assert journal.parts == 3
        await journal.close(published=True)
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="out/.klein/parts/")
    assert "Contents" not in listed


async def test_acks_after_the_last_snapshot_reach_a_machine_that_resumes(
    bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Machine a acknowledges two tasks and is lost before its next snapshot; machine b,
    resuming the output from S3 alone, knows both tasks (it polls them, not pays again),
    and an ack older than what a snapshot says of its key changes nothing."""
    sink = S3Sink(f"s3://{bucket}/out")
    a = await RemoteJournal.open(sink, work_dir=tmp_path / "a", interval_s=60)
    ledger = a.open_ledger()
    ledger.mask = SecretMask({"api_key": "sk-ack-test-secret-7c1f"})  # as a run sets it
    ledger.start_run("run-1", {})
    poll = "https://user:pw@api.test/v1/poll/task-1?key=sk-ack-test-secret-7c1f"
    ledger.record_ack("k1", "task-1", poll, 100.0, 1.4)
    ledger.record_ack("k2", "task-2", "https://api.test/v1/poll/task-2", 101.0, None)
    await a._write_acks()  # what its ticker does every second; then a is lost: no snapshot
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="out/.klein/acks/")
    [stored] = [item["Key"] for item in listed["Contents"]]
    body = s3_client.get_object(Bucket=bucket, Key=stored)["Body"].read().decode()
    assert "sk-ack-test-secret-7c1f" not in body and "pw@" not in body  # as in the ledger

    b = await RemoteJournal.open(sink, work_dir=tmp_path / "b", interval_s=60)
    assert (b.source, b.adopted_acks) == ("new", 2)
    with contextlib.closing(sqlite3.connect(b.ledger_path)) as conn:
        tasks = dict(conn.execute("SELECT key, task_id FROM tasks WHERE status IS NULL"))
    assert tasks == {"k1": "task-1", "k2": "task-2"}

    # b finishes k1 and snapshots; c then resumes: k1 stays finished, k2 is still polled.
    with b.open_ledger() as ledger_b:
        ledger_b.start_run("run-2", {})
        b.start("run-2")
        ledger_b.record_outcome(
            Outcome(index=1, key="k1", status=RowStatus.SUCCEEDED, task_id="task-1")
        )
        await b.close(published=False)
    c = await RemoteJournal.open(sink, work_dir=tmp_path / "c", interval_s=60)
    assert (c.source, c.adopted_acks) == ("remote", 0)
    assert finished_keys(c.ledger_path) == {"k1"}
    with contextlib.closing(sqlite3.connect(c.ledger_path)) as conn:
        tasks = dict(conn.execute("SELECT key, task_id FROM tasks WHERE status IS NULL"))
    assert tasks == {"k2": "task-2"}
    ledger.close()
