"""One OpenBLAS thread in klein-batch's own processes, set before numpy is first imported.

klein-batch uses numpy (through pyarrow, the manifest and the report) for element-wise
array work only, never for linear algebra, yet numpy's bundled OpenBLAS starts a thread per
core the moment numpy is imported and each one spins for about a tenth of a second before
it sleeps: 0.15 CPU-seconds of every ``klein-batch`` command on two cores (0.98 -> 0.83
for a run that stops at a missing manifest), about three on a 32-core Prefect worker, and
its flow runs pay it again. Importing this module sets ``OPENBLAS_NUM_THREADS=1`` for this
process and the processes it starts, unless the variable is already set: a user who wants
BLAS threads in a process that also runs klein-batch sets it. It is imported for that
effect by the entry points only (``pipeline.cli``; the ``flows`` package, imported where a
flow of ours runs), never by the pipeline's library modules a data team imports, and it
does nothing once numpy is loaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
