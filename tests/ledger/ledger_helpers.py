"""Builders shared by the ledger tests (a plain module: conftest is not importable)."""

from __future__ import annotations

from pipeline.rows import ImageRequest, Row


def make_row(index: int, key: str | None = None, prompt: str | None = None) -> Row:
    return Row(
        index=index,
        key=key or f"key-{index}",
        request=ImageRequest(
            prompt=prompt or f"a red mug, view {index}",
            aspect_ratio="square_1_1",
            resolution="1k",
            seed=1000 + index,
            safety_tolerance=2,
            output_format="jpeg",
        ),
    )
