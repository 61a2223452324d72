"""The Python API: one call runs a manifest end to end, as ``klein-batch run`` does.

```python
from pipeline import run_manifest

summary = run_manifest("catalog.csv", "out/", sim=True)   # or api_url=..., key in $FREEPIK_API_KEY
print(summary.counts, summary.images_per_s)

# Every option of `klein-batch run`, as the command and the Prefect flow take them:
spec = RunSpec(out="out/", sim=True, vary=("style=studio,lifestyle",), max_credits=50)
summary = run_manifest("catalog.csv", spec=spec)
```

The stages meet here and nowhere else: the manifest is read and validated batch by batch,
the ledger decides what each row needs (submit, poll an earlier task, nothing), the engine
carries rows to outcomes, and the output manifest and ``run.json`` are written from the
ledger at the end, also when the run is interrupted, so a rerun of the same call resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import dataclasses
import logging
import os
import secrets
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import polars as pl
import pyarrow as pa

from pipeline import dest_lock
from pipeline.budget import Budget
from pipeline.config import MISSING_REFERENCE_CHOICES, WEBHOOK_SECRET_ENV
from pipeline.contract import DEFAULT_TIER, MERGED_STATUS, TIERS, RowStatus
from pipeline.engine import Engine, EngineSettings, Job, KeyState
from pipeline.errors import (
    ApiUnreachable,
    ConfigError,
    KeyRefusedError,
    KleinError,
    StorageError,
    Terminated,
)
from pipeline.html_report import write_html_report
from pipeline.keys import key_shard
from pipeline.ledger import Action, Ledger, Planned
from pipeline.library import Library
from pipeline.limits import resolve_tier
from pipeline.manifest import (
    MERGED_COLUMN,
    ArrowStream,
    Defaults,
    ManifestReader,
    lines_to_validate,
    validate_batch,
)
from pipeline.output_manifest import refuse_own_output_as_input, write_output_manifest
from pipeline.product_exports import ExportSpec, open_manifest
from pipeline.providers import make_provider
from pipeline.references import ReferenceStore
from pipeline.remote_journal import RemoteJournal
from pipeline.report import latency_percentiles, write_run_json
from pipeline.retry import RetryPolicy
from pipeline.rows import ImageRequest, Outcome, Rejection, Row
from pipeline.spec import API_KEY_ENV, RunSpec
from pipeline.storage import LocalSink, Sink, open_sink, write_failed
from pipeline.summary import CHANGED_EXAMPLES, ExitCode, ProgressSnapshot, RunSummary
from pipeline.urls import without_credentials
from pipeline.variations import Catalog
from pipeline.verdicts import duplicate_rejection

if TYPE_CHECKING:
    from pipeline.sim.config import SimConfig
    from pipeline.webhooks import WebhookReceiver

log = logging.getLogger(__name__)

#: Environment variable holding the API key, per dialect. Keys are never flags or parameters
#: that could end up in shell history, logs or Prefect run parameters.
KEY_ENV = API_KEY_ENV

#: What a run reads: a file (local or ``s3://``), or a table in memory.
ManifestSource = str | Path | pl.DataFrame | pa.Table | ArrowStream

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunOptions:
    """Everything that shapes a run except the secrets; the CLI and config file fill it."""

    dialect: str = "klein"
    tier: str | None = None
    max_active: int | None = None
    submits_per_minute: int | None = None
    #: The key's own active limit: its tier's (a config file's tier included), or a flow
    #: shard's key. ``max_active`` below it is this run's share of the key, a hard cap.
    #: None: ``tier``'s limit plays this part.
    key_max_active: int | None = None
    defaults: Defaults = field(default_factory=Defaults)
    limit: int | None = None
    retry_failed: bool = False
    batch_size: int = 2_000
    expected_latency_s: float = 1.0
    refusal_target: float = 0.25
    poll_quantile: float = 0.85
    #: Ask the API's task list which tasks ended, where it keeps up (``pipeline/task_list.py``).
    task_list: bool = True
    task_timeout_s: float = 900.0
    max_reference_bytes: int = 10 * 1024 * 1024
    allow_private_urls: bool = False
    #: Fetch ``http://`` reference URLs too (default: https only).
    allow_http: bool = False
    #: How hard each step (submit, poll, download) retries before its row ends ``failed``.
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Seconds the API may go without answering before the run stops (``ApiUnreachable``);
    #: until then rows wait for it instead of failing (``pipeline/gate.py``).
    api_outage_wait_s: float = 300.0
    #: Submit again a resumed task the API answers 404 for, instead of failing the row. Set
    #: by ``sim=True``: each run starts a fresh simulator that knows no earlier task, and
    #: resubmitting to it costs nothing real. Against a real API leave it off (a forgotten
    #: task may have been charged); ``--retry-failed`` resubmits such rows on request.
    resubmit_unknown: bool = False
    progress_interval_s: float = 0.25
    #: Skip this many data rows first (a shard's row range is ``offset`` + ``limit`` rows);
    #: rows keep their original numbers in messages and in the output manifest.
    offset: int = 0
    #: ``(index, count)``: run only the rows whose product key falls in shard ``index`` of
    #: ``count`` (``keys.key_shard``), the others are another run's; None: every row. A
    #: flow's shards use it, so an edited manifest moves no row between shards.
    shard: tuple[int, int] | None = None
    #: Prompt template and variation matrix (``pipeline/variations.py``); None: plain rows.
    catalog: Catalog | None = None
    #: Credits this output may spend in all, in flight included (``pipeline/budget.py``).
    max_credits: float | None = None
    #: Dialect bfl's model: ``klein-4b`` (default) or ``klein-9b``.
    model: str | None = None
    #: ``HOST:PORT`` to receive webhooks on (``pipeline/webhooks.py``); None: polling only.
    webhook_listen: str | None = None
    #: The address the API should call when it differs from ``http://HOST:PORT``.
    webhook_public_url: str | None = None
    #: A shop's product export read as such (``pipeline/product_exports.py``): layout and
    #: ``--per product|variant``; None: the manifest's rows as they are.
    export: ExportSpec | None = None
    #: The column holding each row's reference image (``--reference-column "Image Src"``);
    #: None: ``input_image`` (and ``input_image_2``...).
    reference_column: str | None = None
    #: What a reference URL that cannot be fetched does to its row: ``fail`` (``failed``,
    #: retried by ``--retry-failed``) or ``text-only`` (generated from the prompt alone).
    missing_reference: str = "fail"
    #: Catalog columns report.html shows under each product (``--report-columns``); empty:
    #: a few that look like a title, SKU or colour.
    report_columns: tuple[str, ...] = ()
    #: The image library (``pipeline/library.py``): a local folder or ``s3://`` URI whose
    #: images are copied instead of paid for, and which keeps every image paid for here.
    library: str | None = None
    #: Called once every row of the run is submitted (or ended) and only tasks in flight are
    #: left (``Engine.fed``): a flow's runner claims its next shard then (``flows/queue.py``).
    on_fed: Callable[[], None] | None = None
    #: Shared by the runs of one process on one key (``engine.KeyState``): a flow's runner
    #: passes one to each shard it runs. None: the run learns the key on its own.
    key_state: KeyState | None = None

    @classmethod
    def from_spec(cls, spec: RunSpec, base: RunOptions | None = None) -> RunOptions:
        """The engine's options for a run specification (the CLI's, a flow shard's, an API
        caller's); ``base`` keeps the tuning knobs a spec does not carry (latencies,
        intervals, a shard's offset)."""
        opts = dataclasses.replace(base) if base is not None else cls()
        limits = spec.limits()
        opts.dialect = spec.dialect
        # A tier from a config file reaches the run as its explicit limits.
        opts.tier = spec.tier if spec.tier in TIERS else None
        opts.max_active = limits.max_active
        opts.submits_per_minute = limits.submits_per_minute
        # A tier of the config file's with a lower --max-active is a share of that key, as
        # a built-in tier's is (``_is_a_share``).
        opts.key_max_active = max(spec.tiers[spec.tier].max_active, limits.max_active)
        opts.defaults = spec.image_defaults()
        opts.limit = spec.limit
        opts.retry_failed = spec.retry_failed
        opts.catalog = Catalog.build(
            prompt_template=spec.prompt_template, vary=spec.vary, variations=spec.variations
        )
        opts.max_credits = spec.max_credits
        opts.model = spec.model
        opts.webhook_listen = spec.webhook_listen
        opts.webhook_public_url = spec.webhook_public_url
        opts.library = spec.library
        opts.export = spec.export()
        opts.reference_column = spec.reference_column
        opts.missing_reference = spec.missing_reference
        opts.allow_http = spec.allow_http_references
        opts.allow_private_urls = spec.allow_private_references
        opts.report_columns = tuple(spec.report_columns)
        opts.api_outage_wait_s = spec.api_outage_wait
        opts.task_list = not spec.no_task_list
        return opts


def simulator_for(spec: RunSpec) -> SimConfig | None:
    """The simulator a spec asks for: its ``sim_config`` file, or, with ``sim`` alone, one
    key whose limits are the ones the run asked for (the demo should show a run using its
    whole tier; a simulated key on a smaller tier would only answer 429s). None: a real API.
    """
    if spec.sim_config is None and not spec.sim:
        return None  # a real API: the simulator's code is not even imported
    from pipeline.sim.config import KeyConfig, SimConfig

    if spec.sim_config is not None:
        return SimConfig.from_toml(spec.sim_config)
    limits = spec.limits()
    key = KeyConfig(
        tier=spec.tier if spec.tier in TIERS else DEFAULT_TIER,
        max_active=limits.max_active,
        submits_per_minute=limits.submits_per_minute,
    )
    return SimConfig(keys=[key])


def run_manifest(
    manifest: ManifestSource,
    out: str | Path | None = None,
    *,
    spec: RunSpec | None = None,
    api_url: str | None = None,
    api_key: str | None = None,
    sim: bool | object = False,
    dialect: str | None = None,
    tier: str | None = None,
    max_active: int | None = None,
    submits_per_minute: int | None = None,
    defaults: Defaults | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
    on_progress: Callable[[ProgressSnapshot], None] | None = None,
    options: RunOptions | None = None,
    prompt_template: str | None = None,
    vary: Sequence[str] = (),
    variations: Sequence[str | Path] = (),
    max_credits: float | None = None,
    catalog: str | ExportSpec | None = None,
    per: str | None = None,
    reference_column: str | None = None,
    missing_reference: str | None = None,
    progress: bool = False,
) -> RunSummary:
    """Run a manifest to completion and return its summary (also written to ``run.json``).

    ``sim=True`` (or a ``pipeline.sim.SimConfig``) starts the bundled simulator in this
    process instead of calling a real API. Keyword arguments override ``options``.
    ``catalog="shopify"`` or ``"woocommerce"`` (with ``per="product"`` or ``"variant"``)
    reads a shop's product export as it is. ``progress=True`` shows a progress bar (in a
    terminal, or in a Jupyter cell).

    Called where an event loop already runs (every Jupyter cell), the run gets a loop of
    its own in a worker thread and this call blocks until it ends, as it does elsewhere;
    ``await arun_manifest(...)`` (same arguments) keeps the cell's loop free instead.

    ``spec`` (a ``pipeline.spec.RunSpec``) is the whole run as ``klein-batch run`` takes it:
    with it the run's options, output, API URL and simulator come from the spec, and the
    option keywords above are not used (``options`` still supplies tuning knobs).

    An API that does not answer for ``api_outage_wait`` seconds raises
    ``pipeline.errors.ApiUnreachable`` once the outputs are written (as a ``StorageError``
    does); until then rows wait for it, and the same call afterwards resumes the run.
    """
    run = arun_manifest(
        manifest,
        out,
        spec=spec,
        api_url=api_url,
        api_key=api_key,
        sim=sim,
        dialect=dialect,
        tier=tier,
        max_active=max_active,
        submits_per_minute=submits_per_minute,
        defaults=defaults,
        limit=limit,
        retry_failed=retry_failed,
        on_progress=on_progress,
        options=options,
        prompt_template=prompt_template,
        vary=vary,
        variations=variations,
        max_credits=max_credits,
        catalog=catalog,
        per=per,
        reference_column=reference_column,
        missing_reference=missing_reference,
        progress=progress,
    )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_until_done(run)
    # A running loop in this thread (Jupyter, an async app): asyncio.run() would refuse.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="klein-run") as pool:
        return pool.submit(_run_until_done, run).result()


async def arun_manifest(
    manifest: ManifestSource,
    out: str | Path | Sink | None = None,
    *,
    spec: RunSpec | None = None,
    api_url: str | None = None,
    api_key: str | None = None,
    sim: bool | object = False,
    dialect: str | None = None,
    tier: str | None = None,
    max_active: int | None = None,
    submits_per_minute: int | None = None,
    defaults: Defaults | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
    on_progress: Callable[[ProgressSnapshot], None] | None = None,
    options: RunOptions | None = None,
    prompt_template: str | None = None,
    vary: Sequence[str] = (),
    variations: Sequence[str | Path] = (),
    max_credits: float | None = None,
    catalog: str | ExportSpec | None = None,
    per: str | None = None,
    reference_column: str | None = None,
    missing_reference: str | None = None,
    progress: bool = False,
    webhook_secret: str | None = None,
) -> RunSummary:
    """``run_manifest`` for callers that already run an event loop (notebooks, Prefect).

    Takes the same arguments as ``run_manifest`` (``sim=True`` included; ``options`` is
    optional). With ``options.webhook_listen`` the webhook signing secret is
    ``webhook_secret`` or the dialect's environment variable
    (``pipeline.config.WEBHOOK_SECRET_ENV``); dialect bfl makes one up per run when neither
    is set, since the client sends it with each task.

    ``out`` may also be a ready ``Sink`` (Prefect shards pass one that keeps their journal
    and partial manifest apart while sharing ``images/``).
    """
    if spec is not None:
        out = out if out is not None else spec.out
        api_url = api_url or spec.api_url
        if sim is False or sim is None:
            sim = simulator_for(spec) or False
        options = RunOptions.from_spec(spec, options)
        dialect = spec.dialect
    if out is None:
        raise ConfigError("no output: pass out (a folder or s3:// URI), or a spec with out")
    opts = options or RunOptions()
    _export_options(opts, catalog, per, reference_column, missing_reference)
    if dialect is not None:
        opts.dialect = dialect
    opts.tier = tier if tier is not None else opts.tier
    opts.max_active = max_active if max_active is not None else opts.max_active
    if submits_per_minute is not None:
        opts.submits_per_minute = submits_per_minute
    opts.defaults = defaults or opts.defaults
    opts.limit = limit if limit is not None else opts.limit
    opts.retry_failed = retry_failed or opts.retry_failed
    if prompt_template is not None or vary or variations:
        opts.catalog = Catalog.build(
            prompt_template=prompt_template, vary=vary, variations=variations
        )
    if max_credits is not None:
        if max_credits < 0:
            raise ConfigError(f"max_credits {max_credits!r} is not allowed; expected 0 or more")
        opts.max_credits = max_credits
    with contextlib.ExitStack() as stack:
        if progress and on_progress is None:
            from pipeline.progress import ProgressDisplay

            on_progress = stack.enter_context(ProgressDisplay(mode="auto"))
        if sim is False or sim is None:
            return await _until_done_or_terminated(
                _arun(
                    manifest,
                    out,
                    api_url=api_url,
                    api_key=api_key,
                    options=opts,
                    on_progress=on_progress,
                    webhook_secret=webhook_secret,
                )
            )
        from pipeline.sim import SimConfig, SimServer

        config = sim if isinstance(sim, SimConfig) else SimConfig()
        opts.resubmit_unknown = True
        hook_secret = webhook_secret
        if opts.webhook_listen:
            # The simulated account signs with its key's secret (dialect klein); bfl tasks
            # carry the run's own. Either way the run and the simulator agree on one.
            config = copy.deepcopy(config)
            first = config.keys[0]
            first.webhook_secret = first.webhook_secret or secrets.token_urlsafe(24)
            hook_secret = first.webhook_secret
        server = stack.enter_context(SimServer.in_thread(config))
        return await _until_done_or_terminated(
            _arun(
                manifest,
                out,
                api_url=server.url,
                api_key=config.keys[0].key,
                options=opts,
                on_progress=on_progress,
                webhook_secret=hook_secret,
            )
        )


@dataclass(slots=True)
class _Stop:
    """What stopped a run from outside (a signal): the first one's reason, and how many came.

    Set by ``_run_until_done``'s handler, read by ``_Run.finish`` so run.json, report.html
    and the journal say ``stopped: interrupted`` rather than ``finished``.
    """

    reason: str | None = None
    signals: int = 0


#: The run's ``_Stop`` while ``_run_until_done`` drives it (a context variable: the run's
#: tasks, its shielded wind-down included, inherit it; a run in a notebook thread has none).
_STOP: contextvars.ContextVar[_Stop | None] = contextvars.ContextVar("klein_stop", default=None)

#: Said on stderr when Ctrl-C (or SIGTERM) comes again while the outputs are being written.
STILL_WRITING = (
    "still writing manifest.parquet, run.json and report.html (a few seconds); "
    "Ctrl-C again to quit at once without them (every acknowledged task is in the journal: "
    "the same command resumes and writes them)\n"
)
#: Said on stderr as a third signal quits at once.
QUITTING = (
    "quitting without writing the outputs; every acknowledged task is in the journal: run "
    "the same command again to resume and write them\n"
)


def _on_stop_signal(
    stop: _Stop, task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop, signum: int
) -> None:
    """Ctrl-C or SIGTERM while a run goes: the first stops it (its outputs are written),
    the second only says so, the third quits at once.

    asyncio's own handler raised KeyboardInterrupt at the second Ctrl-C, wherever the run's
    wind-down was: a double Ctrl-C (common: people press it twice) left no report.html,
    sometimes not even manifest.parquet or run.json. Writing them takes seconds; a person
    who really wants out presses a third time. The journal holds every acknowledged task
    (``Ledger.record_ack`` commits before the task is used), so quitting then loses no paid
    work: it is a kill -9, which the rerun recovers from. A Python-level handler (not the
    loop's) so that the third press works while the loop is busy writing.
    """
    stop.signals += 1
    if stop.signals == 1:
        stop.reason = "terminated" if signum == signal.SIGTERM else "interrupted"
        loop.call_soon_threadsafe(task.cancel)
        return
    if stop.signals == 2:
        _say(STILL_WRITING)
        return
    _say(QUITTING)
    code = ExitCode.TERMINATED if signum == signal.SIGTERM else ExitCode.INTERRUPTED
    os._exit(int(code))


def _say(text: str) -> None:
    """One line to stderr from a signal handler: ``os.write``, since the handler may run in
    the middle of a buffered write to stderr, which must not be re-entered."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


def take_sigterm(handler: Callable[[int, Any], None]) -> Any:
    """Install ``handler`` for SIGTERM, marked as one that stops a run (or a catalog flow)
    first; returns the handler it replaces."""
    handler.klein_stop = True  # type: ignore[attr-defined]
    return signal.signal(signal.SIGTERM, handler)


def sigterm_taken() -> bool:
    """Whether SIGTERM already stops a run or flow of ours first (``take_sigterm``): an
    inner handler would stop only its own part of that work."""
    return bool(getattr(signal.getsignal(signal.SIGTERM), "klein_stop", False))


async def _until_done_or_terminated(run: Coroutine[Any, Any, RunSummary]) -> RunSummary:
    """Await ``run``; a SIGTERM first stops it as ``klein-batch run`` stops (its submits in
    the air answered and journaled, its outputs written, saying ``terminated``), and only
    then reaches the handler that had it.

    For ``arun_manifest`` called in the main thread by code of the user's: a Prefect flow
    of their own on a worker, a script under systemd. Prefect's handler raised its
    ``TerminationSignal`` wherever the main thread was: inside one row's task it ended that
    row (``skipped``) and the run went on; in the loop's ``select``, ``asyncio.run``'s
    clean-up cancelled the submits on the wire, charged and never journaled. Now that
    handler gets the signal once the run has stopped (Prefect then ends the flow run as it
    would have; the default handler ends the process). Not installed under
    ``_run_until_done`` or a catalog flow, which handle SIGTERM themselves, nor off the
    main thread (signals are delivered there only).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or _STOP.get() is not None
        or sigterm_taken()
    ):
        return await run
    loop = asyncio.get_running_loop()
    stop = _Stop()
    context = contextvars.copy_context()
    context.run(_STOP.set, stop)  # the run's finish says ``terminated``
    task = loop.create_task(run, context=context)

    def on_sigterm(signum: int, frame: Any) -> None:
        stop.signals += 1
        if stop.signals == 1:
            stop.reason = "terminated"
            loop.call_soon_threadsafe(task.cancel)

    previous = take_sigterm(on_sigterm)
    try:
        summary = await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if stop.reason != "terminated" or (current is not None and current.cancelling()):
            raise
    finally:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)
    if stop.reason != "terminated":
        return summary
    # Stopped by SIGTERM (or finished as it came), outputs written: now the signal goes
    # where it went before.
    if callable(previous):
        previous(signal.SIGTERM, None)
    elif previous == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGTERM)
    raise Terminated("stopped by SIGTERM; run the same call again to resume")


def _run_until_done(run: Coroutine[Any, Any, RunSummary]) -> RunSummary:
    """``asyncio.run`` with Ctrl-C and SIGTERM stopping the run as a person expects.

    systemd, Kubernetes and Prefect stop a process with SIGTERM; its default kills the
    process at once. Here both cancel the run, so ``arun_manifest`` writes the outputs from
    the journal (saying the run was interrupted), and then raise ``KeyboardInterrupt`` or
    ``Terminated``. A second signal during that wind-down does not abandon it
    (``_on_stop_signal``). Only in the main thread (where signals are delivered).
    """
    stop = _Stop()

    async def main() -> RunSummary:
        _STOP.set(stop)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        previous: dict[int, Any] = {}
        if task is not None and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError, OSError):
                    previous[signum] = signal.signal(
                        signum,
                        lambda number, _frame: _on_stop_signal(stop, task, loop, number),
                    )
        try:
            return await run
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if stop.reason == "terminated":
            raise Terminated("stopped by SIGTERM; run the same command again to resume") from None
        if stop.reason == "interrupted":
            raise KeyboardInterrupt from None
        raise


async def _arun(
    manifest: ManifestSource,
    out: str | Path | Sink,
    *,
    api_url: str | None,
    api_key: str | None,
    options: RunOptions,
    on_progress: Callable[[ProgressSnapshot], None] | None,
    webhook_secret: str | None,
) -> RunSummary:
    """One run with its options settled: the stages wired together."""
    opts = options
    limits = resolve_tier(opts.tier, opts.max_active, opts.submits_per_minute)
    if not api_url:
        raise ConfigError("no API URL: pass --api-url URL, or --sim for the bundled simulator")
    env_name = KEY_ENV.get(opts.dialect, "FREEPIK_API_KEY")
    key = api_key or os.environ.get(env_name, "")
    if not key:
        raise ConfigError(f"no API key: set the environment variable {env_name}")
    hook_secret = webhook_secret
    if opts.webhook_listen and not hook_secret:
        hook_secret = os.environ.get(WEBHOOK_SECRET_ENV.get(opts.dialect, ""), "").strip()
        if not hook_secret and opts.dialect == "bfl":
            hook_secret = secrets.token_urlsafe(24)
    provider = make_provider(
        opts.dialect, api_url, key, model=opts.model, webhook_secret=hook_secret
    )
    receiver: WebhookReceiver | None = None
    if opts.webhook_listen:
        # aiohttp's server side only for a run that receives webhooks (polling: never).
        from pipeline.webhooks import WebhookReceiver, parse_listen

        host, port = parse_listen(opts.webhook_listen)
        receiver = WebhookReceiver(
            provider,
            hook_secret or "",
            lambda task_id, state: (
                run.engine.notify_finished(task_id, state) if run.engine is not None else None
            ),
            host=host,
            port=port,
            public_url=opts.webhook_public_url,
        )
    sink = out if isinstance(out, Sink) else open_sink(out)
    refuse_own_output_as_input(manifest, sink, str(out))
    reader = open_manifest(
        manifest,
        export=opts.export,
        reference_column=opts.reference_column,
        batch_size=opts.batch_size,
        limit=opts.limit,
        offset=opts.offset,
        require_prompt=opts.catalog is None or opts.catalog.requires_prompt,
    )
    if opts.catalog is not None:
        opts.catalog.check(reader)
    # Opened (its index read) before anything is planned: a library that cannot be read
    # stops the run before it starts, rather than making it pay for what it holds.
    library = (
        await Library.open(opts.library, dialect=opts.dialect, model=opts.model)
        if opts.library
        else None
    )
    local_root = sink.local_path(".klein")
    remote: RemoteJournal | None = None
    if local_root is None:
        # A remote output: the ledger lives in a local work dir, mirrored to the output.
        remote = await RemoteJournal.open(sink)
        local_root = remote.work_dir
    local_root.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    lost_lock: list[str] = []
    engines: list[Engine] = []

    def lock_lost(message: str) -> None:
        lost_lock.append(message)
        for running in engines:
            running.fail(StorageError(message))

    async with contextlib.AsyncExitStack() as held:
        if not isinstance(out, Sink):
            # Last out (the lock's release writes through it): an S3 output's upload
            # threads would otherwise idle until the sink is collected, in a worker
            # process that runs flow after flow.
            held.callback(sink.close)
            # DEST's own lock, the one `klein-batch flow` takes too (a Sink passed in is a
            # flow's shard: its flow holds DEST's lock, the shard its own journal's).
            await held.enter_async_context(
                dest_lock.holding(sink, str(out), kind="run", on_lost=lock_lost)
            )
        if isinstance(out, Sink) or remote is not None:
            # The journal's folder on this machine (a shard's, or a remote output's work dir).
            held.enter_context(dest_lock.hold(local_root, str(out)))
        if isinstance(sink, LocalSink):
            # Ours alone now: images a killed run left half-written go (their rows rerun).
            for folder in (sink.root, sink.root / "images"):
                dest_lock.sweep_partial_writes(folder)
        ledger = held.enter_context(
            remote.open_ledger() if remote else Ledger.open(local_root / "ledger.sqlite")
        )
        ledger.mask = provider.mask  # task ids and reasons are stored with secrets masked
        ledger.start_run(
            run_id,
            {
                "manifest": reader.name,
                "dialect": opts.dialect,
                "api_url": without_credentials(api_url),
                "tier": limits.name,
                "max_active": limits.max_active,
                "submits_per_minute": limits.submits_per_minute,
                "limit": opts.limit,
                "retry_failed": opts.retry_failed,
                # For `klein-batch status` (from another process) and report.html.
                "max_credits": opts.max_credits,
                "variations": opts.catalog.size if opts.catalog else 1,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "notices": list(reader.notices),
            },
        )
        if remote is not None:
            remote.start(run_id)
        run = _Run(run_id, reader, ledger, opts, on_progress)
        # A flow's shard (a Sink passed in): the flow says how the night stopped, not it.
        run.own_output = not isinstance(out, Sink)
        run.receiver = receiver
        summary = RunSummary(
            run_id=run_id,
            manifest=reader.name,
            output=str(out),
            dialect=opts.dialect,
            tier=limits.name,
            max_active=limits.max_active,
            submits_per_minute=limits.submits_per_minute,
            total_rows=0,
            started_at=time.time(),
            notices=list(reader.notices),
        )
        settings = EngineSettings(
            max_active=limits.max_active,
            submits_per_minute=limits.submits_per_minute,
            limit_is_the_keys=not _is_a_share(opts),
            expected_latency_s=opts.expected_latency_s,
            refusal_target=opts.refusal_target,
            poll_quantile=opts.poll_quantile,
            use_task_list=opts.task_list,
            task_timeout_s=opts.task_timeout_s,
            retry=opts.retry,
            resubmit_unknown=opts.resubmit_unknown,
            text_only_without_reference=opts.missing_reference == "text-only",
            outage_wait_s=opts.api_outage_wait_s,
        )
        if receiver is not None:
            await receiver.start()
            settings.webhook_url = receiver.url
        references = ReferenceStore(
            reader.base_dir,
            max_bytes=opts.max_reference_bytes,
            allow_private_urls=opts.allow_private_urls,
            allow_http=opts.allow_http,
        )
        connector = aiohttp.TCPConnector(limit=max(100, 4 * limits.max_active))
        engine: Engine | None = None
        stopped_by: BaseException | None = None
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                engine = Engine(
                    provider=provider,
                    session=session,
                    sink=sink,
                    references=references,
                    journal=ledger,
                    settings=settings,
                    on_outcome=run.record,
                    budget=run.budget,
                    library=library,
                    key_state=opts.key_state,
                )
                run.engine = engine
                engines.append(engine)
                if lost_lock:
                    engine.fail(StorageError(lost_lock[0]))
                await run.drive(engine)
        except BaseException as exc:
            stopped_by = exc
            raise
        finally:
            if receiver is not None:
                await asyncio.shield(receiver.stop())
            if library is not None:
                # Entries of images this run paid for: without them the next run would
                # find the images only after a compaction lists the objects.
                try:
                    await asyncio.shield(library.close())
                except KleinError as exc:
                    log.warning("library %s: index not written (%s)", library.uri, exc)
            # Also on Ctrl-C or a crash: what was learned is written down for the rerun.
            published = False
            try:
                await asyncio.shield(run.finish(sink, summary, engine, stopped_by))
                published = True
                if isinstance(stopped_by, KleinError) and stopped_by.summary is None:
                    stopped_by.summary = summary  # the caller gets the figures of run.json
            except StorageError as exc:
                if stopped_by is None:
                    raise
                # What stopped the run says more (often the same full disk).
                log.error("could not write every output of the stopped run: %s", exc)
            finally:
                if remote is not None:
                    await asyncio.shield(remote.close(published=published))
    if engine is not None and engine.key_refused and not engine.stats.accepted:
        where = f" in ${env_name}" if key == os.environ.get(env_name) else ""
        raise KeyRefusedError(
            f"the API at {without_credentials(api_url)} refused the key{where} "
            f"({engine.key_refused}); nothing was submitted; the output manifest in "
            f"{summary.output} lists every row as skipped",
            summary,
        )
    return summary


class _Run:
    """The bookkeeping of one run: feeding jobs, counting outcomes, reporting progress."""

    def __init__(
        self,
        run_id: str,
        reader: ManifestReader,
        ledger: Ledger,
        opts: RunOptions,
        on_progress: Callable[[ProgressSnapshot], None] | None,
    ) -> None:
        self.run_id = run_id
        self.reader = reader
        self.ledger = ledger
        self.opts = opts
        self.on_progress = on_progress
        self.engine: Engine | None = None
        #: ``--webhook-listen``'s receiver, whose figures go into ``run.json``.
        self.receiver: WebhookReceiver | None = None
        self.counts: Counter[str] = Counter()
        self.seen = 0
        self.total: int | None = None
        self.resumed = 0
        #: Rows kept or polled though their request changed since (``Planned.changed``),
        #: and the first few keys (a whole catalog's template edited must not grow a list).
        self.changed = 0
        self.changed_examples: list[str] = []
        #: Rows an earlier run finished, by status: counted as done, but not made by this run,
        #: so the rate leaves them out. (Resumed in-flight rows finish here and count.)
        self.earlier: Counter[str] = Counter()
        self.credits = 0.0
        #: Rows whose image came from the library (no submit, no cost).
        self.reused = 0
        self.started = time.monotonic()
        #: Whether this run is the output's own (False: a flow's shard, whose flow merges
        #: the shards and says itself why the night stopped).
        self.own_output = True
        self._last_flush = 0.0
        #: The count of the manifest's rows in a worker thread (``_count_rows``): begun, done.
        self._count_started = False
        self._counted = threading.Event()
        self._total_noted = False
        #: When the API stopped answering, as journaled for `klein-batch status` (None: up).
        self._outage_noted: float | None = None
        #: What earlier runs into this output spent or left in flight counts against it.
        self.budget = (
            Budget(
                opts.max_credits,
                committed=ledger.destination_credits(),
                unanswered=ledger.unanswered_credits(),
            )
            if opts.max_credits is not None
            else None
        )

    # --- feeding -------------------------------------------------------------------------------

    async def drive(self, engine: Engine) -> None:
        counter = asyncio.create_task(asyncio.to_thread(self._count_rows))
        reporter = asyncio.create_task(self._report_progress())
        on_fed = self.opts.on_fed
        fed = asyncio.create_task(self._when_fed(engine, on_fed)) if on_fed else None
        try:
            await engine.run(self._jobs())
        finally:
            reporter.cancel()
            counter.cancel()
            if fed is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fed
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reporter
            self.ledger.flush()

    @staticmethod
    async def _when_fed(engine: Engine, on_fed: Callable[[], None]) -> None:
        await engine.fed.wait()
        on_fed()

    def _count_rows(self) -> None:
        self._count_started = True
        try:
            if self.opts.shard is not None:
                return  # which rows are this shard's is known only once they are validated
            self.total = self._images_in_manifest()
            # The whole file went through Arrow's pool once; what it kept stays idle now.
            pa.default_memory_pool().release_unused()
        finally:
            self._counted.set()

    def _images_in_manifest(self) -> int:
        """Images the whole manifest asks for (rows x variations; merged lines make none)."""
        total = 0
        per_row = self.opts.catalog.size if self.opts.catalog else 1
        for batch in self.reader.batches():
            total += lines_to_validate(batch).height * per_row
        return total

    async def _jobs(self) -> AsyncIterator[Job]:
        batches: Iterator[pl.DataFrame] = iter(self.reader.batches())
        defaults = self.opts.defaults
        name = self.reader.name
        while True:
            validated = await asyncio.to_thread(
                _next_validated, batches, name, defaults, self.opts.catalog, self.reader.shown_as
            )
            if validated is None:
                return
            rows, rejections = validated
            if self.opts.shard is not None:
                rows = [row for row in rows if self._mine(row.key, row.index)]
                rejections = [r for r in rejections if self._mine(r.key, r.index)]
            self.seen += len(rows) + len(rejections)
            queued_at = time.time()
            self._reject(rejections)
            duplicates: list[Rejection] = []
            planned_rows = self.ledger.plan(rows, retry_failed=self.opts.retry_failed)
            groups = self._products(planned_rows)
            for planned in planned_rows:
                row = planned.row
                if planned.changed:
                    self.changed += 1
                    if len(self.changed_examples) < CHANGED_EXAMPLES:
                        self.changed_examples.append(row.key)
                if planned.action is Action.DONE:
                    self.resumed += 1
                    status = planned.previous.status if planned.previous else RowStatus.SUCCEEDED
                    self.counts[str(status)] += 1
                    self.earlier[str(status)] += 1
                elif planned.action is Action.DUPLICATE:
                    label = self.opts.catalog.label if self.opts.catalog else None
                    duplicates.append(
                        duplicate_rejection(
                            name,
                            row,
                            planned.duplicate_of or 0,
                            label,
                            self.reader.shown_as.get("id", "id") if self.reader.keyed else None,
                        )
                    )
                elif planned.action is Action.POLL:
                    self.resumed += 1
                    yield Job(
                        row,
                        name,
                        queued_at,
                        planned.task_id,
                        planned.poll_url,
                        planned.attempts,
                        submitted_at=planned.submitted_at,
                        ack_cost=planned.ack_cost,
                    )
                else:
                    job = Job(row, name, queued_at, attempts=planned.attempts)
                    if groups:
                        job.group = self._product_of(row.index)
                        job.group_requests = groups[job.group]
                    yield job
            self._reject(duplicates)

    def _products(self, planned: list[Planned]) -> dict[int, tuple[ImageRequest, ...]]:
        """Per product, the images this run submits, when a budget stops at whole products.

        A batch holds every variation of its rows (``Catalog.validate``), so a product's
        images are all here; those polled or done already were paid for before.
        """
        catalog = self.opts.catalog
        if self.budget is None:
            return {}
        if self.reader.products is None and (catalog is None or catalog.size < 2):
            return {}
        groups: dict[int, list[ImageRequest]] = {}
        for item in planned:
            if item.action is Action.SUBMIT:
                groups.setdefault(self._product_of(item.row.index), []).append(item.row.request)
        return {product: tuple(requests) for product, requests in groups.items()}

    def _product_of(self, index: int) -> int:
        """The product a planned image belongs to, for the budget: its input row, or in a
        shop export (``--catalog``) the row its product starts on, so that a product's
        variants (every Shopify line of a Handle, a WooCommerce variable product's
        variations) are kept together, not each variant line on its own."""
        catalog = self.opts.catalog
        line = index // (catalog.size if catalog is not None else 1)
        products = self.reader.products
        return products[line] if products is not None else line

    def _mine(self, key: str | None, index: int) -> bool:
        """Whether a planned row belongs to this run's shard (``RunOptions.shard``).

        A product's variations go together: their keys are ``<product key>--<slug>``, and
        the product key decides, so a budget or a rerun never splits a product's matrix
        between shards. A row without a key (rejected before one was made) goes by its
        product's position: it costs nothing, wherever it is reported.
        """
        assert self.opts.shard is not None
        mine, count = self.opts.shard
        catalog = self.opts.catalog
        size = catalog.size if catalog is not None else 1
        base = key
        if key and catalog is not None and catalog.matrix is not None:
            suffix = "--" + catalog.matrix.variations[index % size].slug
            base = key.removesuffix(suffix) or key
        return key_shard(base or f"row-{index // size}", count) == mine

    def _reject(self, rejections: list[Rejection]) -> None:
        if rejections:
            self.ledger.record_rejections(rejections)
            self.counts[RowStatus.REJECTED] += len(rejections)

    # --- outcomes and progress -----------------------------------------------------------------

    def record(self, outcome: Outcome) -> None:
        self.ledger.record_outcome(outcome)
        self.counts[str(outcome.status)] += 1
        if outcome.reused_from is not None:
            self.reused += 1
        self.credits += outcome.cost_credits
        now = time.monotonic()
        if now - self._last_flush > 0.2:
            self._last_flush = now
            self.ledger.flush()

    def snapshot(self) -> ProgressSnapshot:
        elapsed = time.monotonic() - self.started
        done = sum(self.counts.values())
        # Rows this run worked on: skipped and rejected rows end in bulk without any work
        # (a budget stop skipped thousands at once: "385 img/s" where 17.65 were made).
        idle = (RowStatus.SKIPPED, RowStatus.REJECTED)
        fresh = sum(
            count - self.earlier[status]
            for status, count in self.counts.items()
            if status not in idle
        )
        rate = max(0, fresh) / elapsed if elapsed > 0 else 0.0
        total = self.total if self.total is not None else max(self.seen, done)
        eta = (total - done) / rate if rate > 0 and total >= done else None
        in_flight = self.engine.in_flight if self.engine else 0
        last_running = None
        if self.engine is not None and self.total is not None and 0 < total - done <= in_flight:
            # Every row left is a task in flight: the run ends when the slowest of them does,
            # which the rate of the rows before says nothing of.
            eta = None
            last_running = self.engine.longest_running_s
        return ProgressSnapshot(
            total=total,
            counts=dict(self.counts),
            in_flight=in_flight,
            images_per_s=rate,
            credits=round(self.credits, 2),
            elapsed_s=elapsed,
            eta_s=eta,
            stopped="budget" if self.budget is not None and self.budget.stopped else None,
            api_unreachable_s=self.engine.api_unreachable_for if self.engine else None,
            last_running_s=last_running,
        )

    async def _report_progress(self) -> None:
        while True:
            await asyncio.sleep(self.opts.progress_interval_s)
            try:
                if self.total is not None and not self._total_noted:
                    self._total_noted = True  # `klein-batch status` shows progress against it
                    self.ledger.update_run_info(total=self.total)
                self._note_outage()
                self.ledger.flush()
            except StorageError as exc:
                if self.engine is not None:
                    self.engine.fail(exc)
                return
            if self.on_progress is not None:
                self.on_progress(self.snapshot())

    def _note_outage(self) -> None:
        """Journal an API outage as it starts and ends: `klein-batch status`, from another
        process, then says the run is waiting for the API rather than merely slow."""
        down_for = self.engine.api_unreachable_for if self.engine else None
        if down_for is not None and self._outage_noted is None:
            self._outage_noted = time.time() - down_for
            self.ledger.update_run_info(api_down_since=self._outage_noted)
        elif down_for is None and self._outage_noted is not None and self.engine is not None:
            self._outage_noted = None
            seconds, count = self.engine.api_outages_so_far
            self.ledger.update_run_info(
                api_down_since=None, api_unreachable_s=seconds, api_outages=count
            )

    # --- the end ---------------------------------------------------------------------------------

    async def finish(
        self,
        sink: object,
        summary: RunSummary,
        engine: Engine | None,
        stopped_by: BaseException | None = None,
    ) -> None:
        """Write the output manifest, ``run.json`` and ``report.html`` from the journal.

        Each step is tried even when an earlier one could not write (a full disk may still
        take the small files; a read-only images folder leaves DEST's root writable); the
        first storage error is raised at the end. ``stopped_by``: what ended the run early
        (Ctrl-C's cancellation, an outage, ...), said in all three as ``stopped: <reason>``.
        """
        failures: list[StorageError] = []

        async def attempt(what: str, step: Callable[[], Awaitable[None] | None]) -> None:
            try:
                result = step()
                if result is not None:
                    await result
            except StorageError as exc:
                failures.append(exc)
            except OSError as exc:  # a temporary file of the writers, say
                failures.append(write_failed(what, exc))

        await attempt("the run journal", self.ledger.flush)
        await attempt(
            "manifest.parquet",
            lambda: write_output_manifest(
                self.reader,
                self.ledger,
                sink,  # type: ignore[arg-type]
                expander=self.opts.catalog,
                shard=self.opts.shard,
            ),
        )
        counts = self.ledger.counts()
        summary.finished_at = time.time()
        summary.counts = {str(status): counts.get(str(status), 0) for status in RowStatus}
        unfinished = counts.get("pending", 0) + counts.get("in_flight", 0)
        # Rows not read yet when the run stopped (Ctrl-C early in a large manifest) are in
        # manifest.parquet as skipped: counted so here too, and against the whole manifest.
        try:
            whole = await self._whole_manifest()
        except (KleinError, OSError) as exc:  # the manifest went away since: say what we know
            log.warning("could not count the manifest's rows again: %s", exc)
            whole = 0
        unread = max(0, whole - sum(counts.values()))
        summary.counts[RowStatus.SKIPPED] += unfinished + unread
        merged = await asyncio.to_thread(_merged_lines, self.reader)
        if merged:
            summary.counts[MERGED_STATUS] = merged
        summary.total_rows = sum(summary.counts.values())
        fresh = max(0, summary.counts[RowStatus.SUCCEEDED] - self.earlier[RowStatus.SUCCEEDED])
        summary.images_per_s = round(fresh / summary.elapsed_s, 3) if summary.elapsed_s else 0.0
        summary.latency_p50_s, summary.latency_p95_s = latency_percentiles(
            self.ledger.iter_latencies()
        )
        summary.credits = round(self.ledger.credits(), 2)
        summary.credits_acked_earlier = round(self.ledger.credits_acked_earlier(), 2)
        summary.committed_credits = self.ledger.destination_credits()
        summary.ambiguous_submits = self.ledger.ambiguous_submits()
        summary.resumed_rows = self.resumed
        summary.changed_rows = self.changed
        summary.changed_examples = list(self.changed_examples)
        summary.reused_rows = self.reused
        if engine is not None:
            stats = engine.stats
            summary.submits = stats.submits
            summary.retries = stats.retries
            summary.rate_limited = stats.rate_limited
            summary.polls = stats.polls
            summary.task_lists = stats.lists
            summary.webhooks = stats.webhooks
            summary.errors = dict(stats.errors)
            summary.api_unreachable_s = stats.api_unreachable_s
            summary.api_outages = stats.api_outages
            if engine.abort_reason:
                summary.errors["aborted: " + engine.abort_reason] = 1
        if self.receiver is not None:
            summary.webhook_receiver = self.receiver.stats.as_dict()
        summary.stopped = self._stop_reason(stopped_by, engine)
        await attempt("run.json", lambda: write_run_json(sink, summary))  # type: ignore[arg-type]
        catalog = self.opts.catalog
        await attempt(
            "report.html",
            lambda: write_html_report(
                sink,  # type: ignore[arg-type]
                summary,
                axes=catalog.matrix.axes if catalog is not None and catalog.matrix else (),
                max_credits=self.opts.max_credits,
                columns=self.opts.report_columns,
            ),
        )
        # The end last: a run killed before report.html was written is not "finished" in
        # `klein-batch status` (it said so with no report.html), and its rerun writes it.
        await attempt(
            "the run journal",
            lambda: self.ledger.update_run_info(
                ended_at=summary.finished_at,
                total=summary.images_asked,
                complete=unfinished + unread == 0,
                stopped=summary.stopped,
                api_down_since=None,
                api_unreachable_s=summary.api_unreachable_s,
                api_outages=summary.api_outages,
                notices=summary.notices,
            ),
        )
        if self.on_progress is not None:
            self.on_progress(self.final_snapshot(summary))
        if failures:
            raise failures[0]

    async def _whole_manifest(self) -> int:
        """Images the manifest asks for in all; for a shard, the rows it planned (its other
        rows are other shards'), as its manifest.parquet holds."""
        if self.opts.shard is not None:
            return 0
        if self.total is None and self._count_started:
            # Stopped while the count in the background goes on (its task was cancelled,
            # not its thread): its result, rather than reading a large manifest twice.
            await asyncio.to_thread(self._counted.wait)
        if self.total is None:
            self.total = await asyncio.to_thread(self._images_in_manifest)
        return self.total

    def _stop_reason(self, stopped_by: BaseException | None, engine: Engine | None) -> str | None:
        """Why the run ended before every row did (``summary.STOP_EXIT_CODES``), or None.

        Only the budget used to be said, so a run stopped by Ctrl-C, SIGTERM or a refused
        key wrote ``"state": "finished"`` with exit code 1 into run.json while the process
        exited 130, 143 or 2. A flow's shard says only the budget: its flow merges the
        shards and says itself how the night ended.
        """
        budget = "budget" if self.budget is not None and self.budget.stopped else None
        if not self.own_output:
            return budget
        stop = _STOP.get()
        if stop is not None and stop.reason is not None:
            return stop.reason
        if isinstance(stopped_by, asyncio.CancelledError | KeyboardInterrupt):
            return "interrupted"
        if isinstance(stopped_by, ApiUnreachable):
            return "api unreachable"
        if isinstance(stopped_by, StorageError):
            return "output not writable"
        if engine is not None and engine.key_refused and not engine.stats.accepted:
            return "key refused"
        return budget

    def final_snapshot(self, summary: RunSummary) -> ProgressSnapshot:
        """The last progress line, from the summary: the same counts, rate and elapsed time
        as run.json (the live snapshot's rate counted rows skipped at the end as made)."""
        counts = {k: v for k, v in summary.counts.items() if k != MERGED_STATUS}
        return ProgressSnapshot(
            total=summary.images_asked,
            counts=counts,
            in_flight=0,
            images_per_s=summary.images_per_s,
            credits=summary.credits,
            elapsed_s=summary.elapsed_s,
            eta_s=0.0,  # nothing more comes of this run
            stopped=summary.stopped,
            api_unreachable_s=None,
        )


def _export_options(
    opts: RunOptions,
    catalog: str | ExportSpec | None,
    per: str | None,
    reference_column: str | None,
    missing_reference: str | None,
) -> None:
    """Apply the product-export keyword arguments of ``run_manifest`` to ``opts``."""
    if catalog is not None:
        opts.export = (
            catalog if isinstance(catalog, ExportSpec) else ExportSpec(catalog, per or "product")
        )
    elif per is not None:
        if opts.export is None:
            raise ConfigError(
                f"per={per!r} needs catalog='shopify' or 'woocommerce' (or a mapping): a "
                "plain manifest already has one row per image"
            )
        opts.export = ExportSpec(opts.export.layout, per, opts.export.mapping)
    if reference_column is not None:
        opts.reference_column = reference_column
    if missing_reference is not None:
        opts.missing_reference = missing_reference
    check_missing_reference(opts.missing_reference)


def check_missing_reference(value: str) -> str:
    """``fail`` or ``text-only``; anything else stops the run before it starts."""
    if value not in MISSING_REFERENCE_CHOICES:
        raise ConfigError(
            f"--missing-reference {value!r} is not allowed; expected one of "
            f"{', '.join(MISSING_REFERENCE_CHOICES)}"
        )
    return value


def _merged_lines(reader: ManifestReader) -> int:
    """Input lines that make no image of their own (product exports), listed as merged."""
    if MERGED_COLUMN not in reader.columns:
        return 0
    return sum(batch.get_column(MERGED_COLUMN).is_not_null().sum() for batch in reader.batches())


def _is_a_share(opts: RunOptions) -> bool:
    """Whether the run's active limit is only part of its key's, so a hard cap.

    ``--max-active`` alone describes the key's own contract; below ``--tier``'s limit, or
    below ``key_max_active`` (a shard's lease), it is this run's share of the key.
    """
    if opts.max_active is None:
        return False
    key_limit = opts.key_max_active
    if key_limit is None and opts.tier is not None:
        key_limit = TIERS[opts.tier].max_active
    return key_limit is not None and opts.max_active < key_limit


def _next_validated(
    batches: Iterator[pl.DataFrame],
    name: str,
    defaults: Defaults,
    catalog: Catalog | None = None,
    names: dict[str, str] | None = None,
) -> tuple[list[Row], list[Rejection]] | None:
    """Read and validate the next batch (in a worker thread: it is the CPU-heavy part)."""
    batch = next(batches, None)
    if batch is None:
        return None
    if catalog is not None:
        return catalog.validate(batch, source_name=name, defaults=defaults, names=names)
    return validate_batch(batch, source_name=name, defaults=defaults, names=names)
