"""Where a library lives by default, and the ``{date}`` of an output path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pipeline.library import default_library, library_for
from pipeline.storage import dated


@pytest.mark.parametrize(
    ("out", "library"),
    [
        ("s3://images/nightly/{date}", "s3://images/nightly/library"),
        ("out/nightly/{date}", "out/nightly/library"),
        ("/srv/catalog/{date}/web", "/srv/catalog/library"),
        ("{date}", "library"),
        ("s3://images/{date}", "s3://images/library"),
        ("out/night-{date}", "out/library"),
        ("out/nightly", None),
    ],
)
def test_a_dated_output_defaults_its_library_above_the_dated_folder(
    out: str, library: str | None
) -> None:
    assert default_library(out) == library


def test_an_explicit_library_wins_and_no_library_turns_it_off() -> None:
    assert library_for("out/{date}", "s3://lib/x") == "s3://lib/x"
    assert library_for("out/{date}", None) == "out/library"
    assert library_for("out/{date}", "s3://lib/x", no_library=True) is None
    assert library_for("out/plain", None) is None


def test_date_is_the_utc_day() -> None:
    late = datetime(2026, 12, 4, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert dated("out/{date}", late) == "out/2026-12-05"
    assert dated("out/plain", late) == "out/plain"
    assert dated("s3://b/{date}").endswith(datetime.now(UTC).strftime("%Y-%m-%d"))
