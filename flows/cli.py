"""``python -m flows.catalog`` and ``klein-batch flow``: the catalog flow from a shell.

It runs in Prefect's ephemeral mode when no ``PREFECT_API_URL`` is set (Prefect starts a
temporary local server for the run), or against the configured server otherwise. Options
are checked here, before Prefect starts, so a typo is one ``error:`` line, not a failed
flow run with a traceback. The API key is read from the environment (or a Secret block
with ``--api-key-block``), never from a flag.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from pipeline.config import API_KEY_ENV, RunConfig, check_target, load_config, merge_flags
from pipeline.contract import TIERS
from pipeline.errors import KleinError
from pipeline.summary import ExitCode

EXIT_INTERRUPTED = 130

#: Settings of ``klein-batch run`` that the flow does not carry out, with what they do. A
#: config file shared with ``run`` may hold them; silently dropping a budget or a template
#: would spend credits or make the wrong images, so the flow refuses to start instead.
RUN_ONLY_SETTINGS: Final = {
    "prompt_template": "prompt templates",
    "vary": "variation matrices",
    "variations": "variation matrices",
    "max_credits": "credit budgets",
    "dry_run": "dry runs",
    "model": "choosing the bfl model",
    "webhook_listen": "webhooks",
    "webhook_public_url": "webhooks",
    "catalog": "product exports (--catalog)",
    "per": "product exports (--per)",
    "reference_column": "reference columns",
    "missing_reference": "--missing-reference",
    "report_columns": "report columns",
}


def build_parser(prog: str = "python -m flows.catalog") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the generate-catalog Prefect flow: MANIFEST in shards into --out "
        "DEST (resumable). Without PREFECT_API_URL it runs in Prefect's ephemeral mode.",
        epilog="Exit codes: 0 every row succeeded; 1 some rows did not; 2 could not start; "
        f"130 interrupted. The API key is read from ${API_KEY_ENV['klein']} "
        f"(${API_KEY_ENV['bfl']} for --dialect bfl) or --api-key-block.",
    )
    add = parser.add_argument
    add("manifest", metavar="MANIFEST", help="CSV or Parquet manifest (path or s3:// URI)")
    add("--out", "-o", metavar="DEST", help="output folder or s3:// URI")
    add("--sim", action="store_true", help="start the bundled simulator for the flow's duration")
    add("--sim-config", metavar="FILE", help="simulator settings (TOML); implies --sim")
    add("--api-url", metavar="URL", help="API base URL, e.g. https://api.freepik.com")
    add("--dialect", metavar="klein|bfl", help="API dialect [klein]")
    add("--tier", metavar="NAME", help=f"rate-limit tier: {', '.join(TIERS)} [standard]")
    add("--max-active", type=int, metavar="N", help="active tasks for the key (overrides tier)")
    add("--submits-per-minute", type=int, metavar="M", help="submits per minute (overrides tier)")
    add("--limit", type=int, metavar="N", help="only the first N rows")
    add("--retry-failed", action="store_true", help="retry rows that failed before")
    add("--aspect-ratio", metavar="PRESET", help="default for rows without one")
    add("--resolution", metavar="1k|2k", help="default for rows without one")
    add("--output-format", metavar="png|jpeg", help="default for rows without one")
    add("--safety-tolerance", type=int, metavar="0-5", help="default for rows without one")
    add(
        "--s3-endpoint-url",
        metavar="URL",
        help="S3 endpoint for s3:// manifests and outputs (MinIO, R2, a local server) "
        "[$AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL, else AWS]",
    )
    add(
        "--config",
        metavar="FILE",
        help="TOML file with the settings of `klein-batch run` (templates, variations, "
        "budgets and dry runs are refused: the flow runs the rows as they are)",
    )
    add("--shard-size", type=int, default=5_000, metavar="ROWS", help="rows per shard [5000]")
    add("--parallel-shards", type=int, default=4, metavar="N", help="shards at once [4]")
    add("--shard-retries", type=int, default=2, metavar="N", help="retries per shard [2]")
    add("--api-key-block", metavar="NAME", help="Prefect Secret block holding the API key")
    add(
        "--concurrency-limit",
        default="klein-api-key",
        metavar="NAME",
        help="global concurrency limit for the key's active tasks; '' for none [klein-api-key]",
    )
    add(
        "--shard-deployment",
        metavar="FLOW/DEPLOYMENT",
        help="run shards on a work pool as runs of this deployment "
        "(e.g. generate-catalog-shard/catalog-shard)",
    )
    return parser


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
def _simulator(settings: RunConfig) -> Iterator[tuple[str | None, str | None]]:
    """(api_url, key) of an in-process simulator when asked for, else (None, None)."""
    if not settings.sim:
        yield None, None
        return
    from pipeline.cli import demo_sim_config
    from pipeline.sim import SimConfig, SimServer

    if settings.sim_config is not None:
        config = SimConfig.from_toml(settings.sim_config)
    else:
        config = demo_sim_config(settings.tier, settings.limits())
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


def _parse(argv: Sequence[str] | None, prog: str) -> tuple[argparse.Namespace, RunConfig]:
    args = build_parser(prog).parse_args(argv)
    base = load_config(args.config) if args.config else RunConfig()
    settings = merge_flags(
        base,
        out=args.out,
        api_url=args.api_url,
        sim=True if args.sim else None,
        sim_config=args.sim_config,
        dialect=args.dialect,
        tier=args.tier,
        max_active=args.max_active,
        submits_per_minute=args.submits_per_minute,
        limit=args.limit,
        retry_failed=True if args.retry_failed else None,
        aspect_ratio=args.aspect_ratio,
        resolution=args.resolution,
        output_format=args.output_format,
        safety_tolerance=args.safety_tolerance,
        s3_endpoint_url=args.s3_endpoint_url,
    )
    _refuse_run_only(settings, args.config)
    return args, settings


def _refuse_run_only(settings: RunConfig, config: str | None) -> None:
    """One clear line for a setting only ``klein-batch run`` honours, never a silent drop."""
    plain = RunConfig()
    for name, what in RUN_ONLY_SETTINGS.items():
        value = getattr(settings, name)
        if value != getattr(plain, name):
            shown = list(value) if isinstance(value, tuple) else value
            raise KleinError(
                f"{config}: setting {name} = {shown!r} is not supported by the flow; "
                f"{what} need `klein-batch run` (remove the setting to run the flow)"
            )


def run(argv: Sequence[str] | None = None, *, prog: str = "python -m flows.catalog") -> int:
    """Parse, check, run the flow; returns the exit code."""
    try:
        args, settings = _parse(argv, prog)
        if not settings.out:
            raise KleinError('--out DEST is required (or out = "..." in the config file)')
        check_target(settings)
        if settings.s3_endpoint_url:
            from pipeline.s3 import configure

            # The flow's tasks run in this process (ephemeral mode, or the parent flow on a
            # server); shards on workers read $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL there.
            configure(endpoint_url=settings.s3_endpoint_url)
        manifest = args.manifest
        if "://" not in manifest and not Path(manifest).is_file():
            raise KleinError(f"{manifest}: manifest not found; expected a CSV or Parquet file")
        for name, value, low in (
            ("--shard-size", args.shard_size, 1),
            ("--parallel-shards", args.parallel_shards, 1),
            ("--shard-retries", args.shard_retries, 0),
        ):
            if value < low:
                raise KleinError(f"{name} {value} is not allowed; expected at least {low}")
        key_missing = not os.environ.get(settings.api_key_env, "").strip()
        if key_missing and not settings.sim and not args.api_key_block:
            raise KleinError(
                f"${settings.api_key_env} is not set: export the API key for "
                f"{settings.api_url}, or pass --api-key-block NAME (a Prefect Secret block)"
            )
        limits = settings.limits()
        parameters: dict[str, Any] = {
            "manifest": manifest,
            "out": str(settings.out),
            "dialect": settings.dialect,
            # A tier from a config file reaches the flow as its explicit limits.
            "tier": settings.tier if settings.tier in TIERS else None,
            "max_active": limits.max_active,
            "submits_per_minute": limits.submits_per_minute,
            "shard_size": args.shard_size,
            "parallel_shards": args.parallel_shards,
            "shard_retries": args.shard_retries,
            "api_key_block": args.api_key_block,
            "concurrency_limit": args.concurrency_limit or None,
            "shard_deployment": args.shard_deployment,
            "limit": settings.limit,
            "retry_failed": settings.retry_failed,
            "defaults": {
                "aspect_ratio": settings.aspect_ratio,
                "resolution": settings.resolution,
                "output_format": settings.output_format,
                "safety_tolerance": settings.safety_tolerance,
            },
        }
        from pipeline.manifest import Defaults

        Defaults(**parameters["defaults"])
    except KleinError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.CANNOT_START)

    from flows.catalog import ImageDefaults, ShardsFailed, generate_catalog
    from pipeline.dest_lock import check_free
    from pipeline.storage import open_sink

    out = str(settings.out)
    if "{date}" not in out:
        # Before Prefect starts: a busy output is said in one line (the flow holds the lock).
        try:
            asyncio.run(check_free(open_sink(out), out))
        except KleinError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return int(ExitCode.CANNOT_START)

    parameters["defaults"] = ImageDefaults(**parameters["defaults"])
    try:
        with _simulator(settings) as (sim_url, sim_key):
            parameters["api_url"] = sim_url or settings.api_url
            # Each `--sim` run starts a simulator that knows no task of an earlier run.
            parameters["resubmit_unknown"] = sim_url is not None
            key_env = settings.api_key_env if sim_key else ""
            with _environment(key_env, sim_key) if sim_key else contextlib.nullcontext():
                result = asyncio.run(generate_catalog(**parameters))
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
    counts = result.get("counts", {})
    shown = ", ".join(f"{count:,} {status}" for status, count in counts.items())
    print(f"{result.get('total_rows', 0):,} rows: {shown}")
    print(
        f"{result.get('images_per_s', 0.0):.2f} images/s; credits {result.get('credits', 0.0):,.2f}"
    )
    print(f"output: {result.get('output')} (manifest.parquet, run.json, report.html, images/)")
    return int(result.get("exit_code", ExitCode.PARTIAL))


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv)
