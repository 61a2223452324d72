"""The run's journal: what was asked, acknowledged and finished, per row key.

It is the resume identity of a destination: running the same manifest into the same DEST
again reads it to skip finished rows and to poll, never resubmit, tasks the API already
acknowledged (those were paid for). It lives in ``DEST/.klein/ledger.sqlite``.

Durability. SQLite in WAL mode with ``synchronous=NORMAL``: a commit appends to the WAL
file and returns without an fsync. A ``kill -9`` of the process does not lose the operating
system's page cache, so every committed transaction survives it; only a power loss or a
kernel crash can drop the last few commits (acceptable: the API's own task list is the
fallback for that). ``record_ack`` commits before it returns, so an acknowledged task id is
on disk before the engine hands the task on; ``record_intent`` commits too, so a kill during
the POST is still counted as an ambiguous submit. Outcomes ride along with the next commit
(an ack, an intent or ``flush()``, which the run calls every ~0.2 s and at the end): a lost
outcome only costs a poll of an already-paid task on resume, never a second submit.

Storage errors. A write the file system refuses (disk full, read-only, permission) raises
``StorageError`` naming the journal, and the run stops (``pipeline.errors``). SQLite's
commits are atomic, so the journal stays as it was at the last good commit. Beside it lies
``ledger.reserve``, a megabyte of nothing: when the disk fills, it is deleted to make room
for the write that failed and for the acknowledgements still in the air, so a task the API
acknowledged is journaled (and polled by the rerun) even on a full disk.

Concurrency. One process writes (the run). Any number of readers (``klein-batch status``)
may open the file with ``Ledger.open(path, readonly=True)`` at any time: WAL readers see
the last committed state and never block the writer.

Exactly once. ``plan`` returns ``"submit"`` only for a key with no acknowledged task in
flight: a key with an ack and no final outcome is always ``"poll"``. An intent without an
ack (the submit's response was lost to a kill or a dropped connection) is submitted again,
and counted by ``ambiguous_submits`` because it may have been paid.

Schema. Versioned in the ``meta`` table (``schema_version``); ``open`` refuses a newer
version and is where a later version migrates an older one.

Tables:

- ``tasks``, one row per key across runs: the request (without reference specs, which
  may be megabytes of inline base64; the outcome keeps their digests), intent and ack
  state, the final status and outcome.
- ``run_rows``, this run's map from manifest row index to key (or to a rejection); reset by
  ``start_run``, so it always describes the manifest being run now.
- ``runs``, one row per ``start_run`` (manifest name, dialect, options; never secrets).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

from pipeline.contract import RowStatus, cost_credits, output_size
from pipeline.errors import ConfigError, StorageError
from pipeline.masking import NO_SECRETS, SecretMask
from pipeline.rows import ImageRequest, Outcome, Rejection, Row
from pipeline.urls import redact_credentials, without_credentials

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Where a destination keeps its ledger, relative to DEST.
LEDGER_RELPATH = ".klein/ledger.sqlite"

#: Room held beside the journal for the writes a full disk would refuse (see the docstring).
RESERVE_NAME = "ledger.reserve"
RESERVE_BYTES = 1 << 20

#: SQLite's primary result code for "database or disk is full".
_SQLITE_FULL = 13

SCHEMA_VERSION = 1

#: Statuses that settle a key for good: a rerun skips it (``failed`` only until
#: ``retry_failed``). ``rejected`` and ``skipped`` describe one run, not the image.
FINAL_STATUSES = frozenset({RowStatus.SUCCEEDED, RowStatus.MODERATED, RowStatus.FAILED})
#: How the engine's reason starts when the API answered a submit 400/422 (``rejected``,
#: nothing charged): the same request is refused again.
API_REFUSED: Final = "the API refused the request"

#: How the engine's reason starts when the API accepted a task but its result could not be
#: fetched (polls or downloads failed after every retry). Such a task may well have finished
#: and been charged, so ``retry_failed`` polls its task id again instead of paying anew (as
#: it does for every failed row with a task id unless ``Outcome.resubmit_on_retry``).
UNFETCHED_REASONS: Final = ("polling failed after retries", "download failed after retries")

_SQL_IN_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    request TEXT,
    intents INTEGER NOT NULL DEFAULT 0,
    intent_pending INTEGER NOT NULL DEFAULT 0,
    lost_acks INTEGER NOT NULL DEFAULT 0,
    intent_cost REAL,
    task_id TEXT,
    poll_url TEXT,
    submitted_at REAL,
    ack_cost REAL,
    ack_run TEXT,
    status TEXT,
    outcome TEXT,
    finished_at REAL,
    latency REAL,
    credits REAL,
    finished_run TEXT
);
CREATE TABLE IF NOT EXISTS run_rows (
    idx INTEGER PRIMARY KEY,
    key TEXT,
    dup_of INTEGER,
    retry INTEGER NOT NULL DEFAULT 0,
    rejection TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS run_rows_key ON run_rows(key);
CREATE INDEX IF NOT EXISTS tasks_task_id ON tasks(task_id);
"""


class Action(StrEnum):
    """What the engine does with a planned row."""

    #: New, or failed before and ``retry_failed``: submit it.
    SUBMIT = "submit"
    #: Acknowledged earlier and not finished: poll its task id, never resubmit.
    POLL = "poll"
    #: A final outcome is already recorded: skip it.
    DONE = "done"
    #: The key already appears at another row of this run: reject it, naming that row.
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class Planned:
    """One row's plan, with what the ledger already knows about its key."""

    row: Row
    action: Action
    task_id: str | None = None
    poll_url: str | None = None
    #: Submits already made for this key (the engine continues counting from here).
    attempts: int = 0
    #: 0-based index of the first row of this run with the same key.
    duplicate_of: int | None = None
    #: The outcome recorded by an earlier run, if any.
    previous: Outcome | None = None
    #: When the acknowledged task was submitted, and the cost its acknowledgement quoted.
    submitted_at: float | None = None
    ack_cost: float | None = None
    #: Kept (done) or polled (in flight), though this run asks the key for another request
    #: (prompt, aspect ratio, resolution, seed, safety, format) than the one its image was
    #: made from: the manifest was edited, or the template, since.
    changed: bool = False


_OUTCOME_FIELDS = tuple(
    f.name for f in fields(Outcome) if f.name not in ("index", "key", "status", "request")
)


#: Longest row reason stored: an API's error message can be megabytes, and every reason
#: is repeated in manifest.parquet, run.json and report.html.
MAX_REASON_CHARS = 2000


def stored_reason(reason: str) -> str:
    """A reason as the journal keeps it: URL passwords masked, cut to ``MAX_REASON_CHARS``."""
    reason = redact_credentials(reason)
    if len(reason) > MAX_REASON_CHARS:
        cut = len(reason) - MAX_REASON_CHARS
        reason = f"{reason[:MAX_REASON_CHARS]}... ({cut:,} more characters not kept)"
    return reason


def _published_price(request_json: str | None) -> float:
    """A journaled request's price by the contract (without references, which the journal
    does not keep): for entries written before their price was journaled."""
    request = _request_from_json(request_json)
    if request is None:
        return 0.0
    return cost_credits(*output_size(request.aspect_ratio, request.resolution))


def _request_to_json(request: ImageRequest | None) -> str | None:
    if request is None:
        return None
    return json.dumps(
        [
            request.prompt,
            request.aspect_ratio,
            request.resolution,
            request.seed,
            request.safety_tolerance,
            request.output_format,
        ],
        ensure_ascii=False,
    )


def _request_from_json(text: str | None) -> ImageRequest | None:
    if not text:
        return None
    prompt, aspect_ratio, resolution, seed, safety, output_format = json.loads(text)
    return ImageRequest(prompt, aspect_ratio, resolution, seed, safety, output_format)


def _outcome_to_json(outcome: Outcome, mask: SecretMask = NO_SECRETS) -> str:
    data: dict[str, Any] = {}
    for name in _OUTCOME_FIELDS:
        value = getattr(outcome, name)
        if name == "reference_digests":
            value = list(value)
        elif name == "reason" and value:
            value = stored_reason(mask.mask(value))
        elif name == "task_id" and value:
            value = mask.seal(value)
        if value is not None and value != [] and value != {}:
            data[name] = value
    return json.dumps(data, ensure_ascii=False, default=str)


def _outcome_from_json(
    index: int, key: str, status: str, request_json: str | None, outcome_json: str | None
) -> Outcome:
    data: dict[str, Any] = json.loads(outcome_json) if outcome_json else {}
    if "reference_digests" in data:
        data["reference_digests"] = tuple(data["reference_digests"])
    return Outcome(
        index=index,
        key=key,
        status=RowStatus(status),
        request=_request_from_json(request_json),
        **data,
    )


def _collect_on_retry(outcome: Outcome | None) -> bool:
    """A failed row with a task id whose task the API never ended for us: poll it again.

    Only an end the API itself gave the task (failed, forgotten, result gone) lets
    ``retry_failed`` pay for a new one; anything on our side (polls or downloads failing,
    a full disk, a bug) leaves a task that may have been charged, so it is collected.
    """
    return outcome is not None and not outcome.resubmit_on_retry


def _disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (int(code) & 0xFF) == _SQLITE_FULL
    return "disk is full" in str(exc)


class _Reserve:
    """A file of zeros beside the journal, given up to make room when the disk fills."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self) -> None:
        """Lay the reserve down (best effort: a disk with no room for it fails soon anyway)."""
        try:
            if self.path.is_file() and self.path.stat().st_size >= RESERVE_BYTES:
                return
            with self.path.open("wb") as handle:
                handle.write(bytes(RESERVE_BYTES))
        except OSError as exc:
            log.warning("no room for the journal's reserve %s: %s", self.path, exc.strerror)
            with contextlib.suppress(OSError):
                self.path.unlink()

    def release(self) -> bool:
        """Delete the reserve; True if there was one to give."""
        try:
            self.path.unlink()
        except OSError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class SealedAck:
    """An acknowledged task as the journal stores it: task id and poll URL sealed (secrets
    masked, credentials removed), so it may be written where the journal is mirrored."""

    key: str
    task_id: str
    poll_url: str
    submitted_at: float
    cost: float | None
    run: str | None

    def to_json(self) -> str:
        return json.dumps(
            [self.key, self.task_id, self.poll_url, self.submitted_at, self.cost, self.run],
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, line: str) -> SealedAck:
        key, task_id, poll_url, submitted_at, cost, run = json.loads(line)
        return cls(str(key), str(task_id), str(poll_url), float(submitted_at), cost, run)


def _writes(method: Callable[..., T]) -> Callable[..., T]:
    """A ledger method that writes: file-system refusals become ``StorageError``."""

    @functools.wraps(method)
    def guarded(self: Ledger, *args: Any, **kwargs: Any) -> T:
        return self._write(functools.partial(method, self, *args, **kwargs))  # type: ignore[return-value]

    return guarded


def _journal_failed(path: Path, exc: sqlite3.Error) -> StorageError:
    return StorageError(
        f"cannot write the run journal {path}: {exc}; free space or fix the permissions, "
        "then run the same command again: tasks already acknowledged are collected by their "
        "task ids, not paid for again"
    )


def _chunks(items: Sequence[str], size: int = _SQL_IN_CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Ledger:
    """The SQLite journal of one destination. Not thread-safe: use it from one thread."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, readonly: bool) -> None:
        self._conn = conn
        self.path = path
        self.readonly = readonly
        self._run_id: str | None = None
        self._reserve = _Reserve(path.with_name(RESERVE_NAME))
        #: The run's secrets in every form an answer may echo them (``pipeline/masking.py``):
        #: reasons are stored masked, task ids and poll URLs sealed (read back for polling,
        #: they get the run's own secrets again).
        self.mask: SecretMask = NO_SECRETS

    # --- lifecycle --------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> Ledger:
        """Open (the writer creates it) the ledger at ``path``."""
        path = Path(path)
        try:
            if readonly:
                if not path.is_file():
                    raise ConfigError(f"no ledger at {path}: nothing has run into this folder yet")
                conn = sqlite3.connect(
                    f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 10000")
            if not readonly:
                # Keys are digests, so inserts land all over the B-trees and a page cache
                # smaller than the file rereads pages (from the OS's cache). 8 MB: a 64 MB
                # cache filled up with the file (about 0.75 KB a row) and was the largest
                # growth of a real run's memory with its length, for no CPU saved (100,000
                # rows planned, acked and finished in-process: 16.8 s of CPU with 64 MB,
                # 15.9 with 16 MB, 14.8 with 2 MB; peak RSS 246, 196, 181 MB; issue 16).
                conn.execute("PRAGMA cache_size = -8192")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            ledger = cls(conn, path, readonly=readonly)
            ledger._prepare()
            if not readonly:
                ledger._reserve.ensure()
        except sqlite3.OperationalError as exc:
            if readonly:
                raise ConfigError(f"cannot read the run ledger {path}: {exc}") from exc
            raise _journal_failed(path, exc) from None
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"cannot use the run ledger {path}: {exc}; it may be damaged or not a ledger "
                f"(move it away to start this destination from scratch)"
            ) from exc
        return ledger

    def _prepare(self) -> None:
        if self.readonly:
            version = self._meta("schema_version")
        else:
            # Idempotent DDL; a later schema version migrates here, keyed on schema_version.
            self._conn.executescript(_SCHEMA)
            self._add_missing_columns()
            self._conn.execute(
                "INSERT OR IGNORE INTO meta(name, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            version = self._meta("schema_version")
        if version is None or int(version) > SCHEMA_VERSION:
            raise ConfigError(
                f"the run ledger {self.path} has schema version {version}; this klein-batch "
                f"reads version {SCHEMA_VERSION} or older: upgrade klein-batch"
            )
        self._run_id = self._meta("current_run")

    def _add_missing_columns(self) -> None:
        """Columns added since schema version 1 was written, added to older journals.

        Only nullable columns, which older klein-batch versions never read, so the version
        stays 1 and a journal keeps working with the release that wrote it.
        """
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(tasks)")}
        if "intent_cost" not in have:
            self._conn.execute("ALTER TABLE tasks ADD COLUMN intent_cost REAL")

    def _meta(self, name: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        try:
            if not self.readonly:
                self._write(self._commit)
        finally:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _begin(self) -> None:
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN")

    def _commit(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("COMMIT")

    def flush(self) -> None:
        """Commit the intents and outcomes recorded since the last commit."""
        self._write(self._commit)

    def _write(self, action: Callable[[], T]) -> T | None:
        """Run a write; a refusing file system becomes ``StorageError`` (the run stops).

        On a full disk the reserve makes room and the write is completed (a task id is
        worth more than the reserve) before the error is raised, so the journal keeps it.
        In WAL mode a full disk fails the COMMIT, not the statements: when the transaction
        is still open it is committed; when SQLite rolled it back, ``action`` runs again.
        """
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if not (_disk_full(exc) and self._reserve.release()):
                self._abandon()
                raise _journal_failed(self.path, exc) from None
            first = exc
        log.warning("journal %s: disk full; its reserve made room for this write", self.path)
        try:
            if self._conn.in_transaction:
                self._conn.execute("COMMIT")
            else:
                action()
        except sqlite3.OperationalError as exc:
            self._abandon()
            raise _journal_failed(self.path, exc) from None
        raise _journal_failed(self.path, first)

    def _abandon(self) -> None:
        """After a failed write: end the transaction SQLite may have left open."""
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    @property
    def run_id(self) -> str | None:
        return self._run_id

    # --- planning ---------------------------------------------------------------------------

    @_writes
    def start_run(self, run_id: str, info: dict[str, object]) -> None:
        """Record a run (never pass secrets in ``info``) and start its row map afresh."""
        self._begin()
        self._conn.execute(
            "INSERT OR REPLACE INTO runs(run_id, started_at, info) VALUES (?, ?, ?)",
            (run_id, time.time(), json.dumps(info, default=str, sort_keys=True)),
        )
        self._conn.execute("DELETE FROM run_rows")
        self._conn.execute(
            "INSERT OR REPLACE INTO meta(name, value) VALUES ('current_run', ?)", (run_id,)
        )
        self._conn.execute("COMMIT")
        self._run_id = run_id

    @_writes
    def plan(self, rows: Sequence[Row], *, retry_failed: bool = False) -> list[Planned]:
        """Decide each row's action from what earlier runs recorded, and map it to its key."""
        if not rows:
            return []
        keys = list(dict.fromkeys(row.key for row in rows))
        first_idx: dict[str, int] = {}
        known: dict[str, tuple[Any, ...]] = {}
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            first_idx.update(
                self._conn.execute(
                    f"SELECT key, idx FROM run_rows WHERE key IN ({marks})",  # noqa: S608
                    chunk,
                ).fetchall()
            )
            for record in self._conn.execute(
                "SELECT key, task_id, poll_url, intents, status, request, outcome, "  # noqa: S608
                "submitted_at, ack_cost "
                f"FROM tasks WHERE key IN ({marks})",
                chunk,
            ):
                known[record[0]] = record

        planned: list[Planned] = []
        map_rows: list[tuple[int, str | None, int | None, int]] = []
        new_requests: list[tuple[str, str | None]] = []
        for row in rows:
            first = first_idx.get(row.key)
            if first is not None and first != row.index:
                planned.append(Planned(row, Action.DUPLICATE, duplicate_of=first))
                map_rows.append((row.index, None, first, 0))
                continue
            first_idx[row.key] = row.index
            record = known.get(row.key)
            retry = 0
            if record is None:
                planned.append(Planned(row, Action.SUBMIT))
                new_requests.append((row.key, _request_to_json(row.request)))
            else:
                (
                    _,
                    task_id,
                    poll_url,
                    intents,
                    status,
                    request_json,
                    outcome_json,
                    submitted_at,
                    ack_cost,
                ) = record
                previous = (
                    _outcome_from_json(row.index, row.key, status, request_json, outcome_json)
                    if status is not None
                    else None
                )
                if submitted_at is None and task_id is not None and previous is not None:
                    # Acknowledged, but the ack's own entry was never written (an error of
                    # ours right after the answer): the outcome kept the task's time and cost.
                    submitted_at, ack_cost = previous.submitted_at, previous.cost_credits
                if status in FINAL_STATUSES and not (retry_failed and status == RowStatus.FAILED):
                    action = Action.DONE
                elif (
                    status in FINAL_STATUSES and task_id is not None and _collect_on_retry(previous)
                ):
                    action, retry = Action.POLL, 1
                elif status in FINAL_STATUSES:
                    action, retry = Action.SUBMIT, 1
                elif task_id is not None:
                    action = Action.POLL
                else:
                    action = Action.SUBMIT
                    new_requests.append((row.key, _request_to_json(row.request)))
                # Only what was sent counts (the request is refreshed until then).
                changed = (
                    action in (Action.DONE, Action.POLL)
                    and request_json is not None
                    and (task_id is not None or status is not None)
                    and request_json != _request_to_json(row.request)
                )
                planned.append(
                    Planned(
                        row,
                        action,
                        task_id=self.mask.unseal(task_id) if action is Action.POLL else None,
                        poll_url=self.mask.unseal(poll_url)
                        if action is Action.POLL and poll_url
                        else None,
                        attempts=int(intents),
                        previous=previous,
                        submitted_at=submitted_at if action is Action.POLL else None,
                        ack_cost=ack_cost if action is Action.POLL else None,
                        changed=changed,
                    )
                )
            map_rows.append((row.index, row.key, None, retry))

        self._begin()
        # A row planned twice in one run replaces its own mapping, never another row's.
        self._conn.executemany(
            "INSERT INTO run_rows(idx, key, dup_of, retry) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(idx) DO UPDATE SET key = excluded.key, dup_of = excluded.dup_of, "
            "retry = excluded.retry",
            map_rows,
        )
        # The request is refreshed only while nothing was sent for the key yet.
        self._conn.executemany(
            "INSERT INTO tasks(key, request) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
            "SET request = excluded.request WHERE task_id IS NULL AND status IS NULL",
            new_requests,
        )
        self._conn.execute("COMMIT")
        return planned

    def stored_images(self) -> dict[str, str]:
        """Key -> output URI of every row recorded as succeeded with an image in DEST."""
        return {
            str(key): str(uri)
            for key, uri in self._conn.execute(
                "SELECT key, json_extract(outcome, '$.output_uri') FROM tasks "
                "WHERE status = ? AND json_extract(outcome, '$.output_uri') IS NOT NULL",
                (str(RowStatus.SUCCEEDED),),
            )
        }

    @_writes
    def forget_images(self, keys: Sequence[str]) -> None:
        """Take back the outcome of rows whose image is gone from DEST, keeping what was
        paid: a row with an acknowledged task is polled again (its result collected, not
        paid for), one without (copied from the library) is looked up again."""
        self._begin()
        self._conn.executemany(
            "UPDATE tasks SET status = NULL, outcome = NULL, finished_at = NULL, "
            "latency = NULL, credits = NULL, finished_run = NULL WHERE key = ?",
            [(key,) for key in keys],
        )
        self._conn.execute("COMMIT")

    def earlier_work(self, keys: Sequence[str], *, retry_failed: bool = False) -> dict[str, str]:
        """Which of ``keys`` a rerun would not pay for: ``"done"`` or ``"in_flight"``; and
        ``"refused"`` or ``"rejected"`` for rows an earlier run rejected.

        The same decision as ``plan`` (a final outcome is kept unless it failed and
        ``retry_failed``; an acknowledged task is polled), made read-only, so that
        ``run --dry-run`` into an existing DEST counts and prices only what the run sends.
        A rejected row is tried again by the rerun, but it is sent only if what rejected it
        changed: ``"refused"`` when the API refused the request (it refuses it again, for
        nothing), ``"rejected"`` when its reference could not be used (fetched again: sent
        if it now loads). A dry run cannot tell a URL's fate offline, so it counts such
        rows apart instead of as sent (``check.CheckReport.earlier_rejected``).
        """
        found: dict[str, str] = {}
        for chunk in _chunks(list(dict.fromkeys(keys))):
            marks = ",".join("?" * len(chunk))
            for key, task_id, status, resubmit, reason in self._conn.execute(
                "SELECT key, task_id, status, json_extract(outcome, '$.resubmit_on_retry'), "  # noqa: S608
                f"json_extract(outcome, '$.reason') FROM tasks WHERE key IN ({marks})",
                chunk,
            ):
                if status == RowStatus.REJECTED:
                    refused = str(reason or "").startswith(API_REFUSED)
                    found[key] = "refused" if refused else "rejected"
                elif status in FINAL_STATUSES:
                    if not (retry_failed and status == RowStatus.FAILED):
                        found[key] = "done"
                    elif task_id is not None and not resubmit:
                        found[key] = "in_flight"
                elif task_id is not None:
                    found[key] = "in_flight"
        return found

    @_writes
    def record_rejections(self, rejections: Sequence[Rejection]) -> None:
        """Record rows of this run that will not be sent; final for this run only."""
        if not rejections:
            return
        self._begin()
        self._conn.executemany(
            "INSERT INTO run_rows(idx, rejection) VALUES (?, ?) "
            "ON CONFLICT(idx) DO UPDATE SET rejection = excluded.rejection",
            [
                (
                    rej.index,
                    json.dumps(
                        {
                            "reason": stored_reason(rej.reason),
                            "column": rej.column,
                            "key": rej.key,
                            "prompt": rej.prompt,
                        },
                        ensure_ascii=False,
                    ),
                )
                for rej in rejections
            ],
        )
        self._conn.execute("COMMIT")

    # --- the task lifecycle -----------------------------------------------------------------

    @_writes
    def record_intent(self, key: str, cost: float | None = None) -> None:
        """Note that a submit for ``key`` is about to be POSTed; committed before returning.

        Committed so that a kill during the POST still shows up as an ambiguous submit,
        and ``cost`` (its price, references included) with it: a submit whose answer never
        came may have been charged, and ``destination_credits`` counts it at that price.

        A new submit supersedes a final outcome (``retry_failed``), so that outcome is
        cleared; an earlier intent still waiting for its answer is counted as lost.
        """
        self._begin()
        self._conn.execute(
            "INSERT INTO tasks(key, intents, intent_pending, intent_cost) VALUES (?, 1, 1, ?) "
            "ON CONFLICT(key) DO UPDATE SET intents = intents + 1, "
            "lost_acks = lost_acks + intent_pending, intent_pending = 1, "
            "intent_cost = COALESCE(excluded.intent_cost, intent_cost), "
            "task_id = CASE WHEN status IS NULL THEN task_id END, "
            "poll_url = CASE WHEN status IS NULL THEN poll_url END, "
            "outcome = NULL, status = NULL, finished_at = NULL, latency = NULL, "
            "credits = NULL, finished_run = NULL",
            (key, cost),
        )
        self._conn.execute("COMMIT")

    @_writes
    def record_refused(self, key: str) -> None:
        """The submit was answered without a task (400, 402, 429, 5xx): not ambiguous."""
        self._begin()
        self._conn.execute("UPDATE tasks SET intent_pending = 0 WHERE key = ?", (key,))

    @_writes
    def record_ack(
        self, key: str, task_id: str, poll_url: str, submitted_at: float, cost: float | None
    ) -> str | None:
        """Record an acknowledged task; committed before this returns (survives kill -9).

        Returns the key of another row that already holds ``task_id`` (this run's or an
        earlier one's), else None: an API that hands one task to two requests would
        otherwise give the later row the earlier row's image (``Engine`` fails it).
        """
        self._begin()
        # Credentials never reach the disk: the engine adds the run's back when polling.
        ack = SealedAck(
            key,
            self.mask.seal(task_id),
            self.mask.seal(without_credentials(poll_url)),
            submitted_at,
            cost,
            self._run_id,
        )
        holder = self._conn.execute(
            "SELECT key FROM tasks WHERE task_id = ? AND key <> ? LIMIT 1", (ack.task_id, key)
        ).fetchone()
        self._conn.execute(
            "INSERT INTO tasks(key, intents, task_id, poll_url, submitted_at, ack_cost, ack_run) "
            "VALUES (?, 1, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
            "intent_pending = 0, task_id = excluded.task_id, poll_url = excluded.poll_url, "
            "submitted_at = excluded.submitted_at, ack_cost = excluded.ack_cost, "
            "ack_run = excluded.ack_run",
            (key, ack.task_id, ack.poll_url, submitted_at, cost, ack.run),
        )
        self._conn.execute("COMMIT")
        self._acked(ack)
        return None if holder is None else str(holder[0])

    def _acked(self, ack: SealedAck) -> None:
        """Called with each ack once it is committed, as stored (a mirror of the journal
        keeps them: ``pipeline/remote_journal.NotingLedger``)."""

    @_writes
    def adopt_acks(self, acks: Iterable[SealedAck]) -> int:
        """Take in acknowledgements another copy of this journal recorded after this copy
        was made (``pipeline/remote_journal.py``: a machine lost before its next snapshot),
        so their tasks are polled, not paid again. Returns how many were new here.

        An ack this copy already has (the same task), or one older than what this copy
        knows of its key (an earlier run's, superseded since), changes nothing.
        """
        adopted = 0
        self._begin()
        for ack in acks:
            known = self._conn.execute(
                "SELECT task_id, submitted_at FROM tasks WHERE key = ?", (ack.key,)
            ).fetchone()
            if known is not None and (
                known[0] == ack.task_id or (known[1] or 0.0) >= ack.submitted_at
            ):
                continue
            self._conn.execute(
                "INSERT INTO tasks(key, intents, task_id, poll_url, submitted_at, ack_cost, "
                "ack_run) VALUES (?, 1, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                "intent_pending = 0, task_id = excluded.task_id, poll_url = excluded.poll_url, "
                "submitted_at = excluded.submitted_at, ack_cost = excluded.ack_cost, "
                "ack_run = excluded.ack_run, outcome = NULL, status = NULL, "
                "finished_at = NULL, latency = NULL, credits = NULL, finished_run = NULL",
                (ack.key, ack.task_id, ack.poll_url, ack.submitted_at, ack.cost, ack.run),
            )
            adopted += 1
        self._conn.execute("COMMIT")
        return adopted

    @_writes
    def record_outcome(self, outcome: Outcome) -> None:
        """Record how a key ended; committed by the next ``flush()`` or ack."""
        self._begin()
        self._conn.execute(
            "INSERT INTO tasks(key, request, status, outcome, finished_at, latency, credits, "
            "finished_run) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
            "request = COALESCE(excluded.request, request), status = excluded.status, "
            "outcome = excluded.outcome, finished_at = excluded.finished_at, "
            "latency = excluded.latency, credits = excluded.credits, "
            "finished_run = excluded.finished_run, "
            # The outcome's task id (sealed, as in its JSON) bound as ``?9``, not read back
            # with ``json_extract`` from the JSON just written: a parse per finished row.
            "task_id = COALESCE(task_id, ?9)",
            (
                outcome.key,
                _request_to_json(outcome.request),
                str(outcome.status),
                _outcome_to_json(outcome, self.mask),
                outcome.finished_at,
                outcome.latency_s,
                outcome.cost_credits,
                self._run_id,
                self.mask.seal(outcome.task_id) if outcome.task_id else outcome.task_id,
            ),
        )

    # --- reading ----------------------------------------------------------------------------

    def _require_run(self) -> str:
        if self._run_id is None:
            raise RuntimeError("no run recorded in this ledger yet: call start_run() first")
        return self._run_id

    def counts(self) -> dict[str, int]:
        """This run's rows by status, plus ``pending`` (not sent) and ``in_flight`` (acked)."""
        run_id = self._require_run()
        states = [status.value for status in RowStatus] + ["pending", "in_flight"]
        # One sum per state in a single pass, not GROUP BY: that sorted every row's state
        # in a temporary B-tree first, 8 MB more memory at a million rows (issue 16).
        sums = ", ".join(f"COALESCE(SUM(state = '{state}'), 0)" for state in states)
        rows = """
            SELECT CASE
                WHEN r.rejection IS NOT NULL THEN 'rejected'
                WHEN t.status = 'failed' AND r.retry = 1
                     AND COALESCE(t.finished_run, '') <> :run THEN 'pending'
                WHEN t.status IS NOT NULL THEN t.status
                WHEN t.task_id IS NOT NULL THEN 'in_flight'
                ELSE 'pending' END AS state
            FROM run_rows r LEFT JOIN tasks t ON t.key = r.key
        """
        # Only this module's constants are formatted into the query.
        query = f"SELECT {sums}, COUNT(*) FROM ({rows})"  # noqa: S608
        *found, total = self._conn.execute(query, {"run": run_id}).fetchone()
        result = dict(zip(states, (int(count) for count in found), strict=True))
        if total != sum(result.values()):
            # A state this version does not name (a journal a newer version wrote to):
            # counted as it is, so that no row goes missing from the totals.
            grouped = f"SELECT state, COUNT(*) FROM ({rows}) GROUP BY state"  # noqa: S608
            result = dict.fromkeys(states, 0)
            for state, count in self._conn.execute(grouped, {"run": run_id}):
                result[state] = int(count)
        return result

    def ambiguous_submits(self) -> int:
        """Submits of this run's keys whose response never came: each may have been paid."""
        self._require_run()
        row = self._conn.execute(
            "SELECT COALESCE(SUM(t.lost_acks + t.intent_pending), 0) "
            "FROM run_rows r JOIN tasks t ON t.key = r.key"
        ).fetchone()
        return int(row[0])

    def outcomes_for(self, start_idx: int, end_idx: int) -> list[Outcome]:
        """One Outcome per mapped row of this run in ``[start_idx, end_idx)``, by index.

        Rows not finished are reported ``skipped`` with the reason (a rerun resumes them);
        rows this run never planned or rejected are absent.
        """
        self._require_run()
        query = """
            SELECT r.idx, r.key, r.rejection, t.status, t.request, t.outcome, t.task_id,
                   t.submitted_at, t.intents
            FROM run_rows r LEFT JOIN tasks t ON t.key = r.key
            WHERE r.idx >= ? AND r.idx < ? ORDER BY r.idx
        """
        outcomes: list[Outcome] = []
        for (
            idx,
            key,
            rejection,
            status,
            request_json,
            outcome_json,
            task_id,
            sub,
            intents,
        ) in self._conn.execute(query, (start_idx, end_idx)):
            if rejection is not None:
                rej = json.loads(rejection)
                extra: dict[str, object] = {}
                if rej.get("column"):
                    extra["column"] = rej["column"]
                if rej.get("prompt") is not None:
                    extra["prompt"] = rej["prompt"]
                outcomes.append(
                    Outcome(
                        index=idx,
                        key=rej.get("key") or key or "",
                        status=RowStatus.REJECTED,
                        reason=rej["reason"],
                        extra=extra,
                    )
                )
            elif status is not None:
                outcomes.append(_outcome_from_json(idx, key, status, request_json, outcome_json))
            elif key is None:
                outcomes.append(
                    Outcome(
                        index=idx,
                        key="",
                        status=RowStatus.SKIPPED,
                        reason="duplicate key, not recorded as rejected: the run stopped early",
                    )
                )
            else:
                # The task's id is in the row's task_id column, not in the reason: report.html
                # groups problems by reason, and an id in each made one group per row.
                reason = (
                    "not finished: its task (task_id) was still running when the run stopped; "
                    "run again to collect it, without paying again"
                    if task_id is not None
                    else "not submitted: the run stopped before this row; run again to resume"
                )
                outcomes.append(
                    Outcome(
                        index=idx,
                        key=key,
                        status=RowStatus.SKIPPED,
                        request=_request_from_json(request_json),
                        reason=reason,
                        task_id=task_id,
                        submitted_at=sub,
                        attempts=int(intents or 0),
                    )
                )
        return outcomes

    def latencies(self) -> list[float]:
        """Queue-to-done seconds of the rows that succeeded in this run (the planning figure)."""
        return list(self.iter_latencies())

    def iter_latencies(self) -> Iterator[float]:
        """``latencies()`` one at a time: a million of them need not be a list at once."""
        run_id = self._require_run()
        for (value,) in self._conn.execute(
            "SELECT latency FROM tasks WHERE finished_run = ? AND status = 'succeeded' "
            "AND latency IS NOT NULL",
            (run_id,),
        ):
            yield float(value)

    def credits(self) -> float:
        """Credits spent by this run: finished tasks' cost, or the ack's quote while running."""
        run_id = self._require_run()
        row = self._conn.execute(
            "SELECT COALESCE(SUM(CASE WHEN finished_run = :run THEN COALESCE(credits, 0) "
            "ELSE COALESCE(ack_cost, 0) END), 0) FROM tasks "
            "WHERE finished_run = :run OR (ack_run = :run AND status IS NULL)",
            {"run": run_id},
        ).fetchone()
        return round(float(row[0]), 6)

    def credits_acked_earlier(self) -> float:
        """The part of ``credits`` for tasks an earlier run submitted (and was charged
        for) that this run finished: a rerun after a kill collects them, it pays nothing
        again, and its summary says so beside a "submits 0"."""
        run_id = self._require_run()
        row = self._conn.execute(
            "SELECT COALESCE(SUM(COALESCE(credits, 0)), 0) FROM tasks "
            "WHERE finished_run = :run AND (ack_run IS NULL OR ack_run != :run)",
            {"run": run_id},
        ).fetchone()
        return round(float(row[0]), 6)

    # --- the destination as a whole (budgets, ``klein-batch status``) ------------------------

    def destination_credits(self) -> float:
        """Credits spent into this destination by every run, plus tasks still in flight,
        plus submits whose answer never came.

        An acknowledged task without an outcome will be charged when it completes, so it
        counts at its quoted cost, or at the contract's price for the size it asked for. A
        submit whose answer was lost (a kill, a dropped connection, a run stopped with the
        request out) may have been charged for a task nobody can name, and its row is sent
        again: it counts at its price too, so a budget holds as the API may count it. A row
        whose outcome already recorded its unanswered submit's price (``_AmbiguousSubmit``
        in the engine: credits without a task) is not counted twice.
        """
        (spent,) = self._conn.execute(
            "SELECT COALESCE(SUM(credits), 0) FROM tasks WHERE status IS NOT NULL"
        ).fetchone()
        total = float(spent)
        for ack_cost, request_json in self._conn.execute(
            "SELECT ack_cost, request FROM tasks WHERE status IS NULL AND task_id IS NOT NULL"
        ):
            total += ack_cost if ack_cost is not None else _published_price(request_json)
        return round(total + self._unanswered()[1], 6)

    def unanswered_credits(self) -> float:
        """The part of ``destination_credits`` for submits whose answer never came: perhaps
        charged, perhaps not (the API does not say which task was whose)."""
        return round(self._unanswered()[0], 6)

    def _unanswered(self) -> tuple[float, float]:
        """Credits for unanswered submits: all of them, and those no outcome's ``credits``
        holds already (an ``_AmbiguousSubmit`` row records its own, without a task)."""
        every = uncounted = 0.0
        for lost, pending, counted, price, request_json in self._conn.execute(
            "SELECT lost_acks, intent_pending, "
            "status IS NOT NULL AND task_id IS NULL AND COALESCE(credits, 0) > 0, "
            "COALESCE(intent_cost, ack_cost), request FROM tasks "
            "WHERE lost_acks > 0 OR intent_pending > 0"
        ):
            each = float(price) if price is not None else _published_price(request_json)
            every += (int(lost) + int(pending)) * each
            uncounted += (int(lost) + (0 if counted else int(pending))) * each
        return every, uncounted

    def run_info(self) -> dict[str, Any]:
        """The current run's recorded options and milestones, with ``run_id``/``started_at``."""
        run_id = self._require_run()
        row = self._conn.execute(
            "SELECT started_at, info FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        info: dict[str, Any] = json.loads(row[1]) if row else {}
        info.update(run_id=run_id, started_at=float(row[0]) if row else None)
        return info

    @_writes
    def update_run_info(self, **updates: object) -> None:
        """Merge milestones (``total``, ``finished_at``) into the current run's record."""
        info = self.run_info()
        info.pop("run_id", None)
        info.pop("started_at", None)
        info.update(updates)
        self._begin()
        self._conn.execute(
            "UPDATE runs SET info = ? WHERE run_id = ?",
            (json.dumps(info, default=str, sort_keys=True), self._require_run()),
        )
        self._conn.execute("COMMIT")

    # --- the output manifest ---------------------------------------------------------------

    def output_types(self) -> str | None:
        """What ``record_output_types`` kept for this output (``pipeline/output_manifest.py``
        reads it), or None."""
        return self._meta("output_types")

    @_writes
    def record_output_types(self, text: str) -> None:
        """Keep the types the input's columns were written with to this output's
        manifest.parquet, for the next run into it: a column all nulls then is written
        with its earlier type, not one made up."""
        self._begin()
        self._conn.execute(
            "INSERT OR REPLACE INTO meta(name, value) VALUES ('output_types', ?)", (text,)
        )
        self._conn.execute("COMMIT")

    def finish_times(self, status: str | None = None) -> list[float]:
        """Unix times at which this run's rows reached an outcome (for rates and ETAs).

        ``status`` keeps only outcomes of that status (``succeeded``: the images made).
        """
        run_id = self._require_run()
        return [
            float(value)
            for (value,) in self._conn.execute(
                "SELECT finished_at FROM tasks WHERE finished_run = ? AND finished_at IS NOT NULL "
                "AND (? IS NULL OR status = ?) ORDER BY finished_at",
                (run_id, status, status),
            )
        ]
