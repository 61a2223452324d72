"""S3 through boto3: addresses, clients, reads, and the output sink for ``s3://bucket/prefix``.

Catalog teams keep manifests, reference shots and generated images in object storage, and
often not AWS's own: MinIO, R2 or a local server. So the endpoint is configurable
(``configure(endpoint_url=...)``, ``--s3-endpoint-url``, ``$AWS_ENDPOINT_URL_S3`` or
``$AWS_ENDPOINT_URL``), credentials come from the standard AWS chain (environment, profile,
SSO, instance or task role) and are never read, logged or repeated by this module.

boto3 is blocking, so every call runs in a worker thread: uploads in the sink's own bounded
pool (the event loop keeps polling tasks while images are stored, and a slow bucket holds
back at most ``max_concurrency`` images in memory), one-off reads in the loop's default
executor. Transient S3 errors (500, 503, throttling, dropped connections) are retried by
botocore's ``standard`` retry mode with exponential backoff; what still fails becomes a
``StorageError`` naming the object and what went wrong, never a botocore traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import posixpath
import re
import tempfile
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final, TypeVar

from pipeline.errors import ConfigError, KleinError, StorageError

log = logging.getLogger(__name__)

#: Environment variables naming the S3 endpoint, most specific first (boto3's own names).
ENDPOINT_ENV: Final = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
#: botocore standard-mode attempts per S3 call (1 try + 9 retries, backoff up to 20 s each).
DEFAULT_MAX_ATTEMPTS: Final = 10
#: Objects at least this large are uploaded in parts (S3's minimum part size is 5 MiB).
MULTIPART_THRESHOLD: Final = 16 * 1024 * 1024
MULTIPART_CHUNKSIZE: Final = 16 * 1024 * 1024
#: Concurrent uploads per sink.
DEFAULT_UPLOAD_CONCURRENCY: Final = 16

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_NOT_FOUND: Final = frozenset({"404", "NoSuchKey", "NotFound"})
_DENIED: Final = frozenset(
    {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
)

T = TypeVar("T")


# --- addresses --------------------------------------------------------------------------------


def is_s3_uri(value: object) -> bool:
    """True for ``s3://...`` strings (any case), the only form S3 locations take here."""
    return isinstance(value, str) and value[:5].lower() == "s3://"


@dataclass(frozen=True, slots=True)
class S3Uri:
    """A bucket and a key (or key prefix, without leading or trailing slash)."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, text: str, *, what: str = "S3 location") -> S3Uri:
        """Split ``s3://bucket/key``; a bad bucket name is refused up front, with the rules."""
        raw = text.strip()
        if not is_s3_uri(raw):
            raise ConfigError(f"{what} {text!r} is not an s3:// URI; expected s3://bucket/key")
        rest = raw[5:]
        bucket, _, key = rest.partition("/")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise ConfigError(
                f"{what} {text!r}: {bucket!r} is not a valid bucket name; expected 3 to 63 "
                "lowercase letters, digits, dots and hyphens, e.g. s3://my-catalog/outputs"
            )
        return cls(bucket, key.strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def child(self, relpath: str) -> S3Uri:
        """The object ``relpath`` below this prefix; refuses paths that would climb out."""
        if not relpath or "\x00" in relpath or "\\" in relpath:
            raise ValueError(f"invalid object path {relpath!r}: expected a relative path")
        pure = PurePosixPath(relpath)
        if pure.is_absolute() or ".." in pure.parts or relpath.startswith("~"):
            raise ValueError(
                f"invalid object path {relpath!r}: it must stay below {self} (no leading '/', "
                "no '..')"
            )
        key = str(pure) if not self.key else f"{self.key}/{pure}"
        return S3Uri(self.bucket, key)

    def parent(self) -> S3Uri:
        return S3Uri(self.bucket, posixpath.dirname(self.key))

    @property
    def name(self) -> str:
        return posixpath.basename(self.key) or self.bucket


# --- clients ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Settings:
    endpoint_url: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


_settings = _Settings()
_clients: dict[tuple[str | None, int, int], Any] = {}
_clients_lock = threading.Lock()


def configure(*, endpoint_url: str | None = None, max_attempts: int | None = None) -> None:
    """Process-wide S3 settings (the CLI's ``--s3-endpoint-url``); None keeps the current one.

    An explicit endpoint wins over ``$AWS_ENDPOINT_URL_S3`` and ``$AWS_ENDPOINT_URL``.
    """
    if endpoint_url is not None:
        if not endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"S3 endpoint {endpoint_url!r} is not allowed; expected an http:// or https:// "
                "URL, e.g. http://127.0.0.1:9000"
            )
        _settings.endpoint_url = endpoint_url.rstrip("/")
    if max_attempts is not None:
        if max_attempts < 1:
            raise ConfigError(f"S3 max_attempts must be at least 1, got {max_attempts}")
        _settings.max_attempts = max_attempts


def endpoint_url() -> str | None:
    """The endpoint S3 calls go to: configured, else the environment's, else AWS's own."""
    if _settings.endpoint_url:
        return _settings.endpoint_url
    for name in ENDPOINT_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return value.rstrip("/")
    return None


def client(*, pool_size: int = DEFAULT_UPLOAD_CONCURRENCY) -> Any:
    """A shared S3 client (boto3 clients are thread-safe), built once per endpoint.

    ``path`` addressing for custom endpoints: MinIO and local servers rarely resolve
    ``bucket.host`` names, while AWS keeps its default (virtual hosts).
    """
    endpoint = endpoint_url()
    cache_key = (endpoint, _settings.max_attempts, pool_size)
    with _clients_lock:
        cached = _clients.get(cache_key)
        if cached is not None:
            return cached
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "max_attempts": _settings.max_attempts},
            max_pool_connections=pool_size + 4,
            connect_timeout=10,
            read_timeout=60,
            user_agent_extra="klein-batch",
            s3={"addressing_style": "path"} if endpoint else None,
        )
        session = boto3.session.Session()
        made = session.client("s3", endpoint_url=endpoint, config=config)
        _clients[cache_key] = made
        return made


def reset_clients() -> None:
    """Forget cached clients (new credentials or endpoint in the environment)."""
    with _clients_lock:
        _clients.clear()


def reset() -> None:
    """Back to the defaults: no configured endpoint or attempts, no cached clients.

    The CLI configures once per process; a long-lived process (a notebook, a test session)
    that pointed S3 at a server which is now gone calls this so later calls do not follow.
    """
    _settings.endpoint_url = None
    _settings.max_attempts = DEFAULT_MAX_ATTEMPTS
    reset_clients()


def _transfer_config(threshold: int = MULTIPART_THRESHOLD) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=threshold,
        multipart_chunksize=max(5 * 1024 * 1024, min(threshold, MULTIPART_CHUNKSIZE)),
        max_concurrency=4,
        use_threads=True,
    )


# --- errors -----------------------------------------------------------------------------------


def _code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        code = error.get("Code")
        if code:
            return str(code)
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if status:
            return str(status)
    return None


def is_not_found(exc: BaseException) -> bool:
    return _code(exc) in _NOT_FOUND


def storage_error(exc: BaseException, action: str, where: S3Uri | str) -> KleinError:
    """A one-line error for a failed S3 call; never quotes credentials or raw responses."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return ConfigError(
            f"cannot {action} {where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance or task role"
        )
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError):
        endpoint = endpoint_url() or "the AWS S3 endpoint"
        return StorageError(
            f"cannot {action} {where}: cannot connect to {endpoint} (after retries); check "
            "--s3-endpoint-url / AWS_ENDPOINT_URL and the network"
        )
    code = _code(exc)
    if code == "NoSuchBucket":
        bucket = where.bucket if isinstance(where, S3Uri) else str(where)
        return ConfigError(f"cannot {action} {where}: bucket {bucket!r} does not exist")
    if code in _DENIED:
        return ConfigError(
            f"cannot {action} {where}: access denied ({code}); check that the AWS credentials "
            "in use may read and write this bucket"
        )
    if code in _NOT_FOUND:
        return StorageError(f"cannot {action} {where}: no such object")
    if isinstance(exc, bx.BotoCoreError | bx.ClientError):
        detail = code or type(exc).__name__
        return StorageError(f"cannot {action} {where}: S3 answered {detail} (after retries)")
    return StorageError(f"cannot {action} {where}: {type(exc).__name__}")


def _s3_failures() -> tuple[type[BaseException], ...]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, Boto3Error)


# --- one-off reads (manifests, references) ----------------------------------------------------


def head(location: S3Uri) -> dict[str, Any] | None:
    """The object's metadata (``ContentLength``, ``ETag``, ``Metadata``), None if absent."""
    try:
        return dict(client().head_object(Bucket=location.bucket, Key=location.key))
    except _s3_failures() as exc:
        if is_not_found(exc):
            return None
        raise storage_error(exc, "read", location) from None


def bucket_exists(bucket: str) -> bool:
    """Whether the bucket exists (a HEAD answers 404 alike for a missing key or bucket)."""
    try:
        client().head_bucket(Bucket=bucket)
    except _s3_failures() as exc:
        if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
            return False
        if _code(exc) in _DENIED:
            return True  # it exists; whether we may read the object shows next
        raise storage_error(exc, "read", f"s3://{bucket}") from None
    return True


def download(location: S3Uri, target: Path) -> None:
    """Stream an object to a local file (ranged GETs in parts: memory stays flat)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        client().download_file(
            location.bucket, location.key, str(target), Config=_transfer_config()
        )
    except _s3_failures() as exc:
        raise storage_error(exc, "read", location) from None


def read_capped(location: S3Uri, max_bytes: int, too_big: Callable[[int | None], str]) -> bytes:
    """An object's bytes, refused (``too_big(size)``) when larger than ``max_bytes``."""
    from pipeline.errors import ReferenceError

    try:
        response = client().get_object(Bucket=location.bucket, Key=location.key)
    except _s3_failures() as exc:
        error = storage_error(exc, "read", location)
        raise ReferenceError(str(error).replace(f"cannot read {location}: ", "")) from None
    body = response["Body"]
    try:
        length = response.get("ContentLength")
        if length is not None and length > max_bytes:
            raise ReferenceError(too_big(int(length)))
        data = body.read(max_bytes + 1)
    except _s3_failures() as exc:
        raise ReferenceError(f"reading failed ({type(exc).__name__})") from None
    finally:
        body.close()
    if len(data) > max_bytes:
        raise ReferenceError(too_big(None))
    return data


@dataclass(slots=True)
class DownloadedManifest:
    """A local copy of an S3 manifest, deleted when the reader holding it goes away."""

    path: Path
    name: str
    #: ``s3://bucket/folder/``: what relative reference paths in the manifest are based on.
    base_uri: str


def fetch_manifest(uri: str) -> DownloadedManifest:
    """Copy an S3 manifest to a temporary file (same suffix, so CSV/Parquet/TSV sniffing
    behaves as for a local file); a missing object is a ``ManifestError``."""
    from pipeline.errors import ManifestError

    location = S3Uri.parse(uri, what="manifest")
    if not location.key:
        raise ManifestError(f"{uri}: names a bucket, not a manifest; expected s3://bucket/key")
    suffix = PurePosixPath(location.key).suffix[:16]
    _sweep_orphan_copies()
    fd, name = tempfile.mkstemp(prefix=f"{_COPY_PREFIX}{os.getpid()}-", suffix=suffix)
    os.close(fd)
    path = Path(name)
    try:
        if head(location) is None:
            if not bucket_exists(location.bucket):
                raise ConfigError(f"manifest {location}: bucket {location.bucket!r} does not exist")
            raise ManifestError(f"{location}: no such object; expected a CSV or Parquet manifest")
        download(location, path)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    base = location.parent()
    base_uri = f"{base}/" if base.key else f"s3://{base.bucket}/"
    return DownloadedManifest(path=path, name=location.name, base_uri=base_uri)


#: Temporary copies of S3 manifests are named ``klein-manifest-PID-...``.
_COPY_PREFIX = "klein-manifest-"


def _sweep_orphan_copies() -> None:
    """Delete copies left by processes that no longer run.

    A copy goes with its reader or at exit, but a process killed outright (SIGKILL, or a
    flow run Prefect ends with the default SIGTERM) runs neither: a nightly worker kept one
    copy of its manifest, up to the manifest's size, per night that ended so.
    """
    folder = Path(tempfile.gettempdir())
    for path in folder.glob(f"{_COPY_PREFIX}*"):
        pid = path.name[len(_COPY_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _unlink_quietly(str(path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def delete_when_collected(owner: object, path: Path) -> None:
    """Remove ``path`` once ``owner`` is garbage (or at exit): temp copies never pile up."""
    weakref.finalize(owner, _unlink_quietly, str(path))


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# --- the sink ---------------------------------------------------------------------------------


class S3Sink:
    """Outputs under ``s3://bucket/prefix``, with the same contract as ``LocalSink``.

    A PUT is atomic in S3 (readers see the old object or the whole new one), and so is a
    completed multipart upload, so no temp-and-rename is needed. Uploads run in a pool of
    ``max_concurrency`` threads behind a semaphore of the same size.
    """

    def __init__(
        self,
        uri: str,
        *,
        max_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY,
        multipart_threshold: int = MULTIPART_THRESHOLD,
    ) -> None:
        self.root = S3Uri.parse(uri, what="output")
        if max_concurrency < 1:
            raise ConfigError(f"S3 upload concurrency must be at least 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self.multipart_threshold = multipart_threshold
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="s3-upload")
        self._gates: dict[int, asyncio.Semaphore] = {}

    def __repr__(self) -> str:
        return f"S3Sink({str(self.root)!r})"

    # -- plumbing --------------------------------------------------------------------------

    def _client(self) -> Any:
        return client(pool_size=self.max_concurrency)

    def _gate(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(id(loop))
        if gate is None:
            self._gates = {id(loop): (gate := asyncio.Semaphore(self.max_concurrency))}
        return gate

    async def _call(self, action: str, where: S3Uri, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        async with self._gate():
            try:
                return await loop.run_in_executor(self._pool, fn)
            except _s3_failures() as exc:
                raise storage_error(exc, action, where) from None

    def close(self) -> None:
        """Let the upload threads go (waits for uploads already started)."""
        self._pool.shutdown(wait=True)

    # -- the Sink protocol -----------------------------------------------------------------

    def location(self, relpath: str) -> S3Uri:
        return self.root.child(relpath)

    def uri(self, relpath: str) -> str:
        return str(self.location(relpath))

    def local_path(self, relpath: str) -> Path | None:
        return None

    async def put(self, relpath: str, data: bytes, content_type: str) -> str:
        where = self.location(relpath)
        s3 = self._client()
        if len(data) >= self.multipart_threshold:

            def upload() -> None:
                s3.upload_fileobj(
                    io.BytesIO(data),
                    where.bucket,
                    where.key,
                    ExtraArgs={"ContentType": content_type},
                    Config=_transfer_config(self.multipart_threshold),
                )

        else:

            def upload() -> None:
                s3.put_object(
                    Bucket=where.bucket, Key=where.key, Body=data, ContentType=content_type
                )

        await self._call("write", where, upload)
        return str(where)

    async def put_file(
        self,
        relpath: str,
        local_path: Path,
        content_type: str,
        *,
        metadata: dict[str, str] | None = None,
    ) -> str:
        where = self.location(relpath)
        s3 = self._client()
        extra: dict[str, Any] = {"ContentType": content_type}
        if metadata:
            extra["Metadata"] = metadata

        def upload() -> None:
            s3.upload_file(
                str(local_path),
                where.bucket,
                where.key,
                ExtraArgs=extra,
                Config=_transfer_config(self.multipart_threshold),
            )

        await self._call("write", where, upload)
        return str(where)

    async def get(self, relpath: str) -> bytes | None:
        where = self.location(relpath)
        s3 = self._client()

        def read() -> bytes | None:
            try:
                response = s3.get_object(Bucket=where.bucket, Key=where.key)
            except _s3_failures() as exc:
                if is_not_found(exc):
                    return None
                raise
            with contextlib.closing(response["Body"]) as body:
                return bytes(body.read())

        return await self._call("read", where, read)

    async def exists(self, relpath: str) -> bool:
        return await self.head(relpath) is not None

    # -- beyond the protocol: what the remote journal needs --------------------------------

    async def head(self, relpath: str) -> dict[str, Any] | None:
        """The object's metadata, or None when nothing is stored there."""
        where = self.location(relpath)
        s3 = self._client()

        def look() -> dict[str, Any] | None:
            try:
                return dict(s3.head_object(Bucket=where.bucket, Key=where.key))
            except _s3_failures() as exc:
                if is_not_found(exc):
                    return None
                raise

        return await self._call("read", where, look)

    async def download(self, relpath: str, target: Path) -> None:
        """Stream the object to ``target`` (written beside it first, then renamed)."""
        where = self.location(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        s3 = self._client()

        def fetch() -> None:
            s3.download_file(where.bucket, where.key, tmp, Config=_transfer_config())
            os.replace(tmp, target)

        try:
            await self._call("read", where, fetch)
        finally:
            _unlink_quietly(tmp)

    async def list(self, relprefix: str) -> list[str]:
        """Relative paths of the objects under ``relprefix``."""
        where = self.location(relprefix)
        s3 = self._client()
        root_len = len(self.root.key) + 1 if self.root.key else 0

        def scan() -> list[str]:
            found: list[str] = []
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=where.bucket, Prefix=where.key + "/"
            )
            for page in pages:
                found.extend(item["Key"][root_len:] for item in page.get("Contents", []))
            return found

        return await self._call("list", where, scan)

    async def delete(self, relpaths: list[str]) -> None:
        """Delete objects (in batches of 1,000, S3's limit per request)."""
        if not relpaths:
            return
        s3 = self._client()
        for start in range(0, len(relpaths), 1000):
            keys = [{"Key": self.location(p).key} for p in relpaths[start : start + 1000]]

            def remove(keys: list[dict[str, str]] = keys) -> None:
                s3.delete_objects(Bucket=self.root.bucket, Delete={"Objects": keys, "Quiet": True})

            await self._call("delete objects under", self.root, remove)

    # -- beyond the protocol: what the image library needs ---------------------------------

    async def copy_in(self, relpath: str, source: str) -> bool:
        """Copy the object ``source`` (an ``s3://`` URI) to ``relpath`` inside S3 (no bytes
        through this machine); False when ``source`` does not exist."""
        where = self.location(relpath)
        origin = S3Uri.parse(source, what="copy source")
        s3 = self._client()

        def copy() -> bool:
            try:
                s3.copy_object(
                    Bucket=where.bucket,
                    Key=where.key,
                    CopySource={"Bucket": origin.bucket, "Key": origin.key},
                )
            except _s3_failures() as exc:
                if is_not_found(exc):
                    return False
                raise
            return True

        return await self._call("copy to", where, copy)

    async def put_if_absent(self, relpath: str, data: bytes, content_type: str) -> bool:
        """Store ``data`` at ``relpath`` unless an object is already there (a conditional
        put, ``If-None-Match: *``); True when this call created it."""
        where = self.location(relpath)
        s3 = self._client()

        def put() -> bool:
            try:
                s3.put_object(
                    Bucket=where.bucket,
                    Key=where.key,
                    Body=data,
                    ContentType=content_type,
                    IfNoneMatch="*",
                )
            except _s3_failures() as exc:
                if _code(exc) in ("412", "PreconditionFailed", "409", "ConditionalRequestConflict"):
                    return False
                raise
            return True

        return await self._call("write", where, put)
