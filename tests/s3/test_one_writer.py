"""One writer per output: `run` and `flow` take the same lock on DEST, local and S3.

Issue 13 ("one writer per output") and 15 item 3: a `run` started into the output a
`flow` is writing (or the other way round, or two runs) used to pay for every row twice.
Each case here starts a real first writer (the CLI in a subprocess, against one simulator
so its duplicate counter sees both), waits until it holds the lock and has submitted,
starts the second writer and expects exit 2 naming the holder (kind, host, pid, since).
For S3 (moto's server) the lock is an object made with a conditional put and kept by a
lease; a crashed holder's lease expires and the next writer takes the output over.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import dest_lock, s3
from pipeline.dest_lock import LOCK_RELPATH, DestinationBusy, S3Lease
from pipeline.s3 import S3Sink
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer

KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")
KEY = KeyConfig().key
ROWS = 200  # ~100 s on 2 slots: the first writer outlasts a flow's start-up


@pytest.fixture
def sim() -> Iterator[SimServer]:
    """Slow tasks (1 s) on 2 slots: the first writer is still writing when the second comes."""
    config = SimConfig(latency=LatencyConfig(median_s=1.0, p95_s=1.5))
    config.keys = [KeyConfig(tier="trial")]
    config.validate()
    with SimServer.in_thread(config) as server:
        yield server


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FREEPIK", "BFL"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # A loaded CI machine starts Prefect's ephemeral server slowly (default 20 s).
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        FREEPIK_API_KEY=KEY,
        KLEIN_BATCH_WORK_DIR=str(tmp_path / "work"),
        **extra,
    )
    return env


def _command(kind: str, manifest: Path, out: str, url: str) -> list[str]:
    common = [str(manifest), "--out", out, "--api-url", url, "--tier", "trial"]
    if kind == "run":
        return [KLEIN_BATCH, "run", *common, "--progress", "off"]
    return [KLEIN_BATCH, "flow", *common, "--shard-size", "20", "--concurrency-limit", ""]


def _manifest(tmp_path: Path, rows: int = ROWS) -> Path:
    path = tmp_path / "catalog.csv"
    path.write_text(
        "id,prompt\n" + "".join(f"r{n},mug number {n}\n" for n in range(rows)), encoding="utf-8"
    )
    return path


def _local_holder(out: str) -> dict[str, Any] | None:
    """The holder written in DEST's lock file while its flock is held, else None."""
    path = Path(out) / LOCK_RELPATH
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(ValueError):
                return json.loads(os.pread(fd, 1000, 0))
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _s3_holder(s3_client: Any, bucket: str) -> dict[str, Any] | None:
    try:
        found = s3_client.get_object(Bucket=bucket, Key=f"out/{LOCK_RELPATH}")
    except s3_client.exceptions.NoSuchKey:
        return None
    return json.loads(found["Body"].read())


def _wait(check: Callable[[], object], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 240
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"the first writer ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within 240 s")
        time.sleep(0.1)


CASES = [("run", "run"), ("run", "flow"), ("flow", "run")]


@pytest.mark.slow(seconds=35)
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize(("first", "second"), CASES, ids=[f"{a}-vs-{b}" for a, b in CASES])
def test_a_second_writer_stops_with_exit_2_naming_the_holder(
    request: pytest.FixtureRequest,
    sim: SimServer,
    tmp_path: Path,
    where: str,
    first: str,
    second: str,
) -> None:
    manifest = _manifest(tmp_path)
    extra: dict[str, str] = {}
    if "flow" in (first, second):  # as a deployment's would: the session's Prefect server
        extra["PREFECT_API_URL"] = request.getfixturevalue("prefect_server")
    if where == "s3":
        bucket = request.getfixturevalue("bucket")
        s3_client = request.getfixturevalue("s3_client")
        out = f"s3://{bucket}/out"
        env = _env(tmp_path, AWS_ENDPOINT_URL=request.getfixturevalue("moto_url"), **extra)

        def holder() -> dict[str, Any] | None:
            return _s3_holder(s3_client, bucket)
    else:
        out = str(tmp_path / "out")
        env = _env(tmp_path, **extra)

        def holder() -> dict[str, Any] | None:
            return _local_holder(out)

    writer = subprocess.Popen(
        _command(first, manifest, out, sim.url),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(holder, writer, "lock held")
        _wait(lambda: sim.stats()["keys"]["demo"]["submits_accepted"] > 0, writer, "submit")
        held = holder()
        assert held is not None and held["kind"] == first and held["pid"] == writer.pid

        blocked = subprocess.run(
            _command(second, manifest, out, sim.url),
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        writer.send_signal(signal.SIGINT)
        try:
            writer.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            writer.kill()
            writer.communicate()

    assert blocked.returncode == 2, blocked.stdout + blocked.stderr
    assert "Traceback" not in blocked.stderr
    message = f"another klein-batch {first} (pid {writer.pid} on {socket.gethostname()}, since "
    assert message in blocked.stderr, blocked.stderr
    assert sim.stats()["keys"]["demo"]["duplicate_submits"] == 0


# --- the S3 lease ----------------------------------------------------------------------------


def _lease(bucket: str, kind: str = "run", lease_s: float = 60.0) -> S3Lease:
    return S3Lease(bucket, f"out/{LOCK_RELPATH}", f"s3://{bucket}/out", kind, lease_s=lease_s)


def test_the_lock_object_is_created_only_if_absent_and_names_its_holder(bucket: str) -> None:
    holder = _lease(bucket, "flow")
    holder.acquire()
    with pytest.raises(DestinationBusy, match=r"another klein-batch flow \(pid \d+ on .*since"):
        _lease(bucket).acquire()
    assert holder.renew()  # the owner extends its lease (If-Match on its own ETag)
    holder.release()
    _lease(bucket).acquire()  # free again


def test_a_writer_on_another_machine_is_waited_for_by_its_lease(bucket: str) -> None:
    holder = _lease(bucket, "flow")
    holder.acquire()
    with pytest.raises(
        DestinationBusy,
        match=r"its lease was renewed \d+ s ago; if that writer "
        r"is gone, the output is free in (60|61) s",
    ):
        _lease(bucket).acquire()


def test_letting_go_of_the_lock_when_the_store_is_gone_is_no_error(
    bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that stopped because S3 became unreachable let go of its lock last; the
    connection error escaped there, and the run ended in a traceback (exit 70) instead of
    its own message and exit 74."""
    holder = _lease(bucket)
    holder.acquire()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    s3.reset()
    s3.configure(max_attempts=1)  # one refused connection says enough
    try:
        holder.release()  # must not raise
    finally:
        monkeypatch.undo()
        s3.reset()
    assert "could not remove the lock" in caplog.text
    assert "lease (60 s) lapses" in caplog.text


def test_an_expired_lease_is_taken_over_and_its_old_owner_knows_it_lost(bucket: str) -> None:
    crashed = _lease(bucket, lease_s=1.0)
    crashed.acquire()  # ... and never renews, as a killed writer would not
    time.sleep(2.5)  # the store's clock has seconds: well past the lease

    taker = _lease(bucket, "flow")
    taker.acquire()

    assert not crashed.renew()  # replaced: its owner sees the lock lost, and stops
    with pytest.raises(DestinationBusy, match="another klein-batch flow"):
        _lease(bucket).acquire()


def test_a_run_takes_over_the_output_of_a_writer_killed_with_9(
    sim: SimServer, tmp_path: Path, bucket: str, s3_client: Any, moto_url: str
) -> None:
    manifest = _manifest(tmp_path, rows=16)
    out = f"s3://{bucket}/out"
    env = _env(tmp_path, AWS_ENDPOINT_URL=moto_url)  # a lease of 60 s
    writer = subprocess.Popen(
        _command("run", manifest, out, sim.url),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(lambda: _s3_holder(s3_client, bucket), writer, "lock held")
    finally:
        writer.kill()
        writer.communicate()
    assert _s3_holder(s3_client, bucket) is not None  # kill -9 left the lock behind
    # No wait for the lease: its holder was a process of this machine, and it is gone.

    again = subprocess.run(
        _command("run", manifest, out, sim.url),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert again.returncode == 0, again.stderr
    assert "took over the lock" in again.stderr
    assert "its process on this machine is gone" in again.stderr
    assert _s3_holder(s3_client, bucket) is None  # released at the end
    # Only a submit whose answer the kill cut off may have been sent twice (the kill can
    # land after the first submits on a busy machine); no acknowledged task is paid again.
    summary = json.loads(s3_client.get_object(Bucket=bucket, Key="out/run.json")["Body"].read())
    assert sim.stats()["keys"]["demo"]["duplicate_submits"] <= summary["ambiguous_submits"]


async def test_holding_an_s3_output_renews_the_lease_while_it_runs(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = S3Sink(f"s3://{bucket}/out")
    monkeypatch.setenv(dest_lock.LEASE_ENV, "1.5")
    try:
        async with dest_lock.holding(sink, f"s3://{bucket}/out", kind="run"):
            await asyncio.sleep(3.5)  # two lease lengths: still ours only if renewed
            with pytest.raises(DestinationBusy):
                await asyncio.to_thread(_lease(bucket).acquire)
    finally:
        sink.close()
    _lease(bucket).acquire()  # released
