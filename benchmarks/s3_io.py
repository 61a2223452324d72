"""S3 throughput and memory: image uploads through ``S3Sink``, manifests read from S3.

Two measurements against moto's S3 server on 127.0.0.1 (started here, dummy credentials):

1. uploads: N JPEG-sized objects (``--image-kb``) stored through ``S3Sink.put`` from one
   event loop, at upload concurrency 1 and at the default; images/s and MB/s. Shows what
   the bounded thread pool buys and that the loop is never blocked (it keeps ticking).
2. manifests: CSV manifests of ``--rows`` and 4x that many rows uploaded to S3, then read
   to the end by ``ManifestReader("s3://...")`` in a fresh process each; peak RSS of that
   process, once the copy is downloaded and once every batch was read. The download is
   flat (it streams to disk); what reading adds is the manifest reader's own (the same for
   a local file).

    .venv/bin/python benchmarks/s3_io.py --images 400 --rows 100000

moto is a Python server, so absolute rates are moto's limits, not S3's; the ratios and the
flat memory are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.update(
    AWS_ACCESS_KEY_ID="bench-access",
    AWS_SECRET_ACCESS_KEY="bench-secret",
    AWS_DEFAULT_REGION="us-east-1",
)

# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (moto holds every object).
_READER = """
import sys
from pipeline.manifest import ManifestReader
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
reader = ManifestReader(sys.argv[1], batch_size=10_000)
opened = peak()
rows = sum(batch.height for batch in reader.batches())
print(rows, opened, peak())
"""


async def uploads(bucket: str, count: int, size: int, concurrency: int) -> tuple[float, int]:
    from pipeline.s3 import S3Sink

    sink = S3Sink(f"s3://{bucket}/bench-{concurrency}", max_concurrency=concurrency)
    payload = os.urandom(size)
    ticks = 0
    done = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(heartbeat())
    started = time.perf_counter()
    await asyncio.gather(
        *(sink.put(f"images/{i:06d}.jpg", payload, "image/jpeg") for i in range(count))
    )
    elapsed = time.perf_counter() - started
    done.set()
    await beat
    sink.close()
    return elapsed, ticks


def write_manifest(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write("id,prompt,sku,category\n")
        for i in range(rows):
            handle.write(
                f"p{i:08d},studio photo of product {i} on a light grey background,"
                f"SKU-{i:08d},kitchen\n"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--image-kb", type=int, default=150)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    from pipeline import s3

    client = s3.client()
    client.create_bucket(Bucket="klein-bench")
    try:
        print(f"uploads: {args.images} objects of {args.image_kb} KB to moto on {endpoint}")
        for concurrency in (1, s3.DEFAULT_UPLOAD_CONCURRENCY):
            elapsed, ticks = asyncio.run(
                uploads("klein-bench", args.images, args.image_kb * 1024, concurrency)
            )
            rate = args.images / elapsed
            print(
                f"  concurrency {concurrency:>2}: {rate:7.1f} images/s, "
                f"{rate * args.image_kb / 1024:6.1f} MB/s, event loop ticks {ticks} "
                f"(of {elapsed / 0.01:.0f} possible)"
            )
        print("manifests read from S3 (fresh process each):")
        with tempfile.TemporaryDirectory() as tmp:
            for rows in (args.rows, 4 * args.rows):
                local = Path(tmp) / f"m{rows}.csv"
                write_manifest(local, rows)
                size_mb = local.stat().st_size / 1e6
                client.upload_file(str(local), "klein-bench", f"m{rows}.csv")
                started = time.perf_counter()
                result = subprocess.run(
                    [sys.executable, "-c", _READER, f"s3://klein-bench/m{rows}.csv"],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=os.environ,
                )
                elapsed = time.perf_counter() - started
                counted, opened_mb, peak_mb = result.stdout.split()
                print(
                    f"  {rows:>9,} rows ({size_mb:6.1f} MB): read {int(counted):,} rows in "
                    f"{elapsed:5.1f} s; peak RSS after the download {opened_mb} MB, "
                    f"after reading every batch {peak_mb} MB"
                )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
