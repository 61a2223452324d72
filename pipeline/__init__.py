"""klein-batch: bulk image generation through the FLUX.2 [klein] API.

The public surface is re-exported here; everything else is internal and may change.

The names are loaded on first use (PEP 562 ``__getattr__``), not when the package is
imported: ``import pipeline.cli`` (every ``klein-batch`` command) and any other submodule
import start with this file, and importing the engine, Polars and aiohttp here would make
every command pay for them before it knows whether it needs them.
``from pipeline import run_manifest`` works exactly as before.
"""

from __future__ import annotations

import importlib.util
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.contract import RowStatus
    from pipeline.errors import (
        ApiUnreachable,
        ConfigError,
        KeyRefusedError,
        KleinError,
        ManifestError,
        ReferenceError,
        StorageError,
    )
    from pipeline.manifest import Defaults
    from pipeline.run import RunOptions, arun_manifest, run_manifest
    from pipeline.spec import RunSpec
    from pipeline.summary import ExitCode, ProgressSnapshot, RunSummary

#: Each public name and the submodule that defines it.
_PUBLIC: dict[str, str] = {
    "ApiUnreachable": "pipeline.errors",
    "ConfigError": "pipeline.errors",
    "Defaults": "pipeline.manifest",
    "ExitCode": "pipeline.summary",
    "KeyRefusedError": "pipeline.errors",
    "KleinError": "pipeline.errors",
    "ManifestError": "pipeline.errors",
    "ProgressSnapshot": "pipeline.summary",
    "ReferenceError": "pipeline.errors",
    "RowStatus": "pipeline.contract",
    "RunOptions": "pipeline.run",
    "RunSpec": "pipeline.spec",
    "RunSummary": "pipeline.summary",
    "StorageError": "pipeline.errors",
    "arun_manifest": "pipeline.run",
    "run_manifest": "pipeline.run",
}

__all__ = [
    "ApiUnreachable",
    "ConfigError",
    "Defaults",
    "ExitCode",
    "KeyRefusedError",
    "KleinError",
    "ManifestError",
    "ProgressSnapshot",
    "ReferenceError",
    "RowStatus",
    "RunOptions",
    "RunSpec",
    "RunSummary",
    "StorageError",
    "arun_manifest",
    "run_manifest",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first asked for, and keep the name."""
    module = _PUBLIC.get(name)
    if module is None:
        # ``import pipeline; pipeline.manifest`` worked while this file imported everything:
        # a submodule's name still does, importing it now.
        if name.startswith("_") or importlib.util.find_spec(f"pipeline.{name}") is None:
            raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
        return import_module(f"pipeline.{name}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
