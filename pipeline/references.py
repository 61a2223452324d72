"""Reference images: load, check, convert, encode and cache them.

Catalogs reuse one product shot across hundreds of rows, and a manifest is untrusted input:
a reference may be a broken file, a 50 MB photo, a decompression bomb, a path that climbs
out of the manifest's folder, or a URL pointing at an internal service. So every reference
is checked before it is sent, each distinct image is decoded and base64-encoded once, and
what is not allowed is refused with a message that says what would be.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import posixpath
import re
import socket
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from PIL import Image, UnidentifiedImageError
from yarl import URL

from pipeline.errors import ReferenceError, ReferenceUnreachable

#: Pixel cap: refuses decompression bombs long before Pillow's own (larger) limit.
MAX_PIXELS: Final = 40_000_000
MAX_REDIRECTS: Final = 3
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_DATA_URI = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?;base64,(.*)$", re.DOTALL | re.I)
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_BASE64_MIN_CHARS: Final = 64
_SPEC_CACHE_ENTRIES: Final = 100_000
_CHUNK: Final = 64 * 1024
_KEPT: Final = {"JPEG": "image/jpeg", "PNG": "image/png"}
_ALLOWED_TEXT: Final = (
    "a file path relative to the manifest's folder, an https:// URL, a "
    "data:image/...;base64, URI or base64 text of a JPEG or PNG"
)

# Our pixel cap is stricter than Pillow's warning threshold; its warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True, slots=True)
class Reference:
    """A reference image ready to send: JPEG or PNG bytes, base64-encoded."""

    #: sha256 hex of the bytes that are sent (after any conversion).
    digest: str
    mime: str
    b64: str
    width: int
    height: int
    #: Size in bytes of the image that is sent (before base64).
    size: int


@dataclass(frozen=True, slots=True)
class _Spec:
    kind: str  # "file", "inline", "url"
    cache_key: str
    path: Path | None = None
    payload: str | None = None
    url: str | None = None


Fetcher = Callable[["ReferenceStore", str, aiohttp.ClientSession | None], Awaitable[bytes]]


def _public_url(url: str) -> str:
    """The URL without its query or credentials, for messages (signed URLs carry tokens)."""
    try:
        parsed = URL(url)
        return str(parsed.with_query(None).with_fragment(None).with_user(None))
    except (ValueError, TypeError):
        return "<unparseable URL>"


async def _fetch_http(
    store: ReferenceStore, url: str, session: aiohttp.ClientSession | None
) -> bytes:
    if session is None or not store.allow_private_urls:
        # A session of our own whose resolver refuses non-public addresses: the check in
        # _check_host gives the clear message, this one closes the gap where DNS answers
        # differently when the connection is made (rebinding). References are fetched once
        # per distinct URL, so the lost connection pooling costs little.
        resolver = None if store.allow_private_urls else _PublicOnlyResolver()
        connector = aiohttp.TCPConnector(resolver=resolver, limit=4)
        async with aiohttp.ClientSession(connector=connector) as own:
            return await _fetch(store, url, own)
    return await _fetch(store, url, session)


async def _fetch(store: ReferenceStore, url: str, session: aiohttp.ClientSession) -> bytes:
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        parsed = URL(current)
        scheme = (parsed.scheme or "").lower()
        if scheme not in ("https", "http"):
            raise ReferenceError(
                f"URL {_public_url(current)} redirects to a {scheme or 'relative'} URL; "
                "only http(s) is fetched"
            )
        if scheme == "http" and not store.allow_http:
            raise ReferenceError(
                f"URL {_public_url(current)} uses plain http; expected https:// "
                "(allow plain http with --allow-http-references, or allow_http in RunOptions)"
            )
        if not parsed.host:
            raise ReferenceError(f"URL {_public_url(current)} has no host")
        await store._check_host(parsed.host, parsed.port or (443 if scheme == "https" else 80))
        timeout = aiohttp.ClientTimeout(total=store.timeout_s)
        try:
            async with session.get(parsed, allow_redirects=False, timeout=timeout) as response:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise ReferenceError(
                            f"URL {_public_url(current)} redirects without a Location"
                        )
                    current = str(parsed.join(URL(location)))
                    continue
                if response.status != 200:
                    raise ReferenceUnreachable(
                        f"URL {_public_url(current)} answered HTTP {response.status}; "
                        "expected 200 with an image"
                    )
                length = response.content_length
                if length is not None and length > store.max_bytes:
                    raise ReferenceError(store._too_big(length))
                body = bytearray()
                async for chunk in response.content.iter_chunked(_CHUNK):
                    body.extend(chunk)
                    if len(body) > store.max_bytes:
                        raise ReferenceError(store._too_big(None))
                store.stats["fetches"] += 1
                return bytes(body)
        except TimeoutError:
            raise ReferenceUnreachable(
                f"URL {_public_url(current)} timed out after {store.timeout_s:g} s"
            ) from None
        except aiohttp.ClientConnectorCertificateError:
            # Verification is never switched off: a manifest's URL must prove its host.
            raise ReferenceError(
                f"URL {_public_url(current)}: the TLS certificate of {parsed.host} could not "
                "be verified (self-signed, expired or for another host); expected a "
                "certificate trusted by this machine"
            ) from None
        except aiohttp.ClientSSLError:
            raise ReferenceError(
                f"URL {_public_url(current)}: the TLS handshake with {parsed.host} failed"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            if "non-public address" in str(exc.os_error):
                raise ReferenceError(
                    f"URL {_public_url(current)}: {exc.os_error}; such URLs are refused so a "
                    "manifest cannot reach an internal network (allow them with "
                    "--allow-private-references, or allow_private_urls in RunOptions)"
                ) from None
            raise ReferenceUnreachable(
                f"URL {_public_url(current)} could not be fetched (cannot connect to {parsed.host})"
            ) from None
        except aiohttp.ClientError as exc:
            raise ReferenceUnreachable(
                f"URL {_public_url(current)} could not be fetched ({type(exc).__name__})"
            ) from None
    raise ReferenceError(
        f"URL {_public_url(url)} redirects more than {MAX_REDIRECTS} times; "
        f"at most {MAX_REDIRECTS} redirects are followed"
    )


class _PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, but never to a non-public address."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(str(result["host"]).split("%", 1)[0])
            if not _is_public(address):
                raise OSError(f"{host} resolves to the non-public address {address}")
        return results

    async def close(self) -> None:
        await self._inner.close()


async def _fetch_s3(
    store: ReferenceStore, url: str, session: aiohttp.ClientSession | None
) -> bytes:
    """An ``s3://bucket/key`` reference, through boto3 in a worker thread, with the size cap."""
    from pipeline import s3  # boto3 loads only when a manifest uses S3

    try:
        location = s3.S3Uri.parse(url, what="reference")
    except ValueError as exc:
        raise ReferenceError(str(exc)) from None
    if not location.key:
        raise ReferenceError(f"{url!r} names a bucket, not an object; expected s3://bucket/key")
    data = await asyncio.to_thread(s3.read_capped, location, store.max_bytes, store._too_big)
    store.stats["fetches"] += 1
    return data


#: How each URL scheme is fetched; add one entry to support another.
FETCHERS: dict[str, Fetcher] = {"https": _fetch_http, "http": _fetch_http, "s3": _fetch_s3}
#: Schemes a reference may use (``data:`` is decoded inline).
SPEC_SCHEMES: Final = frozenset({"data", *FETCHERS})


def _prepare(data: bytes, max_pixels: int) -> Reference:
    """Decode fully (to catch truncation), keep JPEG/PNG as is, convert the rest to PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or "unknown"
            width, height = image.size
            if width * height > max_pixels:
                raise ReferenceError(
                    f"the image is {width}x{height} pixels; at most "
                    f"{max_pixels / 1_000_000:g} megapixels are allowed"
                )
            image.load()
            if fmt in _KEPT:
                sent, mime = data, _KEPT[fmt]
            else:
                sent, mime = _to_png(image), "image/png"
    except Image.DecompressionBombError:
        raise ReferenceError(
            f"the image has too many pixels; at most {max_pixels / 1_000_000:g} megapixels "
            "are allowed"
        ) from None
    except UnidentifiedImageError:
        raise ReferenceError(
            "is not an image Pillow can read; expected a JPEG or PNG (WebP, GIF, BMP and "
            "TIFF are converted to PNG)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ReferenceError(
            f"is a broken or truncated image ({exc}); expected a complete JPEG or PNG"
        ) from None
    return Reference(
        digest=hashlib.sha256(sent).hexdigest(),
        mime=mime,
        b64=base64.b64encode(sent).decode("ascii"),
        width=width,
        height=height,
        size=len(sent),
    )


def _to_png(image: Image.Image) -> bytes:
    image.seek(0)  # animated GIF/WebP: the first frame is the product shot
    frame = image
    if frame.mode not in ("RGB", "RGBA", "L", "LA"):
        has_alpha = "A" in frame.mode or "transparency" in frame.info
        frame = frame.convert("RGBA" if has_alpha else "RGB")
    out = io.BytesIO()
    frame.save(out, format="PNG")
    return out.getvalue()


class ReferenceStore:
    """Loads references for one manifest, once per distinct image, safely.

    Cache: spec -> digest (files keyed by resolved path, mtime and size so an edited file
    is read again; inline data by a digest of the text; URLs by URL), and digest ->
    Reference in an LRU bounded by total base64 bytes. Concurrent loads of one spec share a
    single load. Decoding, conversion and encoding run in a worker thread so the event loop
    keeps polling tasks meanwhile.
    """

    def __init__(
        self,
        base_dir: str | Path | None,
        *,
        max_bytes: int = 10 * 1024 * 1024,
        allow_private_urls: bool = False,
        allow_http: bool = False,
        allow_outside: bool = False,
        timeout_s: float = 30.0,
        cache_bytes: int = 256 * 1024 * 1024,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        #: ``s3://bucket/folder/`` when the manifest lives in S3: relative paths resolve there.
        self.base_uri: str | None = None
        if isinstance(base_dir, str) and base_dir[:5].lower() == "s3://":
            self.base_uri, base_dir = base_dir.rstrip("/") + "/", None
        self.base_dir = Path(base_dir).resolve() if base_dir is not None else None
        self.max_bytes = max_bytes
        self.allow_private_urls = allow_private_urls
        self.allow_http = allow_http
        self.allow_outside = allow_outside
        self.timeout_s = timeout_s
        self.cache_bytes = cache_bytes
        self.max_pixels = max_pixels
        #: Counters: file reads, URL fetches, cache hits (for tests and the run summary).
        self.stats: dict[str, int] = {"file_reads": 0, "fetches": 0, "hits": 0}
        self._digests: OrderedDict[str, str] = OrderedDict()
        self._refs: OrderedDict[str, Reference] = OrderedDict()
        self._held = 0
        self._inflight: dict[str, asyncio.Task[Reference]] = {}

    async def load(self, spec: str, session: aiohttp.ClientSession | None = None) -> Reference:
        """The checked, encoded reference for a spec, from the cache when possible."""
        parsed = self._parse(spec)
        digest = self._digests.get(parsed.cache_key)
        if digest is not None:
            cached = self._refs.get(digest)
            if cached is not None:
                self._refs.move_to_end(digest)
                self._digests.move_to_end(parsed.cache_key)
                self.stats["hits"] += 1
                return cached
        task = self._inflight.get(parsed.cache_key)
        if task is None:
            task = asyncio.ensure_future(self._load(parsed, session))
            self._inflight[parsed.cache_key] = task
            task.add_done_callback(partial(self._settled, parsed.cache_key))
        # shield: one caller being cancelled must not cancel the load others wait for.
        return await asyncio.shield(task)

    def _settled(self, cache_key: str, task: asyncio.Task[Reference]) -> None:
        self._inflight.pop(cache_key, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter was cancelled

    async def _load(self, spec: _Spec, session: aiohttp.ClientSession | None) -> Reference:
        if spec.kind == "file":
            assert spec.path is not None
            data = await asyncio.to_thread(self._read_file, spec.path)
        elif spec.kind == "inline":
            assert spec.payload is not None
            data = await asyncio.to_thread(self._decode_inline, spec.payload)
        else:
            assert spec.url is not None
            scheme = URL(spec.url).scheme.lower()
            data = await FETCHERS[scheme](self, spec.url, session)
        try:
            reference = await asyncio.to_thread(_prepare, data, self.max_pixels)
            if reference.size > self.max_bytes:  # a conversion to PNG can grow the image
                raise ReferenceError(self._too_big(reference.size, converted=True))
        except ReferenceError as exc:
            if spec.url is None:
                raise  # a file or inline image: the row's reason names it
            # A fetch's own errors name the URL; what was fetched must too, or a row says
            # "is not an image" without saying which of a shop's thousand image URLs.
            raise ReferenceError(f"URL {_public_url(spec.url)}: {exc}") from None
        self._remember(spec.cache_key, reference)
        return reference

    def _remember(self, cache_key: str, reference: Reference) -> None:
        self._digests[cache_key] = reference.digest
        self._digests.move_to_end(cache_key)
        while len(self._digests) > _SPEC_CACHE_ENTRIES:
            self._digests.popitem(last=False)
        if reference.digest in self._refs:
            self._refs.move_to_end(reference.digest)
            return
        size = len(reference.b64)
        if size > self.cache_bytes:
            return
        self._refs[reference.digest] = reference
        self._held += size
        while self._held > self.cache_bytes:
            _, evicted = self._refs.popitem(last=False)
            self._held -= len(evicted.b64)

    # -- parsing the spec ------------------------------------------------------------------

    def _parse(self, spec: str) -> _Spec:
        text = spec.strip()
        if not text:
            raise ReferenceError(f"is empty; expected {_ALLOWED_TEXT}")
        if "\x00" in text:
            # No file name, URL or base64 holds one; the OS would refuse the path with a
            # ValueError that is not a reference problem (issue 15: validate crashed on it).
            raise ReferenceError(f"contains a NUL byte (\\x00); expected {_ALLOWED_TEXT}")
        scheme_match = _SCHEME.match(text)
        if scheme_match:
            scheme = scheme_match.group(1).lower()
            if scheme == "data":
                return _Spec("inline", "inline:" + _sha(text), payload=text)
            if scheme in FETCHERS:
                if scheme == "http" and not self.allow_http:
                    raise ReferenceError(
                        f"URL {_public_url(text)} uses plain http; expected https:// "
                        "(allow plain http with --allow-http-references, or allow_http in "
                        "RunOptions)"
                    )
                return _Spec("url", "url:" + text, url=text)
            raise ReferenceError(f"the {scheme}: scheme is not supported; expected {_ALLOWED_TEXT}")
        compact = "".join(text.split())
        if len(compact) >= _BASE64_MIN_CHARS and _BASE64.fullmatch(compact):
            return _Spec("inline", "inline:" + _sha(compact), payload=compact)
        return self._file_spec(text)

    def _file_spec(self, text: str) -> _Spec:
        if self.base_uri is not None:
            return self._s3_relative_spec(text)
        raw = Path(text)
        base = self.base_dir if self.base_dir is not None else Path.cwd().resolve()
        if raw.is_absolute() and not self.allow_outside:
            raise ReferenceError(
                f"absolute path {text!r} is refused; expected a path relative to the "
                f"manifest's folder ({base})"
            )
        resolved = (base / raw).resolve()
        if not self.allow_outside and not resolved.is_relative_to(base):
            raise ReferenceError(
                f"path {text!r} leads outside the manifest's folder ({base}), through '..' "
                "or a symbolic link; expected a file inside that folder"
            )
        try:
            info = resolved.stat()
        except FileNotFoundError:
            raise ReferenceError(f"file {text!r} not found (looked in {base})") from None
        except OSError as exc:
            raise ReferenceError(f"file {text!r} cannot be read ({exc.strerror})") from None
        if not resolved.is_file():
            raise ReferenceError(f"{text!r} is not a regular file; expected an image file")
        if info.st_size > self.max_bytes:
            raise ReferenceError(self._too_big(info.st_size))
        return _Spec("file", f"file:{resolved}:{info.st_mtime_ns}:{info.st_size}", path=resolved)

    def _s3_relative_spec(self, text: str) -> _Spec:
        """A path relative to an S3 manifest's folder: the same confinement as on disk."""
        assert self.base_uri is not None
        if text.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", text):
            raise ReferenceError(
                f"absolute path {text!r} is refused; expected a path relative to the "
                f"manifest's folder ({self.base_uri})"
            )
        normal = posixpath.normpath(text.replace("\\", "/"))
        if normal == ".." or normal.startswith("../") or normal == ".":
            raise ReferenceError(
                f"path {text!r} leads outside the manifest's folder ({self.base_uri}) "
                "through '..'; expected an object inside that folder"
            )
        url = self.base_uri + normal
        return _Spec("url", "url:" + url, url=url)

    # -- loading ---------------------------------------------------------------------------

    def _read_file(self, path: Path) -> bytes:
        try:
            with path.open("rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except OSError as exc:
            raise ReferenceError(f"file {path.name!r} cannot be read ({exc.strerror})") from None
        self.stats["file_reads"] += 1
        if len(data) > self.max_bytes:  # the file grew after it was checked
            raise ReferenceError(self._too_big(None))
        return data

    def _decode_inline(self, payload: str) -> bytes:
        if payload[:5].lower() == "data:":
            match = _DATA_URI.match(payload)
            if match is None or not (match.group(1) or "").lower().startswith("image/"):
                raise ReferenceError(
                    "is a data: URI but not data:image/<type>;base64,<data>; expected "
                    "for example data:image/png;base64,iVBORw0..."
                )
            payload = "".join(match.group(3).split())
        if len(payload) * 3 // 4 > self.max_bytes:
            raise ReferenceError(self._too_big(len(payload) * 3 // 4))
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ReferenceError(
                "is not valid base64; expected the standard base64 alphabet "
                "(A-Z a-z 0-9 + /) with '=' padding"
            ) from None

    async def _check_host(self, host: str, port: int) -> None:
        if self.allow_private_urls:
            return
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            # DNS that fails now may answer later (or the network is down): transient.
            raise ReferenceUnreachable(f"host {host!r} cannot be resolved") from None
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if not _is_public(address):
                raise ReferenceError(_not_public(host, address))

    def offline_problem(self, spec: str) -> str | None:
        """What the run will refuse in a reference URL, found without the network.

        ``validate`` and ``--dry-run`` do not fetch URLs, so they passed rows the run then
        rejected: a plain ``http://`` URL, or a host written as a private address. Both
        are plain from the text; a host name's addresses are only known once the run
        resolves it. The message is the run's own.
        """
        try:
            parsed = self._parse(spec)
        except ReferenceError as exc:
            return str(exc)
        if parsed.kind != "url" or parsed.url is None or self.allow_private_urls:
            return None
        host = URL(parsed.url).host or ""
        try:
            address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return None  # a name: resolved by the run
        return None if _is_public(address) else _not_public(host, address)

    def _too_big(self, size: int | None, *, converted: bool = False) -> str:
        limit = f"{self.max_bytes / 1024 / 1024:g} MB"
        what = "converted to PNG, the image is" if converted else "the image is"
        if size is None:
            return f"{what} larger than {limit}; at most {limit} is allowed"
        return f"{what} {size / 1024 / 1024:.1f} MB; at most {limit} is allowed"


def _not_public(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return (
        f"host {host!r} resolves to {address}, a private, loopback, link-local, "
        "multicast or reserved address; such URLs are refused so a manifest "
        "cannot reach an internal network (allow them with --allow-private-references, "
        "or allow_private_urls in RunOptions)"
    )


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        address = mapped
    return address.is_global and not address.is_multicast


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
