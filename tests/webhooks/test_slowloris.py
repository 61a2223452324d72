"""A slowloris flood against ``--webhook-listen`` costs the run its webhooks, never a row.

A real ``klein-batch run --webhook-listen`` process, held to 256 open files (so the flood
is cheap), runs against the simulator while a client on raw sockets keeps about 1,000
connections to its receiver open, each with a request line and a header and never the rest
(the attack that once took every file descriptor and failed rows with ``OSError(24)``).
The receiver holds a bounded number of them and closes the others as they arrive, so the
run keeps its descriptors for the journal, the API and the images; its tasks are noticed
by their polls instead. Every row succeeds, with one accepted submit each.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import polars as pl
from pipeline_helpers import KLEIN_BATCH, SIM_KEY, cli_env, write_catalog

from benchmarks.ports import free_port
from pipeline.sim import KeyConfig, LatencyConfig
from pipeline.webhooks import PATH

SECRET = "whsec_c2xvd2xvcmlzLXRlc3Qtc2lnbmluZy1zZWNyZXQ="
ROWS = 12
FLOOD = 1000
OPEN_FILES = 256


class Slowloris(threading.Thread):
    """Keeps up to ``FLOOD`` connections open, each sending a header line now and then."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.opened = 0

    def _open(self) -> socket.socket | None:
        """A new half-open request; None when nothing listens (yet)."""
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.3)
        except OSError:
            return None
        self.opened += 1
        with contextlib.suppress(OSError):  # closed on arrival: kept, dropped next round
            sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
        return sock

    def run(self) -> None:
        held: list[socket.socket] = []
        while not self.stop.is_set():
            # The whole flood at once, then at most 100 reopened per round (cheap on CPU).
            budget = FLOOD if not held else 100
            while len(held) < FLOOD and budget > 0 and not self.stop.is_set():
                budget -= 1
                sock = self._open()
                if sock is None:
                    break  # not listening yet (or the backlog is full): next round
                held.append(sock)
            alive: list[socket.socket] = []
            for sock in held:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                    alive.append(sock)
                except OSError:
                    sock.close()
            held = alive
            self.stop.wait(0.5 if held else 0.02)
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()


def hold_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


def test_slowloris_against_the_receiver_fails_no_row(start_sim: Any, tmp_path: Path) -> None:
    # Tasks take about a second, so the flood is in place before their webhooks are due.
    server = start_sim(
        keys=[KeyConfig(webhook_secret=SECRET)], latency=LatencyConfig(median_s=1.0, p95_s=1.5)
    )
    manifest = write_catalog(tmp_path / "in", ROWS)
    out = tmp_path / "out"
    port = free_port()
    flood = Slowloris(port)
    command = [KLEIN_BATCH, "run", str(manifest), "--api-url", server.url, "--out", str(out)]
    command += ["--webhook-listen", f"127.0.0.1:{port}", "--progress", "off"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(FREEPIK_API_KEY=SIM_KEY, FREEPIK_WEBHOOK_SECRET=SECRET),
        # Before exec, not after start: a limit set once the process runs could come after
        # the receiver sized its bound from the machine's (much higher) limit.
        preexec_fn=hold_open_files,
    )
    try:
        flood.start()
        _, stderr = proc.communicate(timeout=120)
    finally:
        flood.stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        flood.join(timeout=10)

    assert proc.returncode == 0, stderr[-3000:]
    # More connections than the process has files: unbounded, the receiver would take them all.
    assert flood.opened > OPEN_FILES, flood.opened
    assert "closing new ones at once" in stderr  # the flood reached the receiver's bound
    assert "OSError" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    table = pl.read_parquet(out / "manifest.parquet")
    assert table["status"].to_list() == ["succeeded"] * ROWS, table["reason"].to_list()
    assert table["task_id"].null_count() == 0
    assert server.stats()["keys"]["demo"]["submits_accepted"] == ROWS  # nothing paid twice
    receiver = json.loads((out / "run.json").read_text())["webhook_receiver"]
    assert receiver["connections_refused"] > 0, receiver  # the flood shows in run.json
