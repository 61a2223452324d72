"""A manifest cannot make the pipeline probe an internal network or trust a forged host.

Reference URLs are fetched over http(s) only, never from a private, loopback or link-local
address (by IP, by a DNS name that resolves there, or through a redirect) unless the run
allows private URLs, with a total timeout and a size cap, and always with TLS certificate
verification: even with private URLs allowed, a self-signed https server on 127.0.0.1 is
refused for its certificate, by the reference store's own session and by the run's.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import polars as pl
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from pipeline.errors import ReferenceError
from pipeline.references import ReferenceStore
from pipeline.run import RunOptions, run_manifest
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer

KEY = "kb-ref-test-key-5d1e"


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(out, format="PNG")
    return out.getvalue()


@dataclass
class _Server:
    url: str = ""
    hits: dict[str, int] = field(default_factory=dict)


def _app(state: _Server, png: bytes) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        state.hits[name] = state.hits.get(name, 0) + 1
        if name == "shot.png":
            return web.Response(body=png, content_type="image/png")
        if name == "to-localhost":  # a DNS name that resolves to loopback
            raise web.HTTPFound(f"http://localhost:{request.url.port}/img/shot.png")
        if name == "to-metadata":
            raise web.HTTPTemporaryRedirect("http://169.254.169.254/latest/meta-data/")
        if name == "to-lan":
            raise web.HTTPMovedPermanently("https://192.168.0.10/shot.png")
        if name == "to-file":
            raise web.HTTPFound("file:///etc/passwd")
        if name == "trickle":  # headers at once, then a byte now and then, for ever
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            await response.prepare(request)
            for _ in range(200):
                await response.write(b"\x89")
                await asyncio.sleep(0.05)
            return response
        if name == "huge":
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            response.enable_chunked_encoding()  # no Content-Length to refuse up front
            await response.prepare(request)
            for _ in range(64):
                await response.write(b"\0" * 65536)
            await response.write_eof()
            return response
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/img/{name}", handler)
    return app


async def _serve(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def plain() -> AsyncIterator[_Server]:
    state = _Server()
    runner, port = await _serve(_app(state, _png()))
    state.url = f"http://127.0.0.1:{port}/img"
    try:
        yield state
    finally:
        await runner.cleanup()


@dataclass
class _Tls:
    server: _Server
    ca_file: Path


@pytest.fixture
def self_signed(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A certificate for 127.0.0.1 that no one vouches for (made here, never downloaded)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    yield cert_file, key_file


@pytest.fixture
async def tls(self_signed: tuple[Path, Path]) -> AsyncIterator[_Tls]:
    cert_file, key_file = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    state = _Server()
    runner, port = await _serve(_app(state, _png()), context)
    state.url = f"https://127.0.0.1:{port}/img"
    try:
        yield _Tls(state, cert_file)
    finally:
        await runner.cleanup()


# --- schemes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "file:///etc/passwd",
        "ftp://example.com/x.png",
        "gopher://127.0.0.1:6379/_INFO",
        "javascript:alert(1)",
        "dict://127.0.0.1:11211/stats",
        "ldap://127.0.0.1/",
    ],
)
async def test_only_http_and_https_urls_are_fetched(spec: str) -> None:
    with pytest.raises(ReferenceError, match="scheme is not supported"):
        await ReferenceStore(None).load(spec)


async def test_plain_http_is_refused_unless_allowed(plain: _Server) -> None:
    with pytest.raises(ReferenceError, match="uses plain http; expected https"):
        await ReferenceStore(None, allow_private_urls=True).load(f"{plain.url}/shot.png")
    assert plain.hits == {}
    store = ReferenceStore(None, allow_private_urls=True, allow_http=True)
    assert (await store.load(f"{plain.url}/shot.png")).width == 40


# --- private addresses --------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",  # a DNS name that resolves to 127.0.0.1
        "127.5.6.7",
        "0.0.0.0",
        "10.0.0.7",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[fe80::1]",
        "[fc00::1]",
    ],
)
async def test_private_loopback_and_link_local_hosts_are_refused(host: str, plain: _Server) -> None:
    port = plain.url.split(":")[2].split("/")[0]
    store = ReferenceStore(None, allow_http=True)  # private URLs not allowed: the default
    with pytest.raises(ReferenceError, match="private, loopback, link-local") as err:
        await store.load(f"http://{host}:{port}/img/shot.png")
    if host == "localhost":
        assert "host 'localhost' resolves to" in str(err.value)
    assert plain.hits == {}


async def test_private_urls_are_fetched_when_explicitly_allowed(plain: _Server) -> None:
    port = plain.url.split(":")[2].split("/")[0]
    store = ReferenceStore(None, allow_http=True, allow_private_urls=True)
    assert (await store.load(f"http://localhost:{port}/img/shot.png")).width == 40
    assert plain.hits == {"shot.png": 1}


@pytest.mark.parametrize(
    ("name", "refusal"),
    [
        ("to-localhost", "host 'localhost' resolves to"),
        ("to-metadata", "169.254.169.254, a private"),
        ("to-lan", "192.168.0.10, a private"),
        ("to-file", "only http"),
    ],
)
async def test_redirects_to_private_addresses_are_refused(
    name: str, refusal: str, plain: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first hop is our 127.0.0.1 test server, standing in for a public host: only that
    # exact address is let through; every later hop gets the real check.
    original = ReferenceStore._check_host

    async def public_test_server(self: ReferenceStore, host: str, port: int) -> None:
        if host != "127.0.0.1":
            await original(self, host, port)

    monkeypatch.setattr(ReferenceStore, "_check_host", public_test_server)
    store = ReferenceStore(None, allow_http=True)
    with pytest.raises(ReferenceError, match=refusal):
        await store.load(f"{plain.url}/{name}")
    assert plain.hits == {name: 1}  # the redirect target was never requested


# --- timeout and size cap -----------------------------------------------------------------


async def test_a_body_that_trickles_is_cut_by_the_total_timeout(plain: _Server) -> None:
    # A per-read timeout would never fire (a byte comes every 0.05 s): the fetch would run
    # its 10 s and end as "not an image". Only a total timeout ends it with this message.
    store = ReferenceStore(None, allow_http=True, allow_private_urls=True, timeout_s=0.5)
    with pytest.raises(ReferenceError, match=r"timed out after 0\.5 s"):
        await store.load(f"{plain.url}/trickle")


async def test_an_endless_body_is_cut_at_the_size_cap(plain: _Server) -> None:
    store = ReferenceStore(None, allow_http=True, allow_private_urls=True, max_bytes=1 << 20)
    with pytest.raises(ReferenceError, match="larger than 1 MB; at most 1 MB is allowed"):
        await store.load(f"{plain.url}/huge")


# --- TLS verification ---------------------------------------------------------------------


async def test_self_signed_https_is_refused_for_its_certificate(tls: _Tls) -> None:
    url = f"{tls.server.url}/shot.png"
    store = ReferenceStore(None, allow_private_urls=True)
    with pytest.raises(
        ReferenceError, match=r"TLS certificate of 127\.0\.0\.1 could not be verified"
    ):
        await store.load(url)  # the store's own session
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector()) as session:
        with pytest.raises(ReferenceError, match="could not be verified"):
            await store.load(url, session)  # a session made the way the run makes its own
    assert tls.server.hits == {}
    # The server itself is fine: a client that trusts this certificate gets the image.
    trusting = ssl.create_default_context(cafile=str(tls.ca_file))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusting)) as session:
        assert (await store.load(url, session)).width == 40
    assert tls.server.hits == {"shot.png": 1}


async def test_a_run_refuses_a_self_signed_reference_even_with_private_urls_allowed(
    tls: _Tls, tmp_path: Path
) -> None:
    manifest = tmp_path / "catalog.csv"
    manifest.write_text(
        f"id,prompt,input_image\nplain,a green mug,\nforged,a green mug,{tls.server.url}/shot.png\n"
    )
    config = SimConfig(
        keys=[KeyConfig(name="refs", key=KEY)], latency=LatencyConfig(median_s=0.02, p95_s=0.05)
    )
    async with SimServer(config) as sim:
        summary = await asyncio.to_thread(
            run_manifest,
            manifest,
            tmp_path / "out",
            api_url=sim.url,
            api_key=KEY,
            options=RunOptions(allow_private_urls=True, expected_latency_s=0.05),
        )
    done = pl.read_parquet(tmp_path / "out" / "manifest.parquet").sort("row")
    assert done["status"].to_list() == ["succeeded", "rejected"]
    reason = done["reason"][1]
    assert reason.startswith("catalog.csv row 2, column input_image: URL https://127.0.0.1:")
    assert "TLS certificate of 127.0.0.1 could not be verified" in reason
    assert summary.counts["succeeded"] == 1
    assert tls.server.hits == {}
