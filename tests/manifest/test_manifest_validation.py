"""Row validation: what is accepted, what is rejected, and what the messages say."""

from __future__ import annotations

import csv
import decimal
import io
import math
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from manifest_helpers import read_all, write

from pipeline.contract import PROMPT_MAX_CHARS, SEED_MAX
from pipeline.errors import ConfigError
from pipeline.keys import derive_seed, request_key, safe_key
from pipeline.manifest import INDEX_COLUMN, Defaults, validate_batch


def _one(tmp_path: Path, header: str, cells: str) -> tuple[list, list]:
    return read_all(write(tmp_path / "catalog.csv", f"{header}\n{cells}\n"))


@pytest.mark.parametrize("cell", ["42", " 42 ", "42.0", "0", "4294967295"])
def test_seed_text_accepted(tmp_path: Path, cell: str) -> None:
    rows, rejections = _one(tmp_path, "prompt,seed", f"mug,{cell}")
    assert rejections == []
    assert rows[0].request.seed == int(float(cell))


@pytest.mark.parametrize("cell", ["-3", "1.5", "NaN", "inf", "4294967296", "forty-two", "0x10"])
def test_seed_text_rejected(tmp_path: Path, cell: str) -> None:
    rows, rejections = _one(tmp_path, "prompt,seed", f"mug,{cell}")
    assert rows == []
    assert rejections[0].reason == (
        f"catalog.csv row 1, column seed: {cell!r} is not allowed; expected a whole number "
        "from 0 to 4294967295"
    )
    assert rejections[0].column == "seed"
    assert rejections[0].prompt == "mug"
    assert rejections[0].key == "row-1"


def test_seed_numbers_in_typed_columns() -> None:
    frame = pl.DataFrame(
        {
            "prompt": ["a", "b", "c", "d", "e", "f", "g"],
            "seed": [42.0, 7.5, -1.0, math.nan, math.inf, float(SEED_MAX), None],
        }
    )
    rows, rejections = read_all(frame)
    assert [(r.index, r.request.seed) for r in rows][:2] == [(0, 42), (5, SEED_MAX)]
    assert rows[2].index == 6  # null seed: derived
    assert [r.index for r in rejections] == [1, 2, 3, 4]
    assert "column seed: 7.5 is not allowed" in rejections[0].reason
    assert "column seed: 'NaN' is not allowed" in rejections[2].reason
    ints = pl.DataFrame(
        {"prompt": ["a", "b"], "seed": pl.Series([42, SEED_MAX + 1], dtype=pl.Int64)}
    )
    rows, rejections = read_all(ints)
    assert rows[0].request.seed == 42
    assert rejections[0].reason.startswith("<dataframe> row 2, column seed: 4294967296 is not")


def test_typed_cells_are_shown_as_the_table_holds_them() -> None:
    """A warehouse's decimal cells are named as written, not as Python's repr
    (``Decimal('1.50')``)."""
    table = pa.table(
        {
            "prompt": ["a", "b"],
            "seed": pa.array([decimal.Decimal("1.50"), decimal.Decimal("7")], pa.decimal128(5, 2)),
        }
    )
    rows, rejections = read_all(table)
    reasons = " | ".join(r.reason for r in rejections)
    assert "row 1, column seed: 1.50 is not allowed; expected a whole number" in reasons
    assert "Decimal" not in reasons
    assert [r.request.seed for r in rows] == [7]


@pytest.mark.parametrize(
    ("header", "cells", "column", "allowed"),
    [
        ("prompt,aspect_ratio", "mug,4x7", "aspect_ratio", "expected one of square_1_1,"),
        ("prompt,resolution", "mug,4k", "resolution", "expected 1k or 2k"),
        ("prompt,output_format", "mug,gif", "output_format", "expected png or jpeg"),
        ("prompt,safety_tolerance", "mug,6", "safety_tolerance", "from 0 (strict) to 5"),
        ("prompt,safety_tolerance", "mug,-1", "safety_tolerance", "from 0 (strict) to 5"),
        ("prompt,input_image", "mug,ftp://host/x.png", "input_image", "an https:// URL"),
        ("prompt,input_image_4", "mug,file:///etc/passwd", "input_image_4", "relative to"),
    ],
)
def test_bad_cells_name_row_column_and_allowed(
    tmp_path: Path, header: str, cells: str, column: str, allowed: str
) -> None:
    rows, rejections = _one(tmp_path, header, cells)
    assert rows == []
    value = cells.split(",", 1)[1]
    assert rejections[0].reason.startswith(
        f"catalog.csv row 1, column {column}: {value!r} is not allowed; "
    )
    assert allowed in rejections[0].reason
    assert rejections[0].column == column


def test_prompts_empty_blank_and_too_long(tmp_path: Path) -> None:
    long_prompt = "x" * (PROMPT_MAX_CHARS + 1)
    text = f'id,prompt\nA,""\nB,"   "\nC,{long_prompt}\nD,{"y" * PROMPT_MAX_CHARS}\n'
    rows, rejections = read_all(write(tmp_path / "p.csv", text))
    assert [r.key for r in rows] == ["D"]
    assert [r.key for r in rejections] == ["A", "B", "C"]
    assert rejections[0].reason == "p.csv row 1, column prompt: is empty; every row needs a prompt"
    assert rejections[2].reason == (
        f"p.csv row 3, column prompt: {PROMPT_MAX_CHARS + 1} characters is too long; "
        f"expected at most {PROMPT_MAX_CHARS} characters"
    )
    assert rejections[2].prompt == long_prompt


def test_first_problem_is_reported_and_valid_rows_still_run(tmp_path: Path) -> None:
    text = "id,prompt,aspect_ratio,seed\nok-1,mug,,1\nbad/2,bag,nope,-3\nok-3,lamp,classic_4_3,\n"
    rows, rejections = read_all(write(tmp_path / "m.csv", text))
    assert [r.key for r in rows] == ["ok-1", "ok-3"]
    assert len(rejections) == 1
    assert rejections[0].column == "aspect_ratio"
    assert rejections[0].key == safe_key("bad/2")
    assert rejections[0].index == 1


def test_defaults_and_case_insensitive_values(tmp_path: Path) -> None:
    text = (
        "prompt,aspect_ratio,resolution,output_format,safety_tolerance\n"
        "mug,,,,\n"
        "bag, WIDESCREEN_16_9 ,2K,JPG,5\n"
    )
    defaults = Defaults(aspect_ratio="classic_4_3", output_format="png", safety_tolerance=1)
    rows, _ = read_all(write(tmp_path / "m.csv", text), defaults)
    first, second = (r.request for r in rows)
    assert (first.aspect_ratio, first.resolution, first.output_format) == (
        "classic_4_3",
        "1k",
        "png",
    )
    assert first.safety_tolerance == 1
    assert (second.aspect_ratio, second.resolution, second.output_format) == (
        "widescreen_16_9",
        "2k",
        "jpeg",
    )
    assert second.safety_tolerance == 5


def test_default_seed_applies_to_empty_cells(tmp_path: Path) -> None:
    rows, _ = read_all(write(tmp_path / "m.csv", "prompt,seed\nmug,\nbag,9\n"), Defaults(seed=5))
    assert [r.request.seed for r in rows] == [5, 9]


@pytest.mark.parametrize(
    "changes",
    [
        {"aspect_ratio": "4x7"},
        {"resolution": "8k"},
        {"output_format": "gif"},
        {"safety_tolerance": 9},
        {"seed": -1},
        {"seed": SEED_MAX + 1},
    ],
)
def test_bad_defaults_stop_the_run(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="default"):
        Defaults(**changes)  # type: ignore[arg-type]


def test_keys_and_derived_seeds(tmp_path: Path) -> None:
    text = (
        "id,prompt,seed,input_image,input_image_3\n"
        "sku-1,mug,,refs/a.png,refs/b.png\n"
        ",mug,,refs/a.png,refs/b.png\n"
        ",mug,,refs/a.png,refs/b.png\n"
        ",mug,77,,\n"
        "../escape,bag,,,\n"
    )
    rows, rejections = read_all(write(tmp_path / "m.csv", text))
    assert rejections == []
    first, second, third, fourth, fifth = rows
    assert first.key == "sku-1"
    assert first.request.seed == derive_seed("sku-1")
    assert first.request.references == ("refs/a.png", "refs/b.png")
    # Rows without id: a content key; identical requests, identical keys and seeds.
    assert second.key.startswith("r-")
    assert second.key == third.key
    assert second.request == third.request
    assert second.key == request_key(second.request, seed_given=False)
    assert second.request.seed == derive_seed(second.key)
    assert fourth.request.seed == 77
    assert fourth.key == request_key(fourth.request)
    assert fifth.key == safe_key("../escape")
    assert "/" not in fifth.key


def test_reruns_reproduce_keys_and_seeds(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "prompt,sku\nmug,1\nbag,2\n")
    assert read_all(path) == read_all(path)
    # CSV, Parquet and in-memory give the same rows.
    frame = pl.read_csv(path, infer_schema=False)
    pq.write_table(frame.to_arrow(), tmp_path / "m.parquet")
    assert read_all(tmp_path / "m.parquet")[0] == read_all(path)[0] == read_all(frame)[0]


def test_parquet_typed_ids_and_binary_references(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": pa.array([1001, 1002], pa.int64()),
            "prompt": ["mug", "bag"],
            "input_image": pa.array([b"\x89PNGfake", None], pa.binary()),
        }
    )
    rows, rejections = read_all(table)
    assert rejections == []
    assert [r.key for r in rows] == ["1001", "1002"]
    assert rows[0].request.references == ("data:image/binary;base64,iVBOR2Zha2U=",)
    assert rows[1].request.references == ()


def test_validate_batch_directly() -> None:
    batch = pl.DataFrame({"prompt": ["mug", ""], INDEX_COLUMN: [10, 11]})
    rows, rejections = validate_batch(batch, source_name="feed.csv", defaults=Defaults())
    assert rows[0].index == 10
    assert rejections[0].reason.startswith("feed.csv row 12, column prompt")


_cells = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(2**40), max_value=2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "2k", "1k", "png", "jpeg", "square_1_1", "5", "-0", "1e3"]),
)


@given(st.lists(st.tuples(_cells, _cells, _cells, _cells, _cells, _cells), max_size=20))
@settings(max_examples=150, deadline=None)
def test_every_row_is_accounted_for(cells: list[tuple[str, ...]]) -> None:
    columns = ["id", "prompt", "aspect_ratio", "resolution", "seed", "safety_tolerance"]
    frame = pl.DataFrame(
        {name: [row[i] for row in cells] for i, name in enumerate(columns)},
        schema=dict.fromkeys(columns, pl.String),
    )
    if frame.height == 0:
        return
    rows, rejections = read_all(frame, batch_size=7)
    assert sorted([r.index for r in rows] + [r.index for r in rejections]) == list(
        range(frame.height)
    )
    for row in rows:
        assert 0 <= row.request.seed <= SEED_MAX
        assert row.request.prompt.strip()
        assert "/" not in row.key and ".." not in row.key
    for rejection in rejections:
        assert rejection.reason.startswith(f"<dataframe> row {rejection.index + 1}, column ")
        assert rejection.key


@given(
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            min_size=1,
            max_size=40,
        ),
        min_size=1,
        max_size=15,
    ),
    st.sampled_from([",", ";", "\t"]),
)
@settings(max_examples=60, deadline=None)
def test_csv_text_survives_any_characters(prompts: list[str], delimiter: str) -> None:
    buffer = io.StringIO()
    # "\r\n" makes the writer quote cells holding either character.
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(["sku", "prompt"])
    for number, prompt in enumerate(prompts):
        writer.writerow([f"{number:05d}", prompt])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "awkward.csv"
        path.write_bytes(buffer.getvalue().encode("utf-8"))
        rows, rejections = read_all(path, batch_size=4)
    assert sorted([r.index for r in rows] + [r.index for r in rejections]) == list(
        range(len(prompts))
    )
    for row in rows:
        assert row.request.prompt == prompts[row.index]
    for rejection in rejections:
        assert not prompts[rejection.index].strip()
