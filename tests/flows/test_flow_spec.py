"""The features of `klein-batch run` in the catalog flow, through one run specification:
templates, variation matrices, a budget that holds across shards, and dry runs (real
Prefect flow runs against the simulator)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import polars as pl
import pytest

from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer
from pipeline.spec import RunSpec

pytestmark = pytest.mark.usefixtures("prefect_api")

SECRET = "sk-flow-spec-5e1b7c2d"
TEMPLATE = "Studio photo of {title} in {color}, {style} look"
VARY = ("style=clean,warm",)


def sim_config() -> SimConfig:
    return SimConfig(
        keys=[KeyConfig(name="spec", key=SECRET, max_active=8)],
        latency=LatencyConfig(median_s=0.05, p95_s=0.1),
    )


def products(path: Path, count: int) -> Path:
    """A product export without a prompt column: the template builds the prompts."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title", "color"])
        for n in range(count):
            writer.writerow([f"p{n:02d}", f"product {n}", ["red", "blue", "oak"][n % 3]])
    return path


async def test_a_dry_run_of_the_flow_prices_templates_and_variations_and_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.catalog import generate_catalog

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    manifest = products(tmp_path / "products.csv", 8)
    out = tmp_path / "out"
    async with SimServer(sim_config()) as sim:
        spec = RunSpec(
            out=str(out), api_url=sim.url, prompt_template=TEMPLATE, vary=VARY, dry_run=True
        )
        result = await generate_catalog(str(manifest), spec, shard_size=3)
        stats = sim.stats()["keys"]["spec"]
    assert result["dry_run"] is True
    assert result["to_send"] == 16  # 8 products x 2 styles
    assert result["estimated_credits"] > 0
    assert "nothing was sent" in result["plan"] and "shards:   3 (by key)" in result["plan"]
    assert stats["submits_accepted"] == 0
    assert not (out / ".klein/shards/plan.json").exists()


async def test_templates_variations_and_one_budget_across_all_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 images in 4 shards, a budget for 10: never more than 10 paid, whatever shard
    they fall in; a shard that stopped on its cap gets what others left unused."""
    from flows.catalog import generate_catalog

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    manifest = products(tmp_path / "products.csv", 12)
    out = tmp_path / "out"
    async with SimServer(sim_config()) as sim:
        dry = RunSpec(
            out=str(out), api_url=sim.url, prompt_template=TEMPLATE, vary=VARY, dry_run=True
        )
        plan = await generate_catalog(str(manifest), dry, shard_size=3)
        price = plan["estimated_credits"] / plan["to_send"]
        budget = round(10 * price + 0.05, 2)  # room for 10 images, not 11
        spec = RunSpec(
            out=str(out),
            api_url=sim.url,
            max_active=8,
            prompt_template=TEMPLATE,
            vary=VARY,
            max_credits=budget,
        )
        state = await generate_catalog(
            str(manifest), spec, shard_size=3, parallel_shards=2, return_state=True
        )
        stats = sim.stats()["keys"]["spec"]
    assert state.is_completed(), state.message
    assert "stopped: budget (max_credits reached: run again with a higher one" in state.message
    result = await state.result()
    assert result["shard_count"] == 4
    assert stats["credits_charged"] <= budget + 1e-9
    assert stats["submits_accepted"] == 10
    done = pl.read_parquet(out / "manifest.parquet")
    assert done.height == 24 and done["row"].to_list() == [n // 2 + 1 for n in range(24)]
    counts = done["status"].value_counts().sort("status").rows()
    assert counts == [("skipped", 14), ("succeeded", 10)]
    skipped = done.filter(pl.col("status") == "skipped")
    assert all(reason.startswith("budget") for reason in skipped["reason"])
    sent = done.filter(pl.col("status") == "succeeded")
    assert all(p.startswith("Studio photo of product ") for p in sent["prompt"])
    assert set(done["style"]) == {"clean", "warm"}
    caps = json.loads((out / ".klein/shards/credits.json").read_text())
    assert sum(caps["caps"].values()) <= budget + 1e-9
    assert result["credits"] <= budget

    # A dry run into this output counts what the shards' journals hold, as `run --dry-run`
    # does: only the 14 skipped images are left to send.
    again = await generate_catalog(str(manifest), dry, shard_size=3)
    assert again["to_send"] == 14

    # The same flow with a higher budget finishes the night, paying only for the rest.
    async with SimServer(sim_config()) as sim:
        more = await generate_catalog(
            str(manifest),
            spec.replace(api_url=sim.url, max_credits=round(24 * price + 0.05, 2)),
            shard_size=3,
            parallel_shards=2,
        )
        paid = sim.stats()["keys"]["spec"]["submits_accepted"]
    assert paid == 14
    assert more["counts"]["succeeded"] == 24
