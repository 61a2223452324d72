"""A run against a key whose per-minute submit limit the client was not told.

More rows than the limit means the run cannot finish in less than a minute: the server
counts every submit, refused ones too, over a sliding minute. So the scenario starts in a
background thread as soon as collection selects its test (see ``conftest.py``), runs the
three ``Retry-After`` forms side by side while the other tests run, and the test itself
only collects the results.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline_helpers import SIM_KEY, fast_options, sim_config, write_catalog

from pipeline.run import arun_manifest
from pipeline.sim import KeyConfig, SimServer
from pipeline.summary import RunSummary

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
        self.results = {form: Result(self.root / form / "out") for form in FORMS}
        self.manifest = write_catalog(self.root / "in", ROWS)
        self.thread = threading.Thread(target=self._main, name="minute-storm", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        asyncio.run(self._all())

    async def _all(self) -> None:
        await asyncio.gather(*(self._one(form) for form in FORMS))

    async def _one(self, form: str) -> None:
        result = self.results[form]
        key = KeyConfig(tier="trial", submits_per_minute=SERVER_PER_MINUTE)
        try:
            async with SimServer(sim_config(keys=[key], retry_after=form)) as server:
                # The client believes the trial tier's 120 a minute: the server says otherwise.
                options = fast_options(tier="trial")
                result.summary = await arun_manifest(
                    self.manifest, result.out, api_url=server.url, api_key=SIM_KEY, options=options
                )
                result.stats = server.stats()["keys"]["demo"]
        except BaseException as exc:  # reported by the test, not lost in a thread
            result.error = exc


_STORM: MinuteStorm | None = None


def start_minute_storm() -> MinuteStorm:
    global _STORM
    if _STORM is None:
        _STORM = MinuteStorm()
        _STORM.start()
    return _STORM
