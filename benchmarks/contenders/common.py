"""What the hand-written contenders share: the manifest, the request body, the image store.

Kept deliberately plain (the ``csv`` module, one file write per image): that is what a user
writing their own client would do, and it keeps the comparison about the waiting strategy.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUBMIT_PATH = "/v1/ai/text-to-image/flux-2-klein"
KEY_HEADER = "x-freepik-api-key"
#: Fixed poll interval of the vendor sample and the naive clients.
POLL_S = 0.5
#: Attempts per request on 503/500 or a dropped connection, as a careful user would add.
ATTEMPTS = 5
RETRYABLE = {500, 502, 503, 504}


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("manifest", type=Path, help="CSV manifest (id, prompt, ...)")
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-active", type=int, default=24, help="the tier's active tasks")
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    return parser.parse_args()


def api_key() -> str:
    key = os.environ.get("FREEPIK_API_KEY", "")
    if not key:
        sys.exit("error: set FREEPIK_API_KEY")
    return key


def read_rows(manifest: Path, limit: int | None) -> Iterator[dict[str, str]]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.DictReader(handle)):
            if limit is not None and number >= limit:
                return
            yield row


def body(row: dict[str, str]) -> dict[str, Any]:
    """The request, from the manifest columns the benchmark manifests use."""
    request: dict[str, Any] = {"prompt": row["prompt"]}
    for name in ("aspect_ratio", "resolution", "output_format"):
        if row.get(name):
            request[name] = row[name]
    if row.get("seed"):
        request["seed"] = int(row["seed"])
    return request


def image_path(out: Path, row: dict[str, str]) -> Path:
    ext = "png" if row.get("output_format") == "png" else "jpg"
    return out / "images" / f"{row['id']}.{ext}"


def store(out: Path, row: dict[str, str], data: bytes) -> None:
    path = image_path(out, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def retry_after(value: str | None, default: float = 1.0) -> float:
    """Seconds from a Retry-After header in seconds; anything else waits ``default``."""
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default
