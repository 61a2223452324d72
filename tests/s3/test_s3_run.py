"""Whole runs with S3 in and out: manifest and references from S3, outputs and journal to S3.

The simulator runs in-process on 127.0.0.1 with small latencies; S3 is moto's server.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from s3_helpers import FaultyProxy, catalog_csv, png, read_s3_parquet

from pipeline import s3
from pipeline.errors import ConfigError, KleinError, ManifestError, ReferenceError
from pipeline.manifest import ManifestReader
from pipeline.references import ReferenceStore
from pipeline.remote_journal import work_dir_for
from pipeline.run import run_manifest
from pipeline.sim import KeyConfig, SimConfig, SimServer
from pipeline.sim.config import LatencyConfig

FAST = LatencyConfig(median_s=0.05, p95_s=0.1)
SIM_KEY = KeyConfig().key


@pytest.fixture
def catalog(bucket: str, s3_client: Any) -> str:
    """s3://bucket/catalogs/night.csv with 12 rows and its reference images in S3."""
    s3_client.put_object(Bucket=bucket, Key="catalogs/shots/red.png", Body=png((200, 30, 30)))
    s3_client.put_object(Bucket=bucket, Key="library/blue.png", Body=png((30, 30, 200)))
    body = catalog_csv(bucket, 12).encode()
    s3_client.put_object(Bucket=bucket, Key="catalogs/night.csv", Body=body)
    return f"s3://{bucket}/catalogs/night.csv"


def sim() -> SimConfig:
    return SimConfig(latency=FAST)


def test_manifest_reader_streams_an_s3_manifest_through_a_temp_copy(catalog: str) -> None:
    reader = ManifestReader(catalog, batch_size=5)
    assert reader.name == "night.csv"
    assert reader.base_dir == catalog.rsplit("/", 1)[0] + "/"
    assert reader.extra_columns == ["sku"]
    copy = reader.path
    assert copy is not None and copy.is_file() and copy.suffix == ".csv"
    heights = [batch.height for batch in reader.batches()]
    assert heights == [5, 5, 2]
    del reader
    import gc

    gc.collect()
    assert not copy.exists()  # the temp copy goes with the reader


def test_copies_left_by_killed_processes_are_swept_on_the_next_fetch(
    catalog: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed outright deletes nothing: the next fetch removes the copies of
    processes that are gone, and only theirs."""
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = tmp_path / f"klein-manifest-{gone.stdout.strip()}-x1y2.csv"
    orphan.write_text("id,prompt\n")
    live = tmp_path / f"klein-manifest-{os.getppid()}-a1b2.csv"  # a live process's copy
    live.write_text("id,prompt\n")
    unrelated = tmp_path / "klein-manifest-notes.txt"
    unrelated.write_text("kept")

    reader = ManifestReader(catalog, batch_size=5)
    assert reader.path is not None and reader.path.parent == tmp_path
    assert not orphan.exists()
    assert live.exists() and unrelated.exists()


def test_a_missing_s3_manifest_names_the_object(bucket: str) -> None:
    with pytest.raises(ManifestError, match=rf"s3://{bucket}/nope.csv: no such object"):
        ManifestReader(f"s3://{bucket}/nope.csv")


async def test_references_resolve_against_the_manifest_prefix_with_the_size_cap(
    catalog: str, bucket: str, s3_client: Any
) -> None:
    store = ReferenceStore(catalog.rsplit("/", 1)[0] + "/", max_bytes=20_000)
    red = await store.load("shots/red.png")
    blue = await store.load(f"s3://{bucket}/library/blue.png")
    assert (red.width, red.height, blue.mime) == (48, 32, "image/png")
    assert red.digest != blue.digest
    assert store.stats["fetches"] == 2
    with pytest.raises(ReferenceError, match="outside the manifest's folder"):
        await store.load("../library/blue.png")
    with pytest.raises(ReferenceError, match="no such object"):
        await store.load("shots/missing.png")
    s3_client.put_object(Bucket=bucket, Key="catalogs/shots/huge.png", Body=b"x" * 30_000)
    with pytest.raises(ReferenceError, match=r"at most 0\.019\d* MB is allowed"):
        await store.load("shots/huge.png")


def test_a_run_from_s3_to_s3_leaves_images_manifest_and_summary_beside_each_other(
    catalog: str, bucket: str, s3_client: Any, endpoint: str
) -> None:
    out = f"s3://{bucket}/outputs/night"
    uploaders = {t for t in threading.enumerate() if t.name.startswith("s3-upload")}
    summary = run_manifest(catalog, out, sim=sim())
    assert summary.counts["succeeded"] == 12, summary.errors
    # The run closed its sink: no upload thread of its own left idling in this process.
    assert {t for t in threading.enumerate() if t.name.startswith("s3-upload")} <= uploaders
    manifest = read_s3_parquet(f"{out}/manifest.parquet", endpoint)
    assert manifest.height == 12
    assert manifest["sku"].to_list() == [f"SKU-{i:05d}" for i in range(12)]
    assert set(manifest["status"]) == {"succeeded"}
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="outputs/night/")
    keys = {item["Key"] for item in listed["Contents"]}
    for row in manifest.iter_rows(named=True):
        ext = "png" if row["output_format"] == "png" else "jpg"
        assert row["output_uri"] == f"{out}/images/{row['key']}.{ext}"
        key = row["output_uri"].removeprefix(f"s3://{bucket}/")
        head = s3_client.head_object(Bucket=bucket, Key=key)
        assert head["ContentType"] == ("image/png" if ext == "png" else "image/jpeg")
        assert head["ContentLength"] == row["bytes"]
    refs = manifest.filter(pl.col("reference_digests").list.len() > 0)
    assert refs.height == 8  # 4 relative + 4 absolute S3 references
    assert "outputs/night/run.json" in keys
    assert "outputs/night/.klein/ledger.sqlite" in keys
    # The final manifest supersedes the partial ones.
    assert not [k for k in keys if "/.klein/parts/" in k]
    ledger_head = s3_client.head_object(Bucket=bucket, Key="outputs/night/.klein/ledger.sqlite")
    assert ledger_head["ContentType"] == "application/vnd.sqlite3"


def test_a_rerun_without_the_work_dir_resumes_from_s3_alone(
    catalog: str, bucket: str, work_root: Path
) -> None:
    out = f"s3://{bucket}/outputs/again"
    first = run_manifest(catalog, out, sim=sim(), limit=7)
    assert first.counts["succeeded"] == 7
    work = work_dir_for(f"{out}/.klein")
    assert (work / "ledger.sqlite").is_file()
    shutil.rmtree(work_root)  # a fresh machine: nothing local
    second = run_manifest(catalog, out, sim=sim())
    assert second.resumed_rows == 7
    assert second.submits == 5  # only the rows the first run never reached
    assert second.counts["succeeded"] == 12


def test_a_rerun_into_an_emptied_output_makes_the_images_again(
    catalog: str, bucket: str, s3_client: Any, endpoint: str
) -> None:
    """Deleting an output to redo it must not leave a manifest of images that do not exist."""
    out = f"s3://{bucket}/outputs/redo"
    first = run_manifest(catalog, out, sim=sim(), limit=5)
    assert first.counts["succeeded"] == 5
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="outputs/redo/")["Contents"]
    s3_client.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": item["Key"]} for item in listed]}
    )
    work = work_dir_for(f"{out}/.klein")
    assert (work / "ledger.sqlite").is_file()  # this machine still remembers the first run

    second = run_manifest(catalog, out, sim=sim(), limit=5)

    assert second.resumed_rows == 0
    assert second.submits == 5
    manifest = read_s3_parquet(f"{out}/manifest.parquet", endpoint)
    assert set(manifest["status"]) == {"succeeded"}
    for uri in manifest["output_uri"]:
        s3_client.head_object(Bucket=bucket, Key=uri.removeprefix(f"s3://{bucket}/"))
    assert len(list(work.glob("stale-*/ledger.sqlite"))) == 1  # the old ledger, set aside


def test_images_missing_from_an_output_never_mirrored_are_collected_again_not_paid(
    catalog: str, bucket: str, s3_client: Any, endpoint: str
) -> None:
    """A run killed before its first journal snapshot leaves a local ledger the output
    never saw; the output then emptied (an operator redoing it, a store that lost it), the
    rerun kept the ledger and called rows succeeded whose images did not exist, exit 0.
    Their tasks were paid for: they are polled again and their images stored again."""
    out = f"s3://{bucket}/outputs/unmirrored"
    with SimServer.in_thread(sim()) as server:
        first = run_manifest(catalog, out, api_url=server.url, api_key=SIM_KEY, limit=5)
        assert first.counts["succeeded"] == 5
        listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="outputs/unmirrored/")
        s3_client.delete_objects(
            Bucket=bucket,
            Delete={"Objects": [{"Key": item["Key"]} for item in listed["Contents"]]},
        )
        work = work_dir_for(f"{out}/.klein")
        (work / "snapshot.generation").unlink()  # as if killed before its first snapshot
        paid = server.stats()["totals"]["submits_accepted"]

        second = run_manifest(catalog, out, api_url=server.url, api_key=SIM_KEY, limit=5)

        assert server.stats()["totals"]["submits_accepted"] == paid == 5
    assert second.counts["succeeded"] == 5 and second.submits == 0
    manifest = read_s3_parquet(f"{out}/manifest.parquet", endpoint)
    assert set(manifest["status"]) == {"succeeded"}
    for uri in manifest["output_uri"]:
        s3_client.head_object(Bucket=bucket, Key=uri.removeprefix(f"s3://{bucket}/"))


def test_a_flaky_s3_loses_nothing(
    catalog: str, bucket: str, s3_client: Any, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = f"s3://{bucket}/outputs/flaky"
    monkeypatch.setenv("KLEIN_BATCH_SYNC_S", "0.1")  # journal syncs go through the faults too
    with FaultyProxy(endpoint, error_rate=0.2, drop_rate=0.15, seed=11) as proxy:
        s3.configure(endpoint_url=proxy.url)
        s3.reset_clients()
        proxy.fail_next(4, 503)  # down for a while at the start (manifest download)
        proxy.drop_next_puts(2, after=True)  # stored, but the client never hears so
        proxy.drop_next_puts(2, after=False)  # lost on the way
        summary = run_manifest(catalog, out, sim=sim())
    s3.configure(endpoint_url=endpoint)
    s3.reset_clients()
    assert proxy.counts["error 503"] + proxy.counts["error 500"] >= 8
    assert proxy.counts["dropped after"] >= 2 and proxy.counts["dropped before"] >= 2
    manifest = read_s3_parquet(f"{out}/manifest.parquet", endpoint)
    assert manifest.height == 12
    assert manifest["row"].to_list() == list(range(1, 13))  # every row exactly once
    succeeded = manifest.filter(pl.col("status") == "succeeded")
    assert succeeded.height == summary.counts["succeeded"] == 12
    for row in succeeded.iter_rows(named=True):
        key = row["output_uri"].removeprefix(f"s3://{bucket}/")
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert len(body) == row["bytes"]


def test_an_output_bucket_that_does_not_exist_stops_the_run_before_any_submit(
    catalog: str,
) -> None:
    config = sim()
    with SimServer.in_thread(config) as server:
        with pytest.raises(ConfigError, match="bucket 'klein-no-such-output' does not exist"):
            run_manifest(
                catalog,
                "s3://klein-no-such-output/x",
                api_url=server.url,
                api_key=config.keys[0].key,
            )
        stats = server.stats()
    assert sum(key["submits_accepted"] for key in stats["keys"].values()) == 0


def test_an_input_at_the_s3_output_manifest_is_refused_before_any_submit(
    bucket: str, s3_client: Any
) -> None:
    """``s3://bucket/out/manifest.parquet`` as the input of a run into ``s3://bucket/out``:
    the output would overwrite it and the rerun pay again (issue 15, item 6)."""
    table = pl.DataFrame({"id": ["a"], "prompt": ["a red mug"]})
    buffer = io.BytesIO()
    table.write_parquet(buffer)
    s3_client.put_object(Bucket=bucket, Key="out/manifest.parquet", Body=buffer.getvalue())
    etag = s3_client.head_object(Bucket=bucket, Key="out/manifest.parquet")["ETag"]
    config = sim()
    with SimServer.in_thread(config) as server:
        for out in (f"s3://{bucket}/out", f"s3://{bucket}/out/"):
            with pytest.raises(KleinError, match="is the output manifest this run writes"):
                run_manifest(
                    f"s3://{bucket}/out/manifest.parquet",
                    out,
                    api_url=server.url,
                    api_key=config.keys[0].key,
                )
        stats = server.stats()
    assert sum(key["submits_accepted"] for key in stats["keys"].values()) == 0
    assert s3_client.head_object(Bucket=bucket, Key="out/manifest.parquet")["ETag"] == etag


def test_nightly_runs_into_an_s3_output_from_fresh_workers_keep_the_manifest_schema(
    bucket: str, endpoint: str, work_root: Path
) -> None:
    """An orchestrator runs each night on a fresh worker into the same S3 output, from a
    frame whose ``discount`` has no value tonight (polars types it ``Null``): the output
    manifest keeps ``discount`` a double, as the warehouse table it is appended to."""
    out = f"s3://{bucket}/nightly"
    night1 = pl.DataFrame({"id": ["a", "b"], "prompt": ["a mug", "a jar"], "discount": [0.5, None]})
    night2 = pl.DataFrame(
        {"id": ["b", "c"], "prompt": ["a jar", "a vase"], "discount": [None, None]}
    )
    run_manifest(night1, out, sim=sim())
    first = read_s3_parquet(f"{out}/manifest.parquet", endpoint)
    shutil.rmtree(work_root)  # tonight's worker has nothing local
    summary = run_manifest(night2, out, sim=sim())
    assert summary.counts["succeeded"] == 2 and summary.resumed_rows == 1
    second = read_s3_parquet(f"{out}/manifest.parquet", endpoint)
    assert first.schema == second.schema
    assert second.schema["discount"] == pl.Float64
    assert pl.concat([first, second])["id"].to_list() == ["a", "b", "b", "c"]
