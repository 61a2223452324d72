"""A run against a key whose per-minute submit limit the client was not told.

More rows than the limit means the run cannot finish in less than a minute: the server
counts every submit, refused ones too, over a sliding minute. So the scenario starts in the
background as soon as collection selects its test (see ``conftest.py``), runs the three
``Retry-After`` forms side by side while the other tests run, and the test itself only
collects the results. The runs go in a child process (this file run as a script): in a
thread of the test process, a test that patched a class meanwhile (an error of ours
injected into ``parse_submit``) reached into them and failed a row.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline_helpers import SIM_KEY, fast_options, sim_config, write_catalog

from pipeline.run import arun_manifest
from pipeline.sim import KeyConfig, SimServer
from pipeline.summary import RunSummary

#: What a child's run leaves beside its output for the test process.
RESULT_FILE = "result.json"

#: The server's submits per minute, and the rows the run has (more than one minute's worth).
SERVER_PER_MINUTE = 8
ROWS = 11
FORMS = ("seconds", "http-date", "none")


@dataclass
class Result:
    out: Path
    summary: RunSummary | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


class MinuteStorm:
    """The three runs, started once per session in a daemon thread."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="klein-minute-storm-"))
        # Started at collection, outside pytest's tmp_path: removed as the session's process
        # ends (each run left 6 MB in /tmp).
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)
        self.results = {form: Result(self.root / form / "out") for form in FORMS}
        self.manifest = write_catalog(self.root / "in", ROWS)
        self.thread = threading.Thread(target=self._main, name="minute-storm", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        child = subprocess.run(
            [sys.executable, __file__, str(self.root), str(self.manifest)],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=False,
        )
        for form, result in self.results.items():
            stored = result.out.parent / RESULT_FILE
            if not stored.is_file():
                result.error = RuntimeError(f"no result for {form}: {child.stderr[-3000:]}")
                continue
            data = json.loads(stored.read_text())
            if data["error"] is not None:
                result.error = RuntimeError(data["error"])
                continue
            names = {f.name for f in dataclasses.fields(RunSummary)}
            result.summary = RunSummary(**{k: v for k, v in data["summary"].items() if k in names})
            result.stats = data["stats"]


async def _one(root: Path, manifest: Path, form: str) -> None:
    """One form's run, in the child process; its result written as JSON beside its output."""
    out = root / form / "out"
    data: dict[str, Any] = {"summary": None, "stats": {}, "error": None}
    key = KeyConfig(tier="trial", submits_per_minute=SERVER_PER_MINUTE)
    try:
        async with SimServer(sim_config(keys=[key], retry_after=form)) as server:
            # The client believes the trial tier's 120 a minute: the server says otherwise.
            options = fast_options(tier="trial")
            summary = await arun_manifest(
                manifest, out, api_url=server.url, api_key=SIM_KEY, options=options
            )
            data["summary"] = summary.to_dict()
            data["stats"] = server.stats()["keys"]["demo"]
    except BaseException as exc:  # reported by the test
        data["error"] = f"{type(exc).__name__}: {exc}"
    (root / form).mkdir(parents=True, exist_ok=True)
    (root / form / RESULT_FILE).write_text(json.dumps(data, default=str))


async def _all(root: Path, manifest: Path) -> None:
    await asyncio.gather(*(_one(root, manifest, form) for form in FORMS))


_STORM: MinuteStorm | None = None


def start_minute_storm() -> MinuteStorm:
    global _STORM
    if _STORM is None:
        _STORM = MinuteStorm()
        _STORM.start()
    return _STORM


if __name__ == "__main__":
    asyncio.run(_all(Path(sys.argv[1]), Path(sys.argv[2])))
