"""Small helpers shared by the manifest tests."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa

from pipeline.manifest import Defaults, ManifestReader, iter_rows
from pipeline.rows import Rejection, Row


def read_all(
    source: str | Path | pl.DataFrame | pa.Table,
    defaults: Defaults | None = None,
    **reader_options: int,
) -> tuple[list[Row], list[Rejection]]:
    reader = ManifestReader(source, **reader_options)
    rows: list[Row] = []
    rejections: list[Rejection] = []
    for batch_rows, batch_rejections in iter_rows(reader, defaults or Defaults()):
        rows.extend(batch_rows)
        rejections.extend(batch_rejections)
    return rows, rejections


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path
