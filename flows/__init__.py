"""Prefect flows for klein-batch: a catalog run split into shards, one Prefect task each.

The flows are thin: every row is still carried by ``pipeline.run.arun_manifest``; what this
package adds is the Prefect side of a nightly catalog job (scheduling, retries per shard,
artifacts, and spreading shards over workers that share one API key's budget).

- ``generate_catalog`` (``flows/catalog.py``): validate, shard, run, merge, publish.
- ``generate_catalog_shard``: one shard as its own flow, for ``run_deployment`` scale-out.
"""

from __future__ import annotations

import gc

# A flow run of ours is a process of ours: one OpenBLAS thread (pipeline/blas.py), set
# before its modules import numpy and inherited by the processes a worker starts.
import pipeline.blas  # noqa: F401

# In a flow run's process Prefect's engine has imported Prefect (about 110,000 objects that
# live as long as the process) before this package. Every collection the flow's own imports
# then trigger (Polars, pyarrow, the pipeline: 50,000 more) would walk them all and find
# nothing; moved to the collector's permanent generation they are skipped, as
# ``pipeline.cli.import_quietly`` does for a command's imports: ``import flows.catalog``
# after ``prefect.engine`` took 2.55 CPU-s, 2.25 with this (benchmarks/notes.md, session 28).
gc.freeze()

__all__ = ["generate_catalog", "generate_catalog_shard"]


def __getattr__(name: str) -> object:
    # Importing Prefect costs about a second; `flows.shards` and friends stay cheap to import.
    if name in __all__:
        from flows import catalog

        return getattr(catalog, name)
    raise AttributeError(name)
