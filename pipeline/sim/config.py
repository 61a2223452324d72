"""The simulator's settings: one dataclass tree, loadable from TOML or a plain dict.

Every setting has a default that gives a well-behaved server (one key, standard tier, no
faults), so a test states only what it changes. Loading checks names, types and ranges
up front and raises ``ConfigError`` naming the dotted setting (``faults.poll.error_503``),
because a typo in a chaos setting would otherwise silently run a fault-free benchmark.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.contract import (
    DEFAULT_TIER,
    MAX_REFERENCES,
    PRICES,
    RESULT_URL_TTL_S,
    SAFETY_MAX,
    TIERS,
    Price,
    Tier,
)
from pipeline.errors import ConfigError

RETRY_AFTER_MODES = ("seconds", "http-date", "none", "mixed")


@dataclass(slots=True)
class KeyConfig:
    """One API key: who it is in the stats (``name``), what it may do, what it may spend."""

    name: str = "demo"
    key: str = "sim-demo-key"
    tier: str = DEFAULT_TIER
    #: Explicit limits override the tier's (either may be set alone).
    max_active: int | None = None
    submits_per_minute: int | None = None
    #: Credits the key starts with; ``None`` means unlimited.
    credits: float | None = None
    #: Svix-style signing secret for webhooks ("whsec_<base64>" or any string); unsigned if unset.
    webhook_secret: str | None = None


@dataclass(slots=True)
class TierConfig:
    """A tier as configuration: overrides a contract preset of the same name or adds one."""

    max_active: int = 24
    submits_per_minute: int = 3600


#: Named latency shapes for ``[latency] preset``. "production" is klein 9B as a third party
#: measured it on the real API (p50 2.7 s, p95 29 s: queueing dominates), capped at two
#: minutes; the defaults (median 1 s, p95 2.5 s) are a light tail no production day has.
LATENCY_PRESETS: dict[str, dict[str, float]] = {
    "production": {"median_s": 2.7, "p95_s": 29.0, "cap_s": 120.0},
}


@dataclass(slots=True)
class LatencyConfig:
    """Per-task generation time: lognormal with this median and 95th percentile.

    ``preset`` names a shape from ``LATENCY_PRESETS``; settings given beside it override
    the preset's (``preset = "production"`` with ``cap_s = 60`` keeps its median and p95).
    """

    preset: str | None = None
    median_s: float = 1.0
    p95_s: float = 2.5
    floor_s: float = 0.0
    cap_s: float | None = None
    #: Share of a task's time spent CREATED (queued) before IN_PROGRESS.
    queued_fraction: float = 0.1


@dataclass(slots=True)
class EndpointFaults:
    """Failure rates (0..1) of one endpoint."""

    error_503: float = 0.0
    error_500: float = 0.0
    #: The connection is cut after the headers and part of the body; on submit the task IS
    #: created first (the ambiguous case a client must survive without paying twice).
    drop: float = 0.0


@dataclass(slots=True)
class FaultConfig:
    """Production's bad days, as rates; decisions are hashed from ``seed`` so runs repeat."""

    seed: int = 0
    submit: EndpointFaults = field(default_factory=EndpointFaults)
    poll: EndpointFaults = field(default_factory=EndpointFaults)
    list: EndpointFaults = field(default_factory=EndpointFaults)
    download: EndpointFaults = field(default_factory=EndpointFaults)
    #: Image bodies that announce their full Content-Length and stop halfway.
    truncate: float = 0.0
    #: Image bodies sent at ``slow_bytes_per_s``.
    slow: float = 0.0
    slow_bytes_per_s: int = 262_144
    #: Tasks that end FAILED (refunded, no image).
    task_failed: float = 0.0
    webhook_late: float = 0.0
    webhook_late_s: float = 2.0
    #: Seconds every submit's answer leaves after its task was created and charged: an API
    #: under load answers slowly, and a client stopped in that window must not lose the task.
    submit_answer_delay_s: float = 0.0
    webhook_duplicate: float = 0.0
    webhook_lost: float = 0.0


@dataclass(slots=True)
class ModerationConfig:
    """Which tasks end FAILED with ``has_nsfw: [true]``.

    Rule: a prompt containing one of ``words`` (case-insensitive, whole word) is moderated
    when its ``safety_tolerance`` is below ``pass_tolerance`` (default 5: only the most
    lenient setting lets it through). Independently, ``rate`` moderates that share of all
    tasks, whatever their prompt.
    """

    words: list[str] = field(default_factory=lambda: ["nsfw", "nude", "naked", "gore"])
    pass_tolerance: int = SAFETY_MAX
    rate: float = 0.0


@dataclass(slots=True)
class PriceConfig:
    """One model's price in credits per megapixel; an unset figure keeps the published one."""

    first_mp: float | None = None
    extra_mp: float | None = None
    input_mp: float | None = None


@dataclass(slots=True)
class SimConfig:
    """Everything the simulator can be told."""

    keys: list[KeyConfig] = field(default_factory=lambda: [KeyConfig()])
    tiers: dict[str, TierConfig] = field(default_factory=dict)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    #: How 429s tell the client when to come back: "seconds", "http-date", "none", "mixed".
    retry_after: str = "seconds"
    #: Result URLs expire this long after the task finished.
    result_ttl_s: float = RESULT_URL_TTL_S
    #: Finished tasks are forgotten this long after their result URL expired.
    retention_s: float = 600.0
    #: Webhooks to non-loopback hosts are refused (400) unless this is true.
    allow_external_webhooks: bool = False
    webhook_timeout_s: float = 5.0
    #: Recently rendered images kept in memory, by total bytes; one cache for the
    #: simulators of a process (``results.shared_cache``), 0 for none.
    image_cache_bytes: int = 256 * 1024 * 1024
    #: A folder where rendered images are also kept and read back, by simulators in other
    #: processes too (a test suite's, a load test started again); unset: none. An image
    #: depends only on its inputs and on the renderer's code: share a folder only among
    #: simulators of the same version.
    image_dir: str | None = None
    #: Largest decoded reference image accepted.
    max_reference_bytes: int = 10 * 1024 * 1024
    #: Secret for result-URL signatures; random per server start when unset.
    url_secret: str | None = None
    #: Per-model prices (``flux-2-klein`` for dialect A, ``flux-2-klein-4b``/``-9b`` for B),
    #: overriding the published figures in ``contract.PRICES``.
    prices: dict[str, PriceConfig] = field(default_factory=dict)
    #: Task ids are random UUIDs per server start, as production's are; a seed makes them
    #: a function of (seed, key, request, repeat) instead, the same in every run.
    task_id_seed: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> SimConfig:
        """Build and check a config; errors name ``source`` and the dotted setting."""
        config = _build(cls, _with_latency_preset(data, source), source, "")
        config.validate(source=source)
        return config

    @classmethod
    def from_toml(cls, path: str | Path) -> SimConfig:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read simulator config ({exc.strerror})") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        return cls.from_dict(data, source=str(path))

    def max_body_bytes(self) -> int:
        """Largest submit body: four references at the size limit, base64, plus the rest."""
        return (self.max_reference_bytes * 4 // 3 + 1024) * MAX_REFERENCES + 1024 * 1024

    def price(self, model: str) -> Price:
        """What ``model`` costs here: the published price, with any configured override."""
        base = PRICES[model]
        override = self.prices.get(model)
        if override is None:
            return base
        return Price(
            base.first_mp if override.first_mp is None else override.first_mp,
            base.extra_mp if override.extra_mp is None else override.extra_mp,
            base.input_mp if override.input_mp is None else override.input_mp,
        )

    def tier_table(self) -> dict[str, Tier]:
        """Contract presets, overridden and extended by ``tiers``."""
        table = dict(TIERS)
        for name, tier in self.tiers.items():
            table[name] = Tier(name, tier.max_active, tier.submits_per_minute)
        return table

    def key_tier(self, key: KeyConfig) -> Tier:
        base = self.tier_table()[key.tier]
        return Tier(
            base.name,
            key.max_active if key.max_active is not None else base.max_active,
            key.submits_per_minute
            if key.submits_per_minute is not None
            else base.submits_per_minute,
        )

    def validate(self, *, source: str = "config") -> None:
        """Check ranges and cross-references; raise ``ConfigError`` naming the setting."""

        def bad(setting: str, allowed: str, value: object) -> ConfigError:
            return ConfigError(f"{source}: setting {setting} = {value!r} is not allowed; {allowed}")

        def rate(setting: str, value: float) -> None:
            if not 0.0 <= value <= 1.0:
                raise bad(setting, "expected a rate from 0 to 1", value)

        def positive(setting: str, value: float, *, zero: bool = False) -> None:
            if value < 0 or (value == 0 and not zero):
                raise bad(setting, "expected a positive number", value)

        if not self.keys:
            raise ConfigError(f"{source}: setting keys is empty; expected at least one [[keys]]")
        for name, tier in self.tiers.items():
            for attr in ("max_active", "submits_per_minute"):
                if getattr(tier, attr) < 1:
                    raise bad(
                        f"tiers.{name}.{attr}",
                        "expected a whole number of at least 1",
                        getattr(tier, attr),
                    )
        tiers = self.tier_table()
        names: set[str] = set()
        values: set[str] = set()
        for i, key in enumerate(self.keys):
            where = f"keys[{i}]"
            if not key.name:
                raise bad(f"{where}.name", "expected a non-empty name", key.name)
            if not key.key:
                raise ConfigError(f"{source}: setting {where}.key is empty; expected a key value")
            if key.name in names:
                raise bad(f"{where}.name", "names must be unique", key.name)
            if key.key in values:
                # The value is a secret: name the setting, never echo it.
                raise ConfigError(f"{source}: setting {where}.key repeats another key's value")
            names.add(key.name)
            values.add(key.key)
            if key.tier not in tiers:
                raise bad(f"{where}.tier", f"expected one of {', '.join(sorted(tiers))}", key.tier)
            for attr in ("max_active", "submits_per_minute"):
                value = getattr(key, attr)
                if value is not None and value < 1:
                    raise bad(f"{where}.{attr}", "expected a whole number of at least 1", value)
            if key.credits is not None:
                positive(f"{where}.credits", key.credits, zero=True)
        lat = self.latency
        positive("latency.median_s", lat.median_s)
        if lat.p95_s < lat.median_s:
            raise bad(
                "latency.p95_s", f"expected at least latency.median_s ({lat.median_s})", lat.p95_s
            )
        positive("latency.floor_s", lat.floor_s, zero=True)
        if lat.cap_s is not None and (lat.cap_s <= 0 or lat.cap_s < lat.floor_s):
            raise bad(
                "latency.cap_s", "expected a positive number at least latency.floor_s", lat.cap_s
            )
        if not 0.0 <= lat.queued_fraction < 1.0:
            raise bad(
                "latency.queued_fraction", "expected a fraction from 0 up to 1", lat.queued_fraction
            )
        f = self.faults
        for endpoint in ("submit", "poll", "list", "download"):
            faults: EndpointFaults = getattr(f, endpoint)
            for attr in ("error_503", "error_500", "drop"):
                rate(f"faults.{endpoint}.{attr}", getattr(faults, attr))
        for attr in (
            "truncate",
            "slow",
            "task_failed",
            "webhook_late",
            "webhook_duplicate",
            "webhook_lost",
        ):
            rate(f"faults.{attr}", getattr(f, attr))
        positive("faults.slow_bytes_per_s", f.slow_bytes_per_s)
        positive("faults.webhook_late_s", f.webhook_late_s, zero=True)
        positive("faults.submit_answer_delay_s", f.submit_answer_delay_s, zero=True)
        rate("moderation.rate", self.moderation.rate)
        if not 0 <= self.moderation.pass_tolerance <= SAFETY_MAX + 1:
            raise bad(
                "moderation.pass_tolerance",
                f"expected 0 to {SAFETY_MAX + 1}",
                self.moderation.pass_tolerance,
            )
        if self.retry_after not in RETRY_AFTER_MODES:
            raise bad(
                "retry_after", f"expected one of {', '.join(RETRY_AFTER_MODES)}", self.retry_after
            )
        positive("result_ttl_s", self.result_ttl_s)
        positive("retention_s", self.retention_s, zero=True)
        positive("webhook_timeout_s", self.webhook_timeout_s)
        positive("image_cache_bytes", self.image_cache_bytes, zero=True)
        positive("max_reference_bytes", self.max_reference_bytes)
        for model, price in self.prices.items():
            if model not in PRICES:
                raise bad(f"prices.{model}", f"expected a model: {', '.join(PRICES)}", model)
            for attr in ("first_mp", "extra_mp", "input_mp"):
                value = getattr(price, attr)
                if value is not None:
                    positive(f"prices.{model}.{attr}", value, zero=True)


# --- dict -> dataclass, with errors a person can act on -------------------------------------


def _with_latency_preset(data: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """``data`` with ``[latency] preset``'s figures filled in under any set beside it."""
    latency = data.get("latency")
    if not isinstance(latency, Mapping) or latency.get("preset") is None:
        return data
    name = latency["preset"]
    if name not in LATENCY_PRESETS:
        raise ConfigError(
            f"{source}: setting latency.preset = {name!r} is not allowed; "
            f"expected one of {', '.join(sorted(LATENCY_PRESETS))}"
        )
    return {**data, "latency": {**LATENCY_PRESETS[name], **latency}}


_SECRET_SETTINGS = (".key", "webhook_secret", "url_secret")
_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _build(cls: type, data: object, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: setting {where} must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting {prefix}{unknown[0]}; "
            f"allowed here: {', '.join(sorted(known))}"
        )
    kwargs = {
        name: _convert(hints[name], value, source, f"{prefix}{name}")
        for name, value in data.items()
    }
    return cls(**kwargs)


def _convert(hint: Any, value: object, source: str, setting: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, source, setting)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, f"{setting}.")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: setting {setting} must be a list")
        return [_convert(args[0], item, source, f"{setting}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: setting {setting} must be a table")
        return {str(k): _convert(args[1], v, source, f"{setting}.{k}") for k, v in value.items()}
    ok = (
        isinstance(value, bool)
        if hint is bool
        else isinstance(value, hint) and not isinstance(value, bool)
        if hint in (int, str)
        else isinstance(value, int | float) and not isinstance(value, bool)
    )
    if not ok:
        shown = "(hidden)" if setting.endswith(_SECRET_SETTINGS) else repr(value)
        raise ConfigError(
            f"{source}: setting {setting} = {shown} is not allowed; expected {_TYPE_WORDS[hint]}"
        )
    return float(value) if hint is float else value
