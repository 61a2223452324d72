"""Each fault alone, then all together, on 600-row runs: no row lost, nothing paid twice.

The simulator injects the faults (``pipeline.sim`` FaultConfig); the run is the public
``run_manifest`` against it over real HTTP on 127.0.0.1. Every configuration is checked
for the same invariants (``chaos_helpers.check_run``), plus what that fault must cause.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from chaos_helpers import CHAOS_KEY, check_run, sim_config, sim_process, write_catalog

from pipeline.run import RunOptions, run_manifest

pytestmark = pytest.mark.slow

ROWS = 600
BAD_EVERY = 100
REJECTED = ROWS // BAD_EVERY


def _faults(seed: int, **rates: Any) -> dict[str, Any]:
    return {"seed": seed, **rates}


#: name -> (simulator settings, whether every valid row must still succeed)
MATRIX: dict[str, tuple[dict[str, Any], bool]] = {
    # 503s and 500s are one kind of fault to the client (a server error, retried): one run
    # with both keeps the suite within its CI time budget.
    "5xx-storm": (
        {
            "faults": _faults(
                1,
                submit={"error_503": 0.06, "error_500": 0.05},
                poll={"error_503": 0.06, "error_500": 0.05},
                download={"error_503": 0.06, "error_500": 0.05},
            )
        },
        True,
    ),
    "dropped-connections": (
        {"faults": _faults(3, submit={"drop": 0.06}, poll={"drop": 0.06}, download={"drop": 0.06})},
        True,
    ),
    "truncated-downloads": ({"faults": _faults(4, truncate=0.1)}, True),
    "slow-downloads": ({"faults": _faults(5, slow=0.05, slow_bytes_per_s=2_000_000)}, True),
    "failed-tasks": ({"faults": _faults(6, task_failed=0.1)}, False),
    "moderation": ({"moderation": {"rate": 0.1}}, False),
    # URLs expire at the next whole second after the task ends: some downloads are late.
    "expired-result-urls": ({"result_ttl_s": 0.001}, False),
    # The key really has 32 slots and 30,000 submits a minute; the run is told 384 and
    # 57,600 (another job shares the key): 429 bursts, with every Retry-After style.
    "429-bursts": (
        {
            "key": {"max_active": 32, "submits_per_minute": 30_000},
            "retry_after": "mixed",
        },
        True,
    ),
    "everything-at-once": (
        {
            "faults": _faults(
                7,
                submit={"error_503": 0.05, "error_500": 0.03, "drop": 0.03},
                poll={"error_503": 0.05, "error_500": 0.03, "drop": 0.03},
                download={"error_503": 0.05, "error_500": 0.03, "drop": 0.03},
                truncate=0.05,
                slow=0.02,
                slow_bytes_per_s=2_000_000,
                task_failed=0.05,
            ),
            "moderation": {"rate": 0.05},
            "result_ttl_s": 5.0,
            "key": {"max_active": 64, "submits_per_minute": 20_000},
            "retry_after": "mixed",
        },
        False,
    ),
}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_catalog(tmp_path_factory.mktemp("catalog"), ROWS, BAD_EVERY)


@pytest.mark.parametrize("name", list(MATRIX))
def test_fault_keeps_every_row_and_pays_once(name: str, catalog: Path, tmp_path: Path) -> None:
    settings, all_succeed = MATRIX[name]
    out = tmp_path / "out"
    with sim_process(sim_config(**settings)) as sim:
        summary = run_manifest(
            catalog,
            out,
            api_url=sim.url,
            api_key=CHAOS_KEY,
            tier="enterprise",
            options=RunOptions(expected_latency_s=0.05),
        )
        stats = sim.key_stats()
    done = check_run(catalog, out)
    counts = done.group_by("status").len().to_dict(as_series=False)
    by_status = dict(zip(counts["status"], counts["len"], strict=True))
    assert summary.total_rows == ROWS
    assert by_status.get("rejected", 0) == REJECTED, by_status
    assert by_status.get("skipped", 0) == 0, done.filter(pl.col("status") == "skipped").head()
    # No acknowledged task is submitted twice: the only duplicates the server saw are
    # submits whose answer was lost on the way back.
    assert stats["duplicate_submits"] <= summary.ambiguous_submits, (stats, summary)
    assert stats["submits_accepted"] == ROWS - REJECTED + stats["duplicate_submits"], stats
    injected = sum(stats["faults"].values())
    if all_succeed:
        assert by_status.get("succeeded", 0) == ROWS - REJECTED, _reasons(done)["reason"].to_list()
    if name == "failed-tasks":
        assert by_status["failed"] == stats["tasks_failed"] > 0
        assert injected == stats["tasks_failed"]
    if name == "moderation":
        assert by_status["moderated"] == stats["tasks_moderated"] > 0
    if name == "expired-result-urls":
        assert stats["downloads_expired"] > 0, stats
        expired = done.filter(pl.col("status") == "failed")
        assert expired.height > 0, by_status
        reasons = expired["reason"].to_list()
        assert all("expired" in reason for reason in reasons), sorted(set(reasons))
    if name == "429-bursts":
        assert stats["rate_limited"] > 0
        assert stats["max_active"] <= 32
    if name not in ("moderation", "expired-result-urls", "429-bursts"):
        assert injected > 0, stats["faults"]
    if name == "5xx-storm":
        kinds = {kind for kind, count in stats["faults"].items() if count}
        assert kinds >= {f"{step}_{code}" for step in ("submit", "poll") for code in (500, 503)}
    # A row that failed before its task completed was charged nothing; one whose task
    # completed (its image then lost: an expired result URL, a failed download) was charged.
    not_ok = done.filter(pl.col("status") != "succeeded")
    after = pl.col("reason").str.contains("expired|download failed")
    assert not_ok.filter(~after)["cost_credits"].sum() == 0
    assert (not_ok.filter(after)["cost_credits"] > 0).all()
    # The figures the README's reliability section quotes (visible with -s).
    print(
        f"\nchaos {name}: {ROWS} rows {dict(sorted(by_status.items()))}; faults "
        f"{stats['faults']}, 429s {stats['rate_limited']}, expired downloads "
        f"{stats['downloads_expired']}; ambiguous submits {summary.ambiguous_submits}, "
        f"duplicate submits {stats['duplicate_submits']}"
    )


def _reasons(done: pl.DataFrame) -> pl.DataFrame:
    return done.filter(~pl.col("status").is_in(["succeeded", "rejected"])).select(
        "row", "status", "reason"
    )
