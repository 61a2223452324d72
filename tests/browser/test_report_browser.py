"""report.html in a real browser: thumbnails render from file://, the problem list is there."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from cdp import Browser, find_chromium

from pipeline.run import RunOptions, run_manifest
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig, SimServer

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed: bash .ci/run installs Debian's chromium package "
    "(apt-get install -y chromium) and could not here (not root, or no package mirror)",
)

PROBE = """
(async () => {
  const images = [...document.querySelectorAll('#sheet img')];
  // Lazy images below the fold load when scrolled to; make them all load for the check.
  images.forEach((image) => { image.loading = 'eager'; });
  await Promise.all(images.map((image) => image.decode().catch(() => null)));
  return {
    images: images.length,
    rendered: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    firstVisible: images.length > 0 && images[0].naturalWidth,
    // The row-by-row list is folded under the grouped reasons: read its text.
    problems: [...document.querySelectorAll('#failures tr')].slice(1).map((r) => r.textContent),
    charts: document.querySelectorAll('.charts svg rect.bar').length,
    external: document.querySelectorAll('script, link, [src^="http"], [href^="http"]').length,
    hover: document.querySelector('#sheet figure').getAttribute('title'),
  };
})()
"""


async def _probe(url: str) -> dict[str, Any]:
    assert CHROMIUM is not None
    async with Browser(CHROMIUM) as page:
        await page.open(url)
        return dict(await page.evaluate(PROBE))


def test_report_renders_thumbnails_and_lists_problems(tmp_path: Path) -> None:
    manifest = tmp_path / "catalog.csv"
    manifest.write_text(
        "id,title,color\n"
        "mug,mug,red\n"
        "tote,tote,tan\n"
        "statue,nude statue,white\n"  # moderated by the simulator
        "lamp,lamp,\n",  # rejected: the template needs {color}
        encoding="utf-8",
    )
    out = tmp_path / "out"
    sim_config = SimConfig(
        keys=[KeyConfig(max_active=8)], latency=LatencyConfig(median_s=0.05, p95_s=0.1)
    )
    with SimServer.in_thread(sim_config) as sim:
        summary = run_manifest(
            manifest,
            out,
            api_url=sim.url,
            api_key=sim_config.keys[0].key,
            max_active=8,
            options=RunOptions(expected_latency_s=0.05),
            prompt_template="{title} in {color}, {style}",
            vary=["style=studio,outdoor", "aspect_ratio=square_1_1,portrait_2_3"],
        )
    assert summary.counts == {
        "succeeded": 8,
        "moderated": 4,
        "failed": 0,
        "rejected": 4,
        "skipped": 0,
    }
    report = out / "report.html"
    assert report.is_file()
    found = asyncio.run(_probe(report.resolve().as_uri()))
    assert found["images"] == 8
    assert found["rendered"] == 8
    assert found["firstVisible"] > 0
    assert found["external"] == 0  # self-contained: nothing fetched from anywhere
    assert found["charts"] > 0
    problems = found["problems"]
    assert len(problems) == 8
    assert sum("moderated" in line for line in problems) == 4
    rejected = [line for line in problems if "rejected" in line]
    assert len(rejected) == 4
    assert "catalog.csv row 4, variation" in rejected[0]
    assert "column color: is empty" in rejected[0]
    assert found["hover"].startswith("mug in red, studio")
    # What the page shows agrees with the output manifest.
    manifest_rows = pl.read_parquet(out / "manifest.parquet")
    assert manifest_rows.filter(pl.col("status") != "succeeded").height == len(problems)
