"""Property-based tests: manifest validation, key derivation and size presets, for any input.

The example-based tests next to this file pin the messages; these check the rules hold for
inputs nobody thought of: validation has an independent oracle (a cell is valid or not by
the contract, and a row is accepted exactly when all its cells are), keys stay path-safe,
stable and distinct on a real file system and in S3 keys, and every size the pipeline asks
for is one the contract promises. No deadlines: CI machines are shared, and a slow example
is not a wrong one.
"""

from __future__ import annotations

import math
import posixpath
import tempfile
from pathlib import Path

import polars as pl
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline import contract
from pipeline.contract import (
    ASPECT_RATIOS,
    BFL_MAX_PIXELS,
    BFL_MIN_SIDE,
    MAX_SIDE,
    RESOLUTIONS,
    SEED_MAX,
    SIDE_MULTIPLE,
    bfl_size,
    output_size,
)
from pipeline.keys import MAX_KEY_CHARS, content_key, derive_seed, is_safe_key, safe_key
from pipeline.manifest import (
    INDEX_COLUMN,
    KNOWN_COLUMNS,
    RESERVED_COLUMNS,
    Defaults,
    validate_batch,
)

#: Hypothesis warns when the ``random`` module's state moves while it draws an example.
#: Nothing here draws from it (nor does the pipeline: ``pipeline.retry.JITTER``), but an
#: xdist worker that ran a flow test before this one keeps Prefect's background threads,
#: whose delivery back-off does (``prefect/_internal/_observation_delivery.py``), at any
#: moment: the warning names another thread's timing, not this test's strategies.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)

# --- size presets ---------------------------------------------------------------------------

#: The contract's table (shared/api-contract.md, "Output size by preset"), copied by hand so
#: that a change to the computation cannot silently change what the test expects.
CONTRACT_TABLE: dict[str, dict[str, tuple[int, int]]] = {
    "square_1_1": {"1k": (1024, 1024), "2k": (2048, 2048)},
    "widescreen_16_9": {"1k": (1344, 768), "2k": (2048, 1168)},
    "social_story_9_16": {"1k": (768, 1344), "2k": (1168, 2048)},
    "portrait_2_3": {"1k": (832, 1216), "2k": (1392, 2048)},
    "traditional_3_4": {"1k": (960, 1280), "2k": (1536, 2048)},
    "vertical_1_2": {"1k": (704, 1408), "2k": (1024, 2048)},
    "horizontal_2_1": {"1k": (1408, 704), "2k": (2048, 1024)},
    "social_post_4_5": {"1k": (896, 1152), "2k": (1584, 2048)},
    "standard_3_2": {"1k": (1216, 832), "2k": (2048, 1392)},
    "classic_4_3": {"1k": (1280, 960), "2k": (2048, 1536)},
}


def test_presets_are_exactly_the_contract_table() -> None:
    assert set(ASPECT_RATIOS) == set(CONTRACT_TABLE)
    assert set(RESOLUTIONS) == {"1k", "2k"}


@given(st.sampled_from(sorted(CONTRACT_TABLE)), st.sampled_from(RESOLUTIONS))
@settings(deadline=None)
def test_output_size_is_the_contract_table_within_caps(preset: str, resolution: str) -> None:
    width, height = output_size(preset, resolution)
    assert (width, height) == CONTRACT_TABLE[preset][resolution]
    assert width % SIDE_MULTIPLE == 0 and height % SIDE_MULTIPLE == 0
    assert 0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE
    # Dialect B gets the same picture, shrunk to its pixel cap when it has to be.
    bw, bh = bfl_size(preset, resolution)
    assert bw * bh <= BFL_MAX_PIXELS
    assert bw % SIDE_MULTIPLE == 0 and bh % SIDE_MULTIPLE == 0
    assert bw >= BFL_MIN_SIDE and bh >= BFL_MIN_SIDE
    if width * height <= BFL_MAX_PIXELS:
        assert (bw, bh) == (width, height)
    assert abs(bw / bh - width / height) <= 2 * SIDE_MULTIPLE / min(bw, bh)


_side = st.integers(min_value=16, max_value=MAX_SIDE // SIDE_MULTIPLE).map(
    lambda n: n * SIDE_MULTIPLE
)


@given(_side, _side)
@settings(deadline=None)
def test_2k_rule_holds_for_any_1k_size(width: int, height: int) -> None:
    """The rule, not just the ten presets: a preset added later gets a valid 2k size."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(contract.ASPECT_RATIOS, "any_preset", (width, height))
        assert output_size("any_preset", "1k") == (width, height)
        w2, h2 = output_size("any_preset", "2k")
    assert w2 % SIDE_MULTIPLE == 0 and h2 % SIDE_MULTIPLE == 0
    assert max(w2, h2) <= MAX_SIDE
    assert w2 >= width and h2 >= height  # 2k is never smaller than 1k
    if max(width, height) * 2 <= MAX_SIDE:
        assert (w2, h2) == (2 * width, 2 * height)
    else:
        assert max(w2, h2) == MAX_SIDE  # the longer side is exactly the cap
    # Flooring to 16 moves each side by less than 16 pixels: the shape is kept.
    exact = width / height
    assert abs(w2 / h2 - exact) <= SIDE_MULTIPLE / h2 + exact * SIDE_MULTIPLE / h2


# --- key derivation -------------------------------------------------------------------------

_ids = st.text(max_size=200) | st.sampled_from(["..", "../x", "a/../../b", "/etc/passwd", "C:\\x"])


@given(_ids)
@settings(max_examples=300, deadline=None)
def test_keys_are_files_inside_dest_and_clean_s3_keys(raw: str) -> None:
    key = safe_key(raw)
    assert is_safe_key(key)
    assert safe_key(key) == key  # idempotent: a key read back is its own key
    assert len(key.encode()) == len(key) <= MAX_KEY_CHARS  # ASCII: fits any file system
    s3_key = f"night/2026-11-25/images/{key}.jpg"
    assert posixpath.normpath(s3_key) == s3_key
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder) / "images"
        images.mkdir()
        target = images / f"{key}.jpg"
        target.write_bytes(b"x")  # the OS accepts the name as it is
        assert target.resolve().parent == images.resolve()
        assert [p.name for p in images.iterdir()] == [f"{key}.jpg"]


@given(st.lists(_ids, min_size=2, max_size=30, unique=True))
@settings(max_examples=200, deadline=None)
def test_distinct_ids_in_one_manifest_get_distinct_keys(ids: list[str]) -> None:
    keys = [safe_key(raw) for raw in ids]
    assert len(set(keys)) == len(keys)


_fields = st.tuples(
    st.text(max_size=40),
    st.sampled_from(sorted(ASPECT_RATIOS)),
    st.sampled_from(RESOLUTIONS),
    st.integers(0, 5),
    st.sampled_from(contract.OUTPUT_FORMATS),
    st.lists(st.text(max_size=20), max_size=4).map(tuple),
    st.none() | st.integers(0, SEED_MAX),
)


@given(_fields, _fields)
@settings(max_examples=300, deadline=None)
def test_content_keys_are_stable_and_distinct_for_distinct_requests(a: tuple, b: tuple) -> None:
    assert content_key(*a) == content_key(*a)
    assert is_safe_key(content_key(*a))
    if a != b:
        assert content_key(*a) != content_key(*b)


@given(st.text(max_size=200))
@settings(deadline=None)
def test_derived_seed_is_a_contract_seed_and_stable(key: str) -> None:
    seed = derive_seed(key)
    assert 0 <= seed <= SEED_MAX
    assert derive_seed(key) == seed


# --- manifest validation --------------------------------------------------------------------

_pad = st.sampled_from(["", " ", "  ", "\t"])


def _padded(core: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(_pad, core, _pad).map("".join)


def _cased(word: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda flips: "".join(c.upper() if f else c for c, f in zip(word, flips, strict=True))
    )


#: Id characters: anything but whitespace and control characters (which polars and Python
#: would strip differently, a difference the oracle is not about).
_id_chars = st.characters(exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc"))
_letters = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
_prompt = st.one_of(
    st.none(),
    st.just(""),
    _pad,
    st.text(alphabet="abc xyz,.", min_size=1, max_size=30),
    st.integers(contract.PROMPT_MAX_CHARS - 1, contract.PROMPT_MAX_CHARS + 1).map(
        lambda n: "p" * n
    ),
)
_aspect = st.one_of(
    st.none(), _pad, _padded(st.sampled_from(sorted(ASPECT_RATIOS)).flatmap(_cased)), _letters
)
_resolution = st.one_of(
    st.none(), _pad, _padded(st.sampled_from(["1k", "2k", "1K", "2K"])), _letters
)
_format = st.one_of(
    st.none(), _pad, _padded(st.sampled_from(["png", "jpeg", "jpg", "PNG", "JPG"])), _letters
)
_seed = st.one_of(
    st.none(),
    _pad,
    _padded(st.integers(-(2**40), 2**40).map(str)),
    st.integers(0, SEED_MAX).map(lambda n: f"{n}.0"),
    _letters,
)
_safety = st.one_of(st.none(), _pad, _padded(st.integers(-3, 9).map(str)), _letters)
_reference = st.one_of(
    st.none(),
    st.just(""),
    st.sampled_from(["shots/a.png", "https://cdn.example.com/a.png", "s3://b/k.png"]),
    st.sampled_from(["ftp", "file", "gopher", "javascript"]).map(lambda s: f"{s}://x/a.png"),
)
_row = st.fixed_dictionaries(
    {
        "id": st.none() | _padded(st.text(alphabet=_id_chars, max_size=20)),
        "prompt": _prompt,
        "aspect_ratio": _aspect,
        "resolution": _resolution,
        "output_format": _format,
        "seed": _seed,
        "safety_tolerance": _safety,
        "input_image": _reference,
    }
)


def _blank(cell: str | None) -> bool:
    return cell is None or cell.strip(" \t") == ""


def _bad_columns(row: dict[str, str | None]) -> set[str]:
    """The oracle: which cells the contract refuses, computed without the pipeline's code."""
    bad: set[str] = set()
    prompt = row["prompt"]
    if _blank(prompt) or len(prompt or "") > contract.PROMPT_MAX_CHARS:
        bad.add("prompt")
    choices = {
        "aspect_ratio": set(ASPECT_RATIOS),
        "resolution": {"1k", "2k"},
        "output_format": {"png", "jpeg", "jpg"},
    }
    for column, allowed in choices.items():
        cell = row[column]
        if not _blank(cell) and (cell or "").strip(" \t").lower() not in allowed:
            bad.add(column)
    for column, high in (("seed", SEED_MAX), ("safety_tolerance", 5)):
        cell = row[column]
        if _blank(cell):
            continue
        try:
            value = float((cell or "").strip(" \t"))
        except ValueError:
            bad.add(column)
            continue
        if not (math.isfinite(value) and value == int(value) and 0 <= value <= high):
            bad.add(column)
    reference = row["input_image"]
    if reference and reference.split(":", 1)[0] in ("ftp", "file", "gopher", "javascript"):
        bad.add("input_image")
    return bad


@given(st.lists(_row, min_size=1, max_size=25))
@settings(max_examples=200, deadline=None)
def test_validation_accepts_exactly_the_valid_rows_and_names_the_column(
    records: list[dict[str, str | None]],
) -> None:
    frame = pl.DataFrame(records, schema=dict.fromkeys(records[0], pl.String)).with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).alias(INDEX_COLUMN)
    )
    rows, rejections = validate_batch(frame, source_name="feed.csv", defaults=Defaults())
    assert sorted([r.index for r in rows] + [r.index for r in rejections]) == list(
        range(len(records))
    )
    for row in rows:
        record = records[row.index]
        assert _bad_columns(record) == set(), (record, row)
        request = row.request
        assert request.aspect_ratio in ASPECT_RATIOS
        assert request.resolution in RESOLUTIONS
        assert request.output_format in contract.OUTPUT_FORMATS
        assert 0 <= request.seed <= SEED_MAX
        assert 0 <= request.safety_tolerance <= 5
        assert is_safe_key(row.key)
        if not _blank(record["id"]):
            assert row.key == safe_key((record["id"] or "").strip(" \t"))
        if not _blank(record["seed"]):
            assert request.seed == int(float((record["seed"] or "").strip(" \t")))
    for rejection in rejections:
        record = records[rejection.index]
        bad = _bad_columns(record)
        assert rejection.column in bad, (record, rejection.reason)
        assert rejection.column in KNOWN_COLUMNS
        assert rejection.reason.startswith(
            f"feed.csv row {rejection.index + 1}, column {rejection.column}: "
        )
        assert "expected" in rejection.reason or "every row needs a prompt" in rejection.reason
        assert rejection.key and is_safe_key(rejection.key)


_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**63), 2**63 - 1).map(float),
    st.integers(0, SEED_MAX).map(float),
)


@given(
    st.lists(st.none() | _numbers, min_size=1, max_size=25),
    st.lists(st.none() | st.integers(-(2**63), 2**63 - 1), min_size=25, max_size=25),
)
@settings(max_examples=200, deadline=None)
def test_typed_seed_columns_never_raise_and_follow_the_range(
    float_seeds: list[float | None], int_safety: list[int | None]
) -> None:
    """Parquet gives numbers, not text: any float or int64 is a seed or a clear rejection."""
    n = len(float_seeds)
    frame = pl.DataFrame(
        {
            "prompt": ["a mug"] * n,
            "seed": pl.Series(float_seeds, dtype=pl.Float64),
            "safety_tolerance": pl.Series(int_safety[:n], dtype=pl.Int64),
            INDEX_COLUMN: list(range(n)),
        }
    )
    rows, rejections = validate_batch(frame, source_name="feed.parquet", defaults=Defaults())
    accepted = {row.index: row for row in rows}
    assert len(accepted) + len(rejections) == n
    for index in range(n):
        seed, safety = float_seeds[index], int_safety[index]
        seed_ok = seed is None or (
            math.isfinite(seed) and seed == math.floor(seed) and 0 <= seed <= SEED_MAX
        )
        safety_ok = safety is None or 0 <= safety <= 5
        assert (index in accepted) == (seed_ok and safety_ok), (seed, safety)
        if index in accepted and seed is not None:
            assert accepted[index].request.seed == int(seed)
    for rejection in rejections:
        assert rejection.column in ("seed", "safety_tolerance")
        assert rejection.reason.startswith(f"feed.parquet row {rejection.index + 1}, column ")


@given(st.lists(st.text(max_size=30), min_size=1, max_size=10))
@settings(max_examples=100, deadline=None)
def test_any_extra_or_misspelt_column_never_breaks_validation(names: list[str]) -> None:
    # The reserved ones (``__merged``, ``__error``...) are the reader's, refused in a file.
    assume(not set(names) & set(RESERVED_COLUMNS))
    columns = {name: ["x", "y"] for name in dict.fromkeys(names)}
    frame = pl.DataFrame(
        {**columns, INDEX_COLUMN: [0, 1]}, schema_overrides={INDEX_COLUMN: pl.Int64}
    )
    rows, rejections = validate_batch(frame, source_name="odd.csv", defaults=Defaults())
    assert len(rows) + len(rejections) == 2
    has_prompt = "prompt" in columns
    for rejection in rejections:
        assert rejection.reason.startswith(f"odd.csv row {rejection.index + 1}, column ")
    if not has_prompt:
        assert [r.column for r in rejections] == ["prompt", "prompt"]
