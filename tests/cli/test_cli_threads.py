"""klein-batch's own processes start one OpenBLAS thread, not one per core (pipeline/blas.py).

Each test imports numpy in a fresh interpreter, as ``klein-batch`` and a Prefect flow run
of ``flows`` do, and counts the threads numpy's import adds in ``/proc/self/task``: its
OpenBLAS adds one per core beyond the first the moment it loads, each spinning ~0.1 CPU-s.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task (Linux)"
)

#: Threads numpy's import adds (Prefect, imported by ``flows.catalog``, has threads of its own).
COUNT = """
import os
before = len(os.listdir("/proc/self/task"))
import numpy
print(os.environ.get("OPENBLAS_NUM_THREADS"), len(os.listdir("/proc/self/task")) - before)
"""


def threads_after(first: str, **env: str) -> tuple[str, int]:
    """(OPENBLAS_NUM_THREADS, threads numpy added) once ``first`` and then numpy are imported."""
    clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run(
        [sys.executable, "-c", f"{first}\n{COUNT}"],
        capture_output=True,
        text=True,
        env={**clean, **env},
        check=True,
        timeout=60,
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.parametrize("entry", ["import pipeline.cli", "import flows.catalog"])
def test_an_entry_point_imported_first_leaves_numpy_one_thread(entry: str) -> None:
    assert threads_after(entry) == ("1", 0)


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="OpenBLAS starts no thread of its own on one core"
)
def test_numpy_alone_starts_a_thread_per_core_and_a_users_setting_is_kept() -> None:
    # What the entry points prevent, so the test above can fail on this machine.
    assert threads_after("pass")[1] > 0
    # A user who asks for BLAS threads keeps them.
    assert threads_after("import pipeline.cli", OPENBLAS_NUM_THREADS="2") == ("2", 1)
