"""The image library: every succeeded image kept under its request fingerprint, across runs.

Most of tonight's catalog is yesterday's. With ``--library URI`` a run looks each row's
fingerprint (``pipeline/fingerprint.py``) up before submitting it: an image the library
already holds is copied into DEST (a hard link on one local disk, a server-side
``copy_object`` on S3) and the row succeeds at no cost, with ``reused_from`` naming the
library object; every image the run pays for is added to the library.

Layout under the library's URI (a local folder or ``s3://bucket/prefix``)::

    objects/<fp[:2]>/<fp>.<png|jpg>   the image (the truth)
    objects/<fp[:2]>/<fp>.json        its record: format, bytes, sha256, width, height,
                                      the task id and cost that produced it
    index/<fp[0]>/<stamp>-<uuid>.parquet   index segments, sorted by fingerprint

A HEAD per fingerprint would take hours at a million rows, so a run reads the index once
(16 prefixes, a few segments each) into sorted arrays and looks fingerprints up in memory.
Each run appends its new entries as segments of its own (unique names: two runs never
write the same index object), at most ``FLUSH_ENTRIES`` at a time, and at its end compacts a
prefix that has more than ``COMPACT_AFTER_SEGMENTS`` segments into one.

The objects are the truth, the index a cache of them:

- an index entry whose image is gone is a miss (the copy finds nothing): the row is
  submitted, and compaction drops the entry;
- an image with its record but no index entry (a run killed before it wrote its segment)
  is added back by compaction, which lists the prefix's objects.

Writers never corrupt each other: an image is created only if absent (``os.link`` of a
finished temp file locally, a conditional put on S3), its record only after it, its index
entry only after both; compaction writes the merged segment before deleting the segments
it read, and never one it did not read. Inside one run, rows that share a fingerprint wait
for the first of them (``claim``/``release``) instead of paying again.

Across runs writing one library at once (two shards of a flow, a flow and a run), the
first to make a fingerprint holds its claim, ``claims/<fp[:2]>/<fp>.json``, created only if
absent (``O_EXCL`` locally, a conditional put on S3) and renewed every ``CLAIM_RENEW_S``
while its image is being made. Another run wanting the same fingerprint waits for the
image's record and copies it; when the claim disappears without an image (the maker's row
failed) or lapses (``CLAIM_LEASE_S`` without renewal, by the renewal time the holder wrote;
at once when the holder was a process on this machine that is gone), it makes the image
itself. A run that takes a claim looks for the image and its record once more before
paying (the maker records, then drops its claim, so a maker that finished between the look
and the claim is seen). So two runs pay for one fingerprint once, unless a maker dies and
two waiters take its lapsed claim over at the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import arrow_arrays, dest_lock
from pipeline.contract import FORMAT_EXT, FORMAT_MIME
from pipeline.errors import KleinError
from pipeline.fingerprint import fingerprint, model_name
from pipeline.rows import ImageRequest
from pipeline.storage import DATE_HOLE, Sink, open_sink

log = logging.getLogger(__name__)

OBJECTS: Final = "objects"
INDEX: Final = "index"
CLAIMS: Final = "claims"
#: Seconds a fingerprint's claim outlives a maker that stopped renewing it (a killed run).
CLAIM_LEASE_S: Final = 60.0
#: How often a maker renews the claims it holds.
CLAIM_RENEW_S: Final = 15.0
#: How often a run waiting for another run's image looks for it.
CLAIM_WAIT_S: Final = 1.0
#: New entries kept in memory before they are written as index segments (or after this
#: many seconds, whichever comes first).
FLUSH_ENTRIES: Final = 2000
FLUSH_SECONDS: Final = 60.0
#: A prefix with more segments than this is compacted at the end of a run.
COMPACT_AFTER_SEGMENTS: Final = 8
#: Index prefixes: the first hex digit of the fingerprint.
PREFIXES: Final = "0123456789abcdef"
#: Segment reads in flight while loading the index.
_READ_CONCURRENCY: Final = 16
#: The folder a ``{date}`` output's library defaults to, beside the dated folders.
DEFAULT_FOLDER: Final = "library"

INDEX_SCHEMA: Final = pa.schema(
    [
        ("fingerprint", pa.string()),
        ("format", pa.string()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("task_id", pa.string()),
        ("cost_credits", pa.float64()),
        ("created_at", pa.float64()),
    ]
)
_FORMATS: Final = ("png", "jpeg")


class LibraryError(KleinError):
    """The library cannot be used (unreadable index, bad URI)."""


def default_library(out: str) -> str | None:
    """The library of an output template: ``{date}`` in it puts the library in a
    ``library`` folder beside the dated folders, so every night shares one; None otherwise.

    ``s3://images/nightly/{date}`` -> ``s3://images/nightly/library``;
    ``out/{date}/catalog`` -> ``out/library``.
    """
    if DATE_HOLE not in out:
        return None
    before = out[: out.index(DATE_HOLE)]
    parent = before.rsplit("/", 1)[0] if "/" in before else ""
    if parent.endswith(":/"):  # s3://{date}: the bucket itself is dated; nothing above it
        return None
    return posixpath.join(parent, DEFAULT_FOLDER) if parent else DEFAULT_FOLDER


def library_for(out: str | None, library: str | None, *, no_library: bool = False) -> str | None:
    """The library a run uses: none with ``no_library``, else the one given, else the
    default of a ``{date}`` output (``default_library``), else none."""
    if no_library:
        return None
    if library:
        return library
    return default_library(out) if out else None


def object_relpath(fp: str, fmt: str) -> str:
    return f"{OBJECTS}/{fp[:2]}/{fp}.{FORMAT_EXT[fmt]}"


def record_relpath(fp: str) -> str:
    return f"{OBJECTS}/{fp[:2]}/{fp}.json"


def claim_relpath(fp: str) -> str:
    return f"{CLAIMS}/{fp[:2]}/{fp}.json"


def thumbnail_relpath(fp: str) -> str:
    """report.html's thumbnail of the image (local libraries only; a cache, not the truth)."""
    return f"{OBJECTS}/{fp[:2]}/{fp}.thumb.jpg"


@dataclass(frozen=True, slots=True)
class Entry:
    """One image in the library: what its record and index entry say."""

    fingerprint: str
    format: str
    bytes: int
    sha256: str
    width: int
    height: int
    task_id: str | None = None
    cost_credits: float = 0.0
    created_at: float = 0.0

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Entry:
        fields = json.loads(data)
        return cls(**{name: fields.get(name) for name in cls.__dataclass_fields__})


#: The index columns a lookup needs (a reused row's outcome); the rest stays on disk.
_LOOKUP_COLUMNS: Final = ("fingerprint", "format", "bytes", "sha256", "width", "height")
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10, dtype=np.uint8)
_HEX[np.frombuffer(b"abcdef", dtype=np.uint8)] = np.arange(10, 16, dtype=np.uint8)
_HEX[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def _digests(column: pa.ChunkedArray) -> np.ndarray:
    """64-character hex strings as 32 raw bytes each (``S32``), without a Python object per
    value: a million of them as Python ``bytes`` took 700 MB at the peak of a load."""
    array = column.combine_chunks()
    n = len(array)
    if n == 0:
        return np.empty(0, dtype="S32")
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32, count=n + 1, offset=array.offset * 4)
    if array.null_count or not np.all(np.diff(offsets) == 64):
        raise ValueError("index holds a value that is not a 64-character hex digest")
    data = np.frombuffer(buffers[2], dtype=np.uint8)
    nibbles = _HEX[data[offsets[0] : offsets[0] + 64 * n].reshape(n, 64)]
    if (nibbles == 255).any():
        raise ValueError("index holds a value that is not a 64-character hex digest")
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return np.ascontiguousarray(packed).view("S32").reshape(n)


@dataclass(slots=True)
class _Piece:
    """One segment's lookup columns as numpy arrays (its Arrow table can go)."""

    keys: np.ndarray
    sha: np.ndarray
    size: np.ndarray
    width: np.ndarray
    height: np.ndarray
    fmt: np.ndarray

    @classmethod
    def of(cls, table: pa.Table) -> _Piece:
        import pyarrow.compute as pc

        return cls(
            keys=_digests(table.column("fingerprint")),
            sha=_digests(table.column("sha256")),
            size=table.column("bytes").to_numpy().astype(np.int64),
            width=table.column("width").to_numpy().astype(np.int32),
            height=table.column("height").to_numpy().astype(np.int32),
            # _FORMATS order: 0 png, 1 jpeg
            fmt=pc.equal(table.column("format"), "jpeg").to_numpy().astype(np.uint8),
        )


class _Index:
    """Fingerprints in sorted numpy arrays (32 raw bytes each), with the columns a reused
    row's outcome needs: 81 bytes per entry, 81 MB for a million images."""

    def __init__(self, pieces: list[_Piece]) -> None:
        def joined(name: str, dtype: str) -> np.ndarray:
            parts = [getattr(piece, name) for piece in pieces]
            return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

        keys = joined("keys", "S32")
        order = np.argsort(keys, kind="stable")
        # Segments overlap (a compaction beside a run's own segment): one entry per image.
        ordered = keys[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = ordered[1:] != ordered[:-1]
        order = order[first]
        del ordered, first
        self.keys = keys[order]
        del keys
        self.sha = joined("sha", "S32")[order]
        self.size = joined("size", "int64")[order]
        self.width = joined("width", "int32")[order]
        self.height = joined("height", "int32")[order]
        self.fmt = joined("fmt", "uint8")[order]
        #: Positions whose object turned out to be missing: misses from now on.
        self.gone: set[int] = set()

    def __len__(self) -> int:
        return len(self.keys) - len(self.gone)

    def find(self, fp: str) -> int | None:
        if not len(self.keys):
            return None
        key = bytes.fromhex(fp)
        at = int(np.searchsorted(self.keys, key))
        # numpy's "S" items drop trailing NUL bytes when read: pad back before comparing
        # (one fingerprint in 256 ends with a zero byte).
        found = at < len(self.keys) and bytes(self.keys[at]).ljust(32, b"\0") == key
        if found and at not in self.gone:
            return at
        return None

    def entry(self, at: int, fp: str) -> Entry:
        return Entry(
            fingerprint=fp,
            format=_FORMATS[int(self.fmt[at])],
            bytes=int(self.size[at]),
            sha256=bytes(self.sha[at]).ljust(32, b"\0").hex(),
            width=int(self.width[at]),
            height=int(self.height[at]),
        )


class Library:
    """An open library: look fingerprints up, copy hits into an output, add new images.

    Open with ``await Library.open(uri, dialect=..., model=...)``; ``close()`` writes the
    run's remaining index entries and compacts crowded prefixes.
    """

    def __init__(self, sink: Sink, *, dialect: str, model: str | None = None) -> None:
        self.sink = sink
        self.uri = sink.uri(OBJECTS).rsplit("/", 1)[0]
        self.dialect = dialect
        self.model = model_name(dialect, model)
        self._index = _Index([])
        #: Entries this run added (or learned while storing), by fingerprint.
        self._fresh: dict[str, Entry] = {}
        self._pending: list[Entry] = []
        self._pending_since = 0.0
        self._producing: dict[str, asyncio.Event] = {}
        #: Fingerprints whose shared claim this run holds (``claim_shared``), and its holder.
        self._claimed: set[str] = set()
        self._holder = dest_lock._holder("library claim")
        self._renewer: asyncio.Task[None] | None = None
        self._unclaiming: set[asyncio.Task[None]] = set()
        self._flush_lock = asyncio.Lock()
        self._segments: dict[str, list[str]] = {}
        self.reused = 0
        self.stored = 0

    def __repr__(self) -> str:
        return f"Library({self.uri!r}, {len(self)} images)"

    def __len__(self) -> int:
        return len(self._index) + len(self._fresh)

    @classmethod
    async def open(cls, uri: str, *, dialect: str, model: str | None = None) -> Library:
        """Open (creating a local folder if needed) and read the index."""
        library = cls(open_sink(uri), dialect=dialect, model=model)
        await library.load()
        return library

    # --- reading the index -------------------------------------------------------------------

    async def _list(self, relprefix: str) -> list[str]:
        """Relative paths of the files below ``relprefix`` (temp files of writes excluded)."""
        local = self.sink.local_path(relprefix)
        if local is None:
            listed: list[str] = await self.sink.list(relprefix)  # type: ignore[attr-defined]
            return sorted(listed)

        def walk() -> list[str]:
            if not local.is_dir():
                return []
            return sorted(
                f"{relprefix}/{path.relative_to(local).as_posix()}"
                for path in local.rglob("*")
                if path.is_file() and not path.name.startswith(".")
            )

        return await asyncio.to_thread(walk)

    async def _segment_names(self) -> dict[str, list[str]]:
        by_prefix: dict[str, list[str]] = {}
        for rel in await self._list(INDEX):
            parts = rel.split("/")
            if len(parts) == 3 and parts[1] in PREFIXES and parts[2].endswith(".parquet"):
                by_prefix.setdefault(parts[1], []).append(rel)
        return by_prefix

    async def _read_segment(self, rel: str, columns: tuple[str, ...]) -> pa.Table | None:
        data = await self.sink.get(rel)
        if data is None:
            return None  # compacted away by another run since the listing
        schema = pa.schema([INDEX_SCHEMA.field(name) for name in columns])
        try:
            return pq.read_table(io.BytesIO(data), columns=list(columns)).cast(schema)
        except (pa.ArrowException, KeyError, ValueError) as exc:
            log.warning("library index segment %s is unreadable (%s): skipped", rel, exc)
            return schema.empty_table()

    async def _read_segments(
        self, names: list[str], columns: tuple[str, ...] = tuple(INDEX_SCHEMA.names)
    ) -> tuple[list[pa.Table], list[str]]:
        """The segments that could be read, and the names of those that were gone."""
        gate = asyncio.Semaphore(_READ_CONCURRENCY)

        async def one(rel: str) -> pa.Table | None:
            async with gate:
                return await self._read_segment(rel, columns)

        tables = await asyncio.gather(*(one(rel) for rel in names))
        gone = [rel for rel, table in zip(names, tables, strict=True) if table is None]
        return [t for t in tables if t is not None], gone

    async def _read_pieces(self, names: list[str]) -> tuple[list[_Piece], list[str]]:
        """Like ``_read_segments`` for lookups: each segment's columns turned into numpy
        arrays as soon as it arrives, so no more than a few Arrow tables live at once."""
        gate = asyncio.Semaphore(_READ_CONCURRENCY)

        async def one(rel: str) -> _Piece | None:
            async with gate:
                table = await self._read_segment(rel, _LOOKUP_COLUMNS)
                if table is None:
                    return None
                try:
                    return _Piece.of(table)
                except (ValueError, pa.ArrowException) as exc:
                    log.warning("library index segment %s is unreadable (%s): skipped", rel, exc)
                    return _Piece.of(table.schema.empty_table())

        pieces = await asyncio.gather(*(one(rel) for rel in names))
        gone = [rel for rel, piece in zip(names, pieces, strict=True) if piece is None]
        return [p for p in pieces if p is not None], gone

    async def load(self) -> None:
        """Read every index segment into memory (again, when another run compacted some
        between the listing and the reads: its merged segment holds their entries)."""
        for _ in range(5):
            self._segments = await self._segment_names()
            names = [rel for rels in self._segments.values() for rel in rels]
            pieces, gone = await self._read_pieces(names)
            if not gone:
                break
        self._index = _Index(pieces)
        log.info("library %s: %d images indexed", self.uri, len(self._index))

    # --- looking up and reusing --------------------------------------------------------------

    def fingerprint(self, request: ImageRequest, reference_digests: tuple[str, ...]) -> str:
        return fingerprint(request, reference_digests, dialect=self.dialect, model=self.model)

    def lookup(self, fp: str) -> Entry | None:
        fresh = self._fresh.get(fp)
        if fresh is not None:
            return fresh
        at = self._index.find(fp)
        return self._index.entry(at, fp) if at is not None else None

    def _forget(self, fp: str) -> None:
        self._fresh.pop(fp, None)
        at = self._index.find(fp)
        if at is not None:
            self._index.gone.add(at)

    def location(self, entry: Entry) -> str:
        """The library object's address, as ``reused_from`` records it."""
        # Not ``sink.uri``: a local sink resolves symlinks on every call (a dozen lstat
        # calls), and a library's own paths are hex digits, nothing to resolve.
        return f"{self.uri}/{object_relpath(entry.fingerprint, entry.format)}"

    async def reuse(self, fp: str, dest: Sink, relpath: str) -> tuple[Entry, str] | None:
        """Copy the library's image for ``fp`` to ``relpath`` in ``dest``; returns its entry
        and the copy's URI, or None when the library has none.

        The objects are the truth: an indexed image that is gone is a miss, and before a
        miss is paid for, the image's record is looked for (one GET, or a file read): another
        run may have added it since this one read the index, or a killed run left it
        unindexed. Found that way, it is copied and indexed by this run.
        """
        entry = self.lookup(fp)
        indexed = entry is not None
        if entry is None:
            entry = await self._recorded(fp)
            if entry is None:
                return None
        source = object_relpath(fp, entry.format)
        copied = await copy_object(self.sink, source, dest, relpath, FORMAT_MIME[entry.format])
        if copied is None:
            if indexed:
                log.warning(
                    "library %s lists %s but its image is gone: generating it", self.uri, fp
                )
                self._forget(fp)
            return None
        if not indexed:
            self._fresh[fp] = entry
            await self._add_pending(entry)
        self.reused += 1
        return entry, copied

    async def _recorded(self, fp: str) -> Entry | None:
        """The record of an image the index does not list, if there is one."""
        data = await self.sink.get(record_relpath(fp))
        if data is None:
            return None
        try:
            entry = Entry.from_json(data)
        except (ValueError, TypeError):
            return None
        if entry.fingerprint != fp or entry.format not in FORMAT_MIME:
            return None
        return entry

    async def _made(self, fp: str) -> bool:
        """Whether ``fp`` has its record and its image: a record whose image was deleted
        behind the library's back is made again, not waited for."""
        entry = await self._recorded(fp)
        return entry is not None and await self.sink.exists(object_relpath(fp, entry.format))

    async def reuse_thumbnail(self, fp: str, dest: Sink, relpath: str) -> bool:
        """Link the report thumbnail of ``fp`` into a local ``dest``, if the library (local
        too) has one; False otherwise (report.html then decodes the image)."""
        source = self.sink.local_path(thumbnail_relpath(fp))
        target = dest.local_path(relpath)
        if source is None or target is None:
            return False
        return bool(_link_or_copy(source, target, link_only=True))

    # --- one producer per fingerprint in a run -----------------------------------------------

    def claim(self, fp: str) -> asyncio.Event | None:
        """None: the caller now makes ``fp`` (and must ``release`` it). Otherwise an event
        set when the row making it ends: look up again then (it may have failed)."""
        waiting = self._producing.get(fp)
        if waiting is not None:
            return waiting
        self._producing[fp] = asyncio.Event()
        return None

    def release(self, fp: str) -> None:
        """The row making ``fp`` ended: waiters here look again, the shared claim goes."""
        event = self._producing.pop(fp, None)
        if event is not None:
            event.set()
        if fp in self._claimed:
            self._claimed.discard(fp)
            task = asyncio.get_running_loop().create_task(self._unclaim(fp))
            self._unclaiming.add(task)
            task.add_done_callback(self._unclaiming.discard)

    # --- one producer per fingerprint across runs --------------------------------------------

    async def claim_shared(self, fp: str) -> bool:
        """Take ``fp``'s claim in the library (the caller holds ``claim(fp)`` here): True,
        this run makes the image; False once another run made it (copy it from the library).

        While another run holds the claim, this waits for that run's image record; a claim
        that disappears without one (its row failed) or lapses is taken here.
        """
        while True:
            if await self._create_claim(fp):
                # The maker before this claim records its image, then drops its claim: had
                # that happened between this run's look (the engine's lookup, or the loop
                # below) and its claim, the image is recorded now. Paying for it again is
                # what the claim exists to prevent.
                if await self._made(fp):
                    await self._delete([claim_relpath(fp)])
                    return False
                self._claimed.add(fp)
                if self._renewer is None or self._renewer.done():
                    self._renewer = asyncio.get_running_loop().create_task(self._renew())
                return True
            while True:
                if await self._made(fp):
                    return False
                holder = await self._claim_holder(fp)
                if holder is None:
                    break  # released without an image: try to make it here
                if self._lapsed(holder):
                    log.warning(
                        "library %s: the claim on %s by %s lapsed; making it here",
                        self.uri,
                        fp,
                        dest_lock.describe(holder),
                    )
                    await self._delete([claim_relpath(fp)])
                    break
                await asyncio.sleep(CLAIM_WAIT_S)

    def _claim_body(self) -> bytes:
        return json.dumps(self._holder | {"renewed_at": time.time()}).encode("utf-8")

    async def _create_claim(self, fp: str) -> bool:
        rel = claim_relpath(fp)
        path = self.sink.local_path(rel)
        if path is None:
            return bool(
                await self.sink.put_if_absent(rel, self._claim_body(), "application/json")  # type: ignore[attr-defined]
            )
        # A finished temp file linked into place: a reader never sees a claim half-written.
        return await asyncio.to_thread(_link_or_write_new, path, None, self._claim_body())

    async def _claim_holder(self, fp: str) -> dict[str, Any] | None:
        data = await self.sink.get(claim_relpath(fp))
        if data is None:
            return None
        try:
            holder = json.loads(data)
        except ValueError:
            holder = None
        return holder if isinstance(holder, dict) else {"renewed_at": 0.0}

    @staticmethod
    def _lapsed(holder: dict[str, Any]) -> bool:
        try:
            renewed = float(holder.get("renewed_at", 0.0))
        except (TypeError, ValueError):
            renewed = 0.0
        return time.time() - renewed > CLAIM_LEASE_S or dest_lock._dead_here(holder)

    async def _renew(self) -> None:
        """Rewrite every claim held, every ``CLAIM_RENEW_S``, while any is held."""
        while self._claimed:
            await asyncio.sleep(CLAIM_RENEW_S)
            for fp in list(self._claimed):
                try:
                    await self.sink.put(claim_relpath(fp), self._claim_body(), "application/json")
                except (KleinError, OSError) as exc:
                    log.warning("library %s: claim on %s not renewed (%s)", self.uri, fp, exc)

    async def _unclaim(self, fp: str) -> None:
        try:
            await self._delete([claim_relpath(fp)])
        except (KleinError, OSError) as exc:  # it lapses in CLAIM_LEASE_S
            log.warning("library %s: claim on %s not removed (%s)", self.uri, fp, exc)

    # --- adding ------------------------------------------------------------------------------

    async def store(
        self,
        entry: Entry,
        data: bytes,
        dest: Sink,
        relpath: str,
        thumbnail: bytes | None = None,
    ) -> None:
        """Add an image the run made (``data``, also stored at ``relpath`` in ``dest``).

        The image first, only if absent (a concurrent run may have added the same
        fingerprint; its image stays, and so does its record), then the record, then the
        index entry (in memory; written by ``flush``). A local library also keeps the
        report's ``thumbnail`` of it, so a night of copies need not decode every image
        again for report.html.
        """
        fp = entry.fingerprint
        target = object_relpath(fp, entry.format)
        created = await self._put_if_absent(target, data, dest, relpath, entry.format)
        if created and thumbnail is not None and self.sink.local_path(OBJECTS) is not None:
            await self.sink.put(thumbnail_relpath(fp), thumbnail, "image/jpeg")
        record = record_relpath(fp)
        if not created:
            existing = await self.sink.get(record)
            if existing is not None:
                with contextlib.suppress(ValueError, TypeError):
                    entry = Entry.from_json(existing)
        if created or not await self.sink.exists(record):
            await self.sink.put(record, entry.to_json(), "application/json")
        self._fresh[fp] = entry
        self.stored += 1
        await self._add_pending(entry)

    async def _add_pending(self, entry: Entry) -> None:
        """Queue an index entry; written with the others every ``FLUSH_ENTRIES`` entries or
        ``FLUSH_SECONDS``, so a killed run leaves at most that much unindexed."""
        now = time.monotonic()
        if not self._pending:
            self._pending_since = now
        self._pending.append(entry)
        if len(self._pending) >= FLUSH_ENTRIES or now - self._pending_since >= FLUSH_SECONDS:
            await self.flush()

    async def _put_if_absent(
        self, target: str, data: bytes, dest: Sink, relpath: str, fmt: str
    ) -> bool:
        mine = self.sink.local_path(target)
        if mine is None:
            return bool(
                await self.sink.put_if_absent(target, data, FORMAT_MIME[fmt])  # type: ignore[attr-defined]
            )
        return await asyncio.to_thread(_link_or_write_new, mine, dest.local_path(relpath), data)

    async def flush(self) -> None:
        """Write the entries added so far as index segments, one per prefix, unique names."""
        async with self._flush_lock:
            pending, self._pending = self._pending, []
            by_prefix: dict[str, list[Entry]] = {}
            for entry in pending:
                by_prefix.setdefault(entry.fingerprint[0], []).append(entry)
            for prefix, entries in sorted(by_prefix.items()):
                rel = f"{INDEX}/{prefix}/{_segment_name()}"
                await self.sink.put(rel, _segment_bytes(entries), "application/vnd.apache.parquet")
                self._segments.setdefault(prefix, []).append(rel)

    async def close(self) -> None:
        """Write what is pending and compact the prefixes this run left crowded."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for fp in list(self._claimed):  # rows stopped mid-way: their claims go now
            self.release(fp)
        if self._unclaiming:
            await asyncio.gather(*self._unclaiming, return_exceptions=True)
        await self.flush()
        crowded = [p for p, rels in self._segments.items() if len(rels) > COMPACT_AFTER_SEGMENTS]
        if crowded:
            listed = await self._segment_names()
            for prefix in crowded:
                if len(listed.get(prefix, [])) > COMPACT_AFTER_SEGMENTS:
                    await self.compact(prefix, listed[prefix])
        self.sink.close()

    # --- compaction and reconciliation -------------------------------------------------------

    async def compact(self, prefix: str, segments: list[str] | None = None) -> int:
        """Merge a prefix's segments into one, reconciled with its objects; returns entries.

        Entries whose image is gone are dropped; images with a record but no entry are added.
        The merged segment is written before the segments it replaces are deleted, and only
        segments read here are deleted, so a concurrent run's new segment always survives.
        """
        if segments is None:
            segments = (await self._segment_names()).get(prefix, [])
        tables, gone = await self._read_segments(segments)
        read = [rel for rel in segments if rel not in gone]
        merged: dict[str, dict[str, Any]] = {}
        for table in tables:
            for row in table.to_pylist():
                merged.setdefault(row["fingerprint"], row)
        images: dict[str, str] = {}
        records: set[str] = set()
        for sub in PREFIXES:
            for rel in await self._list(f"{OBJECTS}/{prefix}{sub}"):
                name = rel.rsplit("/", 1)[-1]
                fp, _, ext = name.partition(".")
                if ext == "json":
                    records.add(fp)
                elif ext in FORMAT_EXT.values():
                    images[fp] = ext
        for fp in [fp for fp, row in merged.items() if fp not in images]:
            del merged[fp]
        for fp in sorted(records - merged.keys()):
            if fp not in images:
                continue
            data = await self.sink.get(record_relpath(fp))
            if data is None:
                continue
            try:
                merged[fp] = asdict(Entry.from_json(data))
            except (ValueError, TypeError) as exc:
                log.warning("library record %s is unreadable (%s): skipped", fp, exc)
        entries = [Entry(**merged[fp]) for fp in sorted(merged)]
        rel = f"{INDEX}/{prefix}/{_segment_name()}"
        await self.sink.put(rel, _segment_bytes(entries), "application/vnd.apache.parquet")
        await self._delete(read)
        self._segments[prefix] = [rel]
        return len(entries)

    async def _delete(self, relpaths: list[str]) -> None:
        if not relpaths:
            return
        if self.sink.local_path(relpaths[0]) is None:
            await self.sink.delete(relpaths)  # type: ignore[attr-defined]
            return
        for rel in relpaths:
            path = self.sink.local_path(rel)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _segment_name() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{uuid.uuid4().hex}.parquet"


def _segment_bytes(entries: list[Entry]) -> bytes:
    ordered = sorted(entries, key=lambda e: e.fingerprint)
    columns = {name: [getattr(e, name) for e in ordered] for name in INDEX_SCHEMA.names}
    table = arrow_arrays.table(columns, INDEX_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _link_or_write_new(target: Path, source: Path | None, data: bytes) -> bool:
    """Create ``target`` only if absent: a hard link of ``source`` (the output's copy, on
    the same disk), else a finished temp file linked into place. False if it existed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        try:
            os.link(source, target)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOENT):
                raise
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _link_or_copy(source: Path, target: Path, *, link_only: bool = False) -> bool | None:
    """Put ``source`` at ``target`` atomically: a hard link, or a copy across disks
    (``link_only``: None instead of copying). False when ``source`` does not exist."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        try:
            os.link(source, tmp)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            if link_only:
                return None
            try:
                shutil.copyfile(source, tmp)
            except FileNotFoundError:
                return False
        os.replace(tmp, target)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


async def copy_object(
    source: Sink, src_rel: str, dest: Sink, dest_rel: str, mime: str
) -> str | None:
    """Copy one object between sinks the cheapest way: a hard link on one disk, a
    server-side copy within S3, else read and write. Returns the copy's URI, None when the
    source is missing."""
    src_path, dest_path = source.local_path(src_rel), dest.local_path(dest_rel)
    if src_path is not None and dest_path is not None:
        # A link is two quick system calls: in the loop, not a thread hop per image (which,
        # on a busy machine, made a night of copies wait on thread scheduling).
        linked = _link_or_copy(src_path, dest_path, link_only=True)
        if linked is None:  # another disk: copy the bytes in a thread
            linked = await asyncio.to_thread(_link_or_copy, src_path, dest_path)
        return str(dest_path) if linked else None
    if src_path is None and dest_path is None and hasattr(dest, "copy_in"):
        copied = await dest.copy_in(dest_rel, source.uri(src_rel))
        return dest.uri(dest_rel) if copied else None
    data = await source.get(src_rel)
    if data is None:
        return None
    return await dest.put(dest_rel, data, mime)
