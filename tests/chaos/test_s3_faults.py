"""The chaos matrix's S3 column: a 600-row run into an S3 bucket that errors and drops.

S3 is moto's server on 127.0.0.1 (its own process) behind a fault-injecting proxy (503/500
answers, uploads dropped before or after they were stored); the API simulator adds its own
503s and dropped connections. The invariants are the same as for a local DEST, read back
from the bucket.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest
from chaos_helpers import CHAOS_KEY, check_rows, sim_config, sim_process, write_catalog

from pipeline import s3
from pipeline.run import RunOptions, run_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "s3"))
from s3_helpers import FaultyProxy, read_s3_parquet

pytestmark = pytest.mark.slow

ROWS = 600
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "klein-chaos-access-key",
    "AWS_SECRET_ACCESS_KEY": "klein-chaos-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _listening_port(log: Path, server: subprocess.Popen[bytes]) -> int:
    """The port moto's server chose (it was given port 0), from the line it logs on start.

    Asking the kernel for a free port and handing that number over would leave a moment in
    which another test's connection, on a parallel worker, could take it.
    """
    deadline = time.monotonic() + 60
    while True:
        found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return int(found.group(1))
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"moto's server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """moto's S3 server in its own process, so its work runs beside the pipeline's, not in it."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("KLEIN_BATCH_WORK_DIR", str(tmp_path / "work"))
    log = tmp_path / "moto.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        url = f"http://127.0.0.1:{_listening_port(log, server)}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        s3.reset_clients()
        yield url
    finally:
        s3.reset()  # the endpoint the test configured dies with this server
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_s3_errors_and_drops_lose_no_row(moto: str, tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path / "catalog", ROWS)
    bucket = f"chaos-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/night/2026-11-25"
    api_faults = {"faults": {"seed": 9, "submit": {"error_503": 0.05, "drop": 0.03}}}
    with (
        sim_process(sim_config(**api_faults)) as sim,
        FaultyProxy(moto, error_rate=0.05, drop_rate=0.03, seed=13) as proxy,
    ):
        s3.configure(endpoint_url=proxy.url)
        s3.reset_clients()
        os.environ["KLEIN_BATCH_SYNC_S"] = "0.5"  # journal syncs go through the faults too
        try:
            summary = run_manifest(
                manifest,
                out,
                api_url=sim.url,
                api_key=CHAOS_KEY,
                tier="enterprise",
                options=RunOptions(expected_latency_s=0.05),
            )
        finally:
            os.environ.pop("KLEIN_BATCH_SYNC_S", None)
        stats = sim.key_stats()
    s3.configure(endpoint_url=moto)
    s3.reset_clients()
    client = s3.client()
    assert sum(v for k, v in proxy.counts.items() if k.startswith(("error", "dropped"))) > 20

    def fetch(uri: str) -> bytes:
        assert uri.startswith(f"{out}/images/"), uri
        key = uri.removeprefix(f"s3://{bucket}/")
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    done = read_s3_parquet(f"{out}/manifest.parquet", moto)
    # check_rows reads the succeeded rows in manifest order: fetch a few ahead, in threads,
    # so moto (its own process) serves while this one checks.
    wanted = iter(done.filter(pl.col("status") == "succeeded")["output_uri"].to_list())
    ahead: deque[tuple[str, Future[bytes]]] = deque()
    with ThreadPoolExecutor(max_workers=8) as pool:

        def read(uri: str) -> bytes:
            while len(ahead) < 16 and (nxt := next(wanted, None)) is not None:
                ahead.append((nxt, pool.submit(fetch, nxt)))
            fetched, future = ahead.popleft()
            assert fetched == uri, (fetched, uri)
            return future.result()

        stored = check_rows(manifest, done, read)
    listed = client.list_objects_v2(Bucket=bucket, Prefix="night/2026-11-25/images/")
    names = set()
    while True:
        names |= {o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", [])}
        if not listed.get("IsTruncated"):
            break
        listed = client.list_objects_v2(
            Bucket=bucket,
            Prefix="night/2026-11-25/images/",
            ContinuationToken=listed["NextContinuationToken"],
        )
    assert names == stored
    assert summary.counts["succeeded"] == len(stored) == ROWS - ROWS // 100
    assert stats["duplicate_submits"] <= summary.ambiguous_submits
    print(
        f"\nchaos s3: {ROWS} rows {summary.counts}; "
        f"S3 faults {dict(sorted(proxy.counts.items()))}, "
        f"API faults {stats['faults']}; ambiguous submits {summary.ambiguous_submits}, "
        f"duplicate submits {stats['duplicate_submits']}"
    )
