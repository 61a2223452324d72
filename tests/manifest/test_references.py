"""Reference images: every spec kind, conversion, refusals, caching and URL safety."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from pipeline.errors import ReferenceError
from pipeline.references import SPEC_SCHEMES, ReferenceStore


def _image_bytes(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    image = Image.new(mode, size, "red" if mode == "RGB" else 1)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def base(tmp_path: Path) -> Path:
    folder = tmp_path / "manifest"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "shot.png").write_bytes(_image_bytes("PNG"))
    (folder / "refs" / "shot.jpg").write_bytes(_image_bytes("JPEG"))
    for fmt, ext in (("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tif")):
        (folder / "refs" / f"shot.{ext}").write_bytes(_image_bytes(fmt))
    (folder / "refs" / "notes.txt").write_text("not an image at all")
    jpeg = _image_bytes("JPEG", (400, 300))
    (folder / "refs" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "outside.png").write_bytes(_image_bytes("PNG"))
    return folder


async def test_local_png_and_jpeg_are_kept_byte_for_byte(base: Path) -> None:
    store = ReferenceStore(base)
    for name, mime in (("shot.png", "image/png"), ("shot.jpg", "image/jpeg")):
        raw = (base / "refs" / name).read_bytes()
        ref = await store.load(f"refs/{name}")
        assert ref.mime == mime
        assert base64.b64decode(ref.b64) == raw
        assert ref.digest == hashlib.sha256(raw).hexdigest()
        assert (ref.width, ref.height, ref.size) == (64, 48, len(raw))


@pytest.mark.parametrize("ext", ["webp", "gif", "bmp", "tif"])
async def test_other_formats_are_converted_to_png(base: Path, ext: str) -> None:
    ref = await ReferenceStore(base).load(f"refs/shot.{ext}")
    data = base64.b64decode(ref.b64)
    assert ref.mime == "image/png"
    assert data.startswith(b"\x89PNG")
    assert ref.digest == hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (64, 48)


async def test_inline_data_uri_and_raw_base64(base: Path) -> None:
    png = _image_bytes("PNG")
    store = ReferenceStore(base)
    encoded = base64.b64encode(png).decode()
    from_uri = await store.load(f"data:image/png;base64,{encoded}")
    from_raw = await store.load(encoded)
    wrapped = await store.load("\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60)))
    assert from_uri.digest == from_raw.digest == wrapped.digest == hashlib.sha256(png).hexdigest()
    assert store.stats["file_reads"] == 0


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("refs/notes.txt", "is not an image"),
        ("refs/truncated.jpg", "broken or truncated"),
        ("refs/missing.png", "not found"),
        ("refs", "not a regular file"),
        ("../outside.png", "leads outside the manifest's folder"),
        ("refs/../../outside.png", "leads outside the manifest's folder"),
        ("data:text/plain;base64,aGVsbG8=", "not data:image/"),
        ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
        ("QUJD" * 40, "is not an image"),
        ("ftp://example.com/shot.png", "ftp: scheme is not supported"),
        ("http://example.com/shot.png", "plain http"),
        ("   ", "is empty"),
    ],
)
async def test_bad_references_are_refused_with_reasons(
    base: Path, spec: str, expected: str
) -> None:
    with pytest.raises(ReferenceError, match=expected):
        await ReferenceStore(base).load(spec)


async def test_absolute_paths_and_symlinks_out_are_refused_unless_allowed(base: Path) -> None:
    outside = base.parent / "outside.png"
    (base / "refs" / "link.png").symlink_to(outside)
    strict = ReferenceStore(base)
    with pytest.raises(ReferenceError, match="absolute path"):
        await strict.load(str(outside))
    with pytest.raises(ReferenceError, match="symbolic link"):
        await strict.load("refs/link.png")
    lenient = ReferenceStore(base, allow_outside=True)
    assert (await lenient.load(str(outside))).mime == "image/png"
    assert (await lenient.load("refs/link.png")).mime == "image/png"


async def test_size_cap_refuses_before_reading(base: Path) -> None:
    big = base / "refs" / "big.png"
    big.write_bytes(_image_bytes("PNG") + os.urandom(5000))
    store = ReferenceStore(base, max_bytes=2000)
    with pytest.raises(ReferenceError, match=r"at most 0\.00190735 MB is allowed"):
        await store.load("refs/big.png")
    assert store.stats["file_reads"] == 0
    encoded = base64.b64encode(big.read_bytes()).decode()
    with pytest.raises(ReferenceError, match="at most"):
        await store.load(encoded)


async def test_decompression_bombs_are_refused(base: Path) -> None:
    (base / "refs" / "bomb.png").write_bytes(_image_bytes("PNG", (8000, 6000), mode="1"))
    assert (base / "refs" / "bomb.png").stat().st_size < 100_000
    with pytest.raises(ReferenceError, match="8000x6000 pixels; at most 40 megapixels"):
        await ReferenceStore(base).load("refs/bomb.png")


async def test_cache_hit_does_not_read_again(base: Path) -> None:
    store = ReferenceStore(base)
    first = await store.load("refs/shot.png")
    second = await store.load("refs/shot.png")
    assert second is first
    assert store.stats == {"file_reads": 1, "fetches": 0, "hits": 1}
    # An edited file (new mtime/size) is read again.
    (base / "refs" / "shot.png").write_bytes(_image_bytes("PNG", (32, 32)))
    third = await store.load("refs/shot.png")
    assert third.width == 32
    assert store.stats["file_reads"] == 2


async def test_lru_is_bounded_by_encoded_bytes(base: Path) -> None:
    probe = ReferenceStore(base)
    png, jpeg = await probe.load("refs/shot.png"), await probe.load("refs/shot.jpg")
    # Room for either image, not both.
    store = ReferenceStore(base, cache_bytes=max(len(png.b64), len(jpeg.b64)) + 10)
    await store.load("refs/shot.png")
    await store.load("refs/shot.jpg")  # evicts the PNG
    await store.load("refs/shot.png")
    assert store.stats["file_reads"] == 3
    await store.load("refs/shot.png")
    assert store.stats["file_reads"] == 3


async def test_concurrent_loads_share_one_load(base: Path) -> None:
    store = ReferenceStore(base)
    results = await asyncio.gather(*(store.load("refs/shot.webp") for _ in range(25)))
    assert len({r.digest for r in results}) == 1
    assert store.stats["file_reads"] == 1
    failures = await asyncio.gather(
        *(store.load("refs/truncated.jpg") for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(f, ReferenceError) for f in failures)


# --- URLs -----------------------------------------------------------------------------------


class _Server:
    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.url = ""


@pytest.fixture
async def server() -> AsyncIterator[_Server]:
    state = _Server()
    png = _image_bytes("PNG")
    jpeg = _image_bytes("JPEG")

    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        state.hits[name] = state.hits.get(name, 0) + 1
        if name == "shot.png":
            await asyncio.sleep(0.05)  # long enough for concurrent callers to pile up
            return web.Response(body=png, content_type="image/png")
        if name == "declared-big":
            return web.Response(body=b"x" * 5000, content_type="image/png")
        if name == "streamed-big":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(10):
                await response.write(b"x" * 1000)
            await response.write_eof()
            return response
        if name.startswith("hop"):
            left = int(name[3:])
            target = "shot.png" if left == 0 else f"hop{left - 1}"
            raise web.HTTPFound(f"/img/{target}")
        if name == "to-ftp":
            raise web.HTTPFound("ftp://127.0.0.1/shot.png")
        if name == "to-private":
            raise web.HTTPFound("http://10.1.2.3/shot.png")
        if name == "slow":
            await asyncio.sleep(1.5)
        if name == "page.jpg":  # a CDN's HTML error page, served as an image
            return web.Response(body=b"<html>not found</html>", content_type="image/jpeg")
        if name == "cut.jpg":
            return web.Response(body=jpeg[: len(jpeg) // 2], content_type="image/jpeg")
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/img/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}/img"
    try:
        yield state
    finally:
        await runner.cleanup()


def _store(**options: object) -> ReferenceStore:
    settings: dict[str, object] = {"allow_private_urls": True, "allow_http": True}
    settings.update(options)
    return ReferenceStore(None, **settings)  # type: ignore[arg-type]


async def test_url_fetch_and_single_flight(server: _Server) -> None:
    store = _store()
    async with aiohttp.ClientSession() as session:
        refs = await asyncio.gather(
            *(store.load(f"{server.url}/shot.png", session) for _ in range(10))
        )
        again = await store.load(f"{server.url}/shot.png", session)
    assert {r.mime for r in refs} == {"image/png"}
    assert again is refs[0]
    assert server.hits["shot.png"] == 1
    assert store.stats["fetches"] == 1


async def test_url_without_session_opens_its_own(server: _Server) -> None:
    ref = await _store().load(f"{server.url}/shot.png")
    assert ref.width == 64


async def test_private_and_loopback_urls_refused_by_default(server: _Server) -> None:
    store = _store(allow_private_urls=False)
    async with aiohttp.ClientSession() as session:
        for url in (f"{server.url}/shot.png", "http://[::1]:9/x.png", "http://169.254.169.254/"):
            with pytest.raises(ReferenceError, match="private, loopback, link-local"):
                await store.load(url, session)
    assert server.hits == {}


async def test_every_redirect_hop_is_checked(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ReferenceStore._check_host

    async def loopback_only(self: ReferenceStore, host: str, port: int) -> None:
        if host != "127.0.0.1":
            await original(self, host, port)

    monkeypatch.setattr(ReferenceStore, "_check_host", loopback_only)
    store = _store(allow_private_urls=False)
    async with aiohttp.ClientSession() as session:
        assert (await store.load(f"{server.url}/hop2", session)).width == 64
        with pytest.raises(ReferenceError, match="more than 3 times"):
            await store.load(f"{server.url}/hop3", session)
        with pytest.raises(ReferenceError, match=r"10\.1\.2\.3, a private"):
            await store.load(f"{server.url}/to-private", session)
        with pytest.raises(ReferenceError, match="only http"):
            await store.load(f"{server.url}/to-ftp", session)


async def test_url_size_cap_status_and_timeout(server: _Server) -> None:
    store = _store(max_bytes=2000, timeout_s=0.3)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ReferenceError, match=r"0\.0 MB; at most"):
            await store.load(f"{server.url}/declared-big", session)
        with pytest.raises(ReferenceError, match="larger than"):
            await store.load(f"{server.url}/streamed-big", session)
        with pytest.raises(ReferenceError, match="answered HTTP 404"):
            await store.load(f"{server.url}/missing.png?token=SECRET", session)
        with pytest.raises(ReferenceError, match=r"timed out after 0\.3 s"):
            await store.load(f"{server.url}/slow", session)
    with pytest.raises(ReferenceError) as err:
        await store.load(f"{server.url}/missing.png?token=SECRET")
    assert "/img/missing.png" in str(err.value)
    assert "SECRET" not in str(err.value)  # signed URLs' tokens stay out of messages


async def test_what_a_url_served_is_refused_naming_the_url(server: _Server) -> None:
    """A shop's thousand image URLs: "is not an image" must say which one (the fetch's
    own errors always did); the query of a signed URL stays out."""
    store = _store()
    async with aiohttp.ClientSession() as session:
        for name, problem in (("page.jpg", "is not an image"), ("cut.jpg", "truncated")):
            with pytest.raises(ReferenceError) as err:
                await store.load(f"{server.url}/{name}?sig=SECRET", session)
            assert str(err.value).startswith(f"URL {server.url}/{name}: "), err.value
            assert problem in str(err.value)
            assert "SECRET" not in str(err.value)


def test_schemes_table_lists_fetchable_schemes() -> None:
    assert {"https", "http", "data"} <= SPEC_SCHEMES


async def test_dns_rebinding_is_caught_at_connect_time(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The up-front check is fooled (as by a DNS answer that changes between two lookups);
    # the connection itself must still refuse to reach a loopback address.
    async def fooled(self: ReferenceStore, host: str, port: int) -> None:
        return None

    monkeypatch.setattr(ReferenceStore, "_check_host", fooled)
    port = server.url.split(":")[2].split("/")[0]
    store = _store(allow_private_urls=False)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ReferenceError, match=r"non-public address (127\.0\.0\.1|::1)"):
            await store.load(f"http://localhost:{port}/img/shot.png", session)
    assert server.hits == {}
