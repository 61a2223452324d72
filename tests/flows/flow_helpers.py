"""Manifests and a local S3 for the flow tests."""

from __future__ import annotations

import contextlib
import csv
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from pipeline import s3

PROMPTS = [
    "red mug on white",
    "blue mug on white",
    "green mug on oak",
    "black sneaker, studio",
    "white sneaker, street",
    "tan tote bag",
    "olive crossbody bag",
    "steel bottle",
    "amber candle",
    "brass desk lamp",
    "linen notebook",
]


def write_catalog(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A CSV manifest of (id, prompt, sku) rows; an empty prompt makes a rejected row."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prompt", "sku"])
        writer.writerows(rows)
    return path


@contextlib.contextmanager
def moto_bucket(
    monkeypatch: pytest.MonkeyPatch, work_dir: Path, *, access: str, secret: str, prefix: str
) -> Iterator[str]:
    """A fresh bucket on moto's server (127.0.0.1), with boto3's environment pointed at it."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("KLEIN_BATCH_WORK_DIR", str(work_dir))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    s3.reset_clients()
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=name)
    try:
        yield name
    finally:
        s3.reset_clients()
        server.stop()
