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
import os
import shlex
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, NoReturn

import typer

from pipeline.config import (
    API_KEY_ENV,
    DIALECTS,
    WEBHOOK_SECRET_ENV,
    RunConfig,
    check_target,
    load_config,
    merge_flags,
)
from pipeline.contract import (
    ASPECT_RATIOS,
    DEFAULT_ASPECT_RATIO,
    DEFAULT_OUTPUT_FORMAT,
    DEFAULT_RESOLUTION,
    DEFAULT_SAFETY,
    DEFAULT_TIER,
    OUTPUT_FORMATS,
    RESOLUTIONS,
    SAFETY_MAX,
    SAFETY_MIN,
    TIERS,
    Tier,
)
from pipeline.errors import ConfigError, KleinError, StorageError, Terminated
from pipeline.progress import MODES, format_duration
from pipeline.summary import ExitCode
from pipeline.urls import redact_credentials

if TYPE_CHECKING:
    from pipeline.library import Library
    from pipeline.manifest import Defaults
    from pipeline.sim.config import SimConfig
    from pipeline.variations import Catalog

#: Exit code after Ctrl-C (the shell's convention for SIGINT): the run can be resumed.
EXIT_INTERRUPTED: Final = 130
#: Exit code of an unexpected internal error (a bug in klein-batch, reported with a traceback).
EXIT_INTERNAL: Final = 70
#: Exit code when the output or the run's journal cannot be written (disk full, read-only,
#: permission; sysexits' EX_IOERR): the run stopped at once, the rerun collects what was paid.
EXIT_STORAGE: Final = 74
#: Exit code after SIGTERM (128 + 15, as a shell reports it): handled as Ctrl-C, resumable.
EXIT_TERMINATED: Final = 143

_EXIT_CODES_HELP: Final = (
    f"Exit codes: {int(ExitCode.OK)} every row succeeded; {int(ExitCode.PARTIAL)} finished "
    f"with some rows not succeeded (or, for validate, some rows rejected); "
    f"{int(ExitCode.CANNOT_START)} could not start (bad option, unreadable manifest, missing "
    f"API key, or the API refused the key); {EXIT_INTERRUPTED} interrupted (run the same "
    f"command again to resume); {EXIT_TERMINATED} stopped by SIGTERM (likewise); "
    f"{EXIT_STORAGE} the output or its journal could not be written (disk full, read-only, "
    f"permission: fix it and run the same command again; nothing acknowledged is paid "
    f"twice); {EXIT_INTERNAL} internal error."
)
_INTERNAL_ERROR: Final = (
    "error: klein-batch hit an internal error (a bug, not your input); "
    "the traceback above says where"
)
_TIER_HELP: Final = ", ".join(
    f"{t.name} ({t.max_active} active, {t.submits_per_minute}/min)" for t in TIERS.values()
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
S3EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--s3-endpoint-url",
        metavar="URL",
        help="S3 endpoint for s3:// manifests, references and outputs (MinIO, R2, a local "
        "server), e.g. http://127.0.0.1:9000. [default: $AWS_ENDPOINT_URL_S3 or "
        "$AWS_ENDPOINT_URL, else AWS]. Credentials come from the standard AWS chain.",
        show_default=False,
    ),
]
AspectRatioOpt = Annotated[
    str | None,
    typer.Option(
        "--aspect-ratio",
        metavar="PRESET",
        help=f"Default for rows without one; one of: {', '.join(ASPECT_RATIOS)}. "
        f"[default: {DEFAULT_ASPECT_RATIO}]",
        show_default=False,
    ),
]
ResolutionOpt = Annotated[
    str | None,
    typer.Option(
        "--resolution",
        metavar="1k|2k",
        help=f"Default for rows without one; one of: {', '.join(RESOLUTIONS)}. "
        f"[default: {DEFAULT_RESOLUTION}]",
        show_default=False,
    ),
]
OutputFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--output-format",
        metavar="png|jpeg",
        help=f"Default for rows without one; one of: {', '.join(OUTPUT_FORMATS)}. "
        f"[default: {DEFAULT_OUTPUT_FORMAT}]",
        show_default=False,
    ),
]
SafetyOpt = Annotated[
    int | None,
    typer.Option(
        "--safety-tolerance",
        metavar="0-5",
        help=f"Default for rows without one; {SAFETY_MIN} (strict) to {SAFETY_MAX} (lenient). "
        f"[default: {DEFAULT_SAFETY}]",
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
LimitOpt = Annotated[
    int | None,
    typer.Option(
        "--limit", metavar="N", help="Only the first N rows of the manifest.", show_default=False
    ),
]
TemplateOpt = Annotated[
    str | None,
    typer.Option(
        "--prompt-template",
        metavar="TEXT",
        help="Build each prompt from the row's columns (and variation axes), e.g. "
        "'Studio photo of {title} in {color}, {style}'; the manifest then needs no prompt "
        "column. A row with an empty field is rejected.",
        show_default=False,
    ),
]
VaryOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--vary",
        metavar="AXIS=V1,V2",
        help="Cross every row with these values (repeatable; axes multiply), e.g. "
        "style=studio,lifestyle or aspect_ratio=square_1_1,portrait_2_3 or seed=1,2.",
        show_default=False,
    ),
]
VariationsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--variations",
        metavar="CSV",
        help="A CSV of variations (header: axis names; one variation per row), crossed with "
        "every row and with other axes (repeatable).",
        show_default=False,
    ),
]
CatalogOpt = Annotated[
    str | None,
    typer.Option(
        "--catalog",
        metavar="shopify|woocommerce",
        help="MANIFEST is a shop's product export, read as the shop writes it: product "
        "fields filled down onto variants, ids from the Handle/SKU, image-only lines "
        "accounted for (merged). A [catalog] table in --config maps any other export.",
        show_default=False,
    ),
]
PerOpt = Annotated[
    str | None,
    typer.Option(
        "--per",
        metavar="product|variant",
        help="With --catalog: one image per product, or one per variant. [default: product]",
        show_default=False,
    ),
]
ReferenceColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--reference-column",
        metavar="COLUMN",
        help="The column holding each row's reference image, e.g. 'Image Src' (with "
        "--catalog: the product's first image). [default: input_image]",
        show_default=False,
    ),
]
MissingReferenceOpt = Annotated[
    str | None,
    typer.Option(
        "--missing-reference",
        metavar="fail|text-only",
        help="A reference URL that cannot be fetched: the row ends failed (--retry-failed "
        "tries again), or text-only generates from the prompt alone and says so in its "
        "reason. [default: fail]",
        show_default=False,
    ),
]
ReportColumnsOpt = Annotated[
    str | None,
    typer.Option(
        "--report-columns",
        metavar="COL,COL",
        help="Catalog columns report.html shows under each product, e.g. 'Variant SKU,Variant "
        "Price'. [default: a few that look like a title, SKU or colour]",
        show_default=False,
    ),
]
MaxCreditsOpt = Annotated[
    float | None,
    typer.Option(
        "--max-credits",
        metavar="N",
        help="Budget for this output: spend plus in-flight cost never passes N credits "
        "(earlier runs into DEST count); rows that do not fit end skipped (reason budget).",
        show_default=False,
    ),
]
LibraryOpt = Annotated[
    str | None,
    typer.Option(
        "--library",
        metavar="URI",
        help="Image library (folder or s3://bucket/prefix): rows whose request it already "
        "holds are copied from it (no submit, no cost; reused_from in the manifest) and every "
        "image paid for is added. [default: DEST/../library when --out contains {date}]",
        show_default=False,
    ),
]
NoLibraryOpt = Annotated[
    bool,
    typer.Option("--no-library", help="Use no image library, not even a {date} output's."),
]


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
def _reported() -> Iterator[None]:
    """Expected problems become one line and exit 2; our own bugs keep their traceback.

    Tracebacks are printed by hand (not Python's hook) so any API key that slipped into a
    message is masked first.
    """
    try:
        yield
    except typer.Exit:
        raise
    except StorageError as exc:
        _fail(str(exc), EXIT_STORAGE)
    except KleinError as exc:
        _fail(str(exc))
    except Exception:
        text = "".join(traceback.format_exception(*sys.exc_info()))
        sys.stderr.write(_redact(text))
        sys.stderr.write(_INTERNAL_ERROR + "\n")
        raise typer.Exit(EXIT_INTERNAL) from None


def _settings(config_path: Path | None, **flags: object) -> RunConfig:
    base = load_config(config_path) if config_path is not None else RunConfig()
    return merge_flags(base, **flags)


def _defaults(config: RunConfig) -> Defaults:
    from pipeline.manifest import Defaults

    return Defaults(
        aspect_ratio=config.aspect_ratio,
        resolution=config.resolution,
        safety_tolerance=config.safety_tolerance,
        output_format=config.output_format,
    )


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


def _catalog_flags(
    prompt_template: str | None,
    vary: list[str] | None,
    variations: list[Path] | None,
    catalog: str | None = None,
    per: str | None = None,
    reference_column: str | None = None,
) -> dict[str, object]:
    return {
        "prompt_template": prompt_template,
        "vary": list(vary) if vary else None,
        "variations": [str(path) for path in variations] if variations else None,
        "catalog": catalog,
        "per": per,
        "reference_column": reference_column,
    }


def _catalog(settings: RunConfig) -> Catalog | None:
    """The prompt template and variation matrix asked for (checked here, before any work)."""
    from pipeline.variations import Catalog

    return Catalog.build(
        prompt_template=settings.prompt_template,
        vary=settings.vary,
        variations=settings.variations,
    )


# --- validate -------------------------------------------------------------------------------


@app.command(epilog=_EXIT_CODES_HELP)
def validate(
    manifest: ManifestArg,
    aspect_ratio: AspectRatioOpt = None,
    resolution: ResolutionOpt = None,
    output_format: OutputFormatOpt = None,
    safety_tolerance: SafetyOpt = None,
    limit: LimitOpt = None,
    catalog: CatalogOpt = None,
    per: PerOpt = None,
    reference_column: ReferenceColumnOpt = None,
    prompt_template: TemplateOpt = None,
    vary: VaryOpt = None,
    variations: VariationsOpt = None,
    no_references: Annotated[
        bool,
        typer.Option("--no-references", help="Skip checking local reference image files."),
    ] = False,
    s3_endpoint_url: S3EndpointOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Check a manifest without sending anything, and summarise what a run would do.

    Exit 0 when every row is valid, 1 when some rows would be rejected, 2 when the manifest
    cannot be read at all.
    """
    with _reported():
        settings = _settings(
            config,
            aspect_ratio=aspect_ratio,
            resolution=resolution,
            output_format=output_format,
            safety_tolerance=safety_tolerance,
            limit=limit,
            **_catalog_flags(prompt_template, vary, variations, catalog, per, reference_column),
            s3_endpoint_url=s3_endpoint_url,
        )
        source = _check_manifest_path(manifest)
        _configure_s3(settings)
        from pipeline.check import check_manifest

        report = check_manifest(
            source,
            defaults=_defaults(settings),
            limit=settings.limit,
            check_references=not no_references,
            catalog=_catalog(settings),
            export=settings.export(),
            reference_column=settings.reference_column,
        )
    typer.echo(report.render())
    raise typer.Exit(int(report.exit_code))


# --- run ------------------------------------------------------------------------------------


def _plan_text(
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
            )
    return "\n".join(lines)


def _resume_hint(out: str) -> str:
    command = shlex.join(["klein-batch", *sys.argv[1:]]) if sys.argv[1:] else "the same command"
    return (
        f"interrupted: finished and acknowledged tasks are recorded in {out}; "
        f"run the same command again to resume (no acknowledged task is paid for twice):\n"
        f"  {command}"
    )


@app.command(epilog=_EXIT_CODES_HELP)
def run(
    manifest: ManifestArg,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            metavar="DEST",
            help="Output folder or s3://bucket/prefix: images/, manifest.parquet, run.json "
            "and the resume journal.",
            show_default=False,
        ),
    ] = None,
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api-url",
            metavar="URL",
            help="API base URL, e.g. https://api.freepik.com. The key is read from "
            f"${API_KEY_ENV['klein']} (dialect klein) or ${API_KEY_ENV['bfl']} (dialect bfl), "
            "never from a flag.",
            show_default=False,
        ),
    ] = None,
    sim: Annotated[
        bool,
        typer.Option("--sim", help="Start the bundled simulator in-process and run against it."),
    ] = False,
    sim_config: Annotated[
        Path | None,
        typer.Option(
            "--sim-config",
            metavar="FILE",
            help="Simulator settings (TOML: latency, faults, keys); implies --sim.",
            show_default=False,
        ),
    ] = None,
    dialect: Annotated[
        str | None,
        typer.Option(
            "--dialect",
            metavar="klein|bfl",
            help=f"API dialect; one of: {', '.join(DIALECTS)}. [default: klein]",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="klein-4b|klein-9b",
            help="Dialect bfl's model. [default: klein-4b]",
            show_default=False,
        ),
    ] = None,
    webhook_listen: Annotated[
        str | None,
        typer.Option(
            "--webhook-listen",
            metavar="HOST:PORT",
            help="Receive task webhooks on HOST:PORT (port 0 = any free port) instead of "
            "polling for every task; lost deliveries are still polled. Signing secret from "
            f"${WEBHOOK_SECRET_ENV['klein']} (klein) or ${WEBHOOK_SECRET_ENV['bfl']} (bfl; "
            "made up per run when unset).",
            show_default=False,
        ),
    ] = None,
    webhook_public_url: Annotated[
        str | None,
        typer.Option(
            "--webhook-public-url",
            metavar="URL",
            help="The URL the API should call, when it is not http://HOST:PORT (a tunnel, a "
            "proxy); the receiver's path is appended unless the URL ends with it.",
            show_default=False,
        ),
    ] = None,
    tier: Annotated[
        str | None,
        typer.Option(
            "--tier",
            metavar="NAME",
            help=f"Rate-limit tier of the key; one of: {_TIER_HELP} (a config file may add "
            f"more). [default: {DEFAULT_TIER}]",
            show_default=False,
        ),
    ] = None,
    max_active: Annotated[
        int | None,
        typer.Option(
            "--max-active",
            metavar="N",
            help="Active tasks at once (overrides the tier's).",
            show_default=False,
        ),
    ] = None,
    submits_per_minute: Annotated[
        int | None,
        typer.Option(
            "--submits-per-minute",
            metavar="M",
            help="Submit requests per sliding minute (overrides the tier's).",
            show_default=False,
        ),
    ] = None,
    limit: LimitOpt = None,
    catalog: CatalogOpt = None,
    per: PerOpt = None,
    reference_column: ReferenceColumnOpt = None,
    missing_reference: MissingReferenceOpt = None,
    report_columns: ReportColumnsOpt = None,
    prompt_template: TemplateOpt = None,
    vary: VaryOpt = None,
    variations: VariationsOpt = None,
    max_credits: MaxCreditsOpt = None,
    library: LibraryOpt = None,
    no_library: NoLibraryOpt = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Validate, print the plan and its cost estimate, send nothing."
        ),
    ] = False,
    retry_failed: Annotated[
        bool,
        typer.Option("--retry-failed", help="Retry the rows that failed in an earlier run."),
    ] = False,
    aspect_ratio: AspectRatioOpt = None,
    resolution: ResolutionOpt = None,
    output_format: OutputFormatOpt = None,
    safety_tolerance: SafetyOpt = None,
    s3_endpoint_url: S3EndpointOpt = None,
    config: ConfigOpt = None,
    progress: Annotated[
        str,
        typer.Option(
            "--progress",
            metavar="auto|bar|plain|off",
            help="Progress display; one of: auto (a bar on a terminal, log lines otherwise), "
            "bar, plain, off.",
        ),
    ] = "auto",
) -> None:
    """Generate an image for every row of MANIFEST into --out DEST (resumable).

    Rerunning the same command after a crash or Ctrl-C finishes the job: done rows are
    skipped and tasks already accepted by the API are polled, never paid for twice.
    """
    with _reported():
        if progress not in MODES:
            raise ConfigError(
                f"--progress {progress!r} is not allowed; expected one of {', '.join(MODES)}"
            )
        settings = _settings(
            config,
            out=out,
            api_url=api_url,
            sim=sim or None,
            sim_config=str(sim_config) if sim_config is not None else None,
            dialect=dialect,
            model=model,
            webhook_listen=webhook_listen,
            webhook_public_url=webhook_public_url,
            tier=tier,
            max_active=max_active,
            submits_per_minute=submits_per_minute,
            limit=limit,
            dry_run=dry_run or None,
            retry_failed=retry_failed or None,
            max_credits=max_credits,
            library=library,
            no_library=no_library or None,
            **_catalog_flags(prompt_template, vary, variations, catalog, per, reference_column),
            missing_reference=missing_reference,
            report_columns=(
                [c.strip() for c in report_columns.split(",") if c.strip()]
                if report_columns
                else None
            ),
            aspect_ratio=aspect_ratio,
            resolution=resolution,
            output_format=output_format,
            safety_tolerance=safety_tolerance,
            s3_endpoint_url=s3_endpoint_url,
        )
        if not settings.out:
            raise ConfigError('--out DEST is required (or set out = "..." in the config file)')
        settings = _dated_out(settings)
        source = _check_manifest_path(manifest)
        _configure_s3(settings)
        limits = settings.limits()
        if settings.dry_run:
            _dry_run(source, settings, limits)
        _run(source, settings, limits, progress)


def _dated_out(settings: RunConfig) -> RunConfig:
    """``{date}`` in ``--out`` becomes today (UTC), and the output's library defaults to a
    ``library`` folder beside the dated ones (``pipeline.library.library_for``)."""
    from pipeline.library import library_for
    from pipeline.storage import dated

    assert settings.out is not None
    library = library_for(settings.out, settings.library, no_library=settings.no_library)
    return replace(settings, out=dated(settings.out), library=library)


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
            defaults=_defaults(settings),
            limit=settings.limit,
            catalog=_catalog(settings),
            earlier=earlier,
            export=settings.export(),
            reference_column=settings.reference_column,
            library=_library(settings),
        )
    typer.echo(report.render())
    typer.echo(_plan_text(settings, limits, report.to_send, report.estimated_credits, committed))
    raise typer.Exit(int(report.exit_code))


def demo_sim_config(tier: str, limits: Tier) -> SimConfig:
    """The simulator ``--sim`` starts: one key whose limits are the ones the run asked for.

    The demo should show a run using its whole tier; a simulated key on a smaller tier
    would only answer 429s. A ``--sim-config`` file keeps full control instead (that is how
    a mismatch between client and server limits is rehearsed).
    """
    from pipeline.sim.config import KeyConfig, SimConfig

    key = KeyConfig(
        tier=tier if tier in TIERS else DEFAULT_TIER,
        max_active=limits.max_active,
        submits_per_minute=limits.submits_per_minute,
    )
    return SimConfig(keys=[key])


def _api_key(settings: RunConfig) -> str | None:
    if settings.sim:
        return None
    key = os.environ.get(settings.api_key_env, "").strip()
    if not key:
        raise ConfigError(
            f"${settings.api_key_env} is not set: export the API key for {settings.api_url} "
            "in that environment variable (keys are never taken as flags or from config files)"
        )
    return key


def _run(manifest: str | Path, settings: RunConfig, limits: Tier, progress: str) -> NoReturn:
    check_target(settings)
    api_key = _api_key(settings)

    from pipeline.progress import ProgressDisplay
    from pipeline.report import format_summary
    from pipeline.run import RunOptions, run_manifest
    from pipeline.sim.config import SimConfig

    sim: bool | SimConfig = settings.sim
    if settings.sim_config is not None:
        sim = SimConfig.from_toml(settings.sim_config)
    elif settings.sim:
        sim = demo_sim_config(settings.tier, limits)
    out = str(settings.out)
    try:
        with ProgressDisplay(mode=progress) as display:  # type: ignore[arg-type]
            summary = run_manifest(
                manifest,
                out,
                api_url=None if settings.sim else settings.api_url,
                api_key=api_key,
                sim=sim,
                dialect=settings.dialect,
                # A tier from a config file reaches the run as its explicit limits.
                tier=settings.tier if settings.tier in TIERS else None,
                max_active=limits.max_active,
                submits_per_minute=limits.submits_per_minute,
                defaults=_defaults(settings),
                limit=settings.limit,
                retry_failed=settings.retry_failed,
                on_progress=display,
                prompt_template=settings.prompt_template,
                vary=settings.vary,
                variations=settings.variations,
                max_credits=settings.max_credits,
                catalog=settings.export(),
                reference_column=settings.reference_column,
                missing_reference=settings.missing_reference,
                options=RunOptions(
                    report_columns=tuple(settings.report_columns),
                    model=settings.model,
                    webhook_listen=settings.webhook_listen,
                    webhook_public_url=settings.webhook_public_url,
                    library=settings.library,
                ),
            )
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
    with _reported():
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
    with _reported():
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


# --- flow -----------------------------------------------------------------------------------


@app.command(
    "flow",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def flow_command(ctx: typer.Context) -> None:
    """Run MANIFEST as the generate-catalog Prefect flow, in shards (flow --help for options).

    Prefect's ephemeral mode unless PREFECT_API_URL is set; flows/cli.py parses the options.
    """
    from flows.cli import run as run_flow

    raise typer.Exit(run_flow(list(ctx.args), prog="klein-batch flow"))


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
    with _reported():
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


def main() -> None:
    """Console-script entry point (``klein-batch``).

    Commands report their own errors; this is the last net for anything that escapes them
    (an import failing, say), so it still gets the internal-error exit code and no secret.
    """
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except Exception:
        sys.stderr.write(_redact("".join(traceback.format_exception(*sys.exc_info()))))
        sys.stderr.write(_INTERNAL_ERROR + "\n")
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
