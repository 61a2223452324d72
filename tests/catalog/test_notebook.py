"""Data teams in notebooks: every Jupyter cell runs inside an event loop.

These tests are coroutines, so they run inside a running loop exactly as a cell does:
``run_manifest`` must not call ``asyncio.run()`` there, and ``arun_manifest`` takes the
same arguments (``sim=True``, no options object).
"""

from __future__ import annotations

import asyncio
import io
import sys
import types
from pathlib import Path

import polars as pl
import pytest

from pipeline import arun_manifest, run_manifest
from pipeline.contract import KLEIN_MODEL
from pipeline.progress import ProgressDisplay, in_jupyter
from pipeline.sim import KeyConfig, LatencyConfig, SimConfig

PRODUCTS = pl.DataFrame({"id": ["a1", "a2", "a3"], "title": ["red mug", "blue mug", "jar"]})
FAST = SimConfig(keys=[KeyConfig(max_active=8)], latency=LatencyConfig(median_s=0.05, p95_s=0.1))


async def test_run_manifest_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    asyncio.get_running_loop()  # as in a Jupyter cell
    summary = run_manifest(PRODUCTS, tmp_path / "out", sim=FAST, prompt_template="{title}")
    assert summary.counts["succeeded"] == 3
    done = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert done["id"].to_list() == ["a1", "a2", "a3"]  # joins back on the frame's own id


async def test_arun_manifest_takes_the_same_arguments(tmp_path: Path) -> None:
    seen: list[int] = []
    summary = await arun_manifest(
        PRODUCTS,
        tmp_path / "out",
        sim=FAST,
        prompt_template="{title}, {style}",
        vary=["style=studio,loft"],
        max_credits=round(1.5 * 2 * FAST.price(KLEIN_MODEL).credits(1024, 1024), 2),
        on_progress=lambda snapshot: seen.append(snapshot.done),
    )
    # 3 products x 2 styles: one and a half products' worth fits one whole product, not
    # two, so the budget stops after one whole product.
    assert summary.counts["succeeded"] == 2 and summary.state == "stopped: budget"
    assert seen and seen[-1] == 6


async def test_a_progress_bar_draws_from_a_notebook_cell(tmp_path: Path) -> None:
    stream = io.StringIO()
    with ProgressDisplay(stream=stream, mode="bar") as display:
        summary = run_manifest(
            PRODUCTS, tmp_path / "out", sim=FAST, prompt_template="{title}", on_progress=display
        )
    assert summary.counts["succeeded"] == 3
    assert "klein-batch" in stream.getvalue() and "3/3" in stream.getvalue()


def test_in_a_jupyter_kernel_the_bar_is_drawn_in_the_cell(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Jupyter kernel's stdout is no terminal; the bar is drawn anyway, as rich's widget."""

    class ZMQInteractiveShell:  # the class name IPython's kernel shell has
        pass

    fake = types.ModuleType("IPython")
    fake.get_ipython = ZMQInteractiveShell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert in_jupyter()
    display = ProgressDisplay(mode="auto")
    assert display.mode == "bar" and display._jupyter
    monkeypatch.delitem(sys.modules, "IPython")
    assert not in_jupyter()
    assert ProgressDisplay(mode="auto", stream=io.StringIO()).mode == "plain"
