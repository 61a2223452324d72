"""`klein-batch validate`, `run` (before it sends anything) and `sim`, as a user types them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.contract import ASPECT_RATIOS, TIERS, cost_credits
from pipeline.sim import SimConfig, SimServer

KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")
#: Pixels of shots/red.png (conftest): a reference's megapixels are billed with its image.
RED_PX = 64 * 48
#: bad.csv's two rows to send: a1 with red.png, a8 with a URL a check does not fetch.
A1_AND_A8 = cost_credits(1024, 1024, input_pixels=RED_PX) + cost_credits(1024, 1024)
runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FREEPIK_API_KEY", "BFL_API_KEY")}
    env.update(extra)
    return env


# --- help -----------------------------------------------------------------------------------


def test_help_lists_commands_and_exit_codes() -> None:
    code, out, _ = invoke("--help")
    assert code == 0
    for word in ("run", "validate", "sim", "Exit codes: 0", "2 could not start"):
        assert word in out


def test_run_help_shows_allowed_values() -> None:
    code, out, _ = invoke("run", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for preset in ASPECT_RATIOS:
        assert preset in flat
    for tier in TIERS.values():
        assert f"{tier.name} ({tier.max_active} active, {tier.submits_per_minute}/min)" in flat
    for text in (
        "1k, 2k",
        "png, jpeg",
        "0 (strict) to 5 (lenient)",
        "klein, bfl",
        "$FREEPIK_API_KEY",
        "$BFL_API_KEY",
        "never from a flag",
        "--dry-run",
        "--retry-failed",
        "--sim-config",
        "--limit",
        "--config",
    ):
        assert text in flat, text
    assert "--api-key" not in flat


# --- validate -------------------------------------------------------------------------------


def test_validate_good_manifest(catalog: Path) -> None:
    code, out, err = invoke("validate", str(catalog / "good.csv"))
    assert code == 0, err
    assert "good.csv: 3 rows checked" in out
    assert "valid       3" in out and "rejected    0" in out
    assert "1 distinct local references checked, 0 unusable" in out
    assert "by preset:      square_1_1 2 · portrait_2_3 1" in out
    assert "by resolution:  1k 2 · 2k 1" in out
    # 1024x1024 twice, each with the 64x48 reference (its pixels are billed too), and a 2k
    # portrait 1392x2048, at the published price.
    estimate = 2 * cost_credits(1024, 1024, input_pixels=RED_PX) + cost_credits(1392, 2048)
    assert f"Estimated cost: {estimate:.2f} credits" in out


def test_validate_bad_manifest_names_row_column_and_allowed(catalog: Path) -> None:
    code, out, err = invoke("validate", str(catalog / "bad.csv"))
    assert code == 1
    assert "Traceback" not in out + err
    assert "bad.csv: 8 rows checked" in out
    # The duplicate of a1 is rejected, as the run rejects it (same verdict, same words).
    assert "valid       2" in out and "rejected    6" in out
    assert "bad.csv row 2, column aspect_ratio: 'square_9_9' is not allowed; expected one of" in out
    assert "bad.csv row 3, column prompt:" in out
    assert "bad.csv row 5, column seed: '-3' is not allowed" in out
    assert "bad.csv row 6, column input_image: reference 'shots/missing.png':" in out
    assert "not found" in out
    assert "bad.csv row 7, column input_image: reference 'shots/broken.png':" in out
    assert "of which 1 repeat an earlier row's key" in out
    assert "bad.csv row 4, column id: key 'a1' repeats row 1; each row needs its own id" in out
    assert "1 URL uses not fetched" in out
    assert "not included: 1 reference URL uses" in out  # a8's, priced without its pixels
    # Only the two unique valid rows (a1 and a8) are paid for.
    assert "To send: 2 images" in out
    assert f"Estimated cost: {A1_AND_A8:.2f} credits" in out


def test_validate_groups_and_caps_examples(tmp_path: Path) -> None:
    rows = "".join(f"p{i},prompt {i},4k\n" for i in range(7))
    (tmp_path / "many.csv").write_text("id,prompt,resolution\n" + rows, encoding="utf-8")
    code, out, _ = invoke("validate", str(tmp_path / "many.csv"))
    assert code == 1
    assert "resolution: 7 rows" in out
    assert out.count("column resolution: '4k' is not allowed") == 3
    assert "... and 4 more" in out


def test_validate_defaults_limit_and_config(catalog: Path) -> None:
    config = catalog / "klein.toml"
    config.write_text('resolution = "2k"\noutput_format = "png"\n', encoding="utf-8")
    code, out, _ = invoke("validate", str(catalog / "good.csv"), "--config", str(config))
    assert code == 0
    # Rows with an explicit resolution keep it; the empty one takes the file's default.
    assert "by resolution:  2k 2 · 1k 1" in out
    assert "by format:      png 3" in out
    code, out, _ = invoke(
        "validate",
        str(catalog / "good.csv"),
        "--config",
        str(config),
        "--resolution",
        "1k",
        "--limit",
        "1",
    )
    assert code == 0
    assert "1 rows checked (first 1 rows)" in out
    assert "by format:      png 1" in out


def test_validate_unreadable_manifest_exits_2(tmp_path: Path) -> None:
    (tmp_path / "noprompt.csv").write_text("id,title\n1,mug\n", encoding="utf-8")
    code, out, err = invoke("validate", str(tmp_path / "noprompt.csv"))
    assert code == 2
    assert err.startswith("error: noprompt.csv: no 'prompt' column")
    assert "Traceback" not in out + err
    code, _, err = invoke("validate", str(tmp_path / "absent.csv"))
    assert code == 2
    assert err == f"error: {tmp_path / 'absent.csv'}: manifest not found\n"


def test_validate_bad_default_flag(catalog: Path) -> None:
    code, _, err = invoke("validate", str(catalog / "good.csv"), "--resolution", "4k")
    assert code == 2
    assert err == "error: --resolution '4k' is not allowed; expected one of 1k, 2k\n"


# --- run: everything that must stop before a request is sent -------------------------------


def test_missing_api_key_is_one_clear_line(catalog: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            KLEIN_BATCH,
            "run",
            str(catalog / "good.csv"),
            "--out",
            str(tmp_path / "out"),
            "--api-url",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: $FREEPIK_API_KEY is not set")
    assert not (tmp_path / "out").exists()


def test_bfl_dialect_reads_its_own_key(catalog: Path, tmp_path: Path) -> None:
    code, _, err = invoke(
        "run",
        str(catalog / "good.csv"),
        "--out",
        str(tmp_path / "out"),
        "--dialect",
        "bfl",
        "--api-url",
        "http://127.0.0.1:9",
        env=clean_env(FREEPIK_API_KEY="k"),
    )
    assert code == 2
    assert err.startswith("error: $BFL_API_KEY is not set")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "error: no API to send to: pass --api-url URL"),
        (["--sim", "--api-url", "http://127.0.0.1:9"], "not both"),
        (["--sim", "--tier", "gold"], "error: --tier 'gold' is not allowed; expected one of"),
        (["--sim", "--max-active", "0"], "error: --max-active 0 is not allowed"),
        (["--sim", "--progress", "fancy"], "error: --progress 'fancy' is not allowed"),
        (["--sim", "--api-url", "ftp://x"], "error: --api-url 'ftp://x' is not allowed"),
    ],
)
def test_run_option_errors(catalog: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    code, out, err = invoke(
        "run",
        str(catalog / "good.csv"),
        "--out",
        str(tmp_path / "out"),
        *extra,
        env=clean_env(),
    )
    assert code == 2
    assert message in err
    assert "Traceback" not in out + err


def test_run_needs_out(catalog: Path) -> None:
    code, _, err = invoke("run", str(catalog / "good.csv"), "--sim")
    assert code == 2
    assert "error: --out DEST is required" in err


def test_run_config_file_errors_name_the_file(catalog: Path, tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text('tier = "scale"\nmax_actve = 3\n', encoding="utf-8")
    code, _, err = invoke(
        "run", str(catalog / "good.csv"), "--out", str(tmp_path / "o"), "--config", str(config)
    )
    assert code == 2
    assert err.startswith(
        f"error: {config}: unknown setting 'max_actve' (did you mean max_active?)"
    )
    config.write_text('api_key = "fpk-live-123"\n', encoding="utf-8")
    code, out, err = invoke(
        "run", str(catalog / "good.csv"), "--out", str(tmp_path / "o"), "--config", str(config)
    )
    assert code == 2
    assert "secrets are never read from config files" in err
    assert "fpk-live-123" not in out + err


def test_dry_run_prints_plan_and_cost_and_sends_nothing(catalog: Path, tmp_path: Path) -> None:
    with SimServer.in_thread(SimConfig()) as sim:
        code, out, err = invoke(
            "run",
            str(catalog / "bad.csv"),
            "--out",
            str(tmp_path / "out"),
            "--api-url",
            sim.url,
            "--tier",
            "trial",
            "--dry-run",
            env=clean_env(FREEPIK_API_KEY="sim-demo-key"),
        )
        stats = sim.stats()
    assert code == 1, err  # some rows would be rejected
    assert f"Estimated cost: {A1_AND_A8:.2f} credits" in out
    assert "Plan (dry run: nothing was sent):" in out
    assert f"send to:  {sim.url} (dialect klein, key from $FREEPIK_API_KEY)" in out
    assert "tier trial: 2 active tasks, 120 submits per minute" in out
    assert "sim-demo-key" not in out + err
    demo = stats["keys"]["demo"]
    assert demo["submits_accepted"] == 0 and demo["submits_refused"] == 0
    assert demo["polls"] == 0 and demo["credits_charged"] == 0
    assert not (tmp_path / "out").exists()


def test_dry_run_from_config_file(catalog: Path, tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text(
        'out = "results"\nsim = true\ntier = "nightly"\ndry_run = true\n'
        "[tiers.nightly]\nmax_active = 5\nsubmits_per_minute = 60\n",
        encoding="utf-8",
    )
    code, out, err = invoke("run", str(catalog / "good.csv"), "--config", str(config))
    assert code == 0, err
    assert "send to:  the bundled simulator" in out
    assert f"output:   {tmp_path / 'results'}" in out
    assert "tier nightly: 5 active tasks, 60 submits per minute" in out
    assert "at least: 3s at the submit limit" in out


# --- sim ------------------------------------------------------------------------------------


def test_sim_command_serves_until_interrupted() -> None:
    proc = subprocess.Popen(
        [KLEIN_BATCH, "sim", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("klein simulator listening on http://127.0.0.1:")
        url = first.split()[4]
        assert "FREEPIK_API_KEY=sim-demo-key" in proc.stdout.readline()
        with urllib.request.urlopen(url + "/_sim/stats", timeout=10) as response:
            stats = json.load(response)
        assert stats["keys"]["demo"]["submits_accepted"] == 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sim_command_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text("[latency]\nmedian_s = -1\n", encoding="utf-8")
    code, out, err = invoke("sim", "--config", str(config))
    assert code == 2
    assert err.startswith(f"error: {config}")
    assert "Traceback" not in out + err


# --- our own bugs -----------------------------------------------------------------------------


def test_internal_errors_keep_a_traceback_without_the_key(
    catalog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "fpk-live-0123456789"

    def explode(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError(f"bug while holding {secret}")

    monkeypatch.setattr("pipeline.check.check_manifest", explode)
    code, out, err = invoke(
        "validate", str(catalog / "good.csv"), env=clean_env(FREEPIK_API_KEY=secret)
    )
    assert code == 70
    assert "Traceback (most recent call last)" in err
    assert "RuntimeError: bug while holding ***" in err
    assert "internal error (a bug, not your input)" in err
    assert secret not in out + err


def test_each_error_says_the_exit_code_the_cli_ends_with() -> None:
    """``exit_code`` is what ``klein-batch`` exits with for an error: the one table a
    workflow calling the Python API and a shell calling the CLI both read."""
    from pipeline import (
        ApiUnreachable,
        ConfigError,
        ExitCode,
        KeyRefusedError,
        ManifestError,
        StorageError,
    )

    assert StorageError.exit_code == ExitCode.STORAGE == 74
    assert ApiUnreachable.exit_code == ExitCode.UNAVAILABLE == 69
    for error in (ConfigError, ManifestError, KeyRefusedError):
        assert error.exit_code == ExitCode.CANNOT_START == 2
