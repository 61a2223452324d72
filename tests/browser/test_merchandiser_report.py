"""report.html as a merchandiser uses it: a Shopify export, a budget stop, in Chromium.

The page is opened from a copy of the output folder (as someone would after downloading
it), and the checks are what a person looks for: every tile opens its full-size image,
products are headed by title and id with the chosen catalog columns, problems come
grouped by reason with their rows, and the budget stop is said, not "finished".
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from cdp import Browser, find_chromium

from pipeline.contract import KLEIN_MODEL
from pipeline.run import RunOptions, run_manifest
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed: bash .ci/run installs Debian's chromium package "
    "(apt-get install -y chromium) and could not here (not root, or no package mirror)",
)
SHOPIFY = Path(__file__).resolve().parents[1] / "data" / "exports" / "shopify_products.csv"

PROBE = """
(async () => {
  const links = [...document.querySelectorAll('#sheet a.full')];
  const opened = await Promise.all(links.map(async (a) => {
    const image = new Image();
    image.src = a.href;   // the relative link, resolved against the page's own folder
    try { await image.decode(); return image.naturalWidth; } catch (e) { return 0; }
  }));
  return {
    links: links.map((a) => a.getAttribute('href')),
    opened: opened,
    headings: [...document.querySelectorAll('#sheet h3')].map((h) => h.innerText),
    state: document.querySelector('#state').innerText,
    reasons: [...document.querySelectorAll('#reasons tr')].slice(1).map(
      (r) => [...r.cells].map((c) => c.innerText)),
    markup: (document.querySelector('#markup') || {innerText: ''}).innerText,
  };
})()
"""


async def _look(url: str) -> tuple[dict[str, Any], bytes]:
    assert CHROMIUM is not None
    async with Browser(CHROMIUM, width=1200, height=900) as page:
        await page.open(url)
        found = dict(await page.evaluate(PROBE))
        return found, await page.screenshot(1200, 900)


def test_merchandiser_report_of_a_budget_stopped_shopify_run(tmp_path: Path) -> None:
    config = SimConfig(
        keys=[KeyConfig(max_active=8)], latency=LatencyConfig(median_s=0.05, p95_s=0.1)
    )
    # Two and a half products of 2 images: two whole ones fit, the third does not.
    budget = round(2.5 * 2 * config.price(KLEIN_MODEL).credits(1024, 1024), 2)
    out = tmp_path / "out"
    with SimServer.in_thread(config) as sim:
        summary = run_manifest(
            SHOPIFY,
            out,
            api_url=sim.url,
            api_key=config.keys[0].key,
            max_active=8,
            catalog="shopify",
            per="product",
            prompt_template="{Title}, {Body (HTML)}, {style} photo",
            vary=["style=studio,loft"],
            max_credits=budget,
            options=RunOptions(
                expected_latency_s=0.05, report_columns=("Variant SKU", "Variant Price")
            ),
        )
    assert summary.stopped == "budget"
    copied = tmp_path / "downloaded"
    shutil.copytree(out, copied)  # the folder as a merchandiser gets it
    found, shot = asyncio.run(_look((copied / "report.html").resolve().as_uri()))

    assert found["links"] == [
        "images/clay-plant-pot--studio.jpg",
        "images/clay-plant-pot--loft.jpg",
        "images/ocean-blue-shirt--studio.jpg",
        "images/ocean-blue-shirt--loft.jpg",
    ]
    assert all(width == 1024 for width in found["opened"])  # each opens the full image
    assert found["headings"][0] == (
        "Clay Plant Pot · clay-plant-pot row 1 · Variant SKU POT-REG · Variant Price 9.99"
    )
    assert found["state"].startswith("stopped: budget · 4 of 10 images made (40%)")
    # Three products skipped whole by the budget: one group, its rows sorted and counted.
    (skipped,) = found["reasons"]
    assert skipped[0] == "skipped" and skipped[1] == "6"
    assert skipped[2].startswith(f"budget: --max-credits {budget:g} reached")
    assert skipped[3] == "5, 8-9"
    # Body (HTML) went in without |text: the page warns, naming the rows.
    assert "4 prompts still contain markup (e.g. <p>)" in found["markup"]
    assert found["markup"].endswith("Rows: 1, 4")
    assert len(shot) > 10_000  # a page was drawn (docs/report-shopify.png is one)
