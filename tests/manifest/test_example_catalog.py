"""The demo catalog must stay valid: it is the first thing a new user runs."""

from __future__ import annotations

from pathlib import Path

from manifest_helpers import read_all
from PIL import Image

from pipeline.contract import ASPECT_RATIOS
from pipeline.manifest import ManifestReader
from pipeline.references import ReferenceStore

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def test_csv_and_parquet_validate_to_identical_rows() -> None:
    csv_rows, csv_rejections = read_all(EXAMPLES / "catalog.csv")
    parquet_rows, parquet_rejections = read_all(EXAMPLES / "catalog.parquet")
    assert csv_rejections == [] and parquet_rejections == []
    assert len(csv_rows) == 20
    assert csv_rows == parquet_rows
    assert (
        ManifestReader(EXAMPLES / "catalog.csv").extra_columns
        == ManifestReader(EXAMPLES / "catalog.parquet").extra_columns
    )
    requests = [row.request for row in csv_rows]
    assert len({r.aspect_ratio for r in requests}) >= 6
    assert {r.resolution for r in requests} == {"1k", "2k"}
    assert {r.output_format for r in requests} == {"png", "jpeg"}
    assert any(not r.references for r in requests)
    assert all(r.aspect_ratio in ASPECT_RATIOS for r in requests)


async def test_reference_shots_are_small_real_images() -> None:
    shots = sorted((EXAMPLES / "refs").iterdir())
    assert len(shots) >= 3
    store = ReferenceStore(EXAMPLES)
    for shot in shots:
        assert shot.stat().st_size < 20_000
        with Image.open(shot) as image:
            assert max(image.size) <= 256
        reference = await store.load(f"refs/{shot.name}")
        assert reference.mime in ("image/png", "image/jpeg")
    for row in read_all(EXAMPLES / "catalog.csv")[0]:
        for spec in row.request.references:
            await store.load(spec)
