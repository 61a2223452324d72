"""Regenerate docs/report.png: the README's catalog demo run, its report in Chromium.

    .venv/bin/python tests/browser/make_screenshot.py [OUT_DIR] [--shopify]

Runs the demo (the example catalog, a prompt template, 3 styles x 2 aspect ratios) on the
bundled simulator, opens ``OUT_DIR/report.html`` in headless Chromium and stores the top of
the page as a 256-colour PNG (a modest file for the repository).
"""

from __future__ import annotations

import asyncio
import io
import sys
import tempfile
from pathlib import Path

from cdp import Browser, find_chromium
from PIL import Image

from pipeline import run_manifest
from pipeline.run import RunOptions

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = "{style} product photo of a {color} {title} in {material}"
VARY = ["style=studio,lifestyle,outdoor", "aspect_ratio=square_1_1,portrait_2_3"]
SHOP_TEMPLATE = "{style} product photo of {Title} {Option1 Value?}, {Body (HTML)|text}"


async def _shot(url: str, width: int, height: int) -> bytes:
    binary = find_chromium()
    if binary is None:
        raise SystemExit("chromium is not installed (apt-get install -y chromium)")
    async with Browser(binary, width=width, height=height) as page:
        await page.open(url)
        await page.evaluate(
            "Promise.all([...document.images].map((i) => { i.loading = 'eager'; "
            "return i.decode().catch(() => null); })).then(() => true)"
        )
        return await page.screenshot(width, height)


def main() -> None:
    args = [arg for arg in sys.argv[1:] if arg != "--shopify"]
    out = Path(args[0] if args else tempfile.mkdtemp(prefix="klein-demo-"))
    if "--shopify" in sys.argv[1:]:
        # docs/report-shopify.png: the README's Shopify export walk-through, stopped by its
        # budget after whole products.
        summary = run_manifest(
            REPO / "tests" / "data" / "exports" / "shopify_products.csv",
            out,
            sim=True,
            catalog="shopify",
            per="product",
            prompt_template=SHOP_TEMPLATE,
            vary=["style=studio,lifestyle,outdoor"],
            max_credits=10,
            options=RunOptions(report_columns=("Variant SKU", "Variant Price")),
        )
        target = REPO / "docs" / "report-shopify.png"
    else:
        summary = run_manifest(
            REPO / "manifests" / "examples" / "catalog.csv",
            out,
            sim=True,
            prompt_template=TEMPLATE,
            vary=VARY,
        )
        target = REPO / "docs" / "report.png"
    print(summary.counts, f"{summary.credits:.2f} credits")
    png = asyncio.run(_shot((out / "report.html").resolve().as_uri(), 1200, 1050))
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256)
    image.save(target, optimize=True)
    print(f"wrote {target} ({target.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
