"""One writer per output: the lock that keeps two writers (`run` or `flow`) out of one DEST.

Two writers sharing a destination would each plan the same rows from the journal and
submit them both: every image paid twice (a nightly job that overran into the next
night's, or a `run` started by hand while the scheduled `flow` writes the same output).
`klein-batch run` and `klein-batch flow` take the same lock, ``DEST/.klein/run.lock``:

- a local DEST: an ``flock`` on that file, so the kernel releases it when its holder
  dies, kill -9 included, and a rerun never waits on a ghost;
- an ``s3://`` DEST: that object, created with a conditional put (``If-None-Match: *``,
  which S3 and S3-compatible stores honour atomically), holding a lease its owner renews
  (``If-Match`` on its own ETag) every third of the lease. A writer that crashed stops
  renewing; once its lease is older than ``lease_s`` by the store's own clock (the
  object's ``Last-Modified`` against the answer's ``Date``: no trust in clocks of other
  machines), the next writer replaces it, again conditionally, so two machines never
  both take it over. A writer whose renewal is refused has lost the lock and stops. A
  holder that ran on this machine (same host, boot and pid namespace) and whose process
  is gone (kill -9) is taken over at once, without waiting for its lease.

A second writer anywhere stops at once with ``DestinationBusy`` (exit 2) naming the
holder: what it is (run or flow), its host, its pid and since when. One exception: a
Prefect flow run started again while an earlier attempt of the same flow run still holds
the lock (a night marked Lost while it ran, as after a Prefect server restart) waits for
that attempt to end, then goes on (``holding(flow_run=...)``): it is the same night, and
stopping at once would leave it unmerged if the earlier attempt is stopped later.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
#: The lock of a destination, relative to it (local and S3 alike).
LOCK_RELPATH = f".klein/{LOCK_NAME}"
#: Seconds an S3 lease lasts without renewal; a crashed writer's lock is free after this.
LEASE_ENV = "KLEIN_LOCK_LEASE_S"
DEFAULT_LEASE_S = 60.0

_CONDITION_FAILED = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


#: How often a flow run waiting for its own earlier attempt's lock looks again.
OWN_ATTEMPT_POLL_S = 5.0


class DestinationBusy(ConfigError):
    """Another live writer (a run or a flow) holds the destination."""

    def __init__(self, message: str, holder: dict[str, Any] | str | None = None) -> None:
        super().__init__(message)
        #: Who holds it, as its lock says (``_holder``), when known.
        self.holder = holder


def _holder(kind: str, flow_run: str | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {
        "kind": kind,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "owner": uuid.uuid4().hex,
        "machine": _machine(),
    }
    if flow_run:
        found["flow_run"] = flow_run
    return found


def _machine() -> str | None:
    """This kernel boot and pid namespace: where a pid names one process, and only here."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}:{namespace}"


def _dead_here(holder: dict[str, Any] | str) -> bool:
    """The holder ran in this very pid namespace (same boot) and its process is gone.

    Then a rerun on the same machine after a kill -9 need not wait for the lease. A
    holder elsewhere (another host, container or boot) is judged by its lease alone.
    """
    if not isinstance(holder, dict) or holder.get("machine") is None:
        return False
    if holder.get("host") != socket.gethostname() or holder["machine"] != _machine():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def describe(holder: dict[str, Any] | str) -> str:
    """``run (pid 4242 on host-a, since 2026-12-04T09:12:00+00:00)``; old lock files as is."""
    if isinstance(holder, str):
        return f"writer ({holder or 'unknown'})"
    return (
        f"{holder.get('kind', 'run')} (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {holder.get('since', '?')})"
    )


def _busy(
    destination: str, holder: dict[str, Any] | str, lease: tuple[float, float] | None = None
) -> DestinationBusy:
    """``lease`` is an S3 lock's (age, lease) in seconds: a holder on another machine may
    be dead, and then the lease is all that says when the output is free again."""
    renewed = ""
    if lease is not None:
        age, lease_s = lease
        renewed = (
            f" (its lease was renewed {age:.0f} s ago; if that writer is gone, the output "
            f"is free in {max(0.0, lease_s - age) + 1:.0f} s)"
        )
    return DestinationBusy(
        f"{destination}: another klein-batch {describe(holder)} is writing this output"
        f"{renewed}; wait for it (`klein-batch status {destination}` shows its progress) or "
        "choose another output",
        holder,
    )


def _parse_holder(raw: bytes) -> dict[str, Any] | str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text  # a lock file of an older klein-batch: "pid N on HOST"
    return data if isinstance(data, dict) else text


def lease_seconds() -> float:
    """The S3 lease from ``$KLEIN_LOCK_LEASE_S`` (default 60 s)."""
    raw = os.environ.get(LEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 1.0 <= value <= 3600.0:
        raise ConfigError(f"${LEASE_ENV} {raw!r} is not allowed; expected seconds from 1 to 3600")
    return value


# --- local: flock --------------------------------------------------------------------------------


@contextlib.contextmanager
def hold(
    journal_dir: Path, destination: str, kind: str = "run", flow_run: str | None = None
) -> Iterator[None]:
    """Hold the lock file in ``journal_dir`` for this process, or say who holds it and stop."""
    journal_dir.mkdir(parents=True, exist_ok=True)
    path = journal_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(destination, _parse_holder(os.pread(fd, 1000, 0))) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(kind, flow_run)).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --- S3: a conditional put and a lease -----------------------------------------------------------


class S3Lease:
    """The lock object of an ``s3://`` destination (see the module docstring)."""

    def __init__(
        self,
        bucket: str,
        key: str,
        destination: str,
        kind: str,
        *,
        lease_s: float | None = None,
        on_lost: Callable[[str], None] | None = None,
        flow_run: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.key = key
        self.destination = destination
        self.lease_s = lease_seconds() if lease_s is None else lease_s
        self.holder = _holder(kind, flow_run) | {"lease_s": self.lease_s}
        self.on_lost = on_lost
        self.etag: str | None = None
        self.lost: str | None = None
        # A renewal still in its thread when the holder lets go would change the ETag
        # after release read it (the delete then fails and the lock stays for a lease):
        # renew and release take turns, and nothing is renewed once released.
        self._turn = threading.Lock()
        self._released = False

    def _body(self) -> bytes:
        renewed = datetime.now(UTC).isoformat(timespec="seconds")
        return json.dumps(self.holder | {"renewed_at": renewed}).encode()

    def _put(self, s3: Any, condition: dict[str, str]) -> bool:
        """Put the lock under ``condition``; False when the store says the condition failed."""
        from botocore.exceptions import ClientError

        try:
            answer = s3.put_object(
                Bucket=self.bucket,
                Key=self.key,
                Body=self._body(),
                ContentType="application/json",
                **condition,
            )
        except ClientError as exc:
            if _code(exc) in _CONDITION_FAILED:
                return False
            raise
        self.etag = answer["ETag"]
        return True

    def acquire(self) -> None:
        """Take the lock or raise ``DestinationBusy`` (blocking: call it in a thread)."""
        from botocore.exceptions import ClientError

        from pipeline.s3 import client, is_not_found

        s3 = client()
        for _ in range(5):
            if self._put(s3, {"IfNoneMatch": "*"}):
                return
            try:
                found = s3.get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as exc:
                if is_not_found(exc):
                    continue  # released in between: try again
                raise
            holder, lease, age = self._live(found)
            # Its holder stopped renewing (crashed): replace exactly that object, or lose
            # the race to another writer doing the same.
            if self._put(s3, {"IfMatch": found["ETag"]}):
                log.warning(
                    "%s: took over the lock of %s (%s)",
                    self.destination,
                    describe(holder),
                    f"its lease expired {age - lease:.0f} s ago"
                    if age > lease
                    else "its process on this machine is gone",
                )
                return
        raise _busy(self.destination, "a writer that keeps changing the lock")

    def _live(self, found: dict[str, Any]) -> tuple[dict[str, Any] | str, float, float]:
        """(holder, lease, age) of a lock object; ``DestinationBusy`` while its lease runs
        (unless its holder was a process of this machine that is gone: ``_dead_here``)."""
        holder = _parse_holder(found["Body"].read())
        lease = float(holder.get("lease_s", DEFAULT_LEASE_S)) if isinstance(holder, dict) else 0.0
        age = _age_s(found)
        if age <= lease and not _dead_here(holder):
            raise _busy(self.destination, holder, (age, lease))
        return holder, lease, age

    def check(self) -> None:
        """Raise ``DestinationBusy`` if a live writer holds the lock; take nothing."""
        from botocore.exceptions import ClientError

        from pipeline.s3 import client, is_not_found

        try:
            found = client().get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if is_not_found(exc):
                return
            raise
        self._live(found)

    def renew(self) -> bool:
        """Extend the lease; False when it was lost (another writer replaced the lock)."""
        from pipeline.s3 import client

        with self._turn:
            if self._released:
                return True
            assert self.etag is not None
            return self._put(client(), {"IfMatch": self.etag})

    def release(self) -> None:
        """Delete the lock if it is still ours (a lost lock belongs to someone else now).

        Never raises: it runs as the holder stops, often because the store went away (a run
        that stopped on an unreachable S3 ended in a traceback here, exit 70, instead of
        its own exit 74). A lock left behind is taken over by the next writer on this
        machine at once, and by any other once its lease lapses.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        from pipeline.s3 import client

        with self._turn:
            self._released = True
            if self.etag is None or self.lost:
                return
            try:
                client().delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except ClientError as exc:
                log.warning("%s: could not remove the lock (%s)", self.destination, _code(exc))
            except BotoCoreError as exc:
                log.warning(
                    "%s: could not remove the lock (%s); the next writer takes it over once "
                    "its lease (%.0f s) lapses, at once on this machine",
                    self.destination,
                    exc,
                    self.lease_s,
                )

    async def keep(self) -> None:
        """Renew every third of the lease until cancelled; report a lost lock once."""
        interval = self.lease_s / 3
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                renewed = await asyncio.to_thread(self.renew)
            except Exception as exc:  # network trouble: retried until the lease runs out
                log.warning("%s: renewing the lock failed: %s", self.destination, exc)
                if time.monotonic() - last_ok < self.lease_s:
                    continue
                renewed = False
            if renewed:
                last_ok = time.monotonic()
                continue
            self.lost = (
                f"{self.destination}: lost the lock of this output (its lease of "
                f"{self.lease_s:.0f} s could not be renewed and another writer may hold it "
                "now); stopped so that no row is paid twice: run again once it is free"
            )
            log.error(self.lost)
            if self.on_lost is not None:
                self.on_lost(self.lost)
            return


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _age_s(found: dict[str, Any]) -> float:
    """Seconds since the object was last written, by the store's clock alone."""
    modified: datetime = found["LastModified"]
    header = found.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(header) if header else datetime.now(UTC)
    return (now - modified).total_seconds()


# --- either ---------------------------------------------------------------------------------------


def held_by_flow_run(busy: DestinationBusy, flow_run: str | None) -> bool:
    """Whether the lock ``busy`` names is held by an attempt of the flow run ``flow_run``."""
    holder = busy.holder
    return bool(flow_run) and isinstance(holder, dict) and holder.get("flow_run") == flow_run


@contextlib.asynccontextmanager
async def holding(
    sink: object,
    destination: str,
    *,
    kind: str,
    on_lost: Callable[[str], None] | None = None,
    flow_run: str | None = None,
) -> AsyncIterator[None]:
    """Hold DEST's lock (local ``flock`` or S3 lease) while the block runs; see the docstring.

    ``on_lost`` is called if an S3 lease is lost while held; the caller stops writing.
    ``flow_run``: the Prefect flow run this writer is an attempt of. It is written into the
    lock, and a lock held by an earlier attempt of the same flow run is waited for (it ends,
    is stopped, or its process dies and the lock is freed: at once locally, once its lease
    lapses on S3) instead of stopping with ``DestinationBusy``.
    """
    local = sink.local_path(".klein")  # type: ignore[attr-defined]
    if local is not None:
        with contextlib.ExitStack() as held:
            while True:
                try:
                    held.enter_context(hold(local, destination, kind, flow_run))
                    break
                except DestinationBusy as busy:
                    if not held_by_flow_run(busy, flow_run):
                        raise
                    await _wait_for_own_attempt(destination, busy)
            yield
        return
    from pipeline.s3 import S3Sink, storage_error

    if not isinstance(sink, S3Sink):
        raise ConfigError(f"{destination}: cannot lock an output of type {type(sink).__name__}")
    where = sink.location(LOCK_RELPATH)
    lease = S3Lease(where.bucket, where.key, destination, kind, on_lost=on_lost, flow_run=flow_run)
    while True:
        try:
            await asyncio.to_thread(lease.acquire)
            break
        except DestinationBusy as busy:
            if not held_by_flow_run(busy, flow_run):
                raise
            await _wait_for_own_attempt(destination, busy)
        except Exception as exc:
            error = storage_error(exc, "lock", where)
            raise (error if isinstance(error, ConfigError | StorageError) else exc) from None
    keeper = asyncio.create_task(lease.keep(), name="dest-lock-lease")
    try:
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await asyncio.to_thread(lease.release)


_waiting_logged: set[str] = set()


async def _wait_for_own_attempt(destination: str, busy: DestinationBusy) -> None:
    """Pause before looking at the lock again; says once per holder what it waits for."""
    holder = busy.holder
    owner = holder.get("owner", "") if isinstance(holder, dict) else ""
    if owner not in _waiting_logged:
        _waiting_logged.add(owner)
        log.warning(
            "%s: an earlier attempt of this flow run, %s, still writes this output (the run "
            "was marked lost while it ran, as after a Prefect server restart); waiting for it "
            "to end, then resuming what it left and merging",
            destination,
            describe(holder or ""),
        )
    await asyncio.sleep(OWN_ATTEMPT_POLL_S)


def check_free(sink: object, destination: str) -> None:
    """Raise ``DestinationBusy`` if a live writer holds DEST now; takes nothing.

    For a one-line answer before a writer's slow start (Prefect's): ``holding`` is still
    what keeps writers apart, this only says early what it would say later.
    """
    local = sink.local_path(LOCK_RELPATH)  # type: ignore[attr-defined]
    if local is not None:
        if not local.is_file():
            return
        fd = os.open(local, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _busy(destination, _parse_holder(os.pread(fd, 1000, 0))) from None
        finally:
            os.close(fd)
        return
    from pipeline.s3 import S3Sink

    if isinstance(sink, S3Sink):
        where = sink.location(LOCK_RELPATH)
        S3Lease(where.bucket, where.key, destination, "run").check()


def sweep_partial_writes(folder: Path) -> int:
    """Remove temporary files that a killed run left half-written; returns how many.

    Atomic writes go to ``.NAME.XXXX.tmp`` beside the target and are renamed into place; a
    kill between the two leaves the temporary file. Only call this while holding the lock of
    the one run that writes ``folder``.
    """
    removed = 0
    if not folder.is_dir():
        return 0
    for entry in folder.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed += 1
    return removed
