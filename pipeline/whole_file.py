"""Cache files written whole or not at all, for readers in other threads and processes.

The report's thumbnail cache and the simulator's image folder are read while they are
written (a thread pool, simulators in other processes): a reader must find the old file,
none, or the whole new one, never half of it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def write_whole(path: Path, data: bytes) -> None:
    """``data`` at ``path``, through a temporary file beside it and a rename.

    The temporary name is this process's and thread's, so two writers of one path never
    share it, and has the shape of the output's other atomic writes (``.NAME.XXXX.tmp``,
    which ``dest_lock.sweep_partial_writes`` knows). On an ``OSError`` (a full disk, a
    read-only folder) nothing is left behind and the error is raised: for a cache, the
    caller only loses the file.
    """
    partial = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise
