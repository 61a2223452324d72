"""Run options: one dataclass fed by a TOML file and by command-line flags.

A scheduled job keeps its settings in a file under version control and overrides one or two
on the command line, so both sources go through the same checks and produce the same
messages, naming where the bad value came from and what is allowed. Secrets never live here:
API keys come from the environment only, so a config file can be committed and shared.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from yarl import URL

from pipeline.contract import (
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
from pipeline.product_exports import CATALOG_FORMATS, PER_CHOICES, ExportMapping, ExportSpec

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
#: Settings whose value is a path; relative paths in a config file are relative to that file.
_PATH_SETTINGS: Final = ("out", "sim_config", "library")
#: Names that look like a place for a secret; refused so nobody commits a key by accident.
_SECRET_SETTINGS: Final = ("api_key", "key", "freepik_api_key", "bfl_api_key", "webhook_secret")


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Every option of ``klein-batch run`` except the manifest itself (and never a secret)."""

    out: str | None = None
    api_url: str | None = None
    sim: bool = False
    sim_config: Path | None = None
    dialect: str = DEFAULT_DIALECT
    tier: str = DEFAULT_TIER
    max_active: int | None = None
    submits_per_minute: int | None = None
    limit: int | None = None
    dry_run: bool = False
    retry_failed: bool = False
    aspect_ratio: str = DEFAULT_ASPECT_RATIO
    resolution: str = DEFAULT_RESOLUTION
    output_format: str = DEFAULT_OUTPUT_FORMAT
    safety_tolerance: int = DEFAULT_SAFETY
    #: S3 endpoint for s3:// manifests, references and outputs (MinIO, R2, a local server);
    #: None: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS itself.
    s3_endpoint_url: str | None = None
    #: Catalog workflow (pipeline/variations.py, pipeline/budget.py): a prompt template,
    #: variation axes (``AXIS=V1,V2``), variation CSVs, and a credit budget for the output.
    prompt_template: str | None = None
    vary: tuple[str, ...] = ()
    variations: tuple[str, ...] = ()
    max_credits: float | None = None
    #: Dialect bfl's model (``klein-4b`` or ``klein-9b``); None: ``klein-4b``.
    model: str | None = None
    #: ``HOST:PORT`` of the webhook receiver (port 0 = any free port); None: polling only.
    webhook_listen: str | None = None
    #: The URL the API should call when it differs from ``http://HOST:PORT``.
    webhook_public_url: str | None = None
    #: A shop's product export (pipeline/product_exports.py): ``shopify`` or
    #: ``woocommerce`` (``catalog = "..."``), or ``mapping`` when the file has a
    #: ``[catalog]`` table; one image per ``product`` or per ``variant``.
    catalog: str | None = None
    per: str | None = None
    #: The ``[catalog]`` mapping of a config file, for exports of any other system.
    catalog_mapping: ExportMapping | None = None
    #: The column holding each row's reference image; None: ``input_image``.
    reference_column: str | None = None
    #: ``fail`` or ``text-only``: what an unreachable reference URL does to its row.
    missing_reference: str = "fail"
    #: Catalog columns report.html shows under each product (SKU, price...).
    report_columns: tuple[str, ...] = ()
    #: The image library (``pipeline/library.py``): a folder or ``s3://`` URI; None: the
    #: default of a ``{date}`` output, unless ``no_library``.
    library: str | None = None
    no_library: bool = False
    #: Tier presets: the built-in ones plus any a config file adds or overrides.
    tiers: Mapping[str, Tier] = field(default_factory=lambda: dict(TIERS))

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


#: Settings a config file or flag may set, with the Python type each must have.
_SETTING_TYPES: Final[dict[str, type]] = {
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
    "report_columns": list,
    "library": str,
    "no_library": bool,
}
SETTINGS: Final = tuple(_SETTING_TYPES)
_TYPE_WORDS: Final = {
    str: "a string",
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    list: "a list of strings",
}


class _Where:
    """Phrases a message for the source of a value: a config file or the command line."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def name(self, setting: str) -> str:
        if self.path is None:
            return "--" + setting.replace("_", "-")
        return f"{self.path}: setting {setting}"

    def fail(self, setting: str, value: object, expected: str) -> ConfigError:
        shown = (
            f"{self.name(setting)} {value!r}"
            if self.path is None
            else (f"{self.name(setting)} = {value!r}")
        )
        return ConfigError(f"{shown} is not allowed; expected {expected}")


def _one_of(values: object) -> str:
    return "one of " + ", ".join(str(v) for v in values)  # type: ignore[attr-defined]


def _check(setting: str, value: object, where: _Where, tiers: Mapping[str, Tier]) -> object:
    """Type- and range-check one setting, returning its typed value."""
    expected_type = _SETTING_TYPES[setting]
    if expected_type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected_type is list and isinstance(value, tuple):
        value = list(value)
    if expected_type is list and isinstance(value, list):
        if not all(isinstance(item, str) and item.strip() for item in value):
            raise where.fail(setting, value, _TYPE_WORDS[list] + " (none empty)")
        return tuple(value)
    if setting == "max_credits" and isinstance(value, float) and not value >= 0:
        raise where.fail(setting, value, "a number of credits, 0 or more")
    # bool is an int subclass: `max_active = true` must not pass as 1.
    if not isinstance(value, expected_type) or (expected_type is int and isinstance(value, bool)):
        raise where.fail(setting, value, _TYPE_WORDS[expected_type])
    if setting == "dialect" and value not in DIALECTS:
        raise where.fail(setting, value, _one_of(DIALECTS))
    if setting == "tier" and value not in tiers:
        raise where.fail(setting, value, _one_of(tiers) + " (or add it under [tiers] in a config)")
    if setting == "aspect_ratio" and value not in ASPECT_RATIOS:
        raise where.fail(setting, value, _one_of(ASPECT_RATIOS))
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


def _unknown(name: str, where: _Where, allowed: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(
        f"{where.path}: unknown setting {name!r}{hint}; allowed: {', '.join(allowed)}, [tiers]"
    )


def _parse_tiers(raw: object, where: _Where) -> dict[str, Tier]:
    """``[tiers.NAME] max_active = .., submits_per_minute = ..``: a tier is data, not code."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where.path}: [tiers] must be a table of tables, e.g. "
            "[tiers.nightly] max_active = 8, submits_per_minute = 600"
        )
    tiers: dict[str, Tier] = {}
    for name, limits in raw.items():
        label = f"{where.path}: [tiers.{name}]"
        if not isinstance(limits, dict):
            raise ConfigError(f"{label} must be a table with max_active and submits_per_minute")
        extra = sorted(set(limits) - {"max_active", "submits_per_minute"})
        if extra:
            raise ConfigError(
                f"{label}: unknown setting {extra[0]!r}; allowed: max_active, submits_per_minute"
            )
        base = TIERS.get(name)
        values: dict[str, int] = {}
        for key in ("max_active", "submits_per_minute"):
            value = limits.get(key, getattr(base, key) if base else None)
            if value is None:
                raise ConfigError(f"{label} needs {key} (a whole number of at least 1)")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"{label} {key} = {value!r} is not allowed; expected a whole number "
                    "of at least 1"
                )
            values[key] = value
        tiers[name] = Tier(name, values["max_active"], values["submits_per_minute"])
    return tiers


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML config file; every problem is a ConfigError naming the file and setting.

    Keys are the long flag names (``max_active`` or ``max-active``); a ``[tiers]`` table adds
    or overrides tier presets. Relative paths are taken from the file's folder so a scheduled
    job behaves the same whatever its working directory.
    """
    path = Path(path)
    where = _Where(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None

    raw = {str(key).replace("-", "_"): value for key, value in raw.items()}
    tiers = dict(TIERS)
    if "tiers" in raw:
        tiers.update(_parse_tiers(raw.pop("tiers"), where))
    settings: dict[str, object] = {}
    if isinstance(raw.get("catalog"), dict):
        # [catalog]: how to read the export of a PIM or marketplace (product_exports.py).
        settings["catalog_mapping"] = ExportMapping.from_settings(raw.pop("catalog"), str(path))
        settings["catalog"] = "mapping"
    for name, value in raw.items():
        if name in _SECRET_SETTINGS:
            raise ConfigError(
                f"{path}: setting {name!r} is not allowed: secrets are never read from config "
                f"files; export {API_KEY_ENV['klein']} (or {API_KEY_ENV['bfl']} for --dialect "
                "bfl) instead"
            )
        if name not in _SETTING_TYPES:
            raise _unknown(name, where, SETTINGS)
        settings[name] = _check(name, value, where, tiers)
    for name in _PATH_SETTINGS:
        value = settings.get(name)
        if isinstance(value, str) and "://" not in value:
            settings[name] = str(path.parent / Path(value).expanduser())
    if "variations" in settings:
        settings["variations"] = tuple(
            str(path.parent / Path(str(item)).expanduser())
            for item in settings["variations"]  # type: ignore[attr-defined]
        )
    return _build(RunConfig(tiers=tiers), settings)


def _build(base: RunConfig, settings: Mapping[str, object]) -> RunConfig:
    values = dict(settings)
    if "sim_config" in values and values["sim_config"] is not None:
        values["sim_config"] = Path(str(values["sim_config"]))
    config = replace(base, **values)
    if config.sim_config is not None and "sim" not in settings:
        # A simulator config only makes sense with the simulator.
        config = replace(config, sim=True)
    return config


def merge_flags(config: RunConfig, **flags: object) -> RunConfig:
    """Apply command-line flags over a config; a flag left as None keeps the config's value.

    Choosing a tier on the command line drops explicit limits that came from the file, since
    asking for ``--tier scale`` means the scale tier's limits, unless limits are given too.
    """
    where = _Where(None)
    unknown = sorted(set(flags) - set(_SETTING_TYPES))
    if unknown:
        raise TypeError(f"unknown run option(s): {', '.join(unknown)}")
    given = {name: value for name, value in flags.items() if value is not None}
    checked = {name: _check(name, value, where, config.tiers) for name, value in given.items()}
    if "tier" in checked:
        for name in ("max_active", "submits_per_minute"):
            checked.setdefault(name, None)
    if checked.get("api_url") and "sim" not in checked and "sim_config" not in checked:
        # --api-url on the command line replaces a file's `sim = true`, not the other way.
        checked["sim"] = False
        checked["sim_config"] = None
    if checked.get("sim") or checked.get("sim_config"):
        checked.setdefault("api_url", None)
    return _build(config, checked)


def check_target(config: RunConfig) -> None:
    """A real run needs exactly one place to send to; say so before anything starts."""
    if config.sim and config.api_url:
        raise ConfigError(
            "choose one of --sim (the bundled simulator) or --api-url URL (a real API), not both"
        )
    if not config.sim and not config.api_url:
        raise ConfigError(
            "no API to send to: pass --api-url URL (e.g. https://api.freepik.com) with the key "
            f"in ${config.api_key_env}, or --sim to use the bundled simulator"
        )
    if config.model is not None and config.dialect != "bfl":
        raise ConfigError(
            f"--model {config.model} is for --dialect bfl only (dialect {config.dialect} has one "
            "model)"
        )
    if config.webhook_public_url is not None and config.webhook_listen is None:
        raise ConfigError(
            "--webhook-public-url needs --webhook-listen HOST:PORT (the receiver it points at)"
        )
