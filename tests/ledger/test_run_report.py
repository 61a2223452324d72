"""run.json and the CLI's closing summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.report import format_summary, latency_percentiles, write_run_json
from pipeline.storage import LocalSink
from pipeline.summary import RunSummary


def _summary(output: str) -> RunSummary:
    return RunSummary(
        run_id="run-20251125-1",
        manifest="catalog.csv",
        output=output,
        dialect="klein",
        tier="standard",
        max_active=24,
        submits_per_minute=3600,
        total_rows=20,
        counts={"succeeded": 17, "moderated": 1, "failed": 1, "rejected": 1},
        started_at=1000.0,
        finished_at=1012.5,
        images_per_s=1.36,
        latency_p50_s=3.2,
        latency_p95_s=7.75,
        credits=18.9,
        submits=21,
        retries=4,
        rate_limited=3,
        polls=35,
        ambiguous_submits=1,
        resumed_rows=5,
        errors={"http_503": 3, "timeout": 1},
    )


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], (None, None)),
        ([4.0], (4.0, 4.0)),
        ([1.0, 3.0], (2.0, 2.9)),
        (list(range(1, 101)), (50.5, 95.05)),
        ([5.0, float("nan"), 1.0, 3.0], (3.0, 4.8)),
        ([None, 2.0, None], (2.0, 2.0)),
        ([None, float("nan")], (None, None)),
    ],
)
def test_latency_percentiles(
    values: list[float | None], expected: tuple[float | None, float | None]
) -> None:
    p50, p95 = latency_percentiles(values)
    if expected[0] is None:
        assert (p50, p95) == expected
    else:
        assert p50 == pytest.approx(expected[0])
        assert p95 == pytest.approx(expected[1])


async def test_run_json_is_pretty_and_complete(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "dest")
    summary = _summary(str(sink.root))
    uri = await write_run_json(sink, summary)
    assert uri == str(sink.root / "run.json")
    text = (await sink.get("run.json") or b"").decode()
    assert text.startswith("{\n  ")
    data = json.loads(text)
    assert data["counts"] == summary.counts
    assert data["elapsed_s"] == 12.5
    assert data["exit_code"] == 1
    assert data["latency_p95_s"] == 7.75
    assert data["errors"] == {"http_503": 3, "timeout": 1}


def test_format_summary_names_everything_a_person_checks() -> None:
    text = format_summary(_summary("/data/out"))
    assert "20 rows: 17 succeeded, 1 moderated, 1 failed, 1 rejected, 0 skipped" in text
    assert "1.36 images/s" in text
    assert "p50 3.20 s" in text and "p95 7.75 s" in text
    assert "credits 18.90" in text
    assert "retries 4" in text and "rate-limited (429) 3" in text
    assert "1 submits lost their response" in text
    assert "resumed: 5 rows" in text
    assert "http_503 x3" in text
    assert text.splitlines()[-1] == (
        "output: /data/out (manifest.parquet, run.json, report.html, images/)"
    )


def test_format_summary_of_an_empty_run() -> None:
    summary = RunSummary("r", "m.csv", "/o", "klein", "trial", 2, 120, total_rows=0)
    text = format_summary(summary)
    assert "0 rows" in text
    assert "p50 n/a" in text
    assert "lost their response" not in text
