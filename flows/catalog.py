"""The catalog flow: validate, shard, run each shard as one Prefect task, merge, publish.

```python
from flows.catalog import generate_catalog

generate_catalog("catalog.parquet", "out/night", api_url="https://api.freepik.com",
                 tier="standard", shard_size=5_000, api_key_block="freepik-api-key")
```

A Prefect task per shard, never per row: at a million rows a task per row would cost an
hour of orchestration alone, while a shard of thousands of rows keeps one event loop, one
HTTP session and one limiter busy. A shard that fails is retried by Prefect and resumes
from its own ledger, so a retry never pays for an image twice.

Shards run in this process (``parallel_shards`` at a time), or, with ``shard_deployment``,
as sub-flows of the ``generate-catalog-shard`` deployment on a work pool: each worker runs
whole shards, and every running shard leases its share of the API key's active tasks from a
Prefect global concurrency limit once, for its whole life (see ``flows/budget.py``).

``python -m flows.catalog MANIFEST --out DEST [--sim]`` and ``klein-batch flow`` run it in
Prefect's ephemeral mode (no server needed); see ``flows/cli.py``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from flows import artifacts
from flows.budget import DEFAULT_LIMIT_NAME, Share, ensure_limit, leased, share_of
from flows.merge import MANIFEST_RELPATH, RUN_JSON_RELPATH, combine, merge_manifests, write_run_json
from flows.secrets import resolve_api_key
from flows.shards import (
    DUPLICATES_RELPATH,
    PLAN_RELPATH,
    SHARD_INFO,
    ShardSink,
    ShardSpec,
    StoredPlan,
    duplicates_from_bytes,
    duplicates_to_bytes,
    earlier_duplicates,
    plan_shards,
    scan_keys,
    shard_folder,
)
from pipeline import dest_lock
from pipeline.contract import (
    DEFAULT_ASPECT_RATIO,
    DEFAULT_OUTPUT_FORMAT,
    DEFAULT_RESOLUTION,
    DEFAULT_SAFETY,
)
from pipeline.errors import ConfigError, KleinError
from pipeline.html_report import write_html_report
from pipeline.ledger import LEDGER_RELPATH
from pipeline.library import library_for
from pipeline.limits import resolve_tier
from pipeline.manifest import Defaults
from pipeline.output_manifest import refuse_own_output_as_input
from pipeline.run import KEY_ENV, RunOptions, arun_manifest
from pipeline.storage import DATE_HOLE, dated, open_sink

DEFAULT_API_URL = "https://api.freepik.com"
#: The deployment of ``generate_catalog_shard`` that ``prefect.yaml`` defines.
SHARD_DEPLOYMENT = "generate-catalog-shard/catalog-shard"
#: How often a dispatched shard's state is checked (it runs for minutes).
POLL_S = 2.0
#: Pause before a failed shard is tried again (a dropped worker, a blip of the API).
RETRY_DELAY_S = 5.0


class ShardsFailed(KleinError):
    """Some shards did not finish after their retries; a rerun resumes them."""


class ImageDefaults(BaseModel):
    """Values for manifest cells left empty (the same as ``klein-batch run``'s flags)."""

    aspect_ratio: str = DEFAULT_ASPECT_RATIO
    resolution: str = DEFAULT_RESOLUTION
    safety_tolerance: int = DEFAULT_SAFETY
    output_format: str = DEFAULT_OUTPUT_FORMAT
    seed: int | None = None

    def to_defaults(self) -> Defaults:
        return Defaults(**self.model_dump())


class ShardJob(BaseModel):
    """Everything one shard needs, on whichever worker runs it; never the API key."""

    index: int
    start: int
    stop: int
    manifest: str
    out: str
    api_url: str
    dialect: str = "klein"
    tier: str | None = None
    max_active: int = Field(ge=1)
    submits_per_minute: int = Field(ge=1)
    #: The key's own active limit; when ``max_active`` is less, it is this shard's share
    #: and a hard cap (the engine never probes past it into other shards' slots).
    key_max_active: int | None = None
    defaults: ImageDefaults = Field(default_factory=ImageDefaults)
    retry_failed: bool = False
    api_key_block: str | None = None
    #: Global concurrency limit standing for the key; ``None`` runs without a lease.
    concurrency_limit: str | None = DEFAULT_LIMIT_NAME
    occupy: int = Field(default=1, ge=1)
    #: Where this job came from: (parent flow run, attempt), to spot a stale shard.json.
    token: str = ""
    #: Submit again a task the API no longer knows (404) instead of failing its row: only
    #: for a simulator started per run (``klein-batch flow --sim``), which forgets tasks.
    resubmit_unknown: bool = False
    #: The image library every shard copies from and adds to (``pipeline/library.py``).
    library: str | None = None


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


async def run_shard(job: ShardJob) -> dict[str, Any]:
    """Run one shard with the engine, inside its lease; returns (and stores) ``shard.json``."""
    key = await resolve_api_key(job.api_key_block, job.dialect)
    base = open_sink(job.out)
    spec = ShardSpec(job.index, job.start, job.stop)
    sink = ShardSink(base, shard_folder(job.index))
    duplicates = earlier_duplicates(duplicates_from_bytes(await base.get(DUPLICATES_RELPATH)), spec)
    options = RunOptions(
        dialect=job.dialect,
        tier=job.tier,
        max_active=job.max_active,
        submits_per_minute=job.submits_per_minute,
        key_max_active=job.key_max_active,
        defaults=job.defaults.to_defaults(),
        offset=job.start,
        limit=spec.rows,
        retry_failed=job.retry_failed,
        earlier_duplicates=duplicates,
        resubmit_unknown=job.resubmit_unknown,
        library=job.library,
    )
    async with leased(job.concurrency_limit, job.occupy) as lease:
        summary = await arun_manifest(
            job.manifest, sink, api_url=job.api_url, api_key=key, options=options
        )
    info: dict[str, Any] = {
        "index": job.index,
        "start": job.start,
        "stop": job.stop,
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


@flow(name="generate-catalog-shard", log_prints=False)
async def generate_catalog_shard(job: ShardJob) -> dict[str, Any]:
    """One shard of a catalog as its own flow run, so a work pool can spread shards."""
    logger = get_run_logger()
    logger.info(
        "shard %d: rows %d-%d, %d active tasks of limit %s",
        job.index,
        job.start + 1,
        job.stop,
        job.occupy,
        job.concurrency_limit or "(none)",
    )
    info = await run_shard(job)
    logger.info("shard %d: %s", job.index, _counts_text(info["summary"]["counts"]))
    return info


@task(
    name="catalog-shard",
    task_run_name="shard-{job.index}",
    cache_policy=NO_CACHE,
    retries=2,
)
async def shard_task(job: ShardJob, deployment: str | None = None) -> dict[str, Any]:
    """One shard: here, or as a sub-flow run of ``deployment`` on a worker."""
    if deployment is None:
        return await run_shard(job)
    from prefect.deployments.flow_runs import arun_deployment

    flow_run = await arun_deployment(
        name=deployment,
        parameters={"job": job.model_dump(mode="json")},
        timeout=None,
        poll_interval=POLL_S,
        flow_run_name=f"shard-{job.index}",
        tags=["klein-batch"],
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        name = state.name if state is not None else "unknown"
        raise KleinError(f"shard {job.index}: flow run {flow_run.name} ended {name}")
    data = await open_sink(job.out).get(f"{shard_folder(job.index)}/{SHARD_INFO}")
    info = json.loads(data) if data else None
    if not info or info.get("token") != job.token:
        raise KleinError(f"shard {job.index}: flow run {flow_run.name} left no shard.json")
    return info


# --- validation and planning ----------------------------------------------------------------------


@task(name="validate-manifest", cache_policy=NO_CACHE)
async def validate_task(
    manifest: str, out: str, defaults: ImageDefaults, limit: int | None, shard_size: int
) -> dict[str, Any]:
    """Check the manifest as a run would, find keys repeated across shards, fix the plan."""
    from pipeline.check import check_manifest

    logger = get_run_logger()
    image_defaults = defaults.to_defaults()
    report = await asyncio.to_thread(check_manifest, manifest, defaults=image_defaults, limit=limit)
    logger.info("validation:\n%s", report.render())
    sink = open_sink(out)
    stored = await sink.get(PLAN_RELPATH)
    previous = StoredPlan.from_bytes(stored) if stored is not None else None
    if previous is not None and previous.shard_size != shard_size:
        # The shards' ledgers are the resume state: other ranges would pay twice.
        logger.warning(
            "%s was started with shard_size %d; keeping it (asked for %d)",
            out,
            previous.shard_size,
            shard_size,
        )
        shard_size = previous.shard_size
    if previous is None and await sink.exists(LEDGER_RELPATH):
        raise ConfigError(
            f"{out} holds a run of `klein-batch run` (its journal is {LEDGER_RELPATH}); a "
            "flow would not see what that run already paid for: finish it with "
            "`klein-batch run`, or give the flow a new output"
        )
    scan = await asyncio.to_thread(
        scan_keys, manifest, defaults=image_defaults, limit=limit, shard_size=shard_size
    )
    moved = previous.moved_shard(scan.first_keys) if previous is not None else None
    if moved is not None:
        raise ConfigError(
            f"{out} holds a catalog run of a manifest whose rows were in other places: shard "
            f"{moved} (row {moved * shard_size + 1}) starts with another row than before. "
            "Shards are row ranges, so rows that moved would be paid for twice; write this "
            "manifest to a new output (an out ending in /{date} gives each night its own)"
        )
    plan = StoredPlan(
        manifest=report.source,
        total_rows=scan.total_rows,
        shard_size=shard_size,
        first_keys=scan.first_keys,
    )
    await sink.put(
        DUPLICATES_RELPATH, duplicates_to_bytes(scan.duplicates), "application/octet-stream"
    )
    await sink.put(PLAN_RELPATH, plan.to_bytes(), "application/json")
    return {
        "source": report.source,
        "total_rows": scan.total_rows,
        "valid": report.valid,
        "rejected": report.rejected,
        "duplicates": report.duplicates,
        "estimated_credits": report.estimated_credits,
        "shard_size": shard_size,
    }


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
    """

    @functools.wraps(generate)
    async def holding_the_output(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = inspect.signature(generate).bind(*args, **kwargs).arguments["out"]
        out = _absolute(_dated(out))
        running = asyncio.current_task()

        def lost(message: str) -> None:
            if running is not None:
                running.cancel(message)

        async with dest_lock.holding(open_sink(out), out, kind="flow", on_lost=lost):
            return await generate(*args, **kwargs)

    return holding_the_output


@flow(name="generate-catalog", log_prints=False)
@_one_writer
async def generate_catalog(
    manifest: str,
    out: str,
    api_url: str = DEFAULT_API_URL,
    dialect: str = "klein",
    tier: str | None = "standard",
    max_active: int | None = None,
    submits_per_minute: int | None = None,
    shard_size: int = 5_000,
    parallel_shards: int = 4,
    api_key_block: str | None = None,
    concurrency_limit: str | None = DEFAULT_LIMIT_NAME,
    shard_deployment: str | None = None,
    defaults: ImageDefaults | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
    shard_retries: int = 2,
    resubmit_unknown: bool = False,
    library: str | None = None,
    no_library: bool = False,
) -> dict[str, Any]:
    """Generate a catalog: every manifest row into ``out``, in shards, resumable.

    Args:
        manifest: CSV or Parquet manifest (a path the workers can read, or s3://).
        out: output folder (or s3://): images/, manifest.parquet, run.json; ``{date}`` in
            it becomes the run's scheduled day, e.g. ``s3://catalog/nightly/{date}``.
        api_url: API base URL.
        dialect: ``klein`` or ``bfl``.
        tier: the key's rate-limit tier; ``max_active``/``submits_per_minute`` override it.
        shard_size: rows per shard (kept from the first run into the same output).
        parallel_shards: shards running at once; each leases ``max_active // parallel_shards``
            of the key's active tasks.
        api_key_block: name of a Prefect Secret block holding the API key; empty reads
            ``$FREEPIK_API_KEY`` (``$BFL_API_KEY`` for bfl) where each shard runs.
        concurrency_limit: global concurrency limit standing for the key (created with the
            tier's active tasks if missing); empty runs shards without leases.
        shard_deployment: run shards as sub-flows of this deployment (e.g.
            ``generate-catalog-shard/catalog-shard``) on a work pool; empty runs them here.
        defaults: values for cells the manifest leaves empty.
        limit: only the first N rows.
        retry_failed: submit rows that failed in an earlier run again.
        shard_retries: Prefect retries of a failed shard (each resumes from its ledger).
        resubmit_unknown: submit again a task the API answers 404 for (set by
            ``klein-batch flow --sim``, whose simulator forgets the tasks of an earlier run;
            against a real API leave it off: a forgotten task may have been charged).
        library: image library (folder or s3://) whose images are copied instead of paid
            for, and which keeps every image paid for; default with ``{date}`` in ``out``:
            a ``library`` folder beside the dated ones.
        no_library: use no library, not even a ``{date}`` output's default.
    """
    logger = get_run_logger()
    started = time.time()
    if dialect not in KEY_ENV:
        raise ConfigError(f"dialect {dialect!r} is not allowed; expected one of klein, bfl")
    if parallel_shards < 1:
        raise ConfigError(f"parallel_shards must be at least 1, got {parallel_shards}")
    if shard_retries < 0:
        raise ConfigError(f"shard_retries must be 0 or more, got {shard_retries}")
    limits = resolve_tier(tier, max_active, submits_per_minute)
    image_defaults = defaults or ImageDefaults()
    image_defaults.to_defaults()  # a bad default stops the flow before any work
    plan_shards(1, shard_size)  # checks shard_size
    await resolve_api_key(api_key_block, dialect)  # fail before validating a big manifest
    manifest = _absolute(manifest)
    library = library_for(out, library, no_library=no_library)
    if library is not None:
        library = _absolute(library)
    out = _absolute(_dated(out))
    sink = open_sink(out)
    refuse_own_output_as_input(manifest, sink, out)

    checked = await validate_task(manifest, out, image_defaults, limit, shard_size)
    shards = plan_shards(checked["total_rows"], checked["shard_size"])
    parallel = min(parallel_shards, max(1, len(shards)))
    budget = limits.max_active
    if concurrency_limit:
        budget, active = await ensure_limit(concurrency_limit, limits.max_active)
        if not active:
            logger.warning(
                "global concurrency limit %r is inactive: leases do not limit", concurrency_limit
            )
    # A limit left from a larger tier (it outlives runs in the Prefect server) does not widen
    # the key; and as each running shard leases at least one slot, no more shards run at
    # once than the key has slots: 4 shards of 1 on a 2-slot key would hold 4 and spend
    # the run answering each other's 429s.
    budget = max(1, min(budget, limits.max_active))
    parallel = min(parallel, budget)
    share = share_of(limits, budget, parallel)
    logger.info(
        "%s: %d rows in %d shards of %d; %d at a time, %d of %d active tasks each%s",
        checked["source"],
        checked["total_rows"],
        len(shards),
        checked["shard_size"],
        parallel,
        share.occupy,
        budget,
        f" (on deployment {shard_deployment})" if shard_deployment else "",
    )
    run_id = _flow_run_id()
    progress_id = await artifacts.start_progress(checked["total_rows"], len(shards))
    results, failed = await _run_shards(
        shards,
        _job_factory(
            manifest=manifest,
            out=out,
            api_url=api_url,
            dialect=dialect,
            tier=tier,
            share=share,
            key_max_active=limits.max_active,
            defaults=image_defaults,
            retry_failed=retry_failed,
            api_key_block=api_key_block,
            concurrency_limit=concurrency_limit or None,
            token=f"{run_id}-{uuid.uuid4().hex[:8]}",
            resubmit_unknown=resubmit_unknown,
            library=library,
        ),
        deployment=shard_deployment or None,
        parallel=parallel,
        retries=shard_retries,
        progress_id=progress_id,
        total_rows=checked["total_rows"],
    )
    await artifacts.publish_table(results)

    manifest_uri = sink.uri(MANIFEST_RELPATH)
    summary_data: dict[str, Any] = {}
    if not failed:
        manifest_uri, stats = await merge_manifests(
            sink,
            [(shard.start, shard.stop, f"{shard.folder}/{MANIFEST_RELPATH}") for shard in shards],
            fresh_after=started,
        )
        summary = combine(
            run_id=run_id,
            manifest=checked["source"],
            output=out,
            dialect=dialect,
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
            "parallel_shards": parallel,
            "shard_share": share.occupy,
            "concurrency_limit": concurrency_limit or None,
            "shards": [_shard_entry(info) for info in sorted(results, key=lambda i: i["index"])],
        }
        run_json_uri = await write_run_json(sink, summary, extra)
        report_uri = await write_html_report(sink, summary)
        summary_data = summary.to_dict() | extra
        await artifacts.publish_summary(
            artifacts.summary_markdown(
                summary,
                manifest_uri=manifest_uri,
                run_json_uri=run_json_uri,
                images_uri=sink.uri("images/x").rsplit("/", 1)[0],
                shards=len(shards),
                share=share.occupy,
                failed_shards=[],
                report_uri=report_uri,
            )
        )
        logger.info("catalog done: %s", _counts_text(summary.counts))
        logger.info("output manifest: %s", manifest_uri)
        return summary_data
    names = ", ".join(str(n) for n in failed)
    raise ShardsFailed(
        f"shards {names} did not finish after {shard_retries} retries (their errors are in "
        f"the task runs); the others are done: run the flow again with the same output to "
        f"resume, nothing finished is paid for twice"
    )


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or uuid.uuid4())


def _shard_entry(info: dict[str, Any]) -> dict[str, Any]:
    summary = info.get("summary") or {}
    return {
        "shard": info["index"],
        "rows": [info["start"] + 1, info["stop"]],
        "worker": info.get("worker"),
        "occupy": info.get("occupy"),
        "counts": summary.get("counts"),
        "images_per_s": summary.get("images_per_s"),
        "run_json": f"{shard_folder(info['index'])}/{RUN_JSON_RELPATH}",
    }


def _job_factory(
    *,
    manifest: str,
    out: str,
    api_url: str,
    dialect: str,
    tier: str | None,
    share: Share,
    key_max_active: int,
    defaults: ImageDefaults,
    retry_failed: bool,
    api_key_block: str | None,
    concurrency_limit: str | None,
    token: str,
    resubmit_unknown: bool = False,
    library: str | None = None,
) -> Any:
    def make(shard: ShardSpec) -> ShardJob:
        return ShardJob(
            index=shard.index,
            start=shard.start,
            stop=shard.stop,
            manifest=manifest,
            out=out,
            api_url=api_url,
            dialect=dialect,
            tier=tier,
            max_active=share.max_active,
            submits_per_minute=share.submits_per_minute,
            key_max_active=key_max_active,
            defaults=defaults,
            retry_failed=retry_failed,
            api_key_block=api_key_block,
            concurrency_limit=concurrency_limit,
            occupy=share.occupy,
            token=token,
            resubmit_unknown=resubmit_unknown,
            library=library,
        )

    return make


async def _run_shards(
    shards: list[ShardSpec],
    make_job: Any,
    *,
    deployment: str | None,
    parallel: int,
    retries: int,
    progress_id: Any,
    total_rows: int,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Run every shard, ``parallel`` at a time; progress moves as each one finishes."""
    logger = get_run_logger()
    gate = asyncio.Semaphore(parallel)
    runner = shard_task.with_options(retries=retries, retry_delay_seconds=RETRY_DELAY_S)

    async def one(shard: ShardSpec) -> tuple[ShardSpec, dict[str, Any] | BaseException]:
        async with gate:
            try:
                return shard, await runner(make_job(shard), deployment)
            except Exception as exc:
                return shard, exc

    results: list[dict[str, Any]] = []
    failed: list[int] = []
    done_rows = 0
    for next_done in asyncio.as_completed([one(shard) for shard in shards]):
        shard, outcome = await next_done
        done_rows += shard.rows
        if isinstance(outcome, BaseException):
            failed.append(shard.index)
            logger.error(
                "shard %d (rows %d-%d) failed: %s",
                shard.index,
                shard.start + 1,
                shard.stop,
                outcome,
            )
        else:
            results.append(outcome)
            logger.info(
                "shard %d (rows %d-%d) on %s: %s",
                shard.index,
                shard.start + 1,
                shard.stop,
                outcome.get("worker"),
                _counts_text(outcome["summary"]["counts"]),
            )
        await artifacts.update_progress(progress_id, done_rows, total_rows)
    return results, sorted(failed)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main())
