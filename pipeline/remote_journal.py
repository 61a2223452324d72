"""The run's journal when the output is in S3: a local SQLite ledger, mirrored to the output.

SQLite needs a local file, and a Prefect worker or a spot instance may vanish with its
disk. So the ledger lives in a work dir on this machine (keyed by the output URI) and is
copied to ``<out>/.klein/ledger.sqlite`` as a consistent snapshot (SQLite's backup API,
from its own connection, so the run never waits for it) every few seconds and at the end.
Meanwhile every outcome and rejection the run records goes, within a few seconds, into an
append-only part ``<out>/.klein/parts/<run id>/part-NNNNNN.parquet`` (the output manifest's
fixed columns), so a crash loses at most a few seconds of records, and the data team can
watch a long run land. When the final ``manifest.parquet`` is stored the parts are removed.

Which ledger a rerun trusts: after each snapshot the uploader stores a new generation id in
``<out>/.klein/ledger.generation`` and in ``snapshot.generation`` in its work dir. If the output's
snapshot has the generation this work dir last uploaded, the local ledger is the same or
newer and is used; otherwise (another machine ran since, or this machine never ran into
this output) the snapshot is downloaded. No work dir at all is the "resume from S3 alone"
case. Acks recorded after the last snapshot would be lost with the machine (their tasks
submitted again on resume), so each second's acks also go into a small object
``<out>/.klein/acks/<run id>/acks-NNNNNN.jsonl`` (task ids and poll URLs sealed as in the
ledger), and whichever ledger a run opens takes in the acks it lacks: a resume elsewhere
polls those tasks. Only acks of the last second before a crash are submitted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

import pyarrow.parquet as pq

from pipeline.contract import RowStatus
from pipeline.errors import ConfigError
from pipeline.ledger import LEDGER_RELPATH, Ledger, SealedAck
from pipeline.output_manifest import PARQUET_CONTENT_TYPE, outcomes_table
from pipeline.rows import Outcome, Rejection

log = logging.getLogger(__name__)

#: Root of the per-output work dirs (default: ``$XDG_CACHE_HOME/klein-batch/outputs``).
WORK_DIR_ENV: Final = "KLEIN_BATCH_WORK_DIR"
#: Seconds between syncs to the output (default 5).
SYNC_INTERVAL_ENV: Final = "KLEIN_BATCH_SYNC_S"
DEFAULT_SYNC_INTERVAL_S: Final = 5.0
#: Seconds between uploads of the acknowledgements recorded since the last one (default 1).
ACK_INTERVAL_ENV: Final = "KLEIN_BATCH_ACK_SYNC_S"
DEFAULT_ACK_INTERVAL_S: Final = 1.0
ACKS_RELDIR: Final = ".klein/acks"
#: A snapshot upload may take at most this share of the time (large ledgers sync less often).
_SNAPSHOT_DUTY: Final = 0.25
PARTS_RELDIR: Final = ".klein/parts"
#: Which machine and process last opened the output (written first: the write probe).
WRITER_RELPATH: Final = ".klein/writer.json"
_GENERATION_FILE: Final = "snapshot.generation"
GENERATION_RELPATH: Final = ".klein/ledger.generation"
_SQLITE_CONTENT_TYPE: Final = "application/vnd.sqlite3"


@runtime_checkable
class RemoteStore(Protocol):
    """What the journal needs from a remote sink beyond ``Sink`` (``S3Sink`` has it all)."""

    def uri(self, relpath: str) -> str: ...

    async def put(self, relpath: str, data: bytes, content_type: str) -> str: ...

    async def put_file(self, relpath: str, local_path: Path, content_type: str) -> str: ...

    async def get(self, relpath: str) -> bytes | None: ...

    async def exists(self, relpath: str) -> bool: ...

    async def download(self, relpath: str, target: Path) -> None: ...

    async def list(self, relprefix: str) -> list[str]: ...

    async def delete(self, relpaths: list[str]) -> None: ...


def work_dir_for(uri: str) -> Path:
    """This machine's work dir for an output: stable per URI, outside the output itself."""
    root = os.environ.get(WORK_DIR_ENV, "").strip()
    if root:
        base = Path(root).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME", "").strip()
        base = (Path(cache) if cache else Path.home() / ".cache") / "klein-batch" / "outputs"
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:20]
    return base / digest


def _sync_interval(
    name: str = SYNC_INTERVAL_ENV, default: float = DEFAULT_SYNC_INTERVAL_S
) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 3600:
        raise ConfigError(f"${name} {raw!r} is not allowed; expected seconds from 0.05 to 3600")
    return value


class NotingLedger(Ledger):
    """A ledger that also keeps what it records, for the next part of the partial manifest."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, readonly: bool) -> None:
        super().__init__(conn, path, readonly=readonly)
        self.notes: list[Outcome] = []
        #: Acknowledgements since the last upload of them (``RemoteJournal._write_acks``).
        self.acks: list[SealedAck] = []

    def _acked(self, ack: SealedAck) -> None:
        self.acks.append(ack)

    def record_outcome(self, outcome: Outcome) -> None:
        super().record_outcome(outcome)
        self.notes.append(outcome)

    def record_rejections(self, rejections: Sequence[Rejection]) -> None:
        super().record_rejections(rejections)
        for rejection in rejections:
            extra: dict[str, object] = {}
            if rejection.prompt is not None:
                extra["prompt"] = rejection.prompt
            self.notes.append(
                Outcome(
                    index=rejection.index,
                    key=rejection.key or "",
                    status=RowStatus.REJECTED,
                    reason=rejection.reason,
                    extra=extra,
                )
            )

    def take_notes(self) -> list[Outcome]:
        notes, self.notes = self.notes, []
        return notes


class RemoteJournal:
    """Keeps one run's ledger in a local work dir and mirrors it to an S3 output."""

    def __init__(
        self,
        sink: RemoteStore,
        work_dir: Path,
        *,
        interval_s: float,
        ack_interval_s: float = DEFAULT_ACK_INTERVAL_S,
    ) -> None:
        self.sink = sink
        self.work_dir = work_dir
        self.ledger_path = work_dir / "ledger.sqlite"
        self.interval_s = interval_s
        self.ack_interval_s = ack_interval_s
        #: Files of acknowledgements uploaded by this run, and adopted from others on open.
        self.ack_files = 0
        self.adopted_acks = 0
        self._acker: asyncio.Task[None] | None = None
        self._ack_lock = asyncio.Lock()
        #: Where the ledger came from: "remote" (downloaded), "local" or "new".
        self.source = "new"
        self.snapshots = 0
        self.parts = 0
        self._ledger: NotingLedger | None = None
        self._run_id = "run"
        self._ticker: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._next_snapshot = 0.0

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, sink: object, *, work_dir: Path | None = None, interval_s: float | None = None
    ) -> RemoteJournal:
        """Pick the freshest ledger for ``sink`` (local work dir or the output's snapshot)."""
        if not isinstance(sink, RemoteStore):
            raise ConfigError(
                f"output {sink!r} is neither a local folder nor an S3 location; the run "
                "journal needs one of them"
            )
        journal = cls(
            sink,
            work_dir or work_dir_for(sink.uri(".klein")),
            interval_s=interval_s if interval_s is not None else _sync_interval(),
            ack_interval_s=_sync_interval(ACK_INTERVAL_ENV, DEFAULT_ACK_INTERVAL_S),
        )
        await journal._restore()
        await journal._adopt_acks()
        return journal

    async def _restore(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "output.txt").write_text(self.sink.uri(".klein") + "\n", encoding="utf-8")
        # Also the write probe: a wrong bucket or missing permission stops the run here,
        # before any credit is spent on images that could not be stored.
        writer = {"host": socket.gethostname(), "pid": os.getpid(), "opened_at": time.time()}
        await self.sink.put(WRITER_RELPATH, json.dumps(writer).encode(), "application/json")
        remote = await self.sink.exists(LEDGER_RELPATH)
        local = self.ledger_path.is_file()
        if not remote:
            if local and self._local_generation() is not None:
                # This work dir mirrored its ledger to the output before, yet the output holds
                # no snapshot now: it was emptied (or its bucket recreated) since, and its
                # images went with it. Trusting the local ledger would mark rows done whose
                # images no longer exist, so it is set aside and the output starts afresh.
                # (A run that crashed before its first snapshot has no generation: kept.)
                aside = self._set_aside()
                log.warning(
                    "%s holds no run journal although this machine wrote one there: the "
                    "output was emptied since; starting it afresh (old ledger kept as %s)",
                    self.sink.uri(".klein"),
                    aside,
                )
                local = False
            elif local:
                await self._forget_missing_images()
            self.source = "local" if local else "new"
            return
        stored = await self.sink.get(GENERATION_RELPATH)
        generation = stored.decode("ascii", "replace").strip() if stored else None
        if local and generation and generation == self._local_generation():
            self.source = "local"
            return
        if local:
            log.warning(
                "the ledger in %s is not the output's latest snapshot %s (another machine "
                "ran since, or this one stopped while uploading it); using the output's",
                self.work_dir,
                self.sink.uri(LEDGER_RELPATH),
            )
        # A stale WAL next to a replaced database would be replayed into it: remove both.
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(self.ledger_path) + suffix)
        await self.sink.download(LEDGER_RELPATH, self.ledger_path)
        if generation:
            self._write_generation(generation)
        self.source = "remote"

    async def _forget_missing_images(self) -> None:
        """A ledger this machine never mirrored (its run was killed before the first
        snapshot) may record images the output no longer holds: the output emptied by an
        operator, or a store that lost them. Those rows were kept as done, and the run
        ended with rows "succeeded" whose images did not exist; their outcomes are taken
        back, so the run polls their tasks again (paid once, collected again).
        Bounded: such a ledger holds at most one snapshot interval's work."""
        ledger = Ledger.open(self.ledger_path)
        try:
            stored = ledger.stored_images()
            if not stored:
                return
            base = self.sink.uri(".klein")[: -len(".klein")]
            folders = {uri[len(base) :].rpartition("/")[0] for uri in stored.values()}
            present: set[str] = set()
            for folder in folders:
                present.update(await self.sink.list(folder) if folder else [])
            missing = [key for key, uri in stored.items() if uri[len(base) :] not in present]
            if missing:
                log.warning(
                    "%d images this machine's journal recorded are not in %s (the output was "
                    "emptied since?): their tasks are collected again, not paid again",
                    len(missing),
                    base.rstrip("/"),
                )
                ledger.forget_images(missing)
        finally:
            ledger.close()

    async def _adopt_acks(self) -> None:
        """Tasks acknowledged after the ledger's snapshot, by a machine lost before its next
        one, are in the output's ack files (uploaded every ``ack_interval_s``): taken into
        the ledger, their rows are polled, not paid again. Without them every task acked
        since the last snapshot (up to ``interval_s`` of them) was submitted again."""
        files = sorted(await self.sink.list(ACKS_RELDIR))
        if not files:
            return
        acks: list[SealedAck] = []
        for relpath in files:
            data = await self.sink.get(relpath)
            for line in (data or b"").decode("utf-8", "replace").splitlines():
                with contextlib.suppress(ValueError, TypeError):  # a torn last line
                    acks.append(SealedAck.from_json(line))
        ledger = Ledger.open(self.ledger_path)
        try:
            self.adopted_acks = ledger.adopt_acks(acks)
        finally:
            ledger.close()
        if self.adopted_acks:
            log.warning(
                "%d tasks acknowledged after the journal's last snapshot in %s are polled, "
                "not paid again (their run stopped before its next snapshot)",
                self.adopted_acks,
                self.sink.uri(".klein"),
            )

    def _set_aside(self) -> Path:
        """Move a stale local ledger (and its WAL and generation) out of the run's way."""
        aside = self.work_dir / f"stale-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        aside.mkdir()
        for name in (self.ledger_path.name, *(self.ledger_path.name + x for x in ("-wal", "-shm"))):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.work_dir / name, aside / name)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.work_dir / _GENERATION_FILE, aside / _GENERATION_FILE)
        return aside

    def _local_generation(self) -> str | None:
        try:
            return (self.work_dir / _GENERATION_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            return None

    def _write_generation(self, generation: str) -> None:
        target = self.work_dir / _GENERATION_FILE
        tmp = target.with_suffix(".tmp")
        tmp.write_text(generation + "\n", encoding="utf-8")
        os.replace(tmp, target)

    def open_ledger(self) -> NotingLedger:
        """The run's ledger (in the work dir); ``start`` begins mirroring it."""
        ledger = NotingLedger.open(self.ledger_path)
        assert isinstance(ledger, NotingLedger)
        self._ledger = ledger
        return ledger

    # -- syncing ---------------------------------------------------------------------------

    def start(self, run_id: str) -> None:
        """Mirror the ledger every ``interval_s`` from now on (call after ``start_run``)."""
        self._run_id = run_id
        self._ticker = asyncio.create_task(self._tick(), name="remote-journal")
        self._acker = asyncio.create_task(self._ack_tick(), name="remote-journal-acks")

    async def _ack_tick(self) -> None:
        while True:
            await asyncio.sleep(self.ack_interval_s)
            try:
                await self._write_acks()
            except Exception as exc:  # the next tick tries again, with these acks too
                log.warning("could not store acknowledgements in %s: %s", ACKS_RELDIR, exc)

    async def _write_acks(self) -> None:
        """Upload the acks recorded since the last upload: one small object, well before
        the next snapshot, so another machine resuming this output knows their tasks."""
        ledger = self._ledger
        if ledger is None or not ledger.acks:
            return
        async with self._ack_lock:
            acks, ledger.acks = ledger.acks, []
            body = "".join(ack.to_json() + "\n" for ack in acks).encode("utf-8")
            relpath = f"{ACKS_RELDIR}/{self._run_id}/acks-{self.ack_files + 1:06d}.jsonl"
            try:
                await self.sink.put(relpath, body, "application/x-ndjson")
            except BaseException:
                ledger.acks[:0] = acks
                raise
            self.ack_files += 1

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sync()
            except Exception as exc:  # the run goes on; the next tick tries again
                log.warning(
                    "could not sync the run journal to %s: %s", self.sink.uri(".klein"), exc
                )

    async def sync(self, *, snapshot: bool = False) -> None:
        """Write the records noted since the last sync, and a snapshot when one is due."""
        ledger = self._ledger
        if ledger is None:
            return
        async with self._lock:
            ledger.flush()
            notes = ledger.take_notes()
            if notes:
                try:
                    await self._write_part(notes)
                except BaseException:
                    ledger.notes[:0] = notes  # kept for the next sync
                    raise
            if snapshot or time.monotonic() >= self._next_snapshot:
                await self._snapshot()

    async def _write_part(self, notes: list[Outcome]) -> None:
        fd, name = tempfile.mkstemp(prefix=".part-", suffix=".parquet", dir=self.work_dir)
        os.close(fd)
        tmp = Path(name)
        try:
            table = outcomes_table(notes)
            await asyncio.to_thread(pq.write_table, table, tmp, compression="zstd")
            relpath = f"{PARTS_RELDIR}/{self._run_id}/part-{self.parts + 1:06d}.parquet"
            await self.sink.put_file(relpath, tmp, PARQUET_CONTENT_TYPE)
            self.parts += 1
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    async def _snapshot(self) -> None:
        started = time.monotonic()
        fd, name = tempfile.mkstemp(prefix=".snapshot-", suffix=".sqlite", dir=self.work_dir)
        os.close(fd)
        tmp = Path(name)
        try:
            await asyncio.to_thread(_backup, self.ledger_path, tmp)
            generation = uuid.uuid4().hex
            await self.sink.put_file(LEDGER_RELPATH, tmp, _SQLITE_CONTENT_TYPE)
            # After the snapshot: a crash in between leaves the older id, which only makes
            # this machine trust its own (newer) ledger and others download the snapshot.
            await self.sink.put(GENERATION_RELPATH, generation.encode(), "text/plain")
            self._write_generation(generation)
            self.snapshots += 1
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        took = time.monotonic() - started
        self._next_snapshot = time.monotonic() + max(self.interval_s, took / _SNAPSHOT_DUTY)

    async def close(self, *, published: bool) -> None:
        """Stop mirroring, write the last records and snapshot; tidy parts once published.

        ``published``: the final ``manifest.parquet`` was stored, so the parts are redundant.
        """
        for ticker in (self._ticker, self._acker):
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ticker
        self._ticker = self._acker = None
        try:
            await self._write_acks()  # in case the final snapshot below fails
            await self.sync(snapshot=True)
        except Exception as exc:
            log.warning(
                "could not store the final run journal in %s (%s); the local copy in %s "
                "resumes this output on this machine",
                self.sink.uri(".klein"),
                exc,
                self.work_dir,
            )
            return
        if published:
            try:
                await self.sink.delete(await self.sink.list(PARTS_RELDIR))
                await self.sink.delete(await self.sink.list(ACKS_RELDIR))
            except Exception as exc:
                log.warning("could not remove the partial manifests in %s: %s", PARTS_RELDIR, exc)


def _backup(source: Path, target: Path) -> None:
    """A consistent copy of the ledger as committed now, from a connection of our own."""
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
