"""automations.yaml and prefect.yaml agree: what the lost-run automation watches emits
heartbeats often enough, and the rerun automation names the night's flow.

The automations at work on a real pool: tests/flows/test_scale_out.py (the lost parent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flows.automations import load

REPO = Path(__file__).resolve().parents[2]


def deployments() -> list[dict[str, Any]]:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    return list(config["deployments"])


def test_every_watched_deployment_beats_three_times_per_window() -> None:
    lost, _ = load()
    trigger = lost.trigger
    assert trigger.posture == "Proactive"
    # A run killed before its first heartbeat is watched from its Pending and Running states.
    assert trigger.after == {
        "prefect.flow-run.heartbeat",
        "prefect.flow-run.Pending",
        "prefect.flow-run.Running",
    }
    # A cancelled run whose machine is gone is Prefect's to cancel, not one to run again.
    assert "prefect.flow-run.Cancelling" in trigger.expect
    watched = trigger.match_related
    tag = watched.root["prefect.resource.id"].removeprefix("prefect.tag.")
    window = trigger.within.total_seconds()
    for deployment in deployments():
        # Both deployments are watched (a lost runner is marked Lost too)...
        assert tag in deployment["tags"], deployment["name"]
        env = deployment["work_pool"]["job_variables"]["env"]
        # ...and beat often enough that only three missed heartbeats in a row fire it.
        assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) * 3 <= window, deployment["name"]


def test_only_a_night_marked_lost_or_interrupted_runs_again() -> None:
    from flows.catalog import generate_catalog
    from flows.sigterm import INTERRUPTED

    lost, rerun = load()
    marked = lost.actions[0]
    assert (marked.state, marked.name) == ("CRASHED", "Lost")
    # Lost by the automation, or Interrupted by its own process when its worker was
    # stopped (flows/sigterm.py); an ordinary crash is not run again.
    assert rerun.trigger.expect == {
        f"prefect.flow-run.{marked.name}",
        f"prefect.flow-run.{INTERRUPTED}",
    }
    # An Interrupted run is over, not lost: the watch of missing heartbeats stops there.
    assert f"prefect.flow-run.{INTERRUPTED}" in lost.trigger.expect
    assert rerun.trigger.match_related.root["prefect.resource.name"] == generate_catalog.name
    assert rerun.actions[0].state == "SCHEDULED"
