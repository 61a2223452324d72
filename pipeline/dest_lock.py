"""One writer per output: the lock that keeps two runs out of the same destination.

Two runs writing one destination at once would each plan the same rows from the journal and
submit them both: every image paid twice (a nightly job that overran into the next night's
does exactly this). The lock is an ``flock`` on a file beside the journal, so the kernel
releases it when its holder dies, kill -9 included, and a rerun never waits on a ghost.

It guards runs on one machine; a remote output's journal lives in a local work folder, so
two machines writing one S3 prefix are not seen (README: one writer per output).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import ConfigError

LOCK_NAME = "run.lock"


class DestinationBusy(ConfigError):
    """Another live run holds the destination."""


@contextlib.contextmanager
def hold(journal_dir: Path, destination: str) -> Iterator[None]:
    """Hold the destination for this process, or say who holds it and stop."""
    journal_dir.mkdir(parents=True, exist_ok=True)
    path = journal_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise DestinationBusy(
                f"{destination}: another klein-batch run ({holder}) is writing this output; "
                f"wait for it (`klein-batch status {destination}` shows its progress) or "
                "choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def sweep_partial_writes(folder: Path) -> int:
    """Remove temporary files that a killed run left half-written; returns how many.

    Atomic writes go to ``.NAME.XXXX.tmp`` beside the target and are renamed into place; a
    kill between the two leaves the temporary file. Only call this while holding the lock of
    the one run that writes ``folder``.
    """
    removed = 0
    if not folder.is_dir():
        return 0
    for entry in folder.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed += 1
    return removed
