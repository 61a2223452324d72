"""``python -m flows.catalog`` and ``klein-batch flow``: the catalog flow from a shell.

It runs in Prefect's ephemeral mode when no ``PREFECT_API_URL`` is set (Prefect starts a
temporary local server for the run), or against the configured server otherwise. Options
are checked here, before Prefect starts, so a typo is one ``error:`` line, not a failed
flow run with a traceback. The API key is read from the environment (or a Secret block
with ``--api-key-block``), never from a flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, TypeVar

import typer

from pipeline.cli import (
    ConfigOpt,
    ManifestArg,
    import_quietly,
    reported,
    spec_from,
    with_run_options,
)
from pipeline.config import check_target
from pipeline.errors import ConfigError, KleinError
from pipeline.spec import RunSpec
from pipeline.summary import ExitCode

EXIT_INTERRUPTED = 130

_T = TypeVar("_T")

_EPILOG = (
    "Exit codes: 0 every row succeeded; 1 some rows did not; 2 could not start; "
    "130 interrupted. The API key is read from $FREEPIK_API_KEY ($BFL_API_KEY for "
    "--dialect bfl) or --api-key-block, never from a flag. Without PREFECT_API_URL the flow "
    "runs in Prefect's ephemeral mode."
)


def flow_command(
    manifest: ManifestArg,
    flags: dict[str, object],
    config: ConfigOpt = None,
    shard_size: Annotated[
        int, typer.Option("--shard-size", metavar="ROWS", help="Rows per shard.")
    ] = 5_000,
    parallel_shards: Annotated[
        int, typer.Option("--parallel-shards", metavar="N", help="Shards at once.")
    ] = 4,
    shard_retries: Annotated[
        int, typer.Option("--shard-retries", metavar="N", help="Retries per shard.")
    ] = 2,
    api_key_block: Annotated[
        str | None,
        typer.Option(
            "--api-key-block",
            metavar="NAME",
            help="Prefect Secret block holding the API key.",
            show_default=False,
        ),
    ] = None,
    concurrency_limit: Annotated[
        str,
        typer.Option(
            "--concurrency-limit",
            metavar="NAME",
            help="Global concurrency limit for the key's active tasks; '' for none.",
        ),
    ] = "klein-api-key",
    shard_deployment: Annotated[
        str | None,
        typer.Option(
            "--shard-deployment",
            metavar="FLOW/DEPLOYMENT",
            help="Run shards on a work pool as runs of this deployment "
            "(e.g. generate-catalog-shard/catalog-shard).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run MANIFEST as the generate-catalog Prefect flow, in shards, into --out DEST.

    Every option of `klein-batch run` works here the same way (one run specification,
    pipeline/spec.py); the shard options are the flow's own. Resumable like run.
    """
    with reported():
        spec = spec_from(config, flags)
        for name, value, low in (
            ("--shard-size", shard_size, 1),
            ("--parallel-shards", parallel_shards, 1),
            ("--shard-retries", shard_retries, 0),
        ):
            if value < low:
                raise ConfigError(f"{name} {value} is not allowed; expected at least {low}")
    code = run_flow(
        manifest,
        spec,
        shard_size=shard_size,
        parallel_shards=parallel_shards,
        shard_retries=shard_retries,
        api_key_block=api_key_block,
        concurrency_limit=concurrency_limit or None,
        shard_deployment=shard_deployment,
    )
    raise typer.Exit(code)


def worker_command(ctx: typer.Context) -> None:
    """A Prefect process worker (``prefect worker start`` with the same options, e.g.
    ``--pool klein-pool --name worker-a``) that, when stopped (SIGTERM, Ctrl-C), stops its
    flow runs first: each catalog flow journals its submits in the air, so nothing is paid
    twice. ``prefect worker start`` kills them at once. Linux."""
    from flows.worker import supervise

    raise typer.Exit(supervise(ctx.args))


def _add_flow(app: typer.Typer) -> None:
    app.command("flow", epilog=_EPILOG)(with_run_options()(flow_command))


def register(app: typer.Typer) -> None:
    """Add ``klein-batch flow`` and ``klein-batch worker`` (entry point
    ``klein_batch.commands``; see pipeline/cli.py)."""
    _add_flow(app)
    app.command(
        "worker",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(worker_command)


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """Set one variable for the block (the simulator's key), then put the old value back."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _simulator(spec: RunSpec) -> Iterator[tuple[str | None, str | None]]:
    """(api_url, key) of an in-process simulator when asked for, else (None, None)."""
    from pipeline.run import simulator_for
    from pipeline.sim import SimServer

    config = simulator_for(spec)
    if config is None:
        yield None, None
        return
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(SimServer.in_thread(config))
        try:
            yield server.url, config.keys[0].key
        except KeyboardInterrupt:
            # Shards may still be winding down in Prefect's worker threads: stopped now, the
            # simulator would fail their last polls and those rows would end failed instead
            # of in flight. Its daemon thread ends with the process.
            stack.pop_all()
            raise


#: Said on stderr when Ctrl-C comes again while the shards stop.
STILL_STOPPING = (
    "still stopping: each shard waits for the answers to its submits in the air (up to "
    "10 s) and journals them; Ctrl-C again to quit at once (a submit still unanswered then "
    "may be paid for again by the rerun)\n"
)
#: Said on stderr as a third Ctrl-C quits at once.
QUITTING = (
    "quitting; every acknowledged task is in the shards' journals: the same command resumes\n"
)


def _run_stopping_on_ctrl_c(work: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run`` with Ctrl-C as ``klein-batch run`` takes it: the first cancels the
    flow (its shards stop as a run does, each journaling the answers to its submits in the
    air), a second only says it is still stopping, a third quits at once.

    asyncio's own handler raised KeyboardInterrupt at the second press, and its clean-up
    cancelled the stopping shards again: the answers they waited for were never read, and
    tasks the API had charged went unjournaled (tests/flows/test_flow_cli.py, a double
    Ctrl-C: 12 submits left unanswered in the journals). SIGTERM is the flow's own
    (``flows/sigterm.py``).
    """
    presses = 0

    async def main() -> _T:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                if task is not None:
                    loop.call_soon_threadsafe(task.cancel)
            elif presses == 2:
                _say(STILL_STOPPING)
            else:
                _say(QUITTING)
                os._exit(EXIT_INTERRUPTED)

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            return await work
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if presses:
            raise KeyboardInterrupt from None
        raise


def _say(text: str) -> None:
    """A line to stderr from a signal handler, which may interrupt a buffered write."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


def run_flow(manifest: str, spec: RunSpec, **flow_options: Any) -> int:
    """Check what can be checked before Prefect starts, run the flow; the exit code."""
    try:
        check_target(spec)
        if spec.s3_endpoint_url:
            from pipeline.s3 import configure

            # Before the flow starts, for the checks below; the flow and each shard runner
            # apply the spec's endpoint where they run too (flows/catalog.py).
            configure(endpoint_url=spec.s3_endpoint_url)
        if "://" not in manifest and not Path(manifest).is_file():
            raise KleinError(f"{manifest}: manifest not found; expected a CSV or Parquet file")
        key_missing = not os.environ.get(spec.api_key_env, "").strip()
        if key_missing and not spec.sim and not flow_options.get("api_key_block"):
            raise KleinError(
                f"${spec.api_key_env} is not set: export the API key for "
                f"{spec.api_url}, or pass --api-key-block NAME (a Prefect Secret block)"
            )
    except KleinError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.CANNOT_START)

    # Prefect's own 20 s for its ephemeral server to come up is short on a busy machine
    # (a nightly host running other jobs): a flow that never started helps nobody.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Prefect and the engine with the collector paused: 3.06 -> 2.32 CPU-s (import_quietly).
    import_quietly("flows.catalog")
    from flows.catalog import ShardsFailed, generate_catalog
    from pipeline.dest_lock import check_free
    from pipeline.storage import open_sink

    out = str(spec.out)
    if spec.out and "{date}" not in out:
        # Before Prefect starts: a busy output is said in one line (the flow holds the lock).
        try:
            check_free(open_sink(out), out)
        except KleinError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return int(ExitCode.CANNOT_START)

    try:
        with _simulator(spec) as (sim_url, sim_key):
            if sim_url is not None:
                spec = spec.replace(api_url=sim_url)
            key_env = spec.api_key_env if sim_key else ""
            with _environment(key_env, sim_key) if sim_key else contextlib.nullcontext():
                result = _run_stopping_on_ctrl_c(
                    generate_catalog(
                        manifest,
                        spec,
                        # Each `--sim` run starts a simulator that knows no earlier task.
                        resubmit_unknown=sim_url is not None,
                        **flow_options,
                    )
                )
    except KeyboardInterrupt:
        print(
            "interrupted: run the same command again to resume (shards resume from their "
            "ledgers; nothing acknowledged is paid for twice)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except ShardsFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.PARTIAL)
    except KleinError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.CANNOT_START)
    if result.get("dry_run"):
        print(result["report"])
        print(result["plan"])
        return int(result.get("exit_code", ExitCode.OK))
    counts = result.get("counts", {})
    shown = ", ".join(f"{count:,} {status}" for status, count in counts.items())
    print(f"{result.get('total_rows', 0):,} rows: {shown}")
    print(
        f"{result.get('images_per_s', 0.0):.2f} images/s; credits {result.get('credits', 0.0):,.2f}"
    )
    print(f"output: {result.get('output')} (manifest.parquet, run.json, report.html, images/)")
    return int(result.get("exit_code", ExitCode.PARTIAL))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flows.catalog``: the same command as ``klein-batch flow``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    _add_flow(app)  # its only command: the program is that command
    app(args=list(argv) if argv is not None else None, prog_name="python -m flows.catalog")
