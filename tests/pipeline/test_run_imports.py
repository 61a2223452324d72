"""What ``klein-batch run`` imports when it runs a CSV against an external API.

Each module a run imports costs CPU on every run, before its first submit (benchmarks/
notes.md, "the fixed cost"). A run against a real API never needs the bundled simulator,
the webhook receiver (aiohttp's server side), the progress bar's rich, Prefect or boto3,
nor pandas (installed here as a dev dependency, as on many a data team's machine; pyarrow
imports it for any ``pa.array`` of a Python list: 0.5 s and 30 MB), nor ``pyarrow.compute``
(0.02-0.03 s: ``pl.from_arrow`` and ``Array.cast`` import it; ``pipeline/arrow_arrays.py``
goes around both); this test fails when an import creeps back onto that path.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from pipeline_helpers import SIM_KEY, check_output, cli_env, write_catalog

from pipeline.sim import SimServer

#: Modules (and their submodules) a polling run of a local CSV against --api-url must not load.
NOT_IMPORTED = (
    "pipeline.sim",
    "pipeline.webhooks",
    "pipeline.progress_bar",
    "pipeline.s3",
    "aiohttp.web",
    "rich",
    "prefect",
    "boto3",
    "botocore",
    "pandas",
    "pyarrow.compute",
)

#: The console script's own entry point, with the loaded modules written out at exit.
_PROGRAM = """
import atexit, json, sys
path = sys.argv.pop(1)
atexit.register(lambda: open(path, "w").write(json.dumps(sorted(sys.modules))))
from pipeline.cli import main
main()
"""


def test_a_run_against_an_external_api_imports_only_what_it_uses(
    sim: SimServer, tmp_path: Path
) -> None:
    assert importlib.util.find_spec("pandas") is not None  # else it could not be imported
    manifest = write_catalog(tmp_path / "in", 2)
    out = tmp_path / "out"
    loaded_file = tmp_path / "modules.json"
    result = subprocess.run(
        [
            *(sys.executable, "-c", _PROGRAM, str(loaded_file), "run", str(manifest)),
            *("--out", str(out), "--api-url", sim.url, "--progress", "off"),
        ],
        capture_output=True,
        text=True,
        env=cli_env(FREEPIK_API_KEY=SIM_KEY),
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    check_output(out, 2)  # the run really ran: both images made and recorded
    loaded = set(json.loads(loaded_file.read_text(encoding="utf-8")))
    assert {"pipeline.engine", "pipeline.run", "pipeline.html_report"} <= loaded
    unexpected = sorted(
        name
        for name in loaded
        if any(name == top or name.startswith(top + ".") for top in NOT_IMPORTED)
    )
    assert unexpected == []
