"""RunConfig from TOML files and flags: what a scheduled job's settings turn into."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import RunConfig, check_target, load_config, merge_flags
from pipeline.contract import TIERS
from pipeline.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "klein.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_every_setting_loads_with_types_and_relative_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        out = "results"
        api-url = "https://api.freepik.com"
        dialect = "klein"
        tier = "scale"
        max_active = 10
        submits_per_minute = 600
        limit = 50
        retry_failed = true
        aspect_ratio = "portrait_2_3"
        resolution = "2k"
        output_format = "png"
        safety_tolerance = 4
        """,
    )
    config = load_config(path)
    assert config.out == str(tmp_path / "results")
    assert config.api_url == "https://api.freepik.com"
    assert config.tier == "scale"
    assert (config.max_active, config.submits_per_minute, config.limit) == (10, 600, 50)
    assert config.retry_failed is True
    assert config.aspect_ratio == "portrait_2_3"
    assert config.resolution == "2k"
    assert config.output_format == "png"
    assert config.safety_tolerance == 4
    limits = config.limits()
    assert (limits.name, limits.max_active, limits.submits_per_minute) == ("scale", 10, 600)


def test_sim_config_path_implies_sim_and_is_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'sim_config = "chaos.toml"\n'))
    assert config.sim is True
    assert config.sim_config == tmp_path / "chaos.toml"


def test_custom_tier_is_data(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        tier = "nightly"
        [tiers.nightly]
        max_active = 8
        submits_per_minute = 300
        [tiers.trial]
        max_active = 3
        """,
    )
    config = load_config(path)
    limits = config.limits()
    assert (limits.name, limits.max_active, limits.submits_per_minute) == ("nightly", 8, 300)
    # Overriding one limit of a built-in tier keeps its other limit.
    trial = merge_flags(config, tier="trial").limits()
    assert (trial.max_active, trial.submits_per_minute) == (3, TIERS["trial"].submits_per_minute)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('tierr = "scale"', "unknown setting 'tierr' (did you mean tier?)"),
        ('tier = "gold"', "setting tier = 'gold' is not allowed; expected one of trial"),
        ("max_active = 0", "setting max_active = 0 is not allowed; expected a whole number of at"),
        ("max_active = true", "setting max_active = True is not allowed; expected a whole number"),
        ('limit = "10"', "setting limit = '10' is not allowed; expected a whole number"),
        ('aspect_ratio = "square"', "expected one of square_1_1, widescreen_16_9"),
        ('resolution = "4k"', "setting resolution = '4k' is not allowed; expected one of 1k, 2k"),
        ('output_format = "webp"', "expected one of png, jpeg"),
        ("safety_tolerance = 9", "expected a whole number from 0 to 5"),
        ('dialect = "openai"', "expected one of klein, bfl"),
        ('api_url = "api.freepik.com"', "expected an http:// or https:// URL"),
        ("[tiers.x]\nmax_active = 2", "[tiers.x] needs submits_per_minute"),
        ("[tiers.x]\nmax_active = 2\nsubmits_per_minute = -1", "submits_per_minute = -1"),
        ("tier = [", "not valid TOML"),
    ],
)
def test_bad_settings_name_file_setting_and_what_is_allowed(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert expected in message


def test_secrets_are_refused_without_echoing_them(tmp_path: Path) -> None:
    path = write(tmp_path, 'api_key = "fpk-super-secret"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "FREEPIK_API_KEY" in str(caught.value)
    assert "fpk-super-secret" not in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    base = load_config(write(tmp_path, 'tier = "trial"\nresolution = "2k"\nlimit = 5\nout = "a"\n'))
    merged = merge_flags(base, resolution="1k", limit=None, out="/elsewhere")
    assert merged.resolution == "1k"
    assert merged.limit == 5  # a flag left out keeps the file's value
    assert merged.out == "/elsewhere"
    assert merged.tier == "trial"


def test_tier_flag_replaces_limits_from_the_file(tmp_path: Path) -> None:
    base = load_config(write(tmp_path, "max_active = 4\nsubmits_per_minute = 100\n"))
    assert base.limits().max_active == 4
    scale = merge_flags(base, tier="scale").limits()
    assert (scale.max_active, scale.submits_per_minute) == (96, 14400)
    mixed = merge_flags(base, tier="scale", max_active=50).limits()
    assert (mixed.max_active, mixed.submits_per_minute) == (50, 14400)


def test_api_url_flag_replaces_sim_from_the_file(tmp_path: Path) -> None:
    base = load_config(write(tmp_path, "sim = true\n"))
    merged = merge_flags(base, api_url="http://127.0.0.1:9")
    assert merged.sim is False
    check_target(merged)
    back = merge_flags(load_config(write(tmp_path, 'api_url = "http://127.0.0.1:9"\n')), sim=True)
    assert back.api_url is None and back.sim is True


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--max-active 0 is not allowed; expected a whole"):
        merge_flags(RunConfig(), max_active=0)
    with pytest.raises(ConfigError, match=r"^--output-format 'gif' is not allowed"):
        merge_flags(RunConfig(), output_format="gif")


def test_target_must_be_exactly_one() -> None:
    with pytest.raises(ConfigError, match="no API to send to"):
        check_target(RunConfig())
    with pytest.raises(ConfigError, match="not both"):
        check_target(RunConfig(sim=True, api_url="http://127.0.0.1:1"))
    check_target(RunConfig(sim=True))


def test_dialect_picks_the_key_variable() -> None:
    assert RunConfig().api_key_env == "FREEPIK_API_KEY"
    assert merge_flags(RunConfig(), dialect="bfl").api_key_env == "BFL_API_KEY"
