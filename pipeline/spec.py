"""The run specification: every option of a run, declared once, for ``run``, ``flow`` and APIs.

``klein-batch run``, ``klein-batch flow``, ``run_manifest(spec=...)``, the Prefect flow's
``spec`` parameter and the deployment's parameters in ``prefect.yaml`` all carry one
``RunSpec``: a typed, frozen, serialisable (pydantic) object. It is filled from defaults, a
TOML config file and command-line flags (``pipeline/config.py`` reads the file and merges the
flags) or from a flow parameter (a mapping, checked here on validation), and every value
goes through one checker, ``check_setting``, so a bad value gets the same message naming
where it came from (a flag, a config file's setting, a flow parameter), whatever the entry.

Secrets never enter a spec: API keys come from the environment (or a Prefect Secret block
named by the flow), webhook secrets likewise; ``SECRET_SETTINGS`` are refused by name.

How to add an option so that ``run`` and ``flow`` both get it
-------------------------------------------------------------
1. Add a field to ``RunSpec`` below with ``_option(default, "help", flag=..., metavar=...)``.
   That alone gives it a config-file setting, a ``--flag`` on ``klein-batch run`` and on
   ``klein-batch flow`` (both commands build their flags from these fields, see
   ``pipeline.cli.with_run_options``), a key of the flow's ``spec`` parameter and of the
   deployment's ``parameters.spec`` in ``prefect.yaml``. Leave ``flag`` out for a
   config-only setting.
2. Give its Python type in ``SETTING_TYPES`` and, when it has a range or a set of allowed
   values, a clause in ``check_setting``: the one place its values are checked.
3. Carry it into the run in ``pipeline.run.RunOptions.from_spec`` (or read it from the spec
   where it is used). Shards get the whole spec, so there is nothing to add in ``flows/``,
   unless the option needs something done once for the whole flow (as budgets do).
4. Add its row to the README's table of shared options.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel, ConfigDict, Field, model_validator
from yarl import URL

from pipeline.contract import (
    ASPECT_RATIO_ALIASES,
    ASPECT_RATIOS,
    BFL_MODELS,
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
from pipeline.errors import ConfigError
from pipeline.export_spec import CATALOG_FORMATS, PER_CHOICES, ExportMapping, ExportSpec

if TYPE_CHECKING:
    from pipeline.manifest import Defaults

#: API dialects the client speaks (see the API contract).
DIALECTS: Final = ("klein", "bfl")
#: Environment variable holding the API key of each dialect.
API_KEY_ENV: Final = {"klein": "FREEPIK_API_KEY", "bfl": "BFL_API_KEY"}
DEFAULT_DIALECT: Final = "klein"
#: Environment variable holding the webhook signing secret of each dialect (never a flag).
WEBHOOK_SECRET_ENV: Final = {"klein": "FREEPIK_WEBHOOK_SECRET", "bfl": "BFL_WEBHOOK_SECRET"}
#: ``--model`` values of dialect bfl (the API path is ``/v1/flux-2-<model>``).
BFL_MODEL_NAMES: Final = tuple(name.removeprefix("flux-2-") for name in BFL_MODELS)
#: ``missing_reference``: what an unreachable reference URL does to its row.
MISSING_REFERENCE_CHOICES: Final = ("fail", "text-only")
#: Names that look like a place for a secret; refused so nobody commits a key by accident.
SECRET_SETTINGS: Final = ("api_key", "key", "freepik_api_key", "bfl_api_key", "webhook_secret")

_TIER_HELP: Final = ", ".join(
    f"{t.name} ({t.max_active} active, {t.submits_per_minute}/min)" for t in TIERS.values()
)


def _option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
) -> Any:
    """A spec field with what its command-line flag needs (the same for run and flow)."""
    extra: dict[str, Any] = {}
    if flag is not None:
        extra["flag"] = flag
        if short is not None:
            extra["short"] = short
        if metavar is not None:
            extra["metavar"] = metavar
    return Field(default, description=help, json_schema_extra=extra or None)


class RunSpec(BaseModel):
    """Every option of a run except the manifest itself (and never a secret)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: str | None = _option(
        None,
        "Output folder or s3://bucket/prefix: images/, manifest.parquet, run.json and the "
        "resume journal.",
        flag="--out",
        short="-o",
        metavar="DEST",
    )
    api_url: str | None = _option(
        None,
        "API base URL, e.g. https://api.freepik.com. The key is read from "
        f"${API_KEY_ENV['klein']} (dialect klein) or ${API_KEY_ENV['bfl']} (dialect bfl), "
        "never from a flag.",
        flag="--api-url",
        metavar="URL",
    )
    sim: bool = _option(
        False, "Start the bundled simulator in-process and run against it.", flag="--sim"
    )
    sim_config: Path | None = _option(
        None,
        "Simulator settings (TOML: latency, faults, keys); implies --sim.",
        flag="--sim-config",
        metavar="FILE",
    )
    dialect: str = _option(
        DEFAULT_DIALECT,
        f"API dialect; one of: {', '.join(DIALECTS)}. [default: klein]",
        flag="--dialect",
        metavar="klein|bfl",
    )
    model: str | None = _option(
        None,
        "Dialect bfl's model. [default: klein-4b]",
        flag="--model",
        metavar="klein-4b|klein-9b",
    )
    webhook_listen: str | None = _option(
        None,
        "Receive task webhooks on HOST:PORT (port 0 = any free port) instead of polling for "
        "every task; lost deliveries are still polled. Signing secret from "
        f"${WEBHOOK_SECRET_ENV['klein']} (klein) or ${WEBHOOK_SECRET_ENV['bfl']} (bfl; made "
        "up per run when unset).",
        flag="--webhook-listen",
        metavar="HOST:PORT",
    )
    webhook_public_url: str | None = _option(
        None,
        "The URL the API should call, when it is not http://HOST:PORT (a tunnel, a proxy); "
        "the receiver's path is appended unless the URL ends with it.",
        flag="--webhook-public-url",
        metavar="URL",
    )
    tier: str = _option(
        DEFAULT_TIER,
        f"Rate-limit tier of the key; one of: {_TIER_HELP} (a config file may add more). "
        f"[default: {DEFAULT_TIER}]",
        flag="--tier",
        metavar="NAME",
    )
    max_active: int | None = _option(
        None, "Active tasks at once (overrides the tier's).", flag="--max-active", metavar="N"
    )
    submits_per_minute: int | None = _option(
        None,
        "Submit requests per sliding minute (overrides the tier's).",
        flag="--submits-per-minute",
        metavar="M",
    )
    limit: int | None = _option(
        None, "Only the first N rows of the manifest.", flag="--limit", metavar="N"
    )
    prompt_template: str | None = _option(
        None,
        "Build each prompt from the row's columns (and variation axes), e.g. 'Studio photo "
        "of {title} in {color}, {style}'; the manifest then needs no prompt column. A row "
        "with an empty field is rejected.",
        flag="--prompt-template",
        metavar="TEXT",
    )
    vary: tuple[str, ...] = _option(
        (),
        "Cross every row with these values (repeatable; axes multiply), e.g. "
        "style=studio,lifestyle or aspect_ratio=square_1_1,portrait_2_3 or seed=1,2.",
        flag="--vary",
        metavar="AXIS=V1,V2",
    )
    variations: tuple[str, ...] = _option(
        (),
        "A CSV of variations (header: axis names; one variation per row), crossed with every "
        "row and with other axes (repeatable).",
        flag="--variations",
        metavar="CSV",
    )
    catalog: str | None = _option(
        None,
        "MANIFEST is a shop's product export, read as the shop writes it: product fields "
        "filled down onto variants, ids from the Handle/SKU, image-only lines accounted for "
        "(merged). A [catalog] table in --config maps any other export.",
        flag="--catalog",
        metavar="shopify|woocommerce",
    )
    per: str | None = _option(
        None,
        "With --catalog: one image per product, or one per variant. [default: product]",
        flag="--per",
        metavar="product|variant",
    )
    #: The ``[catalog]`` mapping of a config file, for exports of any other system.
    catalog_mapping: ExportMapping | None = Field(
        None, description="The [catalog] mapping of a config file (any other export)."
    )
    reference_column: str | None = _option(
        None,
        "The column holding each row's reference image, e.g. 'Image Src' (with --catalog: "
        "the product's first image). [default: input_image]",
        flag="--reference-column",
        metavar="COLUMN",
    )
    missing_reference: str = _option(
        "fail",
        "A reference URL that cannot be fetched: the row ends failed (--retry-failed tries "
        "again), or text-only generates from the prompt alone and says so in its reason. "
        "[default: fail]",
        flag="--missing-reference",
        metavar="fail|text-only",
    )
    allow_http_references: bool = _option(
        False,
        "Fetch reference URLs over plain http:// too (an image server inside your network); "
        "by default only https:// is fetched.",
        flag="--allow-http-references",
    )
    allow_private_references: bool = _option(
        False,
        "Fetch reference URLs whose host is a private, loopback or link-local address (a PIM "
        "or image server inside your network); by default refused, so a manifest cannot "
        "make the run reach into an internal network.",
        flag="--allow-private-references",
    )
    report_columns: tuple[str, ...] = _option(
        (),
        "Catalog columns report.html shows under each product, e.g. 'Variant SKU,Variant "
        "Price' (repeatable). [default: option values, SKU, title or colour; never descriptions]",
        flag="--report-columns",
        metavar="COL,COL",
    )
    max_credits: float | None = _option(
        None,
        "Budget for this output: spend plus in-flight cost never passes N credits (earlier "
        "runs into DEST count; in a flow, all shards together); rows that do not fit end "
        "skipped (reason budget).",
        flag="--max-credits",
        metavar="N",
    )
    dry_run: bool = _option(
        False, "Validate, print the plan and its cost estimate, send nothing.", flag="--dry-run"
    )
    retry_failed: bool = _option(
        False, "Retry the rows that failed in an earlier run.", flag="--retry-failed"
    )
    api_outage_wait: float = _option(
        300.0,
        "While the API does not answer (connection refused, reset), rows wait for it instead "
        "of failing; after this many seconds without an answer the run stops (exit 69) and "
        "the same command resumes it. [default: 300]",
        flag="--api-outage-wait",
        metavar="SECONDS",
    )
    no_task_list: bool = _option(
        False,
        "Find ended tasks by polls and probes alone, never asking the API's task list "
        "(dialect klein; by default read while it keeps up with the endings).",
        flag="--no-task-list",
    )
    aspect_ratio: str = _option(
        DEFAULT_ASPECT_RATIO,
        f"Default for rows without one; one of: {', '.join(ASPECT_RATIOS)}, or its ratio "
        f"(16:9). [default: {DEFAULT_ASPECT_RATIO}]",
        flag="--aspect-ratio",
        metavar="PRESET",
    )
    resolution: str = _option(
        DEFAULT_RESOLUTION,
        f"Default for rows without one; one of: {', '.join(RESOLUTIONS)}. "
        f"[default: {DEFAULT_RESOLUTION}]",
        flag="--resolution",
        metavar="1k|2k",
    )
    output_format: str = _option(
        DEFAULT_OUTPUT_FORMAT,
        f"Default for rows without one; one of: {', '.join(OUTPUT_FORMATS)}. "
        f"[default: {DEFAULT_OUTPUT_FORMAT}]",
        flag="--output-format",
        metavar="png|jpeg",
    )
    safety_tolerance: int = _option(
        DEFAULT_SAFETY,
        f"Default for rows without one; {SAFETY_MIN} (strict) to {SAFETY_MAX} (lenient). "
        f"[default: {DEFAULT_SAFETY}]",
        flag="--safety-tolerance",
        metavar="0-5",
    )
    library: str | None = _option(
        None,
        "Image library (folder or s3://bucket/prefix): rows whose request it already holds "
        "are copied from it (no submit, no cost; reused_from in the manifest) and every image "
        "paid for is added. [default: DEST/../library when --out contains {date}]",
        flag="--library",
        metavar="URI",
    )
    no_library: bool = _option(
        False, "Use no image library, not even a {date} output's.", flag="--no-library"
    )
    s3_endpoint_url: str | None = _option(
        None,
        "S3 endpoint for s3:// manifests, references and outputs (MinIO, R2, a local "
        "server), e.g. http://127.0.0.1:9000. [default: $AWS_ENDPOINT_URL_S3 or "
        "$AWS_ENDPOINT_URL, else AWS]. Credentials come from the standard AWS chain.",
        flag="--s3-endpoint-url",
        metavar="URL",
    )
    #: Tier presets: the built-in ones plus any a config file adds or overrides.
    tiers: dict[str, Tier] = Field(
        default_factory=lambda: dict(TIERS),
        description="Tier presets: the built-in ones plus any a config file's [tiers] adds.",
    )

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, data: Any) -> Any:
        """A mapping from outside (a flow or deployment parameter) gets the same checks as
        a flag or a config file, with messages naming the parameter."""
        if not isinstance(data, dict):
            return data
        unknown = sorted(set(data) - set(cls.model_fields))
        for name in unknown:
            if name in SECRET_SETTINGS:
                raise ConfigError(
                    f"flow parameter spec.{name} is not allowed: secrets are never run options; "
                    "keep the key in the environment or a Prefect Secret block"
                )
        tiers = data.get("tiers") or TIERS
        checked = dict(data)
        for name, value in data.items():
            if name in SETTING_TYPES and value is not None:
                checked[name] = check_setting(name, value, Where.PARAMETER, tiers)
        return checked

    # --- what the run needs, derived -----------------------------------------------------------

    def limits(self) -> Tier:
        """The limits the run will respect: the tier's, with explicit limits taking over."""
        base = self.tiers[self.tier]
        return Tier(
            base.name,
            self.max_active if self.max_active is not None else base.max_active,
            (
                self.submits_per_minute
                if self.submits_per_minute is not None
                else base.submits_per_minute
            ),
        )

    @property
    def api_key_env(self) -> str:
        """The environment variable this run's API key is read from."""
        return API_KEY_ENV[self.dialect]

    def image_defaults(self) -> Defaults:
        """Values for manifest cells left empty (``pipeline.manifest.Defaults``)."""
        from pipeline.manifest import Defaults

        return Defaults(
            aspect_ratio=self.aspect_ratio,
            resolution=self.resolution,
            safety_tolerance=self.safety_tolerance,
            output_format=self.output_format,
        )

    def export(self) -> ExportSpec | None:
        """The product export to read (``--catalog``/``--per`` or ``[catalog]``), if any."""
        if self.catalog is None:
            if self.per is not None:
                raise ConfigError(
                    f"--per {self.per} needs --catalog shopify|woocommerce (or a [catalog] "
                    "mapping in the config file): a plain manifest has one row per image"
                )
            return None
        if self.catalog == "mapping" and self.catalog_mapping is None:
            raise ConfigError(
                "--catalog mapping needs a [catalog] table in the --config file (id_column, "
                "group_column, fill_down, reference_column)"
            )
        return ExportSpec(self.catalog, self.per or "product", self.catalog_mapping)

    @property
    def has_catalog(self) -> bool:
        """Whether rows are built from a template or crossed with variations."""
        return bool(self.prompt_template or self.vary or self.variations)

    def replace(self, **changes: Any) -> RunSpec:
        """A copy with ``changes`` (already checked values; flags go through ``merge_flags``)."""
        return self.model_copy(update=changes)

    def to_parameters(self) -> dict[str, Any]:
        """The spec as a JSON-ready mapping (a flow or deployment parameter), defaults left
        out so a deployment shows only what was chosen."""
        return self.model_dump(mode="json", exclude_defaults=True)


def cli_options() -> list[tuple[str, Any]]:
    """``(name, field)`` of every option with a command-line flag, in declaration order."""
    return [
        (name, field)
        for name, field in RunSpec.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and "flag" in field.json_schema_extra
    ]


# --- checking one value ------------------------------------------------------------------------

#: Settings a config file, a flag or a flow parameter may set, with the type each must have.
SETTING_TYPES: Final[dict[str, type]] = {
    "out": str,
    "api_url": str,
    "sim": bool,
    "sim_config": str,
    "dialect": str,
    "tier": str,
    "max_active": int,
    "submits_per_minute": int,
    "limit": int,
    "dry_run": bool,
    "retry_failed": bool,
    "api_outage_wait": float,
    "no_task_list": bool,
    "aspect_ratio": str,
    "resolution": str,
    "output_format": str,
    "safety_tolerance": int,
    "s3_endpoint_url": str,
    "prompt_template": str,
    "vary": list,
    "variations": list,
    "max_credits": float,
    "model": str,
    "webhook_listen": str,
    "webhook_public_url": str,
    "catalog": str,
    "per": str,
    "reference_column": str,
    "missing_reference": str,
    "allow_http_references": bool,
    "allow_private_references": bool,
    "report_columns": list,
    "library": str,
    "no_library": bool,
}
SETTINGS: Final = tuple(SETTING_TYPES)
_TYPE_WORDS: Final = {
    str: "a string",
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    list: "a list of strings",
}


class Where:
    """Phrases a message for the source of a value: a flag, a config file or a parameter."""

    #: Values given to the flow (or a deployment) as its ``spec`` parameter.
    PARAMETER: Where

    def __init__(self, path: Path | None, *, parameter: bool = False) -> None:
        self.path = path
        self.parameter = parameter

    def name(self, setting: str) -> str:
        if self.parameter:
            return f"flow parameter spec.{setting}"
        if self.path is None:
            return "--" + setting.replace("_", "-")
        return f"{self.path}: setting {setting}"

    def fail(self, setting: str, value: object, expected: str) -> ConfigError:
        joiner = " " if self.path is None and not self.parameter else " = "
        return ConfigError(
            f"{self.name(setting)}{joiner}{value!r} is not allowed; expected {expected}"
        )


Where.PARAMETER = Where(None, parameter=True)


def _one_of(values: object) -> str:
    return "one of " + ", ".join(str(v) for v in values)  # type: ignore[attr-defined]


def check_setting(setting: str, value: object, where: Where, tiers: Any) -> object:
    """Type- and range-check one setting, returning its typed value (the one checker)."""
    expected_type = SETTING_TYPES[setting]
    if expected_type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected_type is str and setting == "sim_config" and isinstance(value, Path):
        value = str(value)
    if expected_type is list and isinstance(value, tuple):
        value = list(value)
    if setting == "report_columns" and isinstance(value, str):
        value = [value]
    if setting == "report_columns" and isinstance(value, list):
        # `--report-columns "SKU,Price"` and `report_columns = ["SKU", "Price"]` alike.
        value = [
            part.strip() for item in value if isinstance(item, str) for part in item.split(",")
        ]
    if expected_type is list and isinstance(value, list):
        if not all(isinstance(item, str) and item.strip() for item in value):
            raise where.fail(setting, value, _TYPE_WORDS[list] + " (none empty)")
        return tuple(value)
    if setting == "max_credits" and isinstance(value, float) and not value >= 0:
        raise where.fail(setting, value, "a number of credits, 0 or more")
    if setting == "api_outage_wait" and isinstance(value, float) and not 0 < value < 1e9:
        raise where.fail(setting, value, "a number of seconds, more than 0")
    # bool is an int subclass: `max_active = true` must not pass as 1.
    if not isinstance(value, expected_type) or (expected_type is int and isinstance(value, bool)):
        raise where.fail(setting, value, _TYPE_WORDS[expected_type])
    if setting == "dialect" and value not in DIALECTS:
        raise where.fail(setting, value, _one_of(DIALECTS))
    if setting == "tier" and value not in tiers:
        raise where.fail(setting, value, _one_of(tiers) + " (or add it under [tiers] in a config)")
    if setting == "aspect_ratio" and isinstance(value, str):
        value = ASPECT_RATIO_ALIASES.get(value.strip().lower(), value)
    if setting == "aspect_ratio" and value not in ASPECT_RATIOS:
        raise where.fail(setting, value, _one_of(ASPECT_RATIOS) + ", or its ratio (16:9)")
    if setting == "resolution" and value not in RESOLUTIONS:
        raise where.fail(setting, value, _one_of(RESOLUTIONS))
    if setting == "output_format" and value not in OUTPUT_FORMATS:
        raise where.fail(setting, value, _one_of(OUTPUT_FORMATS))
    if setting == "safety_tolerance" and not SAFETY_MIN <= value <= SAFETY_MAX:  # type: ignore[operator]
        raise where.fail(setting, value, f"a whole number from {SAFETY_MIN} to {SAFETY_MAX}")
    if setting in ("max_active", "submits_per_minute", "limit") and value < 1:  # type: ignore[operator]
        raise where.fail(setting, value, "a whole number of at least 1")
    if setting == "api_url" and not _is_http_url(str(value)):
        raise where.fail(setting, value, "an http:// or https:// URL, e.g. https://api.freepik.com")
    if setting == "s3_endpoint_url" and not _is_http_url(str(value)):
        raise where.fail(setting, value, "an http:// or https:// URL, e.g. http://127.0.0.1:9000")
    if setting == "model" and value not in BFL_MODEL_NAMES:
        raise where.fail(setting, value, _one_of(BFL_MODEL_NAMES) + " (dialect bfl)")
    if setting == "webhook_listen":
        host, sep, port = str(value).rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
            raise where.fail(setting, value, "HOST:PORT, e.g. 127.0.0.1:8787 (port 0 = any free)")
    if setting == "webhook_public_url" and not str(value).startswith(("http://", "https://")):
        raise where.fail(
            setting,
            value,
            "an http:// or https:// URL the API can reach, e.g. https://hooks.example",
        )
    if setting == "catalog" and value not in (*CATALOG_FORMATS, "mapping"):
        raise where.fail(setting, value, _one_of(CATALOG_FORMATS) + " (or a [catalog] mapping)")
    if setting == "per" and value not in PER_CHOICES:
        raise where.fail(setting, value, _one_of(PER_CHOICES))
    if setting == "missing_reference" and value not in MISSING_REFERENCE_CHOICES:
        raise where.fail(setting, value, _one_of(MISSING_REFERENCE_CHOICES))
    if (
        setting in ("out", "api_url", "sim_config", "library", "reference_column")
        and not str(value).strip()
    ):
        raise where.fail(setting, value, "a non-empty value")
    return value


def _is_http_url(text: str) -> bool:
    """An http(s) URL with a host and a valid port.

    Checked up front: a URL aiohttp cannot use (``host:notaport``) would otherwise fail
    every submit as "answer lost" and warn of charges that cannot have happened.
    """
    try:
        url = URL(text)
        return url.scheme in ("http", "https") and bool(url.host) and url.port is not None
    except (TypeError, ValueError):
        return False
