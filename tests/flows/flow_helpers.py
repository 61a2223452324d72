"""Manifests for the flow tests."""

from __future__ import annotations

import csv
from pathlib import Path

PROMPTS = [
    "red mug on white",
    "blue mug on white",
    "green mug on oak",
    "black sneaker, studio",
    "white sneaker, street",
    "tan tote bag",
    "olive crossbody bag",
    "steel bottle",
    "amber candle",
    "brass desk lamp",
    "linen notebook",
]


def write_catalog(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A CSV manifest of (id, prompt, sku) rows; an empty prompt makes a rejected row."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prompt", "sku"])
        writer.writerows(rows)
    return path
