"""Duplicate keys in ``validate`` / ``run --dry-run``: found across batches, first row wins."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.check import SeenKeys, check_manifest
from pipeline.manifest import Defaults

KEYS = st.text(alphabet="abc-_0", min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(KEYS, max_size=12), max_size=8))
def test_seen_keys_agrees_with_a_set(batches: list[list[str]]) -> None:
    seen = SeenKeys()
    reference: set[str] = set()
    for batch in batches:
        expected = []
        for key in batch:
            expected.append(key not in reference)
            reference.add(key)
        assert seen.first_seen(batch) == expected


def test_seen_keys_remembers_across_many_merges() -> None:
    seen = SeenKeys()
    for start in range(0, 5000, 100):
        assert all(seen.first_seen([f"sku-{i}" for i in range(start, start + 100)]))
    again = seen.first_seen(["sku-0", "sku-4999", "sku-5000", "sku-2500", "sku-5000"])
    assert again == [False, False, True, False, False]


def test_dry_run_counts_duplicates_in_later_batches() -> None:
    frame = pl.DataFrame(
        {
            "id": ["a", "b", "c", "d", "a", "e", "c", "f", "f"],
            "prompt": [f"product {i}" for i in range(9)],
        }
    )
    report = check_manifest(frame, defaults=Defaults(), batch_size=2)
    assert report.total == 9
    # A run rejects a row whose key an earlier row has; validate says so, in the run's words.
    assert report.valid == 6
    assert report.duplicates == 3
    assert report.rejected == 3
    assert report.rejections["id"].count == 3
    assert report.rejections["id"].examples == [
        f"{report.source} row 5, column id: key 'a' repeats row 1; each row needs its own id "
        "(or a different request)",
        f"{report.source} row 7, column id: key 'c' repeats row 3; each row needs its own id "
        "(or a different request)",
        f"{report.source} row 9, column id: key 'f' repeats row 8; each row needs its own id "
        "(or a different request)",
    ]
    assert int(report.exit_code) == 1
    assert sum(report.by_preset.values()) == 6
