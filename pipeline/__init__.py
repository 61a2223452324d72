"""klein-batch: bulk image generation through the FLUX.2 [klein] API.

The public surface is re-exported here; everything else is internal and may change.
"""

from __future__ import annotations

from pipeline.contract import RowStatus
from pipeline.errors import ConfigError, KleinError, ManifestError, ReferenceError
from pipeline.manifest import Defaults
from pipeline.run import RunOptions, arun_manifest, run_manifest
from pipeline.spec import RunSpec
from pipeline.summary import ExitCode, ProgressSnapshot, RunSummary

__all__ = [
    "ConfigError",
    "Defaults",
    "ExitCode",
    "KleinError",
    "ManifestError",
    "ProgressSnapshot",
    "ReferenceError",
    "RowStatus",
    "RunOptions",
    "RunSpec",
    "RunSummary",
    "arun_manifest",
    "run_manifest",
]
