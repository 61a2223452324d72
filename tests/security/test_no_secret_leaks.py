"""No API key or webhook secret in anything a run leaves behind or prints, DEBUG logs included.

Runs use distinctive secrets, faults that make the pipeline retry and explain itself, bad
rows, and a refused key; then every byte of every output file (images, Parquet, run.json,
the SQLite ledger and its WAL), every log record, stdout and stderr is searched for them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from pipeline.run import RunOptions, run_manifest
from pipeline.sim import (
    EndpointFaults,
    FaultConfig,
    KeyConfig,
    LatencyConfig,
    SimConfig,
    SimServer,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chaos"))
from chaos_helpers import sim_config, sim_process

API_KEY = "kb-live-7Q2xVw9LmZ4rT8sN3pK6yH1c"
WRONG_KEY = "kb-live-WRONGk3y5Hd8Jq2Lw7Xz0Pv"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"klein-batch-webhook-secret-9f3e").decode()
SECRETS = (API_KEY, WRONG_KEY, WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_"))

MANIFEST = """id,prompt,seed,input_image
m1,red mug,1,
m2,blue mug,2,shots/missing.png
m3,green mug,-4,
m4,nsfw mug,4,
m5,yellow mug,5,https://127.0.0.1/x.png
m6,white mug,6,
"""

_DEBUG_CLI = """
import logging, os, sys
logging.basicConfig(level=logging.DEBUG, filename=sys.argv[1],
                    format="%(name)s %(levelname)s %(message)s")
sys.argv = ["klein-batch", *sys.argv[2:]]
if os.environ.get("KLEIN_TEST_QUICK_RETRIES"):
    # Three quick attempts instead of eight with backoff: the retries are still made and
    # logged, in seconds rather than twenty.
    from pipeline.retry import RetryPolicy
    RetryPolicy.__init__.__defaults__ = (3, 300.0, 0.05, 0.2, 120.0)
    assert RetryPolicy().max_attempts == 3 and RetryPolicy().max_backoff_s == 0.2
from pipeline.cli import main
main()
"""


def _leaks(blob: bytes) -> list[str]:
    return [secret for secret in SECRETS if secret.encode() in blob]


def _contents(path: Path) -> bytes:
    """A file's bytes, plus, for Parquet, every value and metadata entry decompressed.

    The output manifest is zstd-compressed: a secret in it need not appear in its raw bytes.
    """
    data = path.read_bytes()
    if data[:4] == b"PAR1":
        table = pq.read_table(path)
        metadata = table.schema.metadata or {}
        data += repr(table.to_pylist()).encode("utf-8", "backslashreplace")
        data += repr(metadata).encode() + b"".join(metadata.values())
    return data


def _scan(*roots: Path, secrets: tuple[str, ...] = SECRETS) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                blob = _contents(path)
                if leaked := [s for s in secrets if s.encode() in blob]:
                    found[str(path)] = leaked
    return found


def _manifest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "catalog.csv"
    path.write_text(MANIFEST, encoding="utf-8")
    return path


def test_cli_run_with_debug_logs_leaks_no_key(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "in")
    home = tmp_path / "home"
    home.mkdir()
    config = sim_config(
        key={"key": API_KEY, "webhook_secret": WEBHOOK_SECRET},
        faults={
            "seed": 3,
            "submit": {"error_503": 0.3, "drop": 0.2},
            "poll": {"error_500": 0.3},
            "download": {"drop": 0.2},
            "task_failed": 0.2,
        },
    )
    env = _clean_env(home)
    env["FREEPIK_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    outputs: list[str] = []
    with sim_process(config) as sim:
        for key, out in ((API_KEY, "good"), (WRONG_KEY, "refused")):
            log = tmp_path / f"{out}.log"
            result = subprocess.run(
                [
                    *(sys.executable, "-c", _DEBUG_CLI, str(log), "run", str(manifest)),
                    *("--out", str(tmp_path / out), "--api-url", sim.url, "--progress", "plain"),
                    *("--webhook-listen", "127.0.0.1:0"),
                ],
                capture_output=True,
                env={**env, "FREEPIK_API_KEY": key},
                timeout=300,
            )
            assert result.returncode in ((0, 1) if key == API_KEY else (2,)), result.stderr
            assert b"Traceback" not in result.stderr
            outputs += [result.stdout.decode(), result.stderr.decode()]
            assert log.stat().st_size > 0  # DEBUG logging really was on
            assert not _leaks(result.stdout + result.stderr), out
        webhooks = sim.key_stats()["webhooks_sent"]
    assert webhooks > 0  # the run received signed webhooks, so it held the secret
    assert "refused the key" in outputs[-1]  # the 401 was reported, without the key
    assert "retrying after" in (tmp_path / "good.log").read_text()
    assert (tmp_path / "good" / "report.html").is_file()  # every output was written...
    assert (tmp_path / "good" / "manifest.parquet").is_file()
    assert _scan(tmp_path) == {}  # ...and none holds a secret


def _clean_env(home: Path) -> dict[str, str]:
    """The caller's environment without any real key or secret, with a private HOME."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FREEPIK_API_KEY", "BFL_API_KEY", "FREEPIK_WEBHOOK_SECRET")
        and k not in ("BFL_WEBHOOK_SECRET", "PREFECT_API_URL")
    }
    env.update(HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


#: The password of a ``user:password@`` API URL, and the Basic header aiohttp makes of it.
URL_PASSWORD = "Pw0rd-in-the-url-4c8e"
BASIC = base64.b64encode(f"kbuser:{URL_PASSWORD}".encode()).decode()
ECHOED = (*SECRETS, URL_PASSWORD, BASIC)


def _echoing_api(status: int) -> web.Application:
    """An API (or a proxy before it) that quotes what it was sent in every error answer."""

    async def answer(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        heard = [
            request.headers.get("x-freepik-api-key"),
            request.headers.get("x-key"),
            request.headers.get("Authorization"),
            body.get("webhook_secret"),
        ]
        said = " ".join(str(value) for value in heard if value)
        if request.path.endswith("flux-2-klein") or "/v1/flux-2-klein" in request.path:
            detail = f"request refused for {said}"
            return web.json_response(
                {
                    "message": detail,
                    "detail": detail,
                    "invalid_params": [{"name": "key", "reason": said}],
                },
                status=status,
            )
        return web.json_response({"message": f"unknown path for {said}"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


@pytest.mark.parametrize("dialect", ["klein", "bfl"])
@pytest.mark.parametrize("status", [401, 422, 500])
async def test_an_api_that_echoes_secrets_leaks_none_into_outputs(
    dialect: str, status: int, tmp_path: Path
) -> None:
    manifest = _manifest(tmp_path / "in")
    runner = web.AppRunner(_echoing_api(status))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    env = _clean_env(tmp_path)
    key_env = "FREEPIK_API_KEY" if dialect == "klein" else "BFL_API_KEY"
    env[key_env] = API_KEY
    env["FREEPIK_WEBHOOK_SECRET" if dialect == "klein" else "BFL_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    env["KLEIN_TEST_QUICK_RETRIES"] = "1"
    log = tmp_path / "run.log"
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            [
                *(sys.executable, "-c", _DEBUG_CLI, str(log), "run", str(manifest)),
                *("--out", str(tmp_path / "out"), "--dialect", dialect, "--progress", "plain"),
                *("--api-url", f"http://kbuser:{URL_PASSWORD}@127.0.0.1:{port}"),
                *("--webhook-listen", "127.0.0.1:0"),
            ],
            capture_output=True,
            env=env,
            timeout=300,
        )
    finally:
        await runner.cleanup()
    assert b"Traceback" not in result.stderr, result.stderr
    assert result.returncode == (2 if status == 401 else 1), result.stderr
    blob = result.stdout + result.stderr + log.read_bytes()
    assert [s for s in ECHOED if s.encode() in blob] == []
    assert _scan(tmp_path / "out", secrets=ECHOED) == {}
    # The answers were recorded, masked: the reason still says what the API said.
    reasons = pl.read_parquet(tmp_path / "out" / "manifest.parquet")["reason"].to_list()
    assert any("request refused for ***" in (reason or "") for reason in reasons), reasons


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in ("", "aiohttp", "aiohttp.client", "aiohttp.access", "pipeline", "asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    return caplog


def test_api_run_with_webhooks_leaks_no_secret(
    tmp_path: Path, debug_logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path / "in")
    config = SimConfig(
        keys=[KeyConfig(name="leak", key=API_KEY, webhook_secret=WEBHOOK_SECRET)],
        latency=LatencyConfig(median_s=0.05, p95_s=0.1),
        faults=FaultConfig(seed=5, submit=EndpointFaults(error_503=0.3), webhook_duplicate=0.5),
    )
    monkeypatch.setenv("FREEPIK_WEBHOOK_SECRET", WEBHOOK_SECRET)
    with SimServer.in_thread(config) as sim:
        summary = run_manifest(
            manifest,
            tmp_path / "out",
            api_url=sim.url,
            api_key=API_KEY,
            options=RunOptions(webhook_listen="127.0.0.1:0", expected_latency_s=0.1),
        )
        stats = sim.stats()["keys"]["leak"]
    assert stats["webhooks_sent"] > 0  # the run really received signed webhooks
    assert summary.counts["succeeded"] >= 1
    text = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in debug_logs.records
    )
    assert debug_logs.records, "DEBUG logging captured nothing"
    assert not _leaks(text.encode())
    assert not _leaks(repr(summary).encode())
    assert _scan(tmp_path) == {}


@pytest.mark.parametrize(
    "url",
    [
        "ftp://kbuser:{pw}@127.0.0.1:9",
        "http://kbuser:{pw}@127.0.0.1:notaport",  # aiohttp could not use it: refused first
        "http://kbuser:{pw}@[::1",
    ],
)
def test_a_bad_api_url_is_refused_up_front_without_its_password(url: str, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "in")
    result = subprocess.run(
        [
            *(sys.executable, "-c", _DEBUG_CLI, str(tmp_path / "run.log"), "run", str(manifest)),
            *("--out", str(tmp_path / "out"), "--api-url", url.format(pw=URL_PASSWORD)),
        ],
        capture_output=True,
        env={**_clean_env(tmp_path), "FREEPIK_API_KEY": API_KEY},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    err = result.stderr.decode()
    assert err.startswith("error: --api-url 'ftp://kbuser:***@" if "ftp" in url else "error: ")
    assert "kbuser:***@" in err and "is not allowed" in err
    assert URL_PASSWORD not in err + result.stdout.decode()
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written
