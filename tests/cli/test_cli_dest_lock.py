"""One writer per output: a second run into a busy DEST stops before it submits anything.

Two runs sharing a destination would each plan the same rows and pay for them twice, so the
second must refuse in one line; a holder killed with -9 must not keep the output locked; and
the half-written files such a kill leaves are swept by the next run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from test_cli_run import CATALOG, KLEIN_BATCH, REPO, env

from pipeline.dest_lock import DestinationBusy, hold

HOLDER = """
import sys, time
from pathlib import Path
from pipeline.dest_lock import hold
with hold(Path(sys.argv[1]), sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def run(out: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KLEIN_BATCH, "run", str(CATALOG), "--out", str(out), "--sim"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=240,
        cwd=cwd,
    )


def test_a_second_run_into_a_busy_output_stops_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with hold(out / ".klein", str(out)):
        result = run(out, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "another klein-batch run" in result.stderr
    assert f"pid {os.getpid()}" in result.stderr
    assert not (out / "images").exists() or not any((out / "images").iterdir())
    assert not (out / "manifest.parquet").exists()


def test_a_holder_killed_with_9_leaves_the_output_free(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out / ".klein")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        blocked = run(out, tmp_path)
        assert blocked.returncode == 2, blocked.stdout + blocked.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # A half-written image from the killed writer, as an interrupted rename leaves it.
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    leftover = images / ".mug-red.jpg.k3j4h5.tmp"
    leftover.write_bytes(b"\xff\xd8\xff half an image")
    result = run(out, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not leftover.exists()
    assert sorted(p.name for p in images.iterdir() if p.name.startswith(".")) == []
    assert pl.read_parquet(out / "manifest.parquet").height == 20


async def test_an_attempt_of_the_same_flow_run_waits_for_the_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A night marked Lost while it ran (a Prefect server restart) runs again as the same
    flow run and finds its live earlier attempt holding the output: it waits for that
    attempt instead of failing at once (then merges); any other writer still stops."""
    from pipeline import dest_lock
    from pipeline.storage import open_sink

    monkeypatch.setattr(dest_lock, "OWN_ATTEMPT_POLL_S", 0.1)
    out = tmp_path / "out"
    sink = open_sink(str(out))
    entered = asyncio.Event()

    async def second_attempt() -> None:
        async with dest_lock.holding(sink, str(out), kind="flow", flow_run="night-1"):
            entered.set()

    try:
        with hold(out / ".klein", str(out), "flow", flow_run="night-1"):
            with pytest.raises(DestinationBusy, match="another klein-batch flow"):
                async with dest_lock.holding(sink, str(out), kind="flow", flow_run="night-2"):
                    pass
            with pytest.raises(DestinationBusy):
                async with dest_lock.holding(sink, str(out), kind="run"):
                    pass
            waiting = asyncio.create_task(second_attempt())
            await asyncio.sleep(0.5)
            assert not entered.is_set()  # still held by the earlier attempt
        await asyncio.wait_for(waiting, timeout=10)
        assert entered.is_set()
    finally:
        sink.close()
