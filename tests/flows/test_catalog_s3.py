"""The catalog flow with its manifest and output in S3 (moto's server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from flow_helpers import PROMPTS, moto_bucket, write_catalog

from pipeline import s3
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer
from pipeline.spec import RunSpec

pytestmark = pytest.mark.usefixtures("prefect_api")

SECRET = "sk-flow-s3-test-91c4"
KLEIN_BATCH = Path(sys.executable).with_name("klein-batch")


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    with moto_bucket(
        monkeypatch,
        tmp_path / "work",
        access="klein-flow-test-access",
        secret="klein-flow-test-secret",
        prefix="klein-flow",
    ) as name:
        yield name


def _upload_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("s3-upload")}


async def test_flow_reads_and_writes_s3(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.catalog import generate_catalog

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    rows = [(f"s{n}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, 12)]
    local = write_catalog(tmp_path / "catalog.csv", rows)
    client = s3.client()
    client.put_object(Bucket=bucket, Key="in/catalog.csv", Body=local.read_bytes())
    config = SimConfig(
        keys=[KeyConfig(name="s3", key=SECRET, max_active=8)],
        latency=LatencyConfig(median_s=0.05, p95_s=0.1),
    )
    uploaders = _upload_threads()
    async with SimServer(config) as sim:
        state = await generate_catalog(
            f"s3://{bucket}/in/catalog.csv",
            RunSpec(out=f"s3://{bucket}/out/{{date}}", api_url=sim.url, max_active=8),
            shard_size=4,
            parallel_shards=2,
            return_state=True,
        )
        accepted = sim.stats()["keys"]["s3"]["submits_accepted"]
    assert state.is_completed(), state.message
    # Every sink the flow opened (validation, the lock, each shard's, the run's end) was
    # closed: no upload thread of its own left idling in a process that runs flow after flow.
    assert _upload_threads() <= uploaders
    result = await state.result()
    out = result["output"]
    assert out.startswith(f"s3://{bucket}/out/20")
    prefix = out.removeprefix(f"s3://{bucket}/")

    body = client.get_object(Bucket=bucket, Key=f"{prefix}/manifest.parquet")["Body"].read()
    done = pl.read_parquet(io.BytesIO(body))
    assert done["row"].to_list() == list(range(1, 12))
    assert set(done["status"]) == {"succeeded"} and accepted == 11
    assert all(uri.startswith(f"s3://{bucket}/{prefix}/images/") for uri in done["output_uri"])
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/images/")
    assert listed["KeyCount"] == 11
    summary = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/run.json")["Body"].read())
    assert [s["shard"] for s in summary["shards"]] == [0, 1, 2]
    assert sum(s["rows"] for s in summary["shards"]) == 11
    shard_ledger = client.head_object(
        Bucket=bucket, Key=f"{prefix}/.klein/shards/2/.klein/ledger.sqlite"
    )
    assert shard_ledger["ContentLength"] > 0
    assert os.environ["FREEPIK_API_KEY"] not in json.dumps(summary)

    # `klein-batch status` on the finished S3 output: the shards' journals, summed, from this
    # machine's work dirs and, as another machine sees it, from the snapshots in the output.
    from pipeline.status import read_status

    here = await asyncio.to_thread(read_status, out)
    monkeypatch.setenv("KLEIN_BATCH_WORK_DIR", str(tmp_path / "another-machine"))
    elsewhere = await asyncio.to_thread(read_status, out)
    for found in (here, elsewhere):
        assert found.state == "finished", found.render()
        assert found.total == 11 and found.counts["succeeded"] == 11 and found.done == 11
    assert elsewhere.note is not None and "snapshot" in elsewhere.note
    assert here.note is None


def test_flow_command_takes_the_s3_endpoint_from_its_config_file(
    bucket: str, tmp_path: Path, prefect_api: str
) -> None:
    """`s3_endpoint_url` in the --config file reaches the flow's S3 reads and writes.

    `klein-batch flow` runs in a process of its own (as a user starts it), whose environment
    names no endpoint: only the config file knows where the bucket is.
    """
    rows = [(f"c{n}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, 6)]
    local = write_catalog(tmp_path / "catalog.csv", rows)
    s3.client().put_object(Bucket=bucket, Key="in/catalog.csv", Body=local.read_bytes())
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    sim_toml = tmp_path / "sim.toml"
    sim_toml.write_text(
        f'[[keys]]\nname = "cfg"\nkey = "{SECRET}"\ntier = "standard"\n\n'
        "[latency]\nmedian_s = 0.05\np95_s = 0.1\n",
        encoding="utf-8",
    )
    config = tmp_path / "flow.toml"
    config.write_text(
        f's3_endpoint_url = "{endpoint}"\nsim_config = "sim.toml"\n', encoding="utf-8"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "FREEPIK", "BFL", "AWS_ENDPOINT_URL"))
    }
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=prefect_api,  # the session's server, as a deployment's would be
    )
    args = ["--out", f"s3://{bucket}/out", "--config", str(config), "--shard-size", "3"]

    done = subprocess.run(
        [str(KLEIN_BATCH), "flow", f"s3://{bucket}/in/catalog.csv", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    body = s3.client().get_object(Bucket=bucket, Key="out/manifest.parquet")["Body"].read()
    manifest = pl.read_parquet(io.BytesIO(body))
    assert manifest["row"].to_list() == list(range(1, 6))
    assert set(manifest["status"]) == {"succeeded"}


async def test_the_specs_s3_endpoint_reaches_a_night_started_without_it(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's process knows no endpoint (no $AWS_ENDPOINT_URL, no CLI flag): a night
    started from a deployment, and each shard runner, use the spec's `s3_endpoint_url`
    (MinIO, R2). They went to AWS itself, and every runner failed to connect."""
    from flows.catalog import generate_catalog

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    rows = [(f"e{n}", PROMPTS[n % len(PROMPTS)], f"SKU{n}") for n in range(1, 6)]
    local = write_catalog(tmp_path / "catalog.csv", rows)
    s3.client().put_object(Bucket=bucket, Key="in/catalog.csv", Body=local.read_bytes())
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setattr(s3._settings, "endpoint_url", None)  # a fresh worker process
    s3.reset_clients()
    config = SimConfig(
        keys=[KeyConfig(name="s3", key=SECRET, max_active=8)],
        latency=LatencyConfig(median_s=0.05, p95_s=0.1),
    )
    async with SimServer(config) as sim:
        result = await generate_catalog(
            f"s3://{bucket}/in/catalog.csv",
            RunSpec(
                out=f"s3://{bucket}/out/spec-endpoint",
                api_url=sim.url,
                max_active=8,
                s3_endpoint_url=endpoint,
            ),
            shard_size=2,
            parallel_shards=2,
        )
    s3.reset_clients()
    assert result["counts"]["succeeded"] == 5
