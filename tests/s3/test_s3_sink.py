"""The S3 sink against moto on 127.0.0.1: objects, content types, multipart, refusals."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from s3_helpers import DUMMY_ENV, FaultyProxy

from pipeline import s3
from pipeline.errors import ConfigError
from pipeline.s3 import S3Sink, S3Uri, StorageError
from pipeline.storage import open_sink


def test_open_sink_gives_an_s3_sink_whose_uris_name_the_objects(bucket: str) -> None:
    sink = open_sink(f"s3://{bucket}/night/run-1/")
    assert isinstance(sink, S3Sink)
    assert sink.uri("images/a1.jpg") == f"s3://{bucket}/night/run-1/images/a1.jpg"
    assert sink.local_path(".klein") is None
    assert open_sink(f"s3://{bucket}").uri("x.json") == f"s3://{bucket}/x.json"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://", "not a valid bucket name"),
        ("s3://UPPER/x", "not a valid bucket name"),
        ("s3://a/x", "not a valid bucket name"),
        ("s3://under_score/x", "not a valid bucket name"),
    ],
)
def test_bad_bucket_names_are_refused_with_the_rules(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_sink(uri)


def test_object_paths_cannot_climb_out_of_the_prefix() -> None:
    root = S3Uri.parse("s3://bucket-x/out")
    for bad in ("../x", "a/../../x", "/abs", "", "a\\b"):
        with pytest.raises(ValueError, match="invalid object path"):
            root.child(bad)
    assert root.child("images/a.png").key == "out/images/a.png"


async def test_put_get_exists_and_content_types(bucket: str, s3_client: Any) -> None:
    sink = S3Sink(f"s3://{bucket}/out")
    jpeg = b"\xff\xd8\xff" + os.urandom(3000)
    uri = await sink.put("images/a1.jpg", jpeg, "image/jpeg")
    await sink.put("images/a2.png", b"\x89PNG" + os.urandom(100), "image/png")
    assert uri == f"s3://{bucket}/out/images/a1.jpg"
    head = s3_client.head_object(Bucket=bucket, Key="out/images/a1.jpg")
    assert head["ContentType"] == "image/jpeg"
    assert head["ContentLength"] == len(jpeg)
    png = s3_client.head_object(Bucket=bucket, Key="out/images/a2.png")
    assert png["ContentType"] == "image/png"
    assert await sink.get("images/a1.jpg") == jpeg
    assert await sink.exists("images/a1.jpg")
    assert not await sink.exists("images/nope.jpg")
    assert await sink.get("images/nope.jpg") is None
    assert sorted(await sink.list("images")) == ["images/a1.jpg", "images/a2.png"]
    await sink.delete(["images/a1.jpg"])
    assert not await sink.exists("images/a1.jpg")


async def test_large_objects_go_up_in_parts(bucket: str, s3_client: Any, tmp_path: Path) -> None:
    sink = S3Sink(f"s3://{bucket}/out", multipart_threshold=5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    await sink.put("big.bin", data, "application/octet-stream")
    local = tmp_path / "big.parquet"
    local.write_bytes(data[: 6 * 1024 * 1024])
    await sink.put_file("manifest.parquet", local, "application/vnd.apache.parquet")
    for key, size, parts in (("out/big.bin", len(data), 3), ("out/manifest.parquet", 6 << 20, 2)):
        head = s3_client.head_object(Bucket=bucket, Key=key)
        # A multipart ETag ends with -<number of parts>.
        assert head["ETag"].strip('"').endswith(f"-{parts}"), head["ETag"]
        assert head["ContentLength"] == size
    assert await sink.get("big.bin") == data
    assert s3_client.head_object(Bucket=bucket, Key="out/manifest.parquet")["ContentType"] == (
        "application/vnd.apache.parquet"
    )


async def test_uploads_are_bounded_and_run_off_the_event_loop(bucket: str) -> None:
    sink = S3Sink(f"s3://{bucket}/out", max_concurrency=3)
    ticks = 0
    stop = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    beat = asyncio.create_task(heartbeat())
    payloads = {f"images/{i}.jpg": os.urandom(20_000) for i in range(24)}
    await asyncio.gather(*(sink.put(k, v, "image/jpeg") for k, v in payloads.items()))
    stop.set()
    await beat
    assert ticks > 24  # the loop kept running while boto3 worked in threads
    assert sink._pool._max_workers == 3
    for key, value in payloads.items():
        assert await sink.get(key) == value


async def test_a_missing_bucket_is_a_clear_error(endpoint: str) -> None:
    sink = S3Sink("s3://klein-no-such-bucket/out")
    with pytest.raises(ConfigError, match="bucket 'klein-no-such-bucket' does not exist"):
        await sink.put("run.json", b"{}", "application/json")


async def test_an_unreachable_endpoint_is_a_storage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Credentials of its own: without the moto fixture, the dummy ones are in the
    # environment only if an earlier test in this worker started moto.
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3.reset()
    s3.configure(max_attempts=2)
    try:
        sink = S3Sink("s3://klein-any/out")
        with pytest.raises(StorageError, match=r"cannot connect to http://127\.0\.0\.1:9"):
            await sink.put("run.json", b"{}", "application/json")
    finally:
        s3.reset()


async def test_500_503_and_dropped_uploads_are_retried_until_stored(
    bucket: str, faulty: FaultyProxy, s3_client: Any
) -> None:
    s3.configure(endpoint_url=faulty.url)
    s3.reset_clients()
    sink = S3Sink(f"s3://{bucket}/out")
    faulty.fail_next(3, 503)
    await sink.put("images/a.jpg", b"one", "image/jpeg")
    faulty.fail_next(2, 500)
    faulty.drop_next_puts(1, after=True)
    faulty.drop_next_puts(1, after=False)
    await sink.put("images/b.jpg", b"two", "image/jpeg")
    assert faulty.counts["error 503"] == 3
    assert faulty.counts["error 500"] == 2
    assert faulty.counts["dropped after"] == 1
    assert faulty.counts["dropped before"] == 1
    assert s3_client.get_object(Bucket=bucket, Key="out/images/a.jpg")["Body"].read() == b"one"
    assert s3_client.get_object(Bucket=bucket, Key="out/images/b.jpg")["Body"].read() == b"two"
    head = s3_client.head_object(Bucket=bucket, Key="out/images/b.jpg")
    assert head["ContentType"] == "image/jpeg"
