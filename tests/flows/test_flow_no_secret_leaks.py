"""The catalog flow, S3 in and out, leaks neither the API key nor the AWS secret anywhere.

The key comes from a Prefect Secret block (the way a deployment is meant to get it), the
simulator answers with 503s and drops so shards retry and explain themselves, and the
manifest has a bad row. Then every object in the bucket (Parquet decompressed), every file
in the local work folder, everything printed to stdout/stderr (DEBUG logs on) and
everything the Prefect server keeps about the run (parameters, artifacts, logs, task runs
and their inputs) is searched.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from flow_helpers import PROMPTS, moto_bucket, write_catalog
from test_catalog_flow import flow_run_records

from pipeline import s3
from pipeline.sim import (
    EndpointFaults,
    FaultConfig,
    KeyConfig,
    LatencyConfig,
    SimConfig,
    SimServer,
)
from pipeline.spec import RunSpec

pytestmark = pytest.mark.usefixtures("prefect_api", "debug_logging")

API_KEY = "kb-live-flowLeak-3Hq9Zt2Wm7Rx"
AWS_SECRET = "aws-secret-flowLeak-8Jd2Kq5Vn0Lp"
SECRETS = (API_KEY, AWS_SECRET)


def _readable(data: bytes) -> bytes:
    """The bytes, plus every value of a Parquet file (the output manifest is zstd'd)."""
    if data[:4] == b"PAR1":
        table = pq.read_table(io.BytesIO(data))
        data += repr(table.to_pylist()).encode("utf-8", "backslashreplace")
        data += repr(table.schema.metadata).encode("utf-8", "backslashreplace")
    return data


def _leaks(data: bytes) -> list[str]:
    return [secret for secret in SECRETS if secret.encode() in data]


class _Records(logging.Handler):
    """Every record, formatted as a console handler would print it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


RECORDS = _Records()


@pytest.fixture
def debug_logging() -> Iterator[None]:
    """DEBUG on for the loggers a run writes to, each record kept, restored after the test.

    Prefect's console handler keeps the stream it found when an earlier test configured
    it, so the console capture alone can miss records; our own handler sees them all.
    """
    loggers = [logging.getLogger(n) for n in ("", "prefect", "pipeline", "flows", "botocore")]
    levels = [logger.level for logger in loggers]
    RECORDS.lines.clear()
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(RECORDS)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
            logger.removeHandler(RECORDS)


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    monkeypatch.delenv("FREEPIK_API_KEY", raising=False)
    with moto_bucket(
        monkeypatch,
        tmp_path / "work",
        access="klein-flow-leak-access",
        secret=AWS_SECRET,
        prefix="klein-leak",
    ) as name:
        yield name


async def test_flow_with_s3_and_a_secret_block_leaks_no_secret(
    bucket: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from prefect.blocks.system import Secret

    from flows.catalog import generate_catalog

    block = f"klein-leak-{uuid.uuid4().hex[:6]}"
    await Secret(value=API_KEY).save(block, overwrite=True)
    rows = [(f"leak-{n:02d}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, 15)]
    rows[4] = ("leak-05", "", "SKU5")  # rejected: no prompt
    local = write_catalog(tmp_path / "catalog.csv", rows)
    client = s3.client()
    client.put_object(Bucket=bucket, Key="in/catalog.csv", Body=local.read_bytes())
    config = SimConfig(
        keys=[KeyConfig(name="leak", key=API_KEY, max_active=8)],
        latency=LatencyConfig(median_s=0.05, p95_s=0.1),
        faults=FaultConfig(
            seed=11,
            submit=EndpointFaults(error_503=0.3, drop=0.1),
            poll=EndpointFaults(error_500=0.2),
        ),
    )
    async with SimServer(config) as sim:
        state = await generate_catalog(
            f"s3://{bucket}/in/catalog.csv",
            RunSpec(out=f"s3://{bucket}/out/{{date}}", api_url=sim.url, max_active=8),
            shard_size=5,
            parallel_shards=2,
            api_key_block=block,
            return_state=True,
        )
        stats = sim.stats()["keys"]["leak"]
    assert state.is_completed(), state.message
    assert stats["submits_accepted"] >= 13  # the key from the block really was used
    assert sum(stats["faults"].values()) > 0

    found: dict[str, list[str]] = {}
    listed = client.list_objects_v2(Bucket=bucket)
    keys = [item["Key"] for item in listed.get("Contents", [])]
    assert any(key.endswith("/manifest.parquet") for key in keys)
    assert any(key.endswith("/run.json") for key in keys)
    assert sum("/images/" in key for key in keys) == 13
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        if leaked := _leaks(_readable(body)):
            found[f"s3://{bucket}/{key}"] = leaked
    for path in (tmp_path / "work").rglob("*"):
        if path.is_file() and (leaked := _leaks(_readable(path.read_bytes()))):
            found[str(path)] = leaked
    assert found == {}

    records = await flow_run_records(state.state_details.flow_run_id)
    assert records["logs"] and records["artifacts"]
    stored = json.dumps(
        {
            "parameters": records["run"].parameters,
            "run": records["run"].model_dump(mode="json"),
            "artifacts": [a.model_dump(mode="json") for a in records["artifacts"]],
            "logs": [log.model_dump(mode="json") for log in records["logs"]],
            "task_runs": [t.model_dump(mode="json") for t in records["task_runs"]],
        }
    )
    assert records["run"].parameters["api_key_block"] == block
    assert _leaks(stored.encode()) == []
    # Every log record (DEBUG included), and whatever reached the console.
    logged = "\n".join(RECORDS.lines)
    assert "DEBUG pipeline.engine" in logged
    assert _leaks(logged.encode()) == []
    out, err = capfd.readouterr()
    assert _leaks((out + err).encode()) == []
