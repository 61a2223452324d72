"""A shop's product export through the Prefect flow: shards are line ranges of the export.

Each shard reads the whole export (fill-down needs a product's first line), then takes its
own lines; lines that make no image of their own are listed as merged in the merged
manifest, so every line of the export is there once, in order.
"""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest

from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer
from pipeline.spec import RunSpec

pytestmark = pytest.mark.usefixtures("prefect_api")

SECRET = "sk-flow-export-5d2e8a"
SHOPIFY = Path(__file__).resolve().parents[1] / "data" / "exports" / "shopify_products.csv"


def _with_prompts(path: Path) -> Path:
    """The export with a prompt on each product's first line, as a PIM that writes them."""
    with SHOPIFY.open(encoding="utf-8", newline="") as handle:
        lines = list(csv.DictReader(handle))
    header = [*lines[0], "prompt"]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, header, lineterminator="\n")
        writer.writeheader()
        for line in lines:
            prompt = f"studio photo of {line['Title']}" if line["Title"] else ""
            writer.writerow({**line, "prompt": prompt})
    return path


async def test_a_shopify_export_per_variant_through_the_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.catalog import generate_catalog

    monkeypatch.setenv("FREEPIK_API_KEY", SECRET)
    export = _with_prompts(tmp_path / "products.csv")
    out = tmp_path / "out"
    config = SimConfig(
        keys=[KeyConfig(name="flow", key=SECRET, max_active=4)],
        latency=LatencyConfig(median_s=0.05, p95_s=0.1),
    )
    async with SimServer(config) as sim:
        state = await generate_catalog(
            str(export),
            RunSpec(out=str(out), api_url=sim.url, max_active=4, catalog="shopify", per="variant"),
            shard_size=3,
            parallel_shards=2,
            return_state=True,
        )
        accepted = sim.stats()["keys"]["flow"]["submits_accepted"]
    assert state.is_completed(), state.message
    done = pl.read_parquet(out / "manifest.parquet")
    assert done["row"].to_list() == list(range(1, 11))  # every line of the export, in order
    assert done["status"].to_list().count("merged") == 2
    made = done.filter(pl.col("status") == "succeeded")
    assert made["key"].to_list() == [
        "clay-plant-pot.regular",
        "clay-plant-pot.large",
        "ocean-blue-shirt",
        "red-sports-tee.s.red",
        "red-sports-tee.m.red",
        "red-sports-tee.l.red",
        "guitar-pick",
        "copper-light",
    ]
    # Row 7's variant line (shard 2: lines 7-9) has no prompt of its own: filled down from
    # its product's first line, row 5, which is in shard 1.
    assert made.filter(pl.col("row") == 7)["prompt"].to_list() == ["studio photo of Red Sports Tee"]
    assert accepted == 8
