"""Keys must be path-safe whatever the id, stable across processes, and distinct."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.contract import SEED_MAX
from pipeline.keys import MAX_KEY_CHARS, derive_seed, request_key, safe_key
from pipeline.rows import ImageRequest

ALLOWED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
REPO = Path(__file__).resolve().parents[2]


def _assert_safe(key: str) -> None:
    assert key not in ("", ".", "..")
    assert set(key) <= ALLOWED
    assert not key.startswith((".", "-"))
    assert ".." not in key
    assert len(key) <= MAX_KEY_CHARS


@given(st.text(max_size=300))
@settings(max_examples=400)
def test_safe_key_never_escapes(raw: str) -> None:
    key = safe_key(raw)
    _assert_safe(key)
    assert safe_key(raw) == key


@given(st.text(max_size=200), st.text(max_size=200))
@settings(max_examples=400)
def test_distinct_ids_get_distinct_keys(a: str, b: str) -> None:
    if a != b:
        assert safe_key(a) != safe_key(b)


def test_safe_key_keeps_safe_ids_and_marks_changed_ones() -> None:
    assert safe_key("sku-00123_blue.v2") == "sku-00123_blue.v2"
    assert safe_key("a/b") != safe_key("a_b")
    assert safe_key("a/b").startswith("a_b-")
    assert safe_key("../../etc/passwd").startswith("_.__._etc_passwd-")
    long_a, long_b = "x" * 130 + "a", "x" * 130 + "b"
    assert len(safe_key(long_a)) == MAX_KEY_CHARS
    assert safe_key(long_a) != safe_key(long_b)
    for tricky in ("", ".", "..", "...", "/", "\\", "-", "\x00", "日本語"):
        _assert_safe(safe_key(tricky))


def _request(**changes: object) -> ImageRequest:
    fields: dict[str, object] = {
        "prompt": "a red mug",
        "aspect_ratio": "square_1_1",
        "resolution": "1k",
        "seed": 7,
        "safety_tolerance": 2,
        "output_format": "png",
        "references": ("refs/mug.png",),
    }
    fields.update(changes)
    return ImageRequest(**fields)  # type: ignore[arg-type]


def test_request_key_follows_content() -> None:
    base = request_key(_request())
    assert base.startswith("r-")
    _assert_safe(base)
    assert request_key(_request()) == base
    for change in (
        {"prompt": "a blue mug"},
        {"aspect_ratio": "classic_4_3"},
        {"resolution": "2k"},
        {"seed": 8},
        {"safety_tolerance": 3},
        {"output_format": "jpeg"},
        {"references": ()},
        {"references": ("refs/mug.png", "refs/bag.png")},
    ):
        assert request_key(_request(**change)) != base, change
    # Without a seed the key ignores it (the seed is derived from the key).
    assert request_key(_request(seed=1), seed_given=False) == request_key(
        _request(seed=2), seed_given=False
    )
    assert request_key(_request(), seed_given=False) != base


@given(st.text(max_size=100))
def test_derived_seed_in_range(key: str) -> None:
    seed = derive_seed(key)
    assert 0 <= seed <= SEED_MAX
    assert derive_seed(key) == seed


def test_derived_seed_is_stable_across_processes() -> None:
    # hash() is salted per process; a fresh interpreter with another PYTHONHASHSEED must agree.
    code = "from pipeline.keys import derive_seed; print(derive_seed('mug-classic-red'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
    )
    assert int(out.stdout) == derive_seed("mug-classic-red")
    assert derive_seed("a") != derive_seed("b")
