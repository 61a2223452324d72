"""A simulator in its own process, a mixed 2,000-row catalog, and the invariants of a run.

The simulator runs in a separate process so that the run under test and the server share
the machine the way they would in production (two cores, two interpreters), and so that a
``kill -9`` of the pipeline leaves the server, and its duplicate-submit counter, standing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image

from pipeline.contract import output_size

#: Statuses a row may end in; anything else (or a missing row) is a lost row.
TERMINAL = {"succeeded", "moderated", "failed", "rejected", "skipped"}
#: Fast tasks and a roomy tier, so a 2,000-row run takes seconds.
CHAOS_KEY = "chaos-sk-7d1f0c2e9a"
FAST_LATENCY = {"median_s": 0.02, "p95_s": 0.05}

_SIM_MAIN = """
import json, sys
from pipeline.sim import SimConfig, serve
config = SimConfig.from_dict(json.loads(sys.argv[1]), source="chaos test")
serve(config, "127.0.0.1", 0, announce=lambda line: print(line, flush=True))
"""


@dataclass(slots=True)
class SimProcess:
    url: str
    process: subprocess.Popen[str]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_sim/stats", timeout=30) as response:
            return json.load(response)

    def key_stats(self) -> dict[str, Any]:
        return self.stats()["keys"]["chaos"]


#: Where this test run's chaos simulators keep their images (tests/chaos/conftest.py).
IMAGE_DIR: str | None = None


def sim_config(**overrides: Any) -> dict[str, Any]:
    """A simulator config: one key on the enterprise tier, fast tasks, plus ``overrides``."""
    config: dict[str, Any] = {
        "keys": [{"name": "chaos", "key": CHAOS_KEY, "tier": "enterprise"}],
        "latency": dict(FAST_LATENCY),
    }
    if IMAGE_DIR is not None:
        config["image_dir"] = IMAGE_DIR
    for name, value in overrides.items():
        if name == "key":
            config["keys"][0].update(value)
        else:
            config[name] = value
    return config


@contextmanager
def sim_process(config: dict[str, Any]) -> Iterator[SimProcess]:
    """Start ``python -m``-style simulator on 127.0.0.1 with a free port; stop it after."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SIM_MAIN, json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if "listening on " not in line:
            _, err = process.communicate(timeout=10)
            raise RuntimeError(f"simulator did not start: {line}{err}")
        url = line.split("listening on ", 1)[1].split()[0]
        yield SimProcess(url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def write_catalog(folder: Path, rows: int = 2_000, bad_every: int = 100) -> Path:
    """A catalog like a real one: mixed presets and formats, shared references, some bad rows.

    Every ``bad_every``-th row is invalid (an unknown preset or a negative seed), so the
    invariants cover rejected rows too.
    """
    refs = folder / "shots"
    refs.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 32), (200, 40, 40)).save(refs / "red.png")
    Image.new("RGB", (32, 48), (40, 40, 200)).save(refs / "blue.jpg", quality=90)
    aspects = ["square_1_1", "widescreen_16_9", "portrait_2_3", "classic_4_3", "vertical_1_2"]
    records: dict[str, list[str]] = {
        k: []
        for k in (
            "id",
            "prompt",
            "aspect_ratio",
            "resolution",
            "output_format",
            "seed",
            "input_image",
            "sku",
        )
    }
    for i in range(rows):
        bad = bad_every and i % bad_every == bad_every - 1
        records["id"].append(f"sku-{i:06d}")
        records["prompt"].append(f"studio photo of product {i}, colour {i % 17}")
        records["aspect_ratio"].append("square_9_9" if bad and i % 2 else aspects[i % len(aspects)])
        records["resolution"].append("2k" if i % 250 == 0 else "1k")
        # PNGs cost the simulator, the client and the checks 2-3x a JPEG: 1 in 25 is plenty
        # to cover the format without tipping the suite over its CI time budget.
        records["output_format"].append("png" if i % 25 == 3 else "jpeg")
        records["seed"].append("-1" if bad and not i % 2 else ("" if i % 3 else str(i * 7919)))
        records["input_image"].append(
            "shots/red.png" if i % 11 == 0 else ("shots/blue.jpg" if i % 13 == 0 else "")
        )
        records["sku"].append(f"{i:06d}")
    path = folder / "catalog.csv"
    pl.DataFrame(records).write_csv(path)
    return path


def check_run(manifest: Path, out: Path, *, full_decode_every: int = 50) -> pl.DataFrame:
    """Assert the invariants every run keeps, whatever the faults; returns the output manifest.

    - every input row is in the output manifest exactly once, in exactly one terminal state;
    - every ``succeeded`` row's image is in DEST, decodes (PNGs and every
      ``full_decode_every``-th JPEG at full size, the other JPEGs at 1/8 scale, which still
      reads every block), has the promised size and format, and the sha256 and byte count
      the manifest records;
    - every row that did not succeed says why; no two rows share a task id;
    - DEST holds no image that the manifest does not account for.
    """
    done = pl.read_parquet(out / "manifest.parquet")
    root = out.resolve()

    def read(uri: str) -> bytes:
        path = Path(uri)
        assert path.is_relative_to(root), path
        return path.read_bytes()

    stored = check_rows(manifest, done, read, full_decode_every=full_decode_every)
    on_disk = {p.name for p in (out / "images").iterdir()} if (out / "images").exists() else set()
    visible = {name for name in on_disk if not name.startswith(".")}
    assert visible == stored, sorted(visible ^ stored)[:5]
    return done


def check_rows(
    manifest: Path,
    done: pl.DataFrame,
    read: Callable[[str], bytes],
    *,
    full_decode_every: int = 50,
) -> set[str]:
    """``check_run`` for any sink: ``read(output_uri)`` fetches a stored image.

    Returns the file names of the stored images.
    """
    inputs = pl.read_csv(manifest, infer_schema=False)
    assert done.height == inputs.height, (done.height, inputs.height)
    assert sorted(done["row"].to_list()) == list(range(1, inputs.height + 1))
    statuses = set(done["status"].to_list())
    assert statuses <= TERMINAL, statuses
    assert done.filter(pl.col("status").is_null()).height == 0
    # Extra columns are carried through untouched, row for row.
    assert done.sort("row")["sku"].to_list() == inputs["sku"].to_list()
    unexplained = done.filter((pl.col("status") != "succeeded") & pl.col("reason").is_null())
    assert unexplained.height == 0, unexplained.head(5)
    task_ids = done.filter(pl.col("task_id").is_not_null())["task_id"]
    assert task_ids.n_unique() == task_ids.len(), "two rows share one task"
    succeeded = done.filter(pl.col("status") == "succeeded")
    stored: set[str] = set()
    for record in succeeded.iter_rows(named=True):
        data = read(record["output_uri"])
        assert hashlib.sha256(data).hexdigest() == record["sha256"], record["key"]
        assert len(data) == record["bytes"]
        with Image.open(io.BytesIO(data)) as image:
            size, fmt = image.size, image.format
            if image.format == "JPEG" and record["row"] % full_decode_every:
                # Every entropy-coded block is still read at 1/8 scale: a cut body fails.
                image.draft("RGB", (image.width // 8, image.height // 8))
            image.load()
        assert size == output_size(record["aspect_ratio"], record["resolution"])
        assert size == (record["width"], record["height"])
        assert {"JPEG": "jpeg", "PNG": "png"}[fmt or ""] == record["output_format"]
        stored.add(record["output_uri"].rsplit("/", 1)[-1])
    return stored


def kill_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The CLI's environment: the chaos key, ephemeral Prefect, nothing from the caller's keys."""
    env = {k: v for k, v in os.environ.items() if k not in ("FREEPIK_API_KEY", "BFL_API_KEY")}
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["FREEPIK_API_KEY"] = CHAOS_KEY
    env.update(extra or {})
    return env
