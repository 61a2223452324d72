"""The ``klein-batch`` command: run a manifest, check one, or serve the simulator.

The command line is a thin layer over ``run_manifest`` and ``check_manifest``: it gathers
options (config file first, flags over it), reads the API key from the environment, shows
progress and turns every expected problem into one ``error: ...`` line with a documented
exit code, so scripts and cron jobs can tell "some rows failed" from "never started".
Heavy modules (the engine, the simulator) are imported only by the command that needs them,
which keeps ``--help`` and ``validate`` quick.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import inspect
import os
import resource
import shlex
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, NoReturn, get_args, get_origin

import typer

import pipeline.blas  # noqa: F401  (one OpenBLAS thread: before anything imports numpy)
from pipeline.config import (
    API_KEY_ENV,
    WEBHOOK_SECRET_ENV,
    RunConfig,
    check_target,
    load_config,
    merge_flags,
)
from pipeline.contract import (
    Tier,
)
from pipeline.errors import ConfigError, KleinError, Terminated
from pipeline.progress import MODES, format_duration
from pipeline.spec import RunSpec, cli_options
from pipeline.summary import ExitCode
from pipeline.urls import redact_credentials

if TYPE_CHECKING:
    from pipeline.library import Library
    from pipeline.variations import Catalog

#: Exit code after Ctrl-C (the shell's convention for SIGINT): the run can be resumed.
EXIT_INTERRUPTED: Final = int(ExitCode.INTERRUPTED)
#: Exit code of an unexpected internal error (a bug in klein-batch, reported with a traceback).
EXIT_INTERNAL: Final = int(ExitCode.INTERNAL)
#: Exit code when the output or the run's journal cannot be written (disk full, read-only,
#: permission; sysexits' EX_IOERR): the run stopped at once, the rerun collects what was paid.
EXIT_STORAGE: Final = int(ExitCode.STORAGE)
#: Exit code when the API did not answer for ``--api-outage-wait`` seconds (sysexits'
#: EX_UNAVAILABLE): the run stopped as cleanly as on exit 74, and the same command resumes.
EXIT_UNAVAILABLE: Final = int(ExitCode.UNAVAILABLE)
#: Exit code after SIGTERM (128 + 15, as a shell reports it): handled as Ctrl-C, resumable.
EXIT_TERMINATED: Final = int(ExitCode.TERMINATED)

_EXIT_CODES_HELP: Final = (
    f"Exit codes: {int(ExitCode.OK)} every row succeeded; {int(ExitCode.PARTIAL)} finished "
    f"with some rows not succeeded (or, for validate, some rows rejected); "
    f"{int(ExitCode.CANNOT_START)} could not start (bad option, unreadable manifest, missing "
    f"API key, or the API refused the key); {EXIT_INTERRUPTED} interrupted (run the same "
    f"command again to resume; a second Ctrl-C lets the outputs be written, a third quits "
    f"without them); {EXIT_TERMINATED} stopped by SIGTERM (likewise); "
    f"{EXIT_STORAGE} the output or its journal could not be written (disk full, read-only, "
    f"permission: fix it and run the same command again; nothing acknowledged is paid "
    f"twice); {EXIT_UNAVAILABLE} the API did not answer for --api-outage-wait seconds (run "
    f"the same command again once it does; nothing is lost or paid twice); {EXIT_INTERNAL} "
    f"internal error."
)
_INTERNAL_ERROR: Final = (
    "error: klein-batch hit an internal error (a bug, not your input); "
    "the traceback above says where"
)

app = typer.Typer(
    name="klein-batch",
    help="Bulk image generation through the FLUX.2 [klein] API: a manifest of prompts in, "
    "images and a Parquet output manifest out.",
    epilog=_EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# --- shared options ---------------------------------------------------------------------------

ManifestArg = Annotated[
    str,
    typer.Argument(
        metavar="MANIFEST",
        help="The manifest: a CSV or Parquet file with a prompt column (a path or "
        "s3://bucket/key).",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help='A TOML file with the same settings (flag names, e.g. tier = "scale"); '
        "flags win over the file.",
        show_default=False,
    ),
]


def _flag_type(annotation: Any) -> Any:
    """The type a flag of a spec field has on the command line (None: not given)."""
    if annotation is bool:
        return bool
    if get_origin(annotation) is tuple:
        return list[str] | None
    args = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    return args[0] | None


def run_option_parameters(only: Sequence[str] | None = None) -> list[inspect.Parameter]:
    """A typer parameter for every flag of ``pipeline.spec.RunSpec`` (run and flow share),
    or for those named in ``only``."""
    parameters = []
    for name, field in cli_options():
        if only is not None and name not in only:
            continue
        kind = _flag_type(field.annotation)
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=spec_option(name),
                default=False if kind is bool else None,
            )
        )
    return parameters


def spec_option(name: str) -> Any:
    """The typer option of one spec field (for a command that takes just a few of them)."""
    field = RunSpec.model_fields[name]
    extra = field.json_schema_extra
    assert isinstance(extra, dict)
    decls = [extra["flag"], *([extra["short"]] if "short" in extra else [])]
    option = typer.Option(
        *decls, metavar=extra.get("metavar"), help=field.description, show_default=False
    )
    return Annotated[_flag_type(field.annotation), option]


S3EndpointOpt = spec_option("s3_endpoint_url")


def with_run_options(
    only: Sequence[str] | None = None,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command every run option (or those in ``only``) as flags, as ``flags``.

    ``command`` declares its own parameters (the manifest, ``--config``, ...) and a
    ``flags`` parameter; the flags of ``pipeline.spec.RunSpec`` are added to its signature
    for typer, and handed over as a mapping for ``merge_flags`` (None: not given). This is
    how ``klein-batch run`` and ``klein-batch flow`` get the same options from one place.
    """

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [
            p
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.name != "flags"
        ]
        positional = [p for p in own if p.default is inspect.Parameter.empty]
        keyword = inspect.Parameter.KEYWORD_ONLY
        optional = [p.replace(kind=keyword) for p in own if p not in positional]
        shared = run_option_parameters(only)
        names = {p.name for p in shared}

        def wrapper(*args: Any, **kwargs: Any) -> None:
            flags: dict[str, object] = {}
            for name in names:
                value = kwargs.pop(name, None)
                if value is False or value == []:
                    value = None  # a bool flag not given, or a repeatable one left out
                elif isinstance(value, list):
                    value = [str(item) for item in value]
                elif isinstance(value, Path):
                    value = str(value)
                flags[name] = value
            command(*args, flags=flags, **kwargs)

        signature = inspect.Signature([*positional, *shared, *optional])
        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        wrapper.__name__ = command.__name__
        wrapper.__qualname__ = command.__qualname__
        wrapper.__doc__ = command.__doc__
        wrapper.__module__ = command.__module__
        return wrapper

    return decorate


# --- error reporting ------------------------------------------------------------------------


def _secrets() -> list[str]:
    names = (
        *API_KEY_ENV.values(),
        *WEBHOOK_SECRET_ENV.values(),
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    )
    return [value for env in names if (value := os.environ.get(env, "").strip())]


def _redact(text: str) -> str:
    for secret in _secrets():
        text = text.replace(secret, "***")
    return redact_credentials(text)


def _fail(message: str, code: int = ExitCode.CANNOT_START) -> NoReturn:
    typer.echo(f"error: {_redact(message)}", err=True)
    raise typer.Exit(int(code))


@contextmanager
def reported() -> Iterator[None]:
    """Expected problems become one line and exit 2; our own bugs keep their traceback.

    Tracebacks are printed by hand (not Python's hook) so any API key that slipped into a
    message is masked first.
    """
    try:
        yield
    except typer.Exit:
        raise
    except KleinError as exc:
        _fail(str(exc), exc.exit_code)  # 74 storage, 69 API away, else 2
    except Exception:
        text = "".join(traceback.format_exception(*sys.exc_info()))
        sys.stderr.write(_redact(text))
        sys.stderr.write(_INTERNAL_ERROR + "\n")
        raise typer.Exit(EXIT_INTERNAL) from None


def _settings(config_path: Path | None, **flags: object) -> RunConfig:
    base = load_config(config_path) if config_path is not None else RunConfig()
    return merge_flags(base, **flags)


def _check_manifest_path(text: str) -> str | Path:
    """The manifest to read: a Path, or an s3:// URI as given (checked when it is fetched)."""
    if text[:5].lower() == "s3://":
        return text
    manifest = Path(text)
    # A clear message before any reader gets to guess at a missing file or a folder.
    if not manifest.exists():
        raise ConfigError(f"{manifest}: manifest not found")
    if manifest.is_dir():
        raise ConfigError(f"{manifest}: is a folder; expected a CSV or Parquet manifest file")
    return manifest


def _configure_s3(settings: RunConfig) -> None:
    if settings.s3_endpoint_url:
        from pipeline.s3 import configure

        configure(endpoint_url=settings.s3_endpoint_url)


def _catalog(settings: RunConfig) -> Catalog | None:
    """The prompt template and variation matrix asked for (checked here, before any work)."""
    from pipeline.variations import Catalog

    return Catalog.build(
        prompt_template=settings.prompt_template,
        vary=settings.vary,
        variations=settings.variations,
    )


# --- validate -------------------------------------------------------------------------------


#: The run options ``validate`` takes: what shapes rows and prompts, not where they go.
VALIDATE_OPTIONS: Final = (
    "limit",
    "catalog",
    "per",
    "reference_column",
    "allow_http_references",
    "allow_private_references",
    "prompt_template",
    "vary",
    "variations",
    "aspect_ratio",
    "resolution",
    "output_format",
    "safety_tolerance",
    "s3_endpoint_url",
)


@app.command(epilog=_EXIT_CODES_HELP)
@with_run_options(only=VALIDATE_OPTIONS)
def validate(
    manifest: ManifestArg,
    flags: dict[str, object],
    no_references: Annotated[
        bool,
        typer.Option("--no-references", help="Skip checking local reference image files."),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Check a manifest without sending anything, and summarise what a run would do.

    Exit 0 when every row is valid, 1 when some rows would be rejected, 2 when the manifest
    cannot be read at all.
    """
    with reported():
        settings = _settings(config, **flags)
        source = _check_manifest_path(manifest)
        _configure_s3(settings)
        from pipeline.check import check_manifest

        report = check_manifest(
            source,
            defaults=settings.image_defaults(),
            limit=settings.limit,
            check_references=not no_references,
            catalog=_catalog(settings),
            export=settings.export(),
            reference_column=settings.reference_column,
            allow_http=settings.allow_http_references,
            allow_private_urls=settings.allow_private_references,
        )
    typer.echo(report.render())
    raise typer.Exit(int(report.exit_code))


# --- run ------------------------------------------------------------------------------------


def plan_text(
    settings: RunConfig,
    limits: Tier,
    to_send: int,
    estimate: float | None = None,
    committed: float = 0.0,
) -> str:
    if settings.sim:
        target = "the bundled simulator"
    elif settings.api_url:
        target = (
            f"{settings.api_url} (dialect {settings.dialect}, key from ${settings.api_key_env})"
        )
    else:
        target = "no API chosen yet (pass --api-url URL or --sim to run)"
    floor_s = 60.0 * to_send / limits.submits_per_minute
    lines = [
        "",
        "Plan (dry run: nothing was sent):",
        f"  send to:  {target}",
        f"  output:   {settings.out}",
        f"  limits:   tier {limits.name}: {limits.max_active} active tasks, "
        f"{limits.submits_per_minute} submits per minute",
        f"  at least: {format_duration(floor_s)} at the submit limit, plus generation time",
    ]
    if settings.retry_failed:
        lines.append("  retry:    rows that failed in an earlier run into this output are retried")
    if settings.max_credits is not None and estimate is not None:
        budget = settings.max_credits
        # The budget covers the output: what earlier runs into it spent (or left in flight)
        # comes off first, as the run's own Budget does.
        left = max(0.0, budget - committed)
        spent = (
            f" ({committed:.2f} already spent or in flight in this output, {left:.2f} left)"
            if committed
            else ""
        )
        if estimate <= left:
            lines.append(
                f"  budget:   {budget:g} credits{spent} covers the estimate ({estimate:.2f})"
            )
        else:
            share = int(to_send * left / estimate) if estimate else 0
            lines.append(
                f"  budget:   {budget:g} credits{spent} is below the estimate "
                f"({estimate:.2f}): about {share} of {to_send} images fit; the rest end "
                "skipped (budget)"
                + (
                    ", whole products only (a product's variations are made all or none)"
                    if settings.vary or settings.variations
                    else ""
                )
            )
    return "\n".join(lines)


def _resume_hint(out: str) -> str:
    """The command to run again; a password in a URL of it (``--api-url
    https://user:pw@host``) is masked, since stderr lands in cron mail and journald."""
    command = shlex.join(["klein-batch", *sys.argv[1:]]) if sys.argv[1:] else "the same command"
    masked = redact_credentials(command)
    hint = (
        f"interrupted: finished and acknowledged tasks are recorded in {out}; "
        f"run the same command again to resume (no acknowledged task is paid for twice):\n"
        f"  {masked}"
    )
    if masked != command:
        hint += "\n  (with the URL's password where it shows ***)"
    return hint


ProgressOpt = Annotated[
    str,
    typer.Option(
        "--progress",
        metavar="auto|bar|plain|off",
        help="Progress display; one of: auto (a bar on a terminal, log lines otherwise), "
        "bar, plain, off.",
    ),
]


def spec_from(config: Path | None, flags: dict[str, object]) -> RunSpec:
    """The run specification of a command: defaults, the config file, then the flags."""
    spec = _settings(config, **flags)
    if not spec.out:
        raise ConfigError('--out DEST is required (or set out = "..." in the config file)')
    return spec


@app.command(epilog=_EXIT_CODES_HELP)
@with_run_options()
def run(
    manifest: ManifestArg,
    flags: dict[str, object],
    config: ConfigOpt = None,
    progress: ProgressOpt = "auto",
) -> None:
    """Generate an image for every row of MANIFEST into --out DEST (resumable).

    Rerunning the same command after a crash or Ctrl-C finishes the job: done rows are
    skipped and tasks already accepted by the API are polled, never paid for twice.
    """
    with reported():
        if progress not in MODES:
            raise ConfigError(
                f"--progress {progress!r} is not allowed; expected one of {', '.join(MODES)}"
            )
        import_quietly("pipeline.run")
        settings = _dated_out(spec_from(config, flags))
        source = _check_manifest_path(manifest)
        _configure_s3(settings)
        limits = settings.limits()
        if settings.dry_run:
            _dry_run(source, settings, limits)
        _run(source, settings, progress)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector, then move everything alive into its permanent
    generation.

    Importing the engine (Polars, pyarrow, aiohttp, pydantic models), Prefect, or a test
    suite's modules allocates a few hundred thousand objects that all live until the
    process ends; every collection their allocations trigger walks them and finds nothing,
    and so would the first collections after if they were left in the young generations.
    Frozen, they are never walked again (benchmarks/notes.md, "the fixed cost" and session
    28). For work that allocates nothing that could become garbage in a cycle worth
    collecting: imports, a test run's collection (tests/conftest.py)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def import_quietly(module: str) -> None:
    """Import ``module`` (and all it imports) with the collector paused (``collector_paused``)."""
    if module in sys.modules:
        return
    with collector_paused():
        importlib.import_module(module)


def _dated_out(settings: RunConfig) -> RunConfig:
    """``{date}`` in ``--out`` becomes today (UTC), and the output's library defaults to a
    ``library`` folder beside the dated ones (``pipeline.library.library_for``)."""
    from pipeline.library import library_for
    from pipeline.storage import dated

    assert settings.out is not None
    library = library_for(settings.out, settings.library, no_library=settings.no_library)
    return settings.replace(out=dated(settings.out), library=library)


def _library(settings: RunConfig) -> Library | None:
    """The run's library, opened (its index read) for a dry run's count; None without one."""
    if not settings.library:
        return None
    from pipeline.library import Library

    return asyncio.run(
        Library.open(settings.library, dialect=settings.dialect, model=settings.model)
    )


def _dry_run(manifest: str | Path, settings: RunConfig, limits: Tier) -> NoReturn:
    from pipeline.check import check_manifest
    from pipeline.providers import published_cost
    from pipeline.status import earlier_journal

    # Into an output that already holds a run, the rerun skips done rows and polls tasks in
    # flight: the plan counts and prices only what it would send, so the figures match.
    journal = earlier_journal(settings.out) if settings.out else nullcontext()
    with journal as ledger:
        earlier = (
            partial(ledger.earlier_work, retry_failed=settings.retry_failed)
            if ledger is not None
            else None
        )
        committed = ledger.destination_credits() if ledger is not None else 0.0
        report = check_manifest(
            manifest,
            defaults=settings.image_defaults(),
            limit=settings.limit,
            catalog=_catalog(settings),
            earlier=earlier,
            export=settings.export(),
            reference_column=settings.reference_column,
            library=_library(settings),
            cost=published_cost(settings.dialect, settings.model),
            allow_http=settings.allow_http_references,
            allow_private_urls=settings.allow_private_references,
        )
    typer.echo(report.render())
    typer.echo(plan_text(settings, limits, report.to_send, report.estimated_credits, committed))
    raise typer.Exit(int(report.exit_code))


def api_key_from_env(settings: RunConfig) -> str | None:
    """The API key for a real API from its environment variable (None with the simulator)."""
    if settings.sim:
        return None
    key = os.environ.get(settings.api_key_env, "").strip()
    if not key:
        raise ConfigError(
            f"${settings.api_key_env} is not set: export the API key for {settings.api_url} "
            "in that environment variable (keys are never taken as flags or from config files)"
        )
    return key


def _run(manifest: str | Path, settings: RunConfig, progress: str) -> NoReturn:
    check_target(settings)
    api_key = api_key_from_env(settings)

    from pipeline.progress import ProgressDisplay
    from pipeline.report import format_summary
    from pipeline.run import run_manifest

    out = str(settings.out)
    try:
        with ProgressDisplay(mode=progress) as display:  # type: ignore[arg-type]
            summary = run_manifest(manifest, spec=settings, api_key=api_key, on_progress=display)
    except KeyboardInterrupt:
        typer.echo(_resume_hint(out), err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Terminated:
        typer.echo(_resume_hint(out).replace("interrupted", "terminated (SIGTERM)", 1), err=True)
        raise typer.Exit(EXIT_TERMINATED) from None
    typer.echo(format_summary(summary))
    raise typer.Exit(int(summary.exit_code))


# --- status ---------------------------------------------------------------------------------


@app.command()
def status(
    dest: Annotated[
        str,
        typer.Argument(metavar="DEST", help="The output given to --out (a folder or s3:// URI)."),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the figures as JSON (for scripts).")
    ] = False,
) -> None:
    """How the latest run into DEST is doing: rows by status, progress, rate, ETA, credits.

    Reads the run's journal only (read-only), so it works while the run is still going in
    another process, after it finished, and after it was killed. Exit 0 when the run
    finished with every row succeeded, 1 otherwise (running, stopped, or rows not
    succeeded), 2 when DEST has no run.
    """
    with reported():
        from pipeline.status import read_status, render_json

        found = read_status(dest)
    typer.echo(render_json(found) if as_json else found.render())
    complete = found.state == "finished" and found.done == found.counts.get("succeeded", 0)
    raise typer.Exit(int(ExitCode.OK if complete else ExitCode.PARTIAL))


# --- export ---------------------------------------------------------------------------------


@app.command("export")
def export_command(
    dest: Annotated[
        str,
        typer.Argument(metavar="DEST", help="The output given to --out (a folder or s3:// URI)."),
    ],
    catalog: Annotated[
        str,
        typer.Option(
            "--catalog",
            metavar="shopify|woocommerce|csv|json",
            help="The import file to write: Shopify's product CSV (Handle, Image Src, Image "
            "Position, Image Alt Text), WooCommerce's (ID, SKU, Images), or a plain CSV/JSON "
            "of the images for any other system.",
            show_default=False,
        ),
    ],
    image_base_url: Annotated[
        str | None,
        typer.Option(
            "--image-base-url",
            metavar="URL",
            help="Where DEST is served from: each image is URL/images/<key>.jpg (required "
            "for shopify and woocommerce; csv/json use the stored location without it).",
            show_default=False,
        ),
    ] = None,
    alt_template: Annotated[
        str | None,
        typer.Option(
            "--alt-template",
            metavar="TEXT",
            help="Alt text from the row's columns, as a prompt template ('{Title}, {style}'). "
            "[default: the prompt]",
            show_default=False,
        ),
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option(
            "--columns",
            metavar="COL,COL",
            help="csv/json: manifest columns to add to each record (e.g. 'Handle,Variant SKU').",
            show_default=False,
        ),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar="FILE",
            help="Where to write it (a path or s3:// URI). [default: DEST/export/<name>]",
            show_default=False,
        ),
    ] = None,
    s3_endpoint_url: S3EndpointOpt = None,
) -> None:
    """Write the shop's import file for the images a run made into DEST.

    Only succeeded images are exported; each points at --image-base-url. Exit 0 when the
    file was written, 2 when it could not be (no run in DEST, columns missing).
    """
    with reported():
        if s3_endpoint_url:
            from pipeline.s3 import configure

            configure(endpoint_url=s3_endpoint_url)
        import asyncio

        from pipeline.output_manifest import read_output_manifest
        from pipeline.shop_export import build_export
        from pipeline.storage import open_sink

        sink = open_sink(dest)
        manifest = asyncio.run(read_output_manifest(sink))
        made = build_export(
            manifest,
            catalog,
            image_base_url=image_base_url,
            alt_template=alt_template,
            columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else (),
        )
        if to is None:
            where = asyncio.run(sink.put(f"export/{made.name}", made.data, made.content_type))
        elif to[:5].lower() == "s3://":
            folder, _, name = to.rstrip("/").rpartition("/")
            where = asyncio.run(open_sink(folder).put(name, made.data, made.content_type))
        else:
            target = Path(to)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(made.data)
            where = str(target)
    typer.echo(f"wrote {where}: {made.images:,} images for {catalog}")


# --- sim ------------------------------------------------------------------------------------


@app.command("sim")
def sim_command(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            metavar="FILE",
            help="Simulator settings (TOML: keys, tiers, latency, faults, moderation).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", metavar="HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", help="Port to listen on.")] = 8765,
) -> None:
    """Serve the bundled API simulator (both dialects) until Ctrl-C."""
    with reported():
        from pipeline.sim import serve
        from pipeline.sim.config import KeyConfig, SimConfig

        sim_config = SimConfig.from_toml(config) if config is not None else SimConfig()
        default_key = KeyConfig().key

        def announce(line: str) -> None:
            # serve() knows the real port (``--port 0`` picks a free one).
            typer.echo(f"{line} (Ctrl-C to stop)")
            for key in sim_config.keys:
                # The built-in demo key is public (it is in the source); configured keys are not.
                shown = key.key if key.key == default_key else "<the key from your config>"
                typer.echo(f"  key {key.name}: tier {key.tier}; FREEPIK_API_KEY={shown}")
            sys.stdout.flush()

        try:
            serve(sim_config, host, port, announce=announce)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        typer.echo("simulator stopped")


def _add_plugin_commands() -> None:
    """Commands other packages add, found by entry point (group ``klein_batch.commands``).

    ``klein-batch flow`` comes from ``flows/cli.py`` this way, so ``pipeline`` never imports
    ``flows`` (the Prefect side builds on the pipeline, not the other way round).
    """
    from importlib.metadata import entry_points

    for entry in entry_points(group="klein_batch.commands"):
        importing = sys.modules.get(entry.module)
        if importing is not None and not hasattr(importing, entry.attr):
            # That module is importing this one as it starts (``python -m flows.catalog``
            # begins in flows.cli): it is the program then and builds its own command line,
            # and loading it here would fail on its half-initialised module.
            continue
        entry.load()(app)


_add_plugin_commands()


def _more_open_files() -> None:
    """Raise the soft open-file limit to the hard one: a run holds API connections, image
    files, its journal and a webhook receiver's connections at once, and the usual soft
    limit (1,024) is a third of what a large tier can need. Never lowers it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    """Console-script entry point (``klein-batch``).

    Commands report their own errors; this is the last net for anything that escapes them
    (an import failing, say), so it still gets the internal-error exit code and no secret.
    """
    _more_open_files()
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except Exception:
        sys.stderr.write(_redact("".join(traceback.format_exception(*sys.exc_info()))))
        sys.stderr.write(_INTERNAL_ERROR + "\n")
        sys.exit(EXIT_INTERNAL)
    finally:
        # The process ends now: the collections Python runs as it shuts down would walk
        # every object still alive (all the imported libraries) for nothing, about 0.07 s
        # of CPU per command. Frozen objects are skipped; memory is returned either way.
        gc.freeze()


if __name__ == "__main__":
    main()
