"""Reading the run specification (``pipeline/spec.py``) from a TOML file and from flags.

A scheduled job keeps its settings in a file under version control and overrides one or two
on the command line, so both sources go through the same checks and produce the same
messages, naming where the bad value came from and what is allowed (the checks themselves
are ``pipeline.spec.check_setting``, shared with flow parameters). Secrets never live here:
API keys come from the environment only, so a config file can be committed and shared.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from pipeline.contract import TIERS, Tier
from pipeline.errors import ConfigError
from pipeline.export_spec import ExportMapping
from pipeline.spec import (
    API_KEY_ENV,
    BFL_MODEL_NAMES,
    DEFAULT_DIALECT,
    DIALECTS,
    MISSING_REFERENCE_CHOICES,
    SECRET_SETTINGS,
    SETTING_TYPES,
    SETTINGS,
    WEBHOOK_SECRET_ENV,
    RunSpec,
    Where,
    check_setting,
)

__all__ = [
    "API_KEY_ENV",
    "BFL_MODEL_NAMES",
    "DEFAULT_DIALECT",
    "DIALECTS",
    "MISSING_REFERENCE_CHOICES",
    "SETTINGS",
    "WEBHOOK_SECRET_ENV",
    "RunConfig",
    "check_target",
    "load_config",
    "merge_flags",
]

#: The run specification under the name the config code and its callers have long used.
RunConfig = RunSpec

#: Settings whose value is a path; relative paths in a config file are relative to that file.
_PATH_SETTINGS: Final = ("out", "sim_config", "library")


def _unknown(name: str, where: Where, allowed: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(
        f"{where.path}: unknown setting {name!r}{hint}; allowed: {', '.join(allowed)}, [tiers]"
    )


def _parse_tiers(raw: object, where: Where) -> dict[str, Tier]:
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
    where = Where(path)
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
        if name in SECRET_SETTINGS:
            raise ConfigError(
                f"{path}: setting {name!r} is not allowed: secrets are never read from config "
                f"files; export {API_KEY_ENV['klein']} (or {API_KEY_ENV['bfl']} for --dialect "
                "bfl) instead"
            )
        if name not in SETTING_TYPES:
            raise _unknown(name, where, SETTINGS)
        settings[name] = check_setting(name, value, where, tiers)
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
    config = base.replace(**values)
    if config.sim_config is not None and "sim" not in settings:
        # A simulator config only makes sense with the simulator.
        config = config.replace(sim=True)
    return config


def merge_flags(config: RunConfig, **flags: object) -> RunConfig:
    """Apply command-line flags over a config; a flag left as None keeps the config's value.

    Choosing a tier on the command line drops explicit limits that came from the file, since
    asking for ``--tier scale`` means the scale tier's limits, unless limits are given too.
    """
    where = Where(None)
    unknown = sorted(set(flags) - set(SETTING_TYPES))
    if unknown:
        raise TypeError(f"unknown run option(s): {', '.join(unknown)}")
    given = {name: value for name, value in flags.items() if value is not None}
    checked = {
        name: check_setting(name, value, where, config.tiers) for name, value in given.items()
    }
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
