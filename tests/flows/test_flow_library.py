"""The image library in the catalog flow: a real Prefect flow run with the library parameter."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from flow_helpers import PROMPTS, moto_bucket, write_catalog

from pipeline import s3
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer
from pipeline.spec import RunSpec

pytestmark = pytest.mark.usefixtures("prefect_api")

SECRET = "sk-flow-library-3c9d1e"


def sim_config() -> SimConfig:
    return SimConfig(
        keys=[KeyConfig(name="flow", key=SECRET, max_active=8)],
        latency=LatencyConfig(median_s=0.05, p95_s=0.1),
    )


async def test_the_second_night_of_a_flow_copies_from_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.catalog import generate_catalog

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    rows = [
        (f"item-{n:02d}", f"{PROMPTS[n % len(PROMPTS)]} #{n}", f"SKU{n:03d}") for n in range(12)
    ]
    manifest = write_catalog(tmp_path / "catalog.csv", rows)
    common = {"shard_size": 5, "parallel_shards": 2}
    async with SimServer(sim_config()) as sim:
        # Night one: a {date} output, so the library defaults to nightly/library.
        first = await generate_catalog(
            str(manifest),
            RunSpec(out=str(tmp_path / "nightly" / "{date}"), api_url=sim.url, max_active=8),
            return_state=True,
            **common,
        )
        assert first.is_completed(), first.message
        assert sim.stats()["keys"]["flow"]["submits_accepted"] == 12
        library = tmp_path / "nightly" / "library"
        assert len(list((library / "objects").rglob("*.json"))) == 12

        # Night two into another folder, naming the library: nothing is sent.
        edited = [*rows[:11], ("item-11", "a brand new product", "SKU011")]
        second = await generate_catalog(
            str(write_catalog(tmp_path / "edited.csv", edited)),
            RunSpec(
                out=str(tmp_path / "night-2"), api_url=sim.url, max_active=8, library=str(library)
            ),
            return_state=True,
            **common,
        )
        assert second.is_completed(), second.message
        stats = sim.stats()["keys"]["flow"]
    assert stats["submits_accepted"] == 13, "only the changed row was sent"
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert (tmp_path / "nightly" / today / "manifest.parquet").exists()
    done = pl.read_parquet(tmp_path / "night-2" / "manifest.parquet")
    assert done["status"].to_list() == ["succeeded"] * 12
    reused = done.filter(pl.col("reused_from").is_not_null())
    assert reused["row"].to_list() == list(range(1, 12))
    assert reused["cost_credits"].sum() == 0
    assert all(uri.startswith(str(library.resolve())) for uri in reused["reused_from"])
    assert done.filter(pl.col("reused_from").is_null())["row"].to_list() == [12]
    images = {path.name for path in (tmp_path / "night-2" / "images").iterdir()}
    assert images == {Path(uri).name for uri in done["output_uri"]}
    # The night's own run.json adds its shards' copies up (it said 0 whatever they did).
    summary = json.loads((tmp_path / "night-2" / "run.json").read_text())
    assert summary["reused_rows"] == 11


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    with moto_bucket(
        monkeypatch,
        tmp_path / "work",
        access="klein-flow-library-access",
        secret="klein-flow-library-secret",
        prefix="klein-flow-lib",
    ) as name:
        yield name


async def test_a_flow_on_s3_copies_from_its_dated_default_library_inside_s3(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.catalog import generate_catalog

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    rows = [(f"s{n}", f"{PROMPTS[n % len(PROMPTS)]} #{n}", f"SKU{n}") for n in range(9)]
    client = s3.client()
    client.put_object(
        Bucket=bucket,
        Key="in/catalog.csv",
        Body=write_catalog(tmp_path / "catalog.csv", rows).read_bytes(),
    )
    common = {"shard_size": 4, "parallel_shards": 2}
    async with SimServer(sim_config()) as sim:
        first = await generate_catalog(
            f"s3://{bucket}/in/catalog.csv",
            RunSpec(out=f"s3://{bucket}/nightly/{{date}}", api_url=sim.url, max_active=8),
            return_state=True,
            **common,
        )
        assert first.is_completed(), first.message
        # The next night, into another dated folder: the default library is the same one.
        second = await generate_catalog(
            f"s3://{bucket}/in/catalog.csv",
            RunSpec(out=f"s3://{bucket}/nightly/{{date}}-again", api_url=sim.url, max_active=8),
            return_state=True,
            **common,
        )
        assert second.is_completed(), second.message
        accepted = sim.stats()["keys"]["flow"]["submits_accepted"]
    assert accepted == 9, "the second night sent submits"
    out = (await second.result())["output"].removeprefix(f"s3://{bucket}/")
    body = client.get_object(Bucket=bucket, Key=f"{out}/manifest.parquet")["Body"].read()
    done = pl.read_parquet(io.BytesIO(body))
    assert done["status"].to_list() == ["succeeded"] * 9
    assert all(
        uri.startswith(f"s3://{bucket}/nightly/library/objects/") for uri in done["reused_from"]
    )
    assert done["cost_credits"].sum() == 0
    for record in done.iter_rows(named=True):
        key = record["output_uri"].removeprefix(f"s3://{bucket}/")
        image = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(image).hexdigest() == record["sha256"]
