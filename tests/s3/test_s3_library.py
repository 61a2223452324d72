"""The image library on S3: a second night copies every image inside S3 and sends nothing.

Real S3 protocol (moto's server) and the real simulator; the library lives in the same
bucket as the nightly outputs, as a ``{date}`` output's default library does.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from s3_helpers import catalog_csv, png, read_s3_parquet

from pipeline.check import check_manifest
from pipeline.library import INDEX, Entry, Library
from pipeline.manifest import Defaults
from pipeline.run import RunOptions, arun_manifest
from pipeline.s3 import S3Sink
from pipeline.sim import SimConfig, SimServer
from pipeline.sim.config import LatencyConfig
from pipeline.summary import RunSummary

FAST = LatencyConfig(median_s=0.05, p95_s=0.1)


@pytest.fixture
def catalog(bucket: str, s3_client: Any) -> str:
    s3_client.put_object(Bucket=bucket, Key="catalogs/shots/red.png", Body=png((200, 30, 30)))
    s3_client.put_object(Bucket=bucket, Key="library/blue.png", Body=png((30, 30, 200)))
    s3_client.put_object(
        Bucket=bucket, Key="catalogs/night.csv", Body=catalog_csv(bucket, 12).encode()
    )
    return f"s3://{bucket}/catalogs/night.csv"


def night(server: SimServer, manifest: str, out: str, library: str) -> RunSummary:
    options = RunOptions(library=library, expected_latency_s=0.05, progress_interval_s=0.05)
    key = server.config.keys[0].key
    return asyncio.run(
        arun_manifest(manifest, out, api_url=server.url, api_key=key, options=options)
    )


def test_a_second_night_on_s3_copies_server_side_and_sends_nothing(
    catalog: str, bucket: str, s3_client: Any, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    library = f"s3://{bucket}/nightly/library"
    copies: list[str] = []
    copy_in = S3Sink.copy_in

    async def counted(self: S3Sink, relpath: str, source: str) -> bool:
        copies.append(source)
        return await copy_in(self, relpath, source)

    monkeypatch.setattr(S3Sink, "copy_in", counted)
    with SimServer.in_thread(SimConfig(latency=FAST)) as server:
        first = night(server, catalog, f"s3://{bucket}/nightly/2026-12-01", library)
        assert first.counts["succeeded"] == 12 and first.submits == 12
        assert copies == []
        opened = asyncio.run(Library.open(library, dialect="klein"))
        assert len(opened) == 12
        dry = check_manifest(catalog, defaults=Defaults(), library=opened)
        assert (dry.library_hits, dry.to_send, dry.estimated_credits) == (12, 0, 0.0)

        second = night(server, catalog, f"s3://{bucket}/nightly/2026-12-02", library)
        stats = server.stats()["totals"]
    assert stats["submits_accepted"] == 12, "the second night sent submits"
    assert second.counts["succeeded"] == 12 and second.reused_rows == 12
    assert len(copies) == 12, "reused images are copied inside S3"
    frame = read_s3_parquet(f"s3://{bucket}/nightly/2026-12-02/manifest.parquet", endpoint)
    assert frame["cost_credits"].sum() == 0
    for record in frame.iter_rows(named=True):
        assert record["reused_from"].startswith(f"{library}/objects/")
        key = record["output_uri"].removeprefix(f"s3://{bucket}/")
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == record["sha256"]
        assert len(body) == record["bytes"]


async def test_compaction_on_s3_merges_segments_and_keeps_a_concurrent_one(
    bucket: str, s3_client: Any
) -> None:
    library = f"s3://{bucket}/lib"
    data = png((10, 200, 10))
    writers = [await Library.open(library, dialect="klein") for _ in range(3)]
    sink = S3Sink(f"s3://{bucket}/dest")
    await sink.put("images/x.png", data, "image/png")
    fps = [("a" + f"{i:02x}" * 31 + "0")[:64] for i in range(9)]
    for n, fp in enumerate(fps):
        writer = writers[n % 3]
        entry = Entry(fp, "png", len(data), hashlib.sha256(data).hexdigest(), 48, 32, "t", 1.0)
        await writer.store(entry, data, sink, "images/x.png")
        await writer.flush()  # one segment per entry: nine segments under index/a/
    listed = [
        item["Key"]
        for item in s3_client.list_objects_v2(Bucket=bucket, Prefix=f"lib/{INDEX}/a/")["Contents"]
    ]
    assert len(listed) == 9
    compactor = await Library.open(library, dialect="klein")
    segments = [key.removeprefix("lib/") for key in listed]
    # A run that writes a segment after the compactor listed: it must survive compaction.
    late = writers[0]
    late_fp = "a" + "f" * 63
    await late.store(
        Entry(late_fp, "png", len(data), hashlib.sha256(data).hexdigest(), 48, 32, "t", 1.0),
        data,
        sink,
        "images/x.png",
    )
    await late.flush()
    # The late image is merged too: compaction lists the objects, and the late run's record
    # is there (the object is the truth); its segment stays all the same.
    assert await compactor.compact("a", segments) == 10
    after = await Library.open(library, dialect="klein")
    assert len(after) == 10
    assert all(after.lookup(fp) is not None for fp in [*fps, late_fp])
    remaining = s3_client.list_objects_v2(Bucket=bucket, Prefix=f"lib/{INDEX}/a/")["Contents"]
    assert len(remaining) == 2
