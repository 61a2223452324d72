"""``klein-batch status DEST``: how a run into DEST is doing, from its journal alone.

A nightly job runs in cron, a container or a Prefect worker; whoever wants to know how far
it got should not need its logs or its manifest. The ledger already holds everything: the
rows planned, each outcome and when it came, the tasks in flight, the credits. This module
opens it read-only (SQLite WAL readers never block the writer), so it is safe to call
while the run is going in another process, as often as you like.

A run is ``running`` while its process is alive (same machine: checked by pid), ``finished``
once it recorded its end with no row left unfinished, ``stopped: <reason>`` when it ended
early and said why (``budget``, ``interrupted`` by Ctrl-C, ``terminated`` by SIGTERM, ``key
refused``, ...: ``summary.STOP_EXIT_CODES``), and ``stopped`` when it died without recording
an end (kill -9, a lost machine): running the same command again resumes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from pipeline.contract import RowStatus
from pipeline.errors import ConfigError
from pipeline.ledger import LEDGER_RELPATH, Ledger
from pipeline.progress import format_duration
from pipeline.summary import budget_made, stop_advice

#: Finishes within this many seconds before the latest one set the current rate.
RATE_WINDOW_S: Final = 60.0
#: Where the catalog flow keeps one journal per shard and its plan (``flows/shards.py``).
SHARDS_RELDIR: Final = ".klein/shards"


@dataclass(slots=True)
class RunStatus:
    """A run's state as its journal tells it; ``render()`` for people, ``to_dict()`` for code."""

    dest: str
    run_id: str
    manifest: str
    state: str
    started_at: float
    total: int | None
    counts: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    pending: int = 0
    images_per_s: float = 0.0
    eta_s: float | None = None
    elapsed_s: float = 0.0
    credits_run: float = 0.0
    credits_output: float = 0.0
    #: The part of ``credits_output`` for submits whose answer never came (perhaps charged).
    credits_unanswered: float = 0.0
    max_credits: float | None = None
    last_activity_s: float | None = None
    note: str | None = None
    #: How long the API has not answered, while a live run waits for it (``pipeline/gate.py``).
    api_down_s: float | None = None
    #: The run's API outages so far: seconds without an answer in all, and how many.
    api_unreachable_s: float = 0.0
    api_outages: int = 0
    #: What the manifest's reader noted (a column it does not read, say), as the summary did.
    notices: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(self.counts.get(str(status), 0) for status in RowStatus)

    @property
    def waits_for_its_last_tasks(self) -> bool:
        """Every row left is a task in flight (the run's own progress line says so too)."""
        if self.total is None or self.pending or not self.in_flight:
            return False
        return self.total - self.done <= self.in_flight

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["done"] = self.done
        return data

    def render(self) -> str:
        total = self.total if self.total is not None else self.done + self.pending + self.in_flight
        percent = 100.0 * self.done / total if total else 100.0
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        lines = [
            f"{self.dest}: {self.state} · run {self.run_id} · {self.manifest}",
            f"  started   {started} · {'running for' if self.state == 'running' else 'ran'} "
            f"{format_duration(self.elapsed_s)}",
            f"  progress  {self.done:,}/{total:,} ({percent:.1f}%)"
            + ("" if self.total is not None else " (total still being counted)"),
            "  rows      "
            + " · ".join(f"{status} {self.counts.get(str(status), 0):,}" for status in RowStatus)
            + f" · in flight {self.in_flight:,} · not started {self.pending:,}",
        ]
        rate = f"  rate      {self.images_per_s:.2f} images/s"
        if self.state == "running" and self.waits_for_its_last_tasks:
            # The run ends when the slowest of them does: no rate tells when.
            tasks = "the last task" if self.in_flight == 1 else f"the last {self.in_flight:,} tasks"
            rate += f" · ETA ? (waiting for {tasks}, in flight)"
        elif self.state == "running":
            rate += f" · ETA {format_duration(self.eta_s)}"
        lines.append(rate)
        credits = (
            f"  credits   {self.credits_run:,.2f} this run · {self.credits_output:,.2f} "
            "in this output (spent and in flight"
            + (
                f"; {self.credits_unanswered:,.2f} of it for submits whose answer never "
                "came: perhaps charged)"
                if self.credits_unanswered > 0
                else ")"
            )
        )
        if self.max_credits is not None:
            credits += f" · budget {self.max_credits:,.2f}"
        lines.append(credits)
        if self.last_activity_s is not None and self.state != "finished":
            lines.append(f"  last      activity {format_duration(self.last_activity_s)} ago")
        if self.api_down_s is not None:
            lines.append(
                f"  api       not answering for {format_duration(self.api_down_s)}: rows wait "
                "for it (up to --api-outage-wait, then the run stops; nothing is lost)"
            )
        elif self.api_outages:
            times = "once" if self.api_outages == 1 else f"{self.api_outages:,} times"
            lines.append(
                f"  api       did not answer for {format_duration(self.api_unreachable_s)} "
                f"in all ({times}); rows waited for it instead of failing"
            )
        if self.note:
            lines.append(f"  note      {self.note}")
        lines += [f"  note      {notice}" for notice in self.notices]
        return "\n".join(lines)


def _alive(pid: object, host: object) -> bool | None:
    """Whether the run's process still exists; None when it ran on another machine."""
    if host != socket.gethostname() or not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ledger_path(dest: str | Path) -> Path:
    """Where DEST's journal is, for a local output folder (or ``file://`` URI)."""
    text = str(dest)
    if text.startswith("file://"):
        text = text[len("file://") :]
    folder = Path(text).expanduser()
    if not folder.exists():
        raise ConfigError(f"{dest}: no such output folder")
    if not folder.is_dir():
        raise ConfigError(f"{dest}: is a file; expected the output folder given to --out")
    path = folder / LEDGER_RELPATH
    if not path.is_file():
        if (folder / SHARDS_RELDIR / "plan.json").is_file():
            return path  # a catalog flow's output: read_status sums its shards' journals
        raise ConfigError(
            f"{dest}: no run journal ({LEDGER_RELPATH}); nothing has run into this folder yet"
        )
    return path


def read_status(dest: str | Path, *, now: float | None = None) -> RunStatus:
    """The status of the latest run into ``dest`` (local folder or ``s3://`` output)."""
    text = str(dest)
    if text[:5].lower() == "s3://":
        return _remote_status(text, now=now)
    path = ledger_path(dest)
    if not path.is_file():
        return _flow_status(path.parent.parent, text, now=now)
    return status_from_ledger(path, text, now=now)


def _flow_status(folder: Path, dest: str, *, now: float | None = None) -> RunStatus:
    """A local catalog flow's output (``klein-batch flow``): its shards' journals, summed."""
    try:
        plan = json.loads((folder / SHARDS_RELDIR / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{dest}: the catalog flow's plan cannot be read ({exc})") from None
    journals = {
        index: folder / shard_ledger_relpath(index) for index in range(_shard_count(plan, dest))
    }
    return flow_status(plan, journals, dest, now=now)


def shard_ledger_relpath(index: int) -> str:
    """Where shard ``index`` of a catalog flow keeps its journal, relative to the output."""
    return f"{SHARDS_RELDIR}/{index}/{LEDGER_RELPATH}"


def _shard_count(plan: object, dest: str) -> int:
    try:
        assert isinstance(plan, dict)
        if "shards" in plan:  # shards by key: the count the output was started with
            return int(plan["shards"])
        total, size = int(plan["total_rows"]), int(plan["shard_size"])
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{dest}: the catalog flow's plan cannot be read ({exc})") from None
    return -(-total // size) if size > 0 else 0


def flow_status(
    plan: dict[str, Any], journals: dict[int, Path], dest: str, *, now: float | None = None
) -> RunStatus:
    """A catalog flow's output: one journal per shard, summed (``journals`` maps each shard
    to its journal file, which may not exist yet).

    Progress counts against the flow's plan, so shards not started yet show as rows not
    started; the run is ``running`` while any shard runs, ``finished`` once every shard is.
    """
    now = time.time() if now is None else now
    expected = _shard_count(plan, dest)
    total = int(plan["total_rows"])
    shards: list[RunStatus] = []
    for index in range(expected):
        path = journals.get(index)
        if path is not None and path.is_file():
            with contextlib.suppress(ConfigError):  # a shard still creating its journal
                shards.append(status_from_ledger(path, f"{dest}#{index}", now=now))
    if not shards:
        raise ConfigError(f"{dest}: a catalog flow's output whose shards have not started yet")
    counts: dict[str, int] = {str(status): 0 for status in RowStatus}
    for shard in shards:
        for status, count in shard.counts.items():
            counts[status] = counts.get(status, 0) + count
    states = {shard.state for shard in shards}
    if "running" in states:
        state = "running"
    elif states == {"finished"} and len(shards) == expected:
        state = "finished"
    else:
        state = "stopped"
    started = min(shard.started_at for shard in shards)
    ended = max(shard.started_at + shard.elapsed_s for shard in shards)
    elapsed = max(0.0, (now if state == "running" else ended) - started)
    in_flight = sum(shard.in_flight for shard in shards)
    done = sum(counts.get(str(status), 0) for status in RowStatus)
    if state == "running":
        rate = sum(shard.images_per_s for shard in shards if shard.state == "running")
    else:
        made = sum(shard.images_per_s * shard.elapsed_s for shard in shards)
        rate = made / elapsed if elapsed > 0 else 0.0
    status = RunStatus(
        dest=dest,
        run_id=f"catalog flow, {len(shards)} of {expected} shards started",
        manifest=str(plan.get("manifest", "?")),
        state=state,
        started_at=started,
        total=total,
        counts=counts,
        in_flight=in_flight,
        pending=max(0, total - done - in_flight),
        images_per_s=round(rate, 3),
        elapsed_s=elapsed,
        credits_run=round(sum(shard.credits_run for shard in shards), 2),
        credits_output=round(sum(shard.credits_output for shard in shards), 2),
        credits_unanswered=round(sum(shard.credits_unanswered for shard in shards), 2),
        last_activity_s=min(
            (s.last_activity_s for s in shards if s.last_activity_s is not None), default=None
        ),
        note=(
            "shards stopped before every row did; run the flow again to resume"
            if state == "stopped"
            else None
        ),
        api_down_s=max((s.api_down_s for s in shards if s.api_down_s is not None), default=None),
        # Shards wait for the same API at the same time: the longest shard's wait, not a sum.
        api_unreachable_s=max((s.api_unreachable_s for s in shards), default=0.0),
        api_outages=max((s.api_outages for s in shards), default=0),
        notices=list(dict.fromkeys(n for shard in shards for n in shard.notices)),
    )
    if state == "running" and rate > 0 and not status.waits_for_its_last_tasks:
        status.eta_s = max(0, total - done) / rate
    return status


def status_from_ledger(path: Path, dest: str, *, now: float | None = None) -> RunStatus:
    """Read a journal (read-only) into a ``RunStatus``."""
    now = time.time() if now is None else now
    with Ledger.open(path, readonly=True) as ledger:
        if ledger.run_id is None:
            raise ConfigError(f"{dest}: the journal has no run recorded yet")
        info = ledger.run_info()
        counts = ledger.counts()
        finishes = ledger.finish_times()
        images = len(ledger.finish_times(RowStatus.SUCCEEDED))
        credits_run = ledger.credits()
        credits_output = ledger.destination_credits()
        credits_unanswered = ledger.unanswered_credits()
    started = float(info.get("started_at") or now)
    ended = info.get("ended_at")
    alive = _alive(info.get("pid"), info.get("host"))
    in_flight = counts.pop("in_flight", 0)
    pending = counts.pop("pending", 0)
    note = None
    if ended is not None and info.get("stopped") == "budget":
        # Every row has an outcome, but the budget skipped some: not "finished".
        state = "stopped: budget"
        made = budget_made(
            counts.get(str(RowStatus.SUCCEEDED), 0),
            sum(counts.get(str(status), 0) for status in RowStatus),
            counts.get(str(RowStatus.REJECTED), 0),
        )
        note = (
            f"--max-credits {info.get('max_credits')} stopped the run: {made}; rerun with "
            "a higher --max-credits to continue"
        )
    elif ended is not None and info.get("stopped"):
        # Ctrl-C, SIGTERM, a refused key, ...: said as run.json and report.html say it.
        reason = str(info["stopped"])
        state = f"stopped: {reason}"
        note = f"the run ended before every row did: {stop_advice(reason)}"
    elif ended is not None:
        state = "finished" if info.get("complete") else "stopped"
        if state == "stopped":
            note = "the run ended before every row did; run the same command again to resume"
    elif alive is False:
        state = "stopped"
        note = (
            "the run's process is gone without recording its end (killed or crashed); "
            "run the same command again to resume"
        )
    else:
        state = "running"
        if alive is None:
            note = f"running on {info.get('host', 'another machine')} (liveness not checked)"
    last = max([*finishes[-1:], started])
    end_time = float(ended) if ended is not None else now
    elapsed = max(0.0, end_time - started)
    if state == "running":
        # The recent pace, not the average: a run slows down in its tail and speeds up after
        # a resume, and the ETA should follow.
        window_start = max(now - RATE_WINDOW_S, started)
        recent = sum(1 for t in finishes if t >= window_start)
        rate = recent / (now - window_start) if now > window_start else 0.0
    else:
        # Images made over the run's life, as run.json counts them: rows skipped by the
        # budget or refused are outcomes, not images.
        rate = images / elapsed if elapsed > 0 else 0.0
    total = info.get("total")
    if total is not None:
        # Rows not read yet are in no journal table but still to do: "not started" is
        # every row of the manifest not done and not in flight, not only those planned.
        done = sum(counts.get(str(status), 0) for status in RowStatus)
        pending = max(pending, int(total) - done - in_flight)
    status = RunStatus(
        dest=dest,
        run_id=str(info.get("run_id")),
        manifest=str(info.get("manifest", "?")),
        state=state,
        started_at=started,
        total=int(total) if total is not None else None,
        counts={str(k): int(v) for k, v in counts.items()},
        in_flight=in_flight,
        pending=pending,
        images_per_s=round(rate, 3),
        elapsed_s=elapsed,
        credits_run=round(credits_run, 2),
        credits_output=round(credits_output, 2),
        credits_unanswered=round(credits_unanswered, 2),
        max_credits=info.get("max_credits"),
        last_activity_s=max(0.0, now - last) if state != "finished" else None,
        note=note,
        api_down_s=_down_for(info.get("api_down_since"), now) if state == "running" else None,
        api_unreachable_s=float(info.get("api_unreachable_s") or 0.0),
        api_outages=int(info.get("api_outages") or 0),
        notices=[str(notice) for notice in info.get("notices") or ()],
    )
    if state == "running" and rate > 0 and not status.waits_for_its_last_tasks:
        total_rows = status.total if status.total is not None else None
        if total_rows is not None:
            status.eta_s = max(0, total_rows - status.done) / rate
    return status


def _down_for(since: object, now: float) -> float | None:
    """Seconds since the API stopped answering, from the journaled moment (None: it answers)."""
    if not isinstance(since, int | float):
        return None
    return max(0.0, now - float(since))


def _remote_status(dest: str, *, now: float | None) -> RunStatus:
    """An S3 output of ``run`` or ``flow``: journals this machine writes live, else the
    snapshots the writers mirror into the output (a few seconds behind a live run)."""
    import asyncio

    from pipeline.storage import open_sink

    sink = open_sink(dest)
    with tempfile.TemporaryDirectory(prefix="klein-status-") as tmp:
        journal, snapshot = asyncio.run(
            _fetch_journal(sink, LEDGER_RELPATH, Path(tmp) / "run.sqlite")
        )
        if journal is not None:
            status = status_from_ledger(journal, dest, now=now)
        else:
            plan_bytes = asyncio.run(_get(sink, f"{SHARDS_RELDIR}/plan.json", dest))
            if plan_bytes is None:
                raise ConfigError(
                    f"{dest}: no run journal found ({LEDGER_RELPATH}) and no catalog flow plan "
                    f"({SHARDS_RELDIR}/plan.json): nothing has run into this output yet, or "
                    "its first snapshot is still being written"
                )
            try:
                plan = json.loads(plan_bytes)
            except ValueError as exc:
                raise ConfigError(
                    f"{dest}: the catalog flow's plan cannot be read ({exc})"
                ) from None
            fetched = asyncio.run(_fetch_shard_journals(sink, _shard_count(plan, dest), Path(tmp)))
            journals = {index: path for index, (path, _) in fetched.items() if path is not None}
            snapshot = any(is_snapshot for _, is_snapshot in fetched.values())
            status = flow_status(plan, journals, dest, now=now)
    if snapshot:
        status.note = (status.note + "; " if status.note else "") + (
            "read from the output's journal snapshot (a few seconds behind a live run)"
        )
    return status


async def _get(sink: Any, relpath: str, dest: str) -> bytes | None:
    try:
        return await sink.get(relpath)
    except Exception as exc:
        raise ConfigError(f"{dest}: cannot read {relpath}: {exc}") from None


async def _fetch_journal(sink: Any, relpath: str, target: Path) -> tuple[Path | None, bool]:
    """One journal of an S3 output: (local file, whether it is a snapshot), or (None, False).

    A run on this machine keeps its live journal in its work dir (named after the journal's
    ``.klein`` folder); otherwise the mirrored snapshot is downloaded to ``target``.
    """
    from pipeline.remote_journal import work_dir_for

    journal_dir = relpath.rsplit("/", 1)[0]
    local = work_dir_for(sink.uri(journal_dir)) / "ledger.sqlite"
    if local.is_file():
        return local, False
    download = getattr(sink, "download", None)
    if download is None:
        return None, False
    try:
        await download(relpath, target)
    except Exception:  # no snapshot (yet): this journal's run has not started
        return None, False
    return target, True


async def _fetch_shard_journals(
    sink: Any, shards: int, folder: Path
) -> dict[int, tuple[Path | None, bool]]:
    """Every shard's journal of an S3 catalog flow output, a few downloads at a time."""
    import asyncio

    gate = asyncio.Semaphore(8)

    async def one(index: int) -> tuple[int, tuple[Path | None, bool]]:
        async with gate:
            return index, await _fetch_journal(
                sink, shard_ledger_relpath(index), folder / f"shard-{index}.sqlite"
            )

    return dict(await asyncio.gather(*(one(index) for index in range(shards))))


@contextlib.contextmanager
def earlier_journal(dest: str | Path) -> Iterator[Ledger | None]:
    """DEST's journal, read-only, when a run already went into it; None for a new output.

    For ``run --dry-run``: a rerun skips what is done and polls what is in flight, so the
    plan prices only the rest. An S3 output's journal is this machine's live copy or the
    mirrored snapshot, as ``klein-batch status`` reads it.
    """
    text = str(dest)
    if text[:5].lower() != "s3://":
        if text.startswith("file://"):
            text = text[len("file://") :]
        path = Path(text).expanduser() / LEDGER_RELPATH
        if not path.is_file():
            yield None
            return
        with Ledger.open(path, readonly=True) as ledger:
            yield ledger
        return

    import asyncio

    from pipeline.remote_journal import work_dir_for
    from pipeline.storage import open_sink

    sink = open_sink(text)
    local = work_dir_for(sink.uri(".klein")) / "ledger.sqlite"
    if local.is_file():
        with Ledger.open(local, readonly=True) as ledger:
            yield ledger
        return
    with tempfile.TemporaryDirectory(prefix="klein-plan-") as tmp:
        target = Path(tmp) / "ledger.sqlite"
        download = getattr(sink, "download", None)
        found = False
        if download is not None:
            # No snapshot: nothing has run into this output yet (or the first is on its way).
            with contextlib.suppress(Exception):
                asyncio.run(download(LEDGER_RELPATH, target))
                found = target.is_file()
        if not found:
            yield None
            return
        with Ledger.open(target, readonly=True) as ledger:
            yield ledger


def render_json(status: RunStatus) -> str:
    return json.dumps(status.to_dict(), indent=2, default=str)
