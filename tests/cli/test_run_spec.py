"""The run specification: one declaration of every option for run, flow, API and deployments."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import ConfigError
from pipeline.spec import RunSpec, cli_options

REPO = Path(__file__).resolve().parents[2]


def _flags_in_help(command: str) -> set[str]:
    done = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert done.exit_code == 0, done.output
    return {word.rstrip(",") for word in done.output.split() if word.startswith("--")}


def test_run_and_flow_offer_every_option_of_the_spec() -> None:
    flags = {field.json_schema_extra["flag"] for _, field in cli_options()}
    assert {"--max-credits", "--prompt-template", "--vary", "--dry-run", "--out"} <= flags
    assert flags <= _flags_in_help("run")
    assert flags <= _flags_in_help("flow")


def test_a_flow_parameter_gets_the_checks_and_messages_of_a_flag() -> None:
    with pytest.raises(ConfigError, match=r"flow parameter spec.tier = 'gold' is not allowed"):
        RunSpec.model_validate({"out": "o", "tier": "gold"})
    with pytest.raises(ConfigError, match=r"spec.max_credits = -1.0 is not allowed"):
        RunSpec.model_validate({"out": "o", "max_credits": -1})
    with pytest.raises(ConfigError, match="secrets are never run options"):
        RunSpec.model_validate({"out": "o", "api_key": "sk-123"})


def test_a_spec_survives_the_trip_through_a_flow_parameter() -> None:
    spec = RunSpec(
        out="s3://b/nightly/{date}",
        api_url="http://127.0.0.1:8765",
        vary=("style=studio,lifestyle",),
        prompt_template="Photo of {title}",
        max_credits=12.5,
        dry_run=True,
    )
    parameters = spec.to_parameters()
    assert "tiers" not in parameters and "aspect_ratio" not in parameters  # defaults left out
    assert RunSpec.model_validate(parameters) == spec


def test_the_deployment_parameters_are_a_valid_spec() -> None:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    nightly = next(d for d in config["deployments"] if d["name"] == "nightly-catalog")
    spec = RunSpec.model_validate(
        {k: v.replace("{{ $PWD }}", "/repo") for k, v in nightly["parameters"]["spec"].items()}
    )
    assert spec.out == "/repo/out/nightly/{date}"


def test_pipeline_imports_nothing_from_flows() -> None:
    """flows builds on pipeline; `klein-batch flow` reaches flows through an entry point."""
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "flows" or n.startswith("flows.") for n in names), path


def test_the_flow_module_starts_as_a_program() -> None:
    """``python -m flows.catalog`` imports flows.cli before pipeline.cli (the reverse of
    ``klein-batch flow``); the entry-point plugin must not trip over the half-loaded module."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    result = subprocess.run(
        [sys.executable, "-m", "flows.catalog", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--tier" in result.stdout
