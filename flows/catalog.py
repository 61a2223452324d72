"""The catalog flow: validate, shard, run each shard as one Prefect task, merge, publish.

```python
from flows.catalog import generate_catalog

from pipeline.spec import RunSpec

spec = RunSpec(out="out/night", api_url="https://api.freepik.com", tier="standard")
generate_catalog("catalog.parquet", spec, shard_size=5_000, api_key_block="freepik-api-key")
```

Every option of ``klein-batch run`` reaches the flow as one ``spec`` parameter
(``pipeline.spec.RunSpec``): the flow and its shards read it, and nothing here declares an
option again.

A Prefect task per shard, never per row: at a million rows a task per row would cost an
hour of orchestration alone, while a shard of thousands of rows keeps one event loop, one
HTTP session and one limiter busy. A shard that fails is retried by Prefect and resumes
from its own ledger, so a retry never pays for an image twice.

Shards run in this process (``parallel_shards`` at a time, each leasing its share of the
key from a Prefect global concurrency limit, ``flows/budget.py``), or, with
``shard_deployment``, from a queue (``flows/queue.py``): this process and
``parallel_shards - 1`` runner flow runs of the ``generate-catalog-shard`` deployment on a
work pool each claim the next unfinished shard and run it with the whole key, shared
adaptively; a runner's claim lapses when its worker dies and another runner resumes the
shard, so the night ends by itself.

``python -m flows.catalog MANIFEST --out DEST [--sim]`` and ``klein-batch flow`` run it in
Prefect's ephemeral mode (no server needed); see ``flows/cli.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from flows import artifacts, leases, user_errors
from flows.budget import (
    DEFAULT_LIMIT_NAME,
    Share,
    ensure_limit,
    leased,
    runner_share,
    share_of,
)
from flows.credits import CREDITS_RELPATH, CreditPool
from flows.merge import MANIFEST_RELPATH, RUN_JSON_RELPATH, combine, merge_manifests, write_run_json
from flows.queue import drain, forget_claims
from flows.secrets import resolve_api_key
from flows.shards import (
    PLAN_RELPATH,
    SHARD_INFO,
    ShardSink,
    ShardSpec,
    StoredPlan,
    plan_shards,
    shard_count,
    shard_folder,
)
from flows.sigterm import stops_on_sigterm
from pipeline import dest_lock
from pipeline.contract import MERGED_STATUS, RowStatus
from pipeline.engine import KeyState
from pipeline.errors import ConfigError, KleinError
from pipeline.html_report import write_html_report
from pipeline.ledger import LEDGER_RELPATH
from pipeline.library import library_for
from pipeline.output_manifest import refuse_own_output_as_input
from pipeline.run import RunOptions, arun_manifest
from pipeline.spec import RunSpec
from pipeline.storage import DATE_HOLE, dated, open_sink
from pipeline.summary import RunSummary

log = logging.getLogger(__name__)
user_errors.install()
_T = TypeVar("_T")

# Before the engine runs a night: losing the deployment's concurrency lease (a Prefect
# server restart) must not cancel it (flows/leases.py).
leases.install()

DEFAULT_API_URL = "https://api.freepik.com"
#: The deployment of ``generate_catalog_shard`` that ``prefect.yaml`` defines.
SHARD_DEPLOYMENT = "generate-catalog-shard/catalog-shard"
#: How often a dispatched shard's state is checked (it runs for minutes).
POLL_S = 2.0
#: How often a runner looks whether its night was cancelled (``_unless_the_night_is_cancelled``).
NIGHT_CHECK_S = 5.0
#: Pause before a failed shard is tried again (a dropped worker, a blip of the API).
RETRY_DELAY_S = 5.0


class ShardsFailed(KleinError):
    """Some shards did not finish after their retries; a rerun resumes them."""


class ShardJob(BaseModel):
    """Everything one shard needs, on whichever worker runs it; never the API key."""

    index: int
    #: Shards of the output in all: this one runs the rows whose key hashes to ``index``.
    count: int = Field(ge=1)
    manifest: str
    #: The run as the user asked for it, with ``out``, ``api_url`` and ``library`` resolved
    #: by the flow.
    spec: RunSpec
    max_active: int = Field(ge=1)
    submits_per_minute: int = Field(ge=1)
    #: The key's own active limit; when ``max_active`` is less, it is this shard's share
    #: and a hard cap (the engine never probes past it into other shards' slots).
    key_max_active: int | None = None
    api_key_block: str | None = None
    #: Global concurrency limit standing for the key; ``None`` runs without a lease.
    concurrency_limit: str | None = DEFAULT_LIMIT_NAME
    occupy: int = Field(default=1, ge=1)
    #: The night's flow run: a ``shard.json`` of another night (an earlier run into the
    #: same output) is stale, one of this flow run's earlier attempts is not.
    token: str = ""
    #: Submit again a task the API no longer knows (404) instead of failing its row: only
    #: for a simulator started per run (``klein-batch flow --sim``), which forgets tasks.
    resubmit_unknown: bool = False
    #: This shard's cap of the flow's ``spec.max_credits`` (``flows/credits.py``).
    max_credits: float | None = None

    @property
    def out(self) -> str:
        return str(self.spec.out)


def _use_endpoint(endpoint: str | None) -> None:
    """The spec's S3 endpoint (MinIO, R2) wherever the flow or a shard runs: a runner on a
    worker, or a night started from a deployment, never saw the CLI's ``--s3-endpoint-url``
    and went to AWS itself (measured: every runner failed with "cannot connect to the AWS
    S3 endpoint" and the parent ran the night alone)."""
    if endpoint:
        from pipeline.s3 import configure

        configure(endpoint_url=str(endpoint))


def _dated(location: str) -> str:
    """``{date}`` in an output becomes the run's scheduled day (UTC), so each night of a
    scheduled catalog gets its own folder, and a late retry still finds its own."""
    if DATE_HOLE not in location:
        return location
    from prefect.runtime import flow_run

    return dated(location, flow_run.scheduled_start_time)


def _absolute(location: str) -> str:
    """Local paths made absolute, so a worker with another working directory finds them."""
    if "://" in location:
        return location
    return str(Path(location).expanduser().resolve())


# --- one shard ------------------------------------------------------------------------------------


async def run_shard(
    job: ShardJob,
    on_fed: Callable[[], None] | None = None,
    key_state: KeyState | None = None,
) -> dict[str, Any]:
    """Run one shard with the engine, inside its lease; returns (and stores) ``shard.json``.

    ``on_fed`` is called once every row of the shard is submitted (``RunOptions.on_fed``);
    a runner passes every shard it runs one ``key_state``, so each shard starts with the
    key as the last one learned it, and counts the slots that one's tail still holds.
    """
    key = await resolve_api_key(job.api_key_block, job.spec.dialect)
    base = open_sink(job.out)
    try:
        spec = ShardSpec(job.index, job.count)
        sink = ShardSink(base, shard_folder(job.index))
        options = RunOptions.from_spec(job.spec)
        # The shard's part of the key and of the manifest; everything else is the spec's.
        options.max_active = job.max_active
        options.submits_per_minute = job.submits_per_minute
        options.key_max_active = job.key_max_active
        options.shard = (job.index, job.count)
        if job.max_credits is not None:
            options.max_credits = job.max_credits
        options.resubmit_unknown = job.resubmit_unknown
        options.on_fed = on_fed
        options.key_state = key_state
        async with leased(job.concurrency_limit, job.occupy) as lease:
            summary = await arun_manifest(
                job.manifest, sink, api_url=job.spec.api_url, api_key=key, options=options
            )
        info: dict[str, Any] = {
            "index": job.index,
            "count": job.count,
            "max_credits": job.max_credits,
            "token": job.token,
            "worker": os.environ.get("PREFECT__WORKER_NAME") or "local",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "occupy": job.occupy,
            "concurrency_limit": job.concurrency_limit,
            "lease_acquired_at": lease.acquired_at,
            "lease_released_at": lease.released_at,
            "manifest_relpath": f"{spec.folder}/{MANIFEST_RELPATH}",
            "summary": summary.to_dict(),
        }
        await sink.put(SHARD_INFO, (json.dumps(info, indent=2) + "\n").encode(), "application/json")
        return info
    finally:
        base.close()


class ShardQueue(BaseModel):
    """The shards a runner may claim: the parent's plan, recomputed where the runner is."""

    total_rows: int = Field(ge=0)
    #: Shards of the output (by key, ``flows/shards.py``).
    shards: int = Field(ge=1)
    #: Each shard's credit cap when the run has a budget (``flows/credits.py``).
    caps: dict[int, float] = Field(default_factory=dict)
    #: Failures of one shard in one runner before that runner leaves it to the others.
    attempts: int = Field(default=3, ge=1)
    #: The night's flow run (the parent): its runners stop when it is cancelled.
    night: str | None = None


def _job_for(template: ShardJob, shard: ShardSpec, queue: ShardQueue) -> ShardJob:
    cap = queue.caps.get(shard.index)
    return template.model_copy(
        update={"index": shard.index, "count": shard.count, "max_credits": cap}
    )


@flow(name="generate-catalog-shard", log_prints=False)
@stops_on_sigterm
async def generate_catalog_shard(job: ShardJob, queue: ShardQueue | None = None) -> Any:
    """Shards of a catalog on a worker of the pool: shard ``job.index``, or, with ``queue``,
    whichever shards are unfinished, one after another, until every shard of the night is
    finished by some runner (``flows/queue.py``)."""
    logger = get_run_logger()
    _use_endpoint(job.spec.s3_endpoint_url)  # this worker may know no endpoint of its own
    if queue is not None:
        shards = plan_shards(queue.shards)
        ran: list[int] = []
        key = KeyState()  # one runner, one key: every shard starts where the last one was

        async def run_here(shard: ShardSpec, fed: Callable[[], None]) -> dict[str, Any]:
            info = await run_shard(_job_for(job, shard, queue), fed, key)
            ran.append(shard.index)
            logger.info("shard %d: %s", shard.index, _counts_text(info["summary"]["counts"]))
            return info

        drained = drain(shards, out=job.out, token=job.token, run=run_here, attempts=queue.attempts)
        ended = await _unless_the_night_is_cancelled(drained, queue.night)
        if ended is None:
            logger.warning(
                "the night's flow run was cancelled: stopped after shards %s; the others "
                "resume from their journals when the night runs again",
                ran or "none",
            )
            from prefect.states import Cancelled

            return Cancelled(message="the night's flow run was cancelled")
        finished, gave_up = ended
        logger.info("ran shards %s; %d of %d finished", ran or "none", len(finished), len(shards))
        return {"ran": ran, "gave_up": gave_up, "finished": len(finished)}
    logger.info(
        "shard %d of %d: %d active tasks of limit %s",
        job.index,
        job.count,
        job.occupy,
        job.concurrency_limit or "(none)",
    )
    info = await run_shard(job)
    logger.info("shard %d: %s", job.index, _counts_text(info["summary"]["counts"]))
    return info


async def _unless_the_night_is_cancelled(work: Awaitable[_T], night: str | None) -> _T | None:
    """Run ``work`` unless the night's flow run is cancelled first (then None).

    Cancelling the night asks the server to cancel its runner flow runs too (``end_runners``),
    but a worker only stops a runner's process if the server's cancellation reaches it (on
    SQLite it was refused with "database is locked", and the runner kept claiming shards).
    So a runner also looks at the night's state every ``NIGHT_CHECK_S`` and stops by itself:
    its shard stops as on Ctrl-C, journal intact. A night that crashed or failed is left to
    its runners: they finish the shards, and the night's rerun only merges them.
    """
    running = asyncio.ensure_future(work)
    if night is None:
        return await running
    watch = asyncio.ensure_future(_cancelled(UUID(night)))
    try:
        await asyncio.wait({running, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this runner itself cancelled: ``wait`` does not pass it on
        with contextlib.suppress(asyncio.CancelledError):  # what ends it is raised below
            await _stop_shards([running])  # raised at once, its shards' answers were cut off
        raise
    finally:
        watch.cancel()
    if running.done():
        return running.result()
    # The shards now wait for the answers to their submits in the air. A SIGTERM for the
    # same cancellation often comes a moment later (the server's cancel reaching the
    # worker) and cancels this runner again (tests/flows/test_scale_out.py: 13 charged, 12
    # journaled, before ``_stop_shards`` waited through it).
    await _stop_shards([running])
    return None


async def _cancelled(night: UUID) -> None:
    """Return once the flow run ``night`` is cancelled or being cancelled."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        while True:
            await asyncio.sleep(NIGHT_CHECK_S)
            try:
                state = (await client.read_flow_run(night)).state
            except Exception as exc:  # the server busy or restarting: look again later
                log.warning("could not read the night's flow run %s: %s", night, exc)
                continue
            if state is not None and (state.is_cancelling() or state.is_cancelled()):
                return


@task(
    name="catalog-shard",
    task_run_name="shard-{job.index}",
    cache_policy=NO_CACHE,
    retries=2,
)
async def shard_task(job: ShardJob) -> dict[str, Any]:
    """One shard in this process, as a Prefect task (retried by Prefect, resumed by its ledger)."""
    return await run_shard(job)


# --- validation and planning ----------------------------------------------------------------------


@task(name="validate-manifest", cache_policy=NO_CACHE)
async def validate_task(manifest: str, spec: RunSpec, shard_size: int) -> dict[str, Any]:
    """Check the manifest as ``klein-batch run`` would (template, variations, library
    included), and fix the shard count of the output (kept from its first run)."""
    from pipeline.check import CheckReport, check_manifest
    from pipeline.library import Library
    from pipeline.providers import published_cost
    from pipeline.status import earlier_journal
    from pipeline.variations import Catalog

    logger = get_run_logger()
    out = str(spec.out)
    library = (
        await Library.open(spec.library, dialect=spec.dialect, model=spec.model)
        if spec.library
        else None
    )
    sink = open_sink(out)
    try:
        stored = await sink.get(PLAN_RELPATH)
        previous = StoredPlan.from_bytes(stored, out) if stored is not None else None

        def check() -> tuple[CheckReport, float]:
            # Into an output the flow ran into before, a dry run counts and prices only what the
            # rerun sends, as `klein-batch run --dry-run` does: the shards' journals say what
            # is done (skipped) and in flight (polled).
            with contextlib.ExitStack() as journals:
                ledgers = [
                    ledger
                    for n in range(previous.shards if previous and spec.dry_run else 0)
                    if (
                        ledger := journals.enter_context(earlier_journal(sink.uri(shard_folder(n))))
                    )
                    is not None
                ]

                def earlier(keys: list[str]) -> dict[str, str]:
                    found: dict[str, str] = {}
                    for ledger in ledgers:
                        found.update(ledger.earlier_work(keys, retry_failed=spec.retry_failed))
                    return found

                committed = sum(ledger.destination_credits() for ledger in ledgers)
                report = check_manifest(
                    manifest,
                    defaults=spec.image_defaults(),
                    limit=spec.limit,
                    catalog=Catalog.build(
                        prompt_template=spec.prompt_template,
                        vary=spec.vary,
                        variations=spec.variations,
                    ),
                    earlier=earlier if ledgers else None,
                    export=spec.export(),
                    reference_column=spec.reference_column,
                    library=library,
                    cost=published_cost(spec.dialect, spec.model),
                )
                return report, committed

        report, committed = await asyncio.to_thread(check)
        logger.info("validation:\n%s", report.render())
        if previous is None and await sink.exists(LEDGER_RELPATH):
            raise ConfigError(
                f"{out} holds a run of `klein-batch run` (its journal is {LEDGER_RELPATH}); a "
                "flow would not see what that run already paid for: finish it with "
                "`klein-batch run`, or give the flow a new output"
            )
        # Input lines: every row (its variations counted once) and every merged line.
        manifest_rows = report.total // max(1, report.per_row) + report.merged
        if previous is not None:
            # The shards' journals are the resume state: the same keys must find the same
            # shards, so the count stays whatever this manifest's size is now.
            count, shard_size = previous.shards, previous.shard_size
        else:
            count = shard_count(manifest_rows, shard_size)
        if not spec.dry_run:
            plan = StoredPlan(
                manifest=report.source,
                total_rows=manifest_rows,
                shard_size=shard_size,
                shards=count,
            )
            await sink.put(PLAN_RELPATH, plan.to_bytes(), "application/json")
        return {
            "source": report.source,
            "total_rows": manifest_rows,
            "shards": count,
            "shard_size": shard_size,
            "to_send": report.to_send,
            "estimated_credits": report.estimated_credits,
            "committed_credits": committed,
            "exit_code": int(report.exit_code),
            "report": report.render(),
        }
    finally:
        sink.close()
        if library is not None:  # read here, not written: its sink's threads are all it holds
            library.sink.close()


def _counts_text(counts: dict[str, int]) -> str:
    shown = [f"{count:,} {status}" for status, count in counts.items() if count]
    return ", ".join(shown) or "no rows"


# --- the catalog flow -----------------------------------------------------------------------------


def _one_writer(
    generate: Callable[..., Awaitable[dict[str, Any]]],
) -> Callable[..., Awaitable[dict[str, Any]]]:
    """The flow holds DEST's lock while it runs: the same lock as `klein-batch run`.

    So a `run` into the flow's output (or a second flow) stops with exit 2 naming this
    flow, and this flow stops the same way while a `run` holds it (``pipeline.dest_lock``:
    an flock locally, a leased conditional-put object on S3). A lost S3 lease cancels
    the flow: another writer may hold the output now.

    The lock names this flow run. A night marked Lost while it still ran (a Prefect server
    down for more than the 90 s heartbeat window: measured, its run was marked Lost 5 s
    after the server came back) is scheduled again as the same flow run, and that attempt
    finds the live one holding the lock: it waits for it instead of failing at once, then
    resumes whatever is left and merges. So the night ends merged whether the live attempt
    finishes or is stopped.
    """

    @functools.wraps(generate)
    async def holding_the_output(*args: Any, **kwargs: Any) -> dict[str, Any]:
        spec = inspect.signature(generate).bind(*args, **kwargs).arguments["spec"]
        out = spec.get("out") if isinstance(spec, dict) else getattr(spec, "out", None)
        endpoint = (dict(spec) if isinstance(spec, dict) else vars(spec)).get("s3_endpoint_url")
        _use_endpoint(endpoint)
        if not out:
            return await generate(*args, **kwargs)  # which says that out is required
        out = _absolute(_dated(out))
        running = asyncio.current_task()

        def lost(message: str) -> None:
            if running is not None:
                running.cancel(message)

        with contextlib.closing(open_sink(out)) as sink:
            async with dest_lock.holding(
                sink, out, kind="flow", on_lost=lost, flow_run=_this_flow_run()
            ):
                return await generate(*args, **kwargs)

    return holding_the_output


#: What ``end_runners`` cleans up after each night run in this process: (runner flow runs,
#: output, shards), by the night's flow run id.
_WIND_DOWN: dict[str, tuple[list[Any], str, list[ShardSpec]]] = {}


async def end_runners(flow: Any, flow_run: Any, state: Any) -> None:
    """State hook of ``generate-catalog``: end its runner flow runs and delete its claims.

    It runs once the night's run has its final state, so neither the runners' exits nor the
    clean-up count as the night's time (the key has nothing left to do by then).

    A night that failed or crashed leaves its runners and their claims alone: they finish
    the shards and a rerun merges them. Measured: a night crashed with two runners at work
    (its lease cancelled by a restarted Prefect server), this hook marked them crashed and
    deleted their claims while they ran, and the next shard was then claimed, and run, by
    both of them.
    """
    night = _WIND_DOWN.pop(str(flow_run.id), None)
    if night is None:
        return
    if state.is_failed() or state.is_crashed():
        return
    helpers, out, shards = night
    await _end_helpers(helpers)
    await forget_claims(out, shards)


@flow(
    name="generate-catalog",
    log_prints=False,
    on_completion=[end_runners],
    on_failure=[end_runners],
    on_crashed=[end_runners],
    on_cancellation=[end_runners],
)
@stops_on_sigterm
@_one_writer
async def generate_catalog(
    manifest: str,
    spec: RunSpec,
    shard_size: int = 5_000,
    parallel_shards: int = 4,
    api_key_block: str | None = None,
    concurrency_limit: str | None = DEFAULT_LIMIT_NAME,
    shard_deployment: str | None = None,
    shard_retries: int = 2,
    resubmit_unknown: bool = False,
) -> dict[str, Any]:
    """Generate a catalog: every manifest row into ``spec.out``, in shards, resumable.

    Args:
        manifest: CSV or Parquet manifest (a path the workers can read, or s3://).
        spec: the run, as ``klein-batch run`` takes it (``pipeline.spec.RunSpec``; a
            mapping of its settings in a deployment's parameters). ``out`` is required;
            ``{date}`` in it becomes the run's scheduled day, e.g.
            ``s3://catalog/nightly/{date}``. ``api_url`` defaults to the Freepik API;
            ``library`` (default with ``{date}`` in ``out``: a ``library`` folder beside the
            dated ones) is where images are copied from instead of paid for.
        shard_size: rows per shard (kept from the first run into the same output).
        parallel_shards: shards running at once; here each leases
            ``max_active // parallel_shards`` of the key's active tasks; with
            ``shard_deployment``, this process plus ``parallel_shards - 1`` runner flow runs
            on the pool, sharing the key adaptively.
        api_key_block: name of a Prefect Secret block holding the API key; empty reads
            ``$FREEPIK_API_KEY`` (``$BFL_API_KEY`` for bfl) where each shard runs.
        concurrency_limit: global concurrency limit standing for the key (created with the
            tier's active tasks if missing); empty runs shards without leases.
        shard_deployment: also run shards in runner flow runs of this deployment (e.g.
            ``generate-catalog-shard/catalog-shard``) on a work pool; empty runs them here.
        shard_retries: Prefect retries of a failed shard (each resumes from its ledger).
        resubmit_unknown: submit again a task the API answers 404 for (set by
            ``klein-batch flow --sim``, whose simulator forgets the tasks of an earlier run;
            against a real API leave it off: a forgotten task may have been charged).
    """
    logger = get_run_logger()
    started = time.time()
    if not spec.out:
        raise ConfigError("flow parameter spec.out is required (the output folder or s3:// URI)")
    if parallel_shards < 1:
        raise ConfigError(f"parallel_shards must be at least 1, got {parallel_shards}")
    if shard_retries < 0:
        raise ConfigError(f"shard_retries must be 0 or more, got {shard_retries}")
    limits = spec.limits()
    shard_count(1, shard_size)  # checks shard_size
    await resolve_api_key(api_key_block, spec.dialect)  # fail before validating a big manifest
    manifest = _absolute(manifest)
    library = library_for(spec.out, spec.library, no_library=spec.no_library)
    out = _absolute(_dated(spec.out))
    spec = spec.replace(
        out=out,
        api_url=spec.api_url or DEFAULT_API_URL,
        library=_absolute(library) if library is not None else None,
    )
    sink = open_sink(out)
    try:
        refuse_own_output_as_input(manifest, sink, out)

        checked = await validate_task(manifest, spec, shard_size)
        shards = plan_shards(checked["shards"])
        parallel = min(parallel_shards, max(1, len(shards)))
        budget = limits.max_active
        if concurrency_limit:
            budget, active = await ensure_limit(concurrency_limit, limits.max_active)
            if not active:
                logger.warning(
                    "global concurrency limit %r is inactive: leases do not limit",
                    concurrency_limit,
                )
        # A limit left from a larger tier (it outlives runs in the Prefect server) does not widen
        # the key; and as each running shard leases at least one slot, no more shards run at
        # once than the key has slots: 4 shards of 1 on a 2-slot key would hold 4 and spend
        # the run answering each other's 429s.
        budget = max(1, min(budget, limits.max_active))
        parallel = min(parallel, budget)
        # What the key itself allows: a `max_active` below its tier's is a share of it.
        key_active = max(spec.tiers[spec.tier].max_active, limits.max_active)
        if shard_deployment:
            # Runners pull whole shards from a queue (flows/queue.py), each with the whole
            # budget shared adaptively, or a fixed part of a budget below the key's.
            share = runner_share(limits, key_active, budget, parallel)
        else:
            share = share_of(limits, budget, parallel)
        shared = _share_text(share, budget, key_active, queue=bool(shard_deployment))
        logger.info(
            "%s: %d rows in %d shards (by key, about %d rows each); %d at a time, %s%s",
            checked["source"],
            checked["total_rows"],
            len(shards),
            checked["total_rows"] // len(shards),
            parallel,
            shared,
            f" (this process and {parallel - 1} runners of deployment {shard_deployment})"
            if shard_deployment
            else "",
        )
        if spec.dry_run:
            return _dry_run_result(spec, limits, checked, parallel, shared)
        pool = (
            CreditPool.load(spec.max_credits, await sink.get(CREDITS_RELPATH), len(shards))
            if spec.max_credits is not None
            else None
        )
        if pool is not None and shard_deployment:
            # Runners claim shards on their own; each gets an equal, fixed part (never more in
            # all). In this process the flow moves what one shard leaves to the others.
            _fixed_caps(pool, shards)
            await sink.put(CREDITS_RELPATH, pool.to_bytes(), "application/json")
        run_id = _flow_run_id()
        # The night's flow run: a shard one of its attempts finished (the same parameters,
        # the same manifest) is finished for the next attempt too. A night marked Lost and
        # run again (automations.yaml) then merges what the surviving runners finished,
        # instead of both sides resuming each other's finished shards once more.
        token = run_id
        make_job = _job_factory(
            manifest=manifest,
            spec=spec,
            share=share,
            key_max_active=key_active,
            api_key_block=api_key_block,
            concurrency_limit=concurrency_limit or None,
            token=token,
            resubmit_unknown=resubmit_unknown,
        )
        progress_id = await artifacts.start_progress(checked["total_rows"], len(shards))
        if shard_deployment:
            if warning := await leases.leases_in_memory():
                logger.warning(warning)
            results, failed = await _run_queue(
                shards,
                make_job,
                deployment=shard_deployment,
                queue=ShardQueue(
                    total_rows=checked["total_rows"],
                    shards=len(shards),
                    caps=dict(pool.caps) if pool is not None else {},
                    attempts=shard_retries + 1,
                    night=_flow_run_id(),
                ),
                runners=parallel,
                progress_id=progress_id,
            )
        else:
            results, failed = await _run_shards(
                shards,
                make_job,
                parallel=parallel,
                retries=shard_retries,
                progress_id=progress_id,
                total_rows=checked["total_rows"],
                credits=_Credits(pool, sink) if pool is not None else None,
            )
        await artifacts.publish_table(results)

        manifest_uri = sink.uri(MANIFEST_RELPATH)
        summary_data: dict[str, Any] = {}
        if not failed:
            manifest_uri, stats = await merge_manifests(
                sink,
                [f"{shard.folder}/{MANIFEST_RELPATH}" for shard in shards],
                total_rows=checked["total_rows"],
                fresh_after=started,
            )
            summary = combine(
                run_id=run_id,
                manifest=checked["source"],
                output=out,
                dialect=spec.dialect,
                tier=limits.name,
                max_active=limits.max_active,
                submits_per_minute=limits.submits_per_minute,
                started_at=started,
                finished_at=time.time(),
                stats=stats,
                shard_summaries=[info["summary"] for info in results],
            )
            extra = {
                "shard_size": checked["shard_size"],
                "shard_count": len(shards),
                "max_credits": spec.max_credits,
                "parallel_shards": parallel,
                "shard_share": share.max_active,
                "key_max_active": key_active,
                "concurrency_limit": concurrency_limit or None,
                "shards": [
                    _shard_entry(info) for info in sorted(results, key=lambda i: i["index"])
                ],
            }
            run_json_uri = await write_run_json(sink, summary, extra)
            report_uri = await write_html_report(
                sink, summary, max_credits=spec.max_credits, columns=spec.report_columns
            )
            summary_data = summary.to_dict() | extra
            await artifacts.publish_summary(
                artifacts.summary_markdown(
                    summary,
                    manifest_uri=manifest_uri,
                    run_json_uri=run_json_uri,
                    images_uri=sink.uri("images/x").rsplit("/", 1)[0],
                    shards=len(shards),
                    share=shared,
                    failed_shards=[],
                    report_uri=report_uri,
                )
            )
            logger.info("catalog done: %s", _counts_text(summary.counts))
            logger.info("output manifest: %s", manifest_uri)
            return _night_state(summary, summary_data, manifest_uri)
        names = ", ".join(str(n) for n in failed)
        raise ShardsFailed(
            f"shards {names} did not finish after {shard_retries} retries (their errors are in "
            f"the task runs); the others are done: run the flow again with the same output to "
            f"resume, nothing finished is paid for twice"
        )
    finally:
        sink.close()


def _night_state(summary: RunSummary, data: dict[str, Any], manifest_uri: str) -> Any:
    """The night's result; a night that left rows without an image says so in its state.

    A Completed state with a message, not Failed: the night did all it could (a Failed
    night would be retried by Prefect, which pays for nothing new and fixes no bad row),
    but whoever looks at the flow runs in the UI should see which nights need a look.
    """
    problems = {
        status: count
        for status, count in summary.counts.items()
        if count and status not in (RowStatus.SUCCEEDED, MERGED_STATUS)
    }
    notes = []
    if problems:
        notes.append(
            f"{summary.succeeded:,} of {summary.images_asked:,} images made; "
            f"{_counts_text(problems)}: each row's reason is in {manifest_uri} and "
            "report.html (rerun with retry_failed for failed rows)"
        )
    if summary.stopped == "budget":
        notes.append(
            "stopped: budget (max_credits reached: run again with a higher one to continue)"
        )
    elif summary.stopped:
        notes.append(f"stopped: {summary.stopped} (run the night again to resume)")
    if summary.changed_rows:
        notes.append(summary.changed_warning().removeprefix("warning: "))
    notes += summary.notices
    if not notes:
        return data
    from prefect.states import Completed

    return Completed(message="; ".join(notes), data=data)


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or uuid.uuid4())


def _this_flow_run() -> str | None:
    """This flow run's id, when it runs as one (its attempts share it)."""
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def _shard_entry(info: dict[str, Any]) -> dict[str, Any]:
    summary = info.get("summary") or {}
    return {
        "shard": info["index"],
        "rows": summary.get("total_rows"),
        "max_credits": info.get("max_credits"),
        "worker": info.get("worker"),
        "occupy": info.get("occupy"),
        "counts": summary.get("counts"),
        "images_per_s": summary.get("images_per_s"),
        "run_json": f"{shard_folder(info['index'])}/{RUN_JSON_RELPATH}",
    }


def _job_factory(
    *,
    manifest: str,
    spec: RunSpec,
    share: Share,
    key_max_active: int,
    api_key_block: str | None,
    concurrency_limit: str | None,
    token: str,
    resubmit_unknown: bool = False,
) -> Any:
    def make(shard: ShardSpec, max_credits: float | None = None) -> ShardJob:
        return ShardJob(
            index=shard.index,
            count=shard.count,
            max_credits=max_credits,
            manifest=manifest,
            spec=spec,
            max_active=share.max_active,
            submits_per_minute=share.submits_per_minute,
            key_max_active=key_max_active,
            api_key_block=api_key_block,
            concurrency_limit=concurrency_limit,
            occupy=share.occupy,
            token=token,
            resubmit_unknown=resubmit_unknown,
        )

    return make


class _Credits:
    """The flow's credit pool (``flows/credits.py``), stored in the output at every change."""

    def __init__(self, pool: CreditPool, sink: Any) -> None:
        self.pool = pool
        self.sink = sink
        self._lock = asyncio.Lock()

    async def grant(self, index: int, *, everything: bool = False) -> float:
        async with self._lock:
            cap = self.pool.grant(index, everything=everything)
            await self._save()
            return cap

    async def settle(self, index: int, info: dict[str, Any]) -> None:
        async with self._lock:
            self.pool.settle(index, float(info["summary"].get("committed_credits", 0.0)))
            await self._save()

    async def _save(self) -> None:
        await self.sink.put(CREDITS_RELPATH, self.pool.to_bytes(), "application/json")


def _fixed_caps(pool: CreditPool, shards: list[ShardSpec]) -> None:
    """Every shard's cap at once, equal parts of what is free (for runners on a pool)."""
    for shard in shards:
        pool.grant(shard.index)


#: How long a cancelled night (Ctrl-C on ``klein-batch flow``, a cancelled flow run) waits
#: for its shards to stop: each waits for the answers to its submits in the air (up to
#: ``pipeline.engine.SETTLE_SUBMITS_S``) and writes its outputs.
SHARDS_STOP_S = 30.0


async def _stop_shards(running: list[asyncio.Future[Any]]) -> None:
    """Cancel the shards still running and wait for them to stop (``SHARDS_STOP_S``), also
    when this task is cancelled again meanwhile; that cancellation is raised once they have.

    Left to ``asyncio.run``'s clean-up, every task of the loop was cancelled at once, the
    engine's submits on the wire among them: tasks the API had charged were never
    journaled, and the rerun paid for their rows again. Cancelled from here, each shard's
    engine stops as a Ctrl-C'd ``klein-batch run`` does, its submits answered first. A
    second cancellation (a SIGTERM after the night's cancel, a second Ctrl-C) ended the
    wait, and the shards were cut as before: ``asyncio.wait`` does not pass it on to them,
    so the wait goes on.
    """
    for future in running:
        future.cancel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SHARDS_STOP_S
    again = False
    pending = [future for future in running if not future.done()]
    while pending and (left := deadline - loop.time()) > 0:
        try:
            await asyncio.wait(pending, timeout=left)
        except asyncio.CancelledError:
            again = True
        pending = [future for future in pending if not future.done()]
    if again:
        raise asyncio.CancelledError


async def _run_shards(
    shards: list[ShardSpec],
    make_job: Any,
    *,
    parallel: int,
    retries: int,
    progress_id: Any,
    total_rows: int,
    credits: _Credits | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Run every shard, ``parallel`` at a time; progress moves as each one finishes.

    With a budget, a shard gets its cap as it starts and gives back what it did not commit
    as it ends; then shards that stopped on their cap run again, one at a time, with what
    is left (``flows/credits.py``).
    """
    logger = get_run_logger()
    gate = asyncio.Semaphore(parallel)
    runner = shard_task.with_options(retries=retries, retry_delay_seconds=RETRY_DELAY_S)

    async def one(
        shard: ShardSpec, everything: bool = False
    ) -> tuple[ShardSpec, dict[str, Any] | BaseException]:
        async with gate:
            cap = await credits.grant(shard.index, everything=everything) if credits else None
            try:
                info = await runner(make_job(shard, cap))
            except Exception as exc:
                return shard, exc  # its cap stays: it may have committed up to it
            if credits is not None:
                await credits.settle(shard.index, info)
            return shard, info

    results: dict[int, dict[str, Any]] = {}
    failed: list[int] = []
    running = [asyncio.ensure_future(one(s)) for s in shards]
    for done, next_done in enumerate(asyncio.as_completed(running), start=1):
        try:
            shard, outcome = await next_done
        except asyncio.CancelledError:
            await _stop_shards(running)
            raise
        if isinstance(outcome, BaseException):
            failed.append(shard.index)
            logger.error("shard %d failed: %s", shard.index, outcome)
        else:
            results[shard.index] = outcome
            logger.info(
                "shard %d on %s: %s",
                shard.index,
                outcome.get("worker"),
                _counts_text(outcome["summary"]["counts"]),
            )
        await artifacts.update_progress(progress_id, total_rows * done // len(shards), total_rows)
    if credits is not None:
        for shard in shards:
            info = results.get(shard.index)
            if info is None or not _budget_skipped(info) or credits.pool.free < 0.01:
                continue
            logger.info(
                "shard %d: again, with the %.2f credits left", shard.index, credits.pool.free
            )
            _, outcome = await one(shard, everything=True)
            if isinstance(outcome, BaseException):
                failed.append(shard.index)
                logger.error("shard %d failed: %s", shard.index, outcome)
            else:
                results[shard.index] = outcome
    return list(results.values()), sorted(failed)


def _budget_skipped(info: dict[str, Any]) -> bool:
    """Whether a shard left rows skipped, as a shard stopped by its credit cap does."""
    return int((info["summary"].get("counts") or {}).get("skipped", 0)) > 0


def _share_text(share: Share, budget: int, key_active: int, *, queue: bool) -> str:
    """How the shards divide the key, for the log, the dry run and the summary artifact."""
    if queue and share.max_active == budget:
        return f"sharing {budget} active tasks adaptively"
    text = f"{share.max_active} of {budget} active tasks each"
    if share.max_active < key_active:
        text += f" (a hard cap; the key has {key_active})"
    return text


def _dry_run_result(
    spec: RunSpec, limits: Any, checked: dict[str, Any], parallel: int, shared: str
) -> dict[str, Any]:
    """What a dry run of the flow returns (and ``klein-batch flow --dry-run`` prints): the
    validation, the plan and its cost, as ``klein-batch run --dry-run``; nothing sent."""
    from pipeline.cli import plan_text

    plan = plan_text(
        spec,
        limits,
        checked["to_send"],
        checked["estimated_credits"],
        checked.get("committed_credits", 0.0),
    )
    plan += f"\n  shards:   {checked['shards']} (by key), {parallel} at a time, {shared}"
    get_run_logger().info("dry run: nothing was sent\n%s%s", checked["report"], plan)
    return {
        "dry_run": True,
        "output": spec.out,
        "report": checked["report"],
        "plan": plan,
        "to_send": checked["to_send"],
        "estimated_credits": checked["estimated_credits"],
        "shards": checked["shards"],
        "exit_code": checked["exit_code"],
    }


async def _run_queue(
    shards: list[ShardSpec],
    make_job: Any,
    *,
    deployment: str,
    queue: ShardQueue,
    runners: int,
    progress_id: Any,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Run the shards from a queue: this process at once, ``runners - 1`` helper flow runs
    of ``deployment`` as soon as workers start them; ends when every shard is finished.

    This process is a runner too, so the key is busy while the workers start their
    processes, and the night ends even if every worker is lost. Helpers still running once
    every shard is finished are ended after the night's run ends (``end_runners``).
    """
    from prefect.deployments.flow_runs import arun_deployment

    logger = get_run_logger()
    if not shards:
        return [], []
    template: ShardJob = make_job(shards[0])
    helpers: list[Any] = []
    # Ended by the flow's state hooks once the night's run has its final state (runners
    # take a few seconds to notice the empty queue and exit, and the night is done by then).
    _WIND_DOWN[_flow_run_id()] = (helpers, template.out, shards)
    for number in range(1, min(runners, len(shards))):
        helper = await arun_deployment(
            name=deployment,
            parameters={
                "job": template.model_dump(mode="json"),
                "queue": queue.model_dump(mode="json"),
            },
            timeout=0,
            flow_run_name=f"shard-runner-{number}",
            tags=["klein-batch"],
        )
        helpers.append(helper.id)
    done = 0
    key = KeyState()  # this process is a runner: its shards share what they learn of the key

    async def on_shard(shard: ShardSpec, info: dict[str, Any] | None) -> None:
        nonlocal done
        done += 1
        if info is None:
            logger.error("shard %d failed here", shard.index)
        else:
            logger.info(
                "shard %d on %s: %s",
                shard.index,
                info.get("worker"),
                _counts_text(info["summary"]["counts"]),
            )
        total = queue.total_rows
        await artifacts.update_progress(progress_id, total * done // len(shards), total)

    finished, failed = await drain(
        shards,
        out=template.out,
        token=template.token,
        run=lambda shard, fed: run_shard(make_job(shard, queue.caps.get(shard.index)), fed, key),
        attempts=queue.attempts,
        on_shard=on_shard,
    )
    return [finished[index] for index in sorted(finished)], failed


#: How long helpers get to notice that every shard is finished and end by themselves.
HELPER_GRACE_S = 30.0


async def _end_helpers(helpers: list[Any]) -> None:
    """End helper runs that did not end by themselves once the queue was empty.

    A helper that never started (no worker free) is cancelled; one still running after
    ``HELPER_GRACE_S`` lost its worker (kill -9, a lost machine: nothing reports its end),
    and is marked crashed, its shards having been finished by the other runners.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import MissingContextError
    from prefect.states import Cancelled, Crashed

    try:
        logger: Any = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger(__name__)
    deadline = time.monotonic() + HELPER_GRACE_S
    async with get_client() as client:
        left = list(helpers)
        while left:
            runs = [await client.read_flow_run(run_id) for run_id in left]
            waiting = [run for run in runs if run.state is None or not run.state.is_final()]
            never_started = [
                run
                for run in waiting
                if run.state is None or run.state.is_scheduled() or run.state.is_pending()
            ]
            for run in never_started:
                await client.set_flow_run_state(
                    run.id, Cancelled(message="not needed: every shard is finished"), force=True
                )
            left = [run.id for run in waiting if run not in never_started]
            if not left:
                return
            if time.monotonic() >= deadline:
                for run_id in left:
                    logger.warning(
                        "shard runner %s did not end %.0f s after every shard finished: its "
                        "worker is lost; marking it crashed",
                        run_id,
                        HELPER_GRACE_S,
                    )
                    await client.set_flow_run_state(
                        run_id,
                        Crashed(
                            message="lost: stopped reporting; its shards were finished by "
                            "other runners"
                        ),
                        force=True,
                    )
                return
            await asyncio.sleep(POLL_S)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main())
