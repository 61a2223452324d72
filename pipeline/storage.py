"""Where a run's outputs go: images, the output manifest, the run summary.

The engine and the writers only see the `Sink` protocol, so a later S3 sink slots in
without touching them; `open_sink` is the one place that turns a user's ``--out`` into a
sink. Every write is atomic (a reader never sees half an image or half a manifest, and a
``kill -9`` mid-write leaves the previous file or nothing), because a resumed run and the
data team downstream both trust that a file which exists is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import re
import shutil
import stat
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from pipeline.errors import ConfigError, StorageError

#: Writes larger than this go to a worker thread so the event loop keeps polling.
INLINE_WRITE_LIMIT = 1 << 20

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://")
#: A Windows drive (``C:``): an absolute path however the rest is spelled.
_DRIVE = re.compile(r"^[A-Za-z]:")


@runtime_checkable
class Sink(Protocol):
    """A destination for a run's files, addressed by paths relative to its root."""

    def uri(self, relpath: str) -> str:
        """The address a data team uses to read ``relpath`` back (recorded in the manifest)."""
        ...

    async def put(self, relpath: str, data: bytes, content_type: str) -> str:
        """Store ``data`` atomically at ``relpath``; returns its URI."""
        ...

    async def put_file(self, relpath: str, local_path: Path, content_type: str) -> str:
        """Store a local file's content atomically at ``relpath``; returns its URI."""
        ...

    async def get(self, relpath: str) -> bytes | None:
        """The stored bytes, or None when nothing is stored there."""
        ...

    async def exists(self, relpath: str) -> bool: ...

    def local_path(self, relpath: str) -> Path | None:
        """The real file behind ``relpath`` for a local sink; None for remote sinks."""
        ...

    def close(self) -> None:
        """Let go of what the sink holds (an S3 sink's upload threads) once its owner is done."""
        ...


class LocalSink:
    """A folder on this machine.

    Paths are checked after normalisation and symlink resolution, so a key such as
    ``../../etc/passwd`` or a symlink planted inside the folder cannot write outside it.
    """

    def __init__(self, root: str | Path, *, fsync: bool = False) -> None:
        root_path = Path(root).expanduser()
        if root_path.exists() and not root_path.is_dir():
            raise ConfigError(f"output {root_path} is a file; expected a folder (or a new path)")
        try:
            root_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create output folder {root_path}: {exc.strerror}") from exc
        self.root = root_path.resolve()
        self._root_text = str(self.root)
        #: Folders below the root already found to be real directories (``_plain_path``).
        self._dirs: set[str] = set()
        #: Names temporary files apart (with the pid): see ``_create_temp``.
        self._tmp_seq = itertools.count()
        #: fsync each file before renaming it: survives power loss, not only a process kill.
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"LocalSink({str(self.root)!r})"

    def _path(self, relpath: str) -> Path:
        if not relpath or "\x00" in relpath:
            raise ValueError(f"invalid output path {relpath!r}: expected a relative file path")
        if relpath.startswith(("/", "\\", "~")) or _DRIVE.match(relpath):
            raise ValueError(
                f"invalid output path {relpath!r}: absolute paths are not allowed; "
                f"expected a path relative to {self.root}"
            )
        fast = self._plain_path(relpath)
        if fast is not None:
            return fast
        target = (self.root / PurePosixPath(relpath)).resolve()
        if target == self.root or not target.is_relative_to(self.root):
            raise ValueError(
                f"invalid output path {relpath!r}: it leads outside the output folder {self.root}"
            )
        return target

    def _plain_path(self, relpath: str) -> Path | None:
        """``root/relpath`` when no component is ``..`` and none that exists is a symlink.

        Such a path cannot lead outside the (resolved) root, so it needs no full
        resolution: one ``lstat`` per component below the root instead of one per
        component of the whole absolute path, for every image and thumbnail written.
        A folder found to be a real directory is remembered for the sink's life
        (``_dirs``), so each write then checks only its last component: the output
        folder's confinement is resolved once per folder, not once per file (issue 16's
        profile: a few percent of the client's CPU per image). Plain string operations
        rather than ``pathlib``: building and joining path objects for every image and
        thumbnail cost more than the checks themselves. Swapping a checked folder for a
        symlink during the run needs write access to the output folder itself. None
        sends anything else (a ``..``, a symlink anywhere) to the full check.
        """
        # The key as PurePosixPath reads it: empty and "." components dropped.
        parts = [part for part in relpath.split("/") if part and part != "."]
        if not parts or ".." in parts:
            return None
        current = self._root_text
        last = len(parts) - 1
        for i, part in enumerate(parts):
            current = f"{current}/{part}"
            if i < last and current in self._dirs:
                continue
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                break  # neither it nor anything below it exists yet: no link to follow
            except OSError:
                return None
            if stat.S_ISLNK(mode):
                return None
            if i < last and stat.S_ISDIR(mode):
                self._dirs.add(current)
        return Path(self._root_text, *parts)

    def uri(self, relpath: str) -> str:
        # A plain absolute path, not file://: polars, PIL and shells all open it as it is.
        return str(self._path(relpath))

    def local_path(self, relpath: str) -> Path | None:
        return self._path(relpath)

    def close(self) -> None:
        """Nothing to let go: every write ends with its file closed."""

    def _write_atomic(self, target: Path, data: bytes | None, source: Path | None) -> None:
        parent = target.parent
        if str(parent) not in self._dirs:  # a checked folder exists: no mkdir per file
            parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = self._create_temp(parent, target.name)
        try:
            if source is not None:
                with os.fdopen(fd, "wb") as handle:
                    with source.open("rb") as src:
                        shutil.copyfileobj(src, handle, 1 << 20)
                    if self.fsync:
                        handle.flush()
                        os.fsync(handle.fileno())
            else:
                # Bytes in hand go straight to the descriptor: a buffered file object per
                # image was a tenth of this function's CPU (issue 16's profile).
                try:
                    _write_all(fd, data or b"")
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    def _create_temp(self, folder: Path, name: str) -> tuple[int, str]:
        """A new hidden file beside ``name`` in ``folder``, open for writing.

        What ``tempfile.mkstemp`` does (``O_EXCL``, no symlink followed) without its
        random names and its ``fchmod``. The file gets the mode ``open()`` would give
        (0o666 less the umask, applied by the kernel), not mkstemp's 0600: renamed into
        place as they were, images, manifests and report.html were readable by their
        owner alone, so a web server, a teammate or a CDN sync job could not read what
        the run published. The name is unique by process id and a counter, the next
        one tried should a killed run's leftover hold it. A system call per image
        fewer than mkstemp and ``fchmod``, on the hottest path of the run.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        while True:
            tmp_name = os.path.join(folder, f".{name}.{os.getpid()}-{next(self._tmp_seq)}.tmp")
            try:
                return os.open(tmp_name, flags, 0o666), tmp_name
            except FileExistsError:
                continue

    async def put(self, relpath: str, data: bytes, content_type: str) -> str:
        target = self._path(relpath)
        try:
            if len(data) > INLINE_WRITE_LIMIT:
                await asyncio.to_thread(self._write_atomic, target, data, None)
            else:
                self._write_atomic(target, data, None)
        except OSError as exc:
            raise write_failed(target, exc) from None
        return str(target)

    async def put_file(self, relpath: str, local_path: Path, content_type: str) -> str:
        target = self._path(relpath)
        try:
            await asyncio.to_thread(self._write_atomic, target, None, Path(local_path))
        except OSError as exc:
            if exc.filename is not None and Path(exc.filename) == Path(local_path):
                raise  # the source could not be read: not a problem of the output
            raise write_failed(target, exc) from None
        return str(target)

    async def get(self, relpath: str) -> bytes | None:
        target = self._path(relpath)
        try:
            size = target.stat().st_size
        except FileNotFoundError:
            return None
        if size > INLINE_WRITE_LIMIT:
            return await asyncio.to_thread(target.read_bytes)
        return target.read_bytes()

    async def exists(self, relpath: str) -> bool:
        return self._path(relpath).is_file()


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``: ``os.write`` may take less than it is given."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_failed(target: Path | str, exc: OSError) -> StorageError:
    """The one-line error for a local write that failed (disk full, read-only, permission).

    A ``StorageError`` stops the run (see ``pipeline.errors``): the message names the file
    and the operating system's reason, and says the rerun collects what was paid for.
    """
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        remedy = "raise the open-file limit (ulimit -n)"
    else:
        remedy = "free space or fix the permissions"
    return StorageError(
        f"cannot write {target}: {reason} (errno {exc.errno}); {remedy}, then run the same "
        "command again: tasks already acknowledged are collected by their task ids, not "
        "paid for again"
    )


#: The hole an output path may hold for the day of the run (``out/nightly/{date}``).
DATE_HOLE = "{date}"


def dated(location: str, when: datetime | None = None) -> str:
    """``{date}`` in an output path becomes the day (UTC, ``YYYY-MM-DD``) of ``when``
    (default: now), so each night of a scheduled catalog writes a folder of its own."""
    if DATE_HOLE not in location:
        return location
    day = (when or datetime.now(UTC)).astimezone(UTC)
    return location.replace(DATE_HOLE, day.strftime("%Y-%m-%d"))


def open_sink(uri: str | Path) -> Sink:
    """Turn ``--out`` into a sink: a local path, a ``file://`` URI or ``s3://bucket/prefix``."""
    if isinstance(uri, Path):
        return LocalSink(uri)
    text = uri.strip()
    if not text:
        raise ConfigError("no output given; expected a folder path (or file:// URI)")
    match = _SCHEME.match(text)
    if match is None:
        return LocalSink(text)
    scheme = match["scheme"].lower()
    if scheme == "file":
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(
                f"output {text!r}: file:// URIs must name a local path (file:///path), "
                f"not host {parsed.netloc!r}"
            )
        return LocalSink(unquote(parsed.path))
    if scheme == "s3":
        from pipeline.s3 import S3Sink  # boto3 loads only for S3 outputs

        return S3Sink(text)
    raise ConfigError(
        f"output {text!r}: unsupported scheme {scheme!r}; expected a local folder, a file:// "
        "URI or s3://bucket/prefix"
    )
