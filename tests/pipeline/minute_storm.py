"""A run against a key whose per-minute submit limit the client was not told.

More rows than the limit means the run cannot finish in less than a minute: the server
counts every submit, refused ones too, over a sliding minute. So the scenario starts in the
background as soon as collection selects its test (see ``conftest.py``), runs the three
``Retry-After`` forms side by side while the other tests run, and the test itself only
collects the results. The runs go in a child process (this file run as a script): in a
thread of the test process, a test that patched a class meanwhile (an error of ours
injected into ``parse_submit``) reached into them and failed a row.

Under pytest-xdist every worker collects every test, and each used to start the three runs
of its own (six copies, 15 CPU-seconds of a CPU-bound suite, for one worker's test). The
runs are now made once per test run, in a folder the workers share: the first to create
it starts the child, and every worker's tests read what it wrote there.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
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


#: Written by the child once every form's result is: the runs are over.
DONE_FILE = "done"
#: How long a worker waits for the runs (one minute and a bit on an idle machine).
WAIT_S = 240.0


class MinuteStorm:
    """The three runs, started once per test run; a daemon thread waits for their results.

    ``root``: the folder shared by the run's workers (one per process without xdist).
    ``starts``: whether this process starts the child (it created ``root``); the others
    only wait for its ``DONE_FILE``.
    """

    def __init__(self, root: Path, starts: bool) -> None:
        self.root = root
        self.starts = starts
        self.results = {form: Result(self.root / form / "out") for form in FORMS}
        self.manifest = self.root / "in" / "catalog.csv"
        self.thread = threading.Thread(target=self._main, name="minute-storm", daemon=True)

    def start(self) -> None:
        if self.starts:
            write_catalog(self.manifest.parent, ROWS)
            # Not a child of the thread: a worker that xdist shuts down once the queue is
            # empty would take a running child's results with it; this one writes them.
            with open(self.root / "child.log", "wb") as log:
                subprocess.Popen(
                    [sys.executable, __file__, str(self.root), str(self.manifest)],
                    cwd=Path(__file__).parent,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        self.thread.start()

    def _main(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while not (self.root / DONE_FILE).exists():
            if time.monotonic() > deadline:
                return  # the test says the runs did not finish
            time.sleep(0.5)
        log = (self.root / "child.log").read_text(errors="replace")[-3000:]
        for form, result in self.results.items():
            stored = result.out.parent / RESULT_FILE
            if not stored.is_file():
                result.error = RuntimeError(f"no result for {form}: {log}")
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
    (root / form / f"{RESULT_FILE}.tmp").write_text(json.dumps(data, default=str))
    os.replace(root / form / f"{RESULT_FILE}.tmp", root / form / RESULT_FILE)


async def _all(root: Path, manifest: Path) -> None:
    await asyncio.gather(*(_one(root, manifest, form) for form in FORMS))


_STORM: MinuteStorm | None = None


def start_minute_storm(config: pytest.Config) -> MinuteStorm:
    """This process's view of the runs, started by the first process of the test run to
    ask. Under xdist the folder is in the run's own temporary folder (``pytest-N``, which
    pytest keeps for the last three runs and then removes), named by the run's id."""
    global _STORM
    if _STORM is None:
        run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
        factory = getattr(config, "_tmp_path_factory", None)
        if run_id and factory is not None:
            root = factory.getbasetemp().parent / f"minute-storm-{run_id}"
            try:
                root.mkdir()
                starts = True
            except FileExistsError:
                starts = False
        else:
            root = Path(tempfile.mkdtemp(prefix="klein-minute-storm-"))
            # Outside pytest's folders: removed as the process ends (6 MB in /tmp a run).
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            starts = True
        _STORM = MinuteStorm(root, starts)
        _STORM.start()
    return _STORM


if __name__ == "__main__":
    try:
        asyncio.run(_all(Path(sys.argv[1]), Path(sys.argv[2])))
    finally:
        (Path(sys.argv[1]) / DONE_FILE).touch()
