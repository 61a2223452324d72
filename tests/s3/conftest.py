"""A real S3 protocol server (moto's server mode) on 127.0.0.1, started by the tests.

The AWS credentials are dummy values set in the environment for the whole session (moto
accepts any); they are never printed. Each test gets its own bucket, and its own work-dir
root so "a machine without the local work dir" is a fresh folder.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.server import ThreadedMotoServer
from s3_helpers import DUMMY_ENV, FaultyProxy

from pipeline import s3


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    saved = {name: os.environ.get(name) for name in (*DUMMY_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(DUMMY_ENV)
    # No stray profile or real credentials file may take part.
    os.environ.pop("AWS_PROFILE", None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        yield url
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def endpoint(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The moto endpoint, as $AWS_ENDPOINT_URL (how a user points klein-batch at it)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    s3.reset()
    yield moto_url
    s3.reset()


@pytest.fixture
def s3_client(endpoint: str) -> Any:
    return s3.client()


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"klein-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True)
def work_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "work"
    monkeypatch.setenv("KLEIN_BATCH_WORK_DIR", str(root))
    return root


@pytest.fixture
def faulty(moto_url: str) -> Iterator[FaultyProxy]:
    """A fault-injecting HTTP proxy in front of moto, on 127.0.0.1."""
    with FaultyProxy(moto_url) as proxy:
        yield proxy
