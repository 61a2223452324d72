"""A run that uses only part of its key never holds more tasks than its share.

Probing (a submit while every slot seems busy, accepted only if one of ours finished) is
proof only when our limit is the key's. A share of a larger key (``--tier standard
--max-active 2``, a Prefect shard's lease) must be a hard cap, or the run takes slots that
belong to the other jobs on the key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pipeline_helpers import check_output, fast_options, key_stats, run_against, write_catalog

from pipeline.contract import Tier
from pipeline.run import RunOptions
from pipeline.sim import SimServer
from pipeline.spec import RunSpec


def config_tier_with_less() -> dict[str, object]:
    """`[tiers.nightly] max_active = 24` in a config file, and `--max-active 3`: the
    spec's options (as `run`, `flow` and a flow's shards build them)."""
    spec = RunSpec(tiers={"nightly": Tier("nightly", 24, 3600)}, tier="nightly", max_active=3)
    options = RunOptions.from_spec(spec)
    return {"tier": options.tier, "max_active": 3, "key_max_active": options.key_max_active}


@pytest.mark.parametrize(
    ("limits", "cap"),
    [
        ({"tier": "standard", "max_active": 2}, 2),
        ({"max_active": 3, "key_max_active": 24}, 3),
        (config_tier_with_less(), 3),
    ],
    ids=["tier-with-less", "lease-of-a-key", "config-tier-with-less"],
)
def test_a_share_of_a_larger_key_is_a_hard_cap(
    limits: dict[str, object], cap: int, start_sim: Callable[..., SimServer], tmp_path: Path
) -> None:
    server = start_sim()  # standard tier: 24 active tasks, far more than the share
    rows = 80
    summary = run_against(
        server,
        write_catalog(tmp_path / "in", rows),
        tmp_path / "out",
        options=fast_options(**limits),
    )
    table = check_output(tmp_path / "out", rows, summary)
    assert table.filter(table["status"] == "succeeded").height == rows
    stats = key_stats(server)
    assert stats["max_active"] <= cap, stats
    assert stats["submits_refused"] == 0, stats
