"""How heavy is report.html for a big run? Build it for N images and open it in Chromium.

    .venv/bin/python benchmarks/report_html.py [--images 10000] [--out DIR]

Renders 100 distinct 1k simulator JPEGs and hard-links them under N keys (so the disk cost
stays small while every thumbnail is still decoded from its own file), writes a matching
manifest.parquet (12 variations per product, 2% failed), then times ``write_html_report``
with a cold thumbnail cache and again warm, and the page's load in headless Chromium.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from pipeline.html_report import write_html_report
from pipeline.sim.images import render_image
from pipeline.storage import LocalSink
from pipeline.summary import RunSummary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "browser"))


def _build(out: Path, count: int) -> RunSummary:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    sources = []
    for i in range(100):
        path = out / f"src-{i}.jpg"
        path.write_bytes(
            render_image(prompt=f"product {i}", seed=i, width=1024, height=1024, fmt="jpeg")
        )
        sources.append(path)
    start = time.time() - 3600
    rows: dict[str, list[object]] = {
        name: []
        for name in (
            "row",
            "key",
            "status",
            "reason",
            "prompt",
            "seed",
            "aspect_ratio",
            "resolution",
            "output_uri",
            "format",
            "width",
            "height",
            "finished_at",
            "latency_s",
            "cost_credits",
            "variation",
            "title",
        )
    }
    for n in range(count):
        product, variation = divmod(n, 12)
        key = f"product-{product}--v{variation}"
        failed = n % 50 == 7
        target = images / f"{key}.jpg"
        if not failed and not target.exists():
            os.link(sources[n % 100], target)
        rows["row"].append(product + 1)
        rows["key"].append(key)
        rows["status"].append("failed" if failed else "succeeded")
        rows["reason"].append("task FAILED on the server" if failed else None)
        rows["prompt"].append(f"Studio photo of product {product}, style {variation}")
        rows["seed"].append(n)
        rows["aspect_ratio"].append("square_1_1")
        rows["resolution"].append("1k")
        rows["output_uri"].append(str(target))
        rows["format"].append("jpeg")
        rows["width"].append(1024)
        rows["height"].append(1024)
        rows["finished_at"].append(datetime.fromtimestamp(start + n * 0.3, UTC))
        rows["latency_s"].append(1.0 + (n % 17) / 10)
        rows["cost_credits"].append(0.0 if failed else 1.05)
        rows["variation"].append(f"v{variation}")
        rows["title"].append(f"Product {product}")
    pl.DataFrame(rows).write_parquet(out / "manifest.parquet")
    return RunSummary(
        run_id="bench",
        manifest="bench.csv",
        output=str(out),
        dialect="klein",
        tier="standard",
        max_active=24,
        submits_per_minute=3600,
        total_rows=count,
        started_at=start,
        finished_at=start + count * 0.3,
    )


async def _load(url: str) -> float:
    from cdp import Browser, find_chromium

    binary = find_chromium()
    if binary is None:
        return float("nan")
    async with Browser(binary) as page:
        started = time.perf_counter()
        await page.open(url)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="klein-report-bench-"))
    summary = _build(out, args.images)
    sink = LocalSink(out)
    for label in ("cold thumbnail cache", "warm thumbnail cache"):
        started = time.perf_counter()
        asyncio.run(write_html_report(sink, summary, axes=("style",)))
        print(f"write_html_report, {label}: {time.perf_counter() - started:.1f} s")
    size = (out / "report.html").stat().st_size
    print(f"report.html: {size / 1e6:.1f} MB for {args.images:,} images")
    seconds = asyncio.run(_load((out / "report.html").resolve().as_uri()))
    print(f"chromium load event (file://): {seconds:.1f} s")
    print(f"output: {out}")


if __name__ == "__main__":
    main()
