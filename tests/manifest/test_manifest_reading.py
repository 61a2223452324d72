"""Reading manifests: formats, delimiters, encodings, batches, and unusable files."""

from __future__ import annotations

import codecs
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from manifest_helpers import read_all, write

from pipeline.errors import ManifestError
from pipeline.keys import derive_seed
from pipeline.manifest import INDEX_COLUMN, ManifestReader

CSV = "id,prompt,seed,sku\nA1,a red mug,42,00123\nA2,a blue mug,,007\n"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("comma.csv", CSV),
        ("semi.csv", CSV.replace(",", ";")),
        ("tabs.csv", CSV.replace(",", "\t")),
        ("tabs.tsv", CSV.replace(",", "\t")),
        ("crlf.csv", CSV.replace("\n", "\r\n")),
    ],
)
def test_delimiters_and_line_endings(tmp_path: Path, name: str, text: str) -> None:
    rows, rejections = read_all(write(tmp_path / name, text))
    assert rejections == []
    assert [(r.key, r.request.prompt, r.request.seed) for r in rows] == [
        ("A1", "a red mug", 42),
        ("A2", "a blue mug", derive_seed("A2")),
    ]


def test_tsv_name_means_tab_even_with_commas_in_cells(tmp_path: Path) -> None:
    path = write(tmp_path / "m.tsv", "prompt\tsku\nmug, red, glossy\t1\n")
    rows, _ = read_all(path)
    assert rows[0].request.prompt == "mug, red, glossy"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_encodings(tmp_path: Path, encoding: str) -> None:
    path = write(tmp_path / "m.csv", "prompt,title\ncafé crème mug,Tasse\n", encoding)
    if encoding == "utf-16":
        assert path.read_bytes()[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    rows, rejections = read_all(path)
    assert rejections == []
    assert rows[0].request.prompt == "café crème mug"


def test_csv_cells_stay_text_and_extras_carry_through(tmp_path: Path) -> None:
    path = write(tmp_path / "catalog.csv", " ID ,Prompt, sku ,NA\nA1,mug,00123,NA\n")
    reader = ManifestReader(path)
    assert reader.name == "catalog.csv"
    assert reader.base_dir == tmp_path.resolve()
    assert reader.columns == ["id", "prompt", "sku", "NA"]
    assert reader.extra_columns == ["sku", "NA"]
    batch = next(reader.batches())
    assert batch.get_column("sku").to_list() == ["00123"]
    assert batch.get_column("NA").to_list() == ["NA"]
    assert batch.get_column(INDEX_COLUMN).to_list() == [0]


def test_quoted_cells_with_delimiters_and_newlines(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", 'prompt,sku\n"mug, red\nsecond line ""quoted""",1\nbag,2\n')
    rows, rejections = read_all(path)
    assert rejections == []
    assert rows[0].request.prompt == 'mug, red\nsecond line "quoted"'
    assert [r.index for r in rows] == [0, 1]


def test_batches_limit_and_index(tmp_path: Path) -> None:
    lines = "".join(f"p{i},{i}\n" for i in range(25))
    path = write(tmp_path / "m.csv", "prompt,n\n" + lines)
    reader = ManifestReader(path, batch_size=10)
    sizes = [b.height for b in reader.batches()]
    assert sizes == [10, 10, 5]
    indices = [i for b in reader.batches() for i in b.get_column(INDEX_COLUMN).to_list()]
    assert indices == list(range(25))
    rows, _ = read_all(path, batch_size=4, limit=7)
    assert [r.index for r in rows] == list(range(7))
    assert [r.request.prompt for r in rows][-1] == "p6"


def test_parquet_by_extension_and_by_magic(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": ["A1", "A2"],
            "prompt": ["mug", "bag"],
            "seed": pa.array([42, None], pa.int64()),
            "price": [9.5, 12.0],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    pq.write_table(table, tmp_path / "export.dat")
    for name in ("m.parquet", "export.dat"):
        reader = ManifestReader(tmp_path / name)
        batch = next(reader.batches())
        assert batch.get_column("price").dtype == pl.Float64  # Parquet keeps its types
        rows, rejections = read_all(tmp_path / name)
        assert rejections == []
        assert rows[0].request.seed == 42


def test_parquet_streams_in_batches(tmp_path: Path) -> None:
    table = pa.table({"prompt": [f"p{i}" for i in range(1000)]})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=100)
    reader = ManifestReader(tmp_path / "m.parquet", batch_size=256)
    sizes = [b.height for b in reader.batches()]
    assert sizes == [256, 256, 256, 232]


def test_in_memory_frames() -> None:
    frame = pl.DataFrame({"prompt": ["mug", "bag", "lamp"], "sku": ["1", "2", "3"]})
    reader = ManifestReader(frame, batch_size=2)
    assert reader.name == "<dataframe>"
    assert reader.base_dir is None
    assert reader.extra_columns == ["sku"]
    rows, _ = read_all(frame, batch_size=2)
    assert [r.index for r in rows] == [0, 1, 2]
    arrow_rows, _ = read_all(frame.to_arrow())
    assert [r.request for r in arrow_rows] == [r.request for r in rows]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"\n\n  \n", "is empty"),
        (b"prompt,seed\n", "no data rows"),
        (b"\xef\xbb\xbfprompt,seed\r\n", "no data rows"),
        (b"title,seed\nmug,1\n", "no 'prompt' column; found 'title', 'seed'"),
        (b"prompt|seed\nmug|1\n", "no 'prompt' column"),
        (b"prompt,Prompt\nmug,mug\n", "both mean 'prompt'"),
        (b"prompt,notes, notes\nmug,a,b\n", "column 'notes' appears twice"),
        (b"PK\x03\x04rest-of-a-zip", "Excel"),
        (b"p\x00r\x00o\x00m\x00p\x00t\x00", "UTF-16 without a byte-order mark"),
    ],
)
def test_unusable_files(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "bad.csv").write_bytes(content)
    with pytest.raises(ManifestError) as err:
        read_all(tmp_path / "bad.csv")
    assert "bad.csv" in str(err.value)
    assert expected in str(err.value)


def test_stray_nul_in_a_cell_is_just_text(tmp_path: Path) -> None:
    (tmp_path / "nul.csv").write_bytes(b"prompt,sku\nmug\x00,1\nbag,2\n")
    rows, rejections = read_all(tmp_path / "nul.csv")
    assert [r.request.prompt for r in rows] == ["mug\x00", "bag"]
    assert rejections == []


def test_wrong_delimiter_hint(tmp_path: Path) -> None:
    write(tmp_path / "m.csv", "titel|prompt|seed\nx|mug|1\n")
    with pytest.raises(ManifestError, match="no 'prompt' column") as err:
        ManifestReader(tmp_path / "m.csv")
    assert "delimiter" not in str(err.value)  # one column without , ; or tab: no hint
    write(tmp_path / "s.tsv", "prompt;seed\nmug;1\n")
    with pytest.raises(ManifestError, match="is the delimiter right"):
        ManifestReader(tmp_path / "s.tsv")


def test_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    content = "prompt,sku\n" + "".join(f"mug {i},{i}\n" for i in range(5))
    (tmp_path / "latin.csv").write_bytes(content.encode() + "crème,9\n".encode("latin-1"))
    with pytest.raises(ManifestError) as err:
        read_all(tmp_path / "latin.csv")
    message = str(err.value)
    assert message.startswith("latin.csv:")
    assert "line 7" in message
    assert "UTF-8" in message


def test_broken_utf16(tmp_path: Path) -> None:
    body = "prompt,sku\nmug,1\n".encode("utf-16-le") + b"\x00\xd8a\x00,\x001\x00\n\x00"
    (tmp_path / "u16.csv").write_bytes(codecs.BOM_UTF16_LE + body)
    with pytest.raises(ManifestError, match=r"u16\.csv: bytes that are not valid UTF-16"):
        read_all(tmp_path / "u16.csv")


def test_undecodable_header(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_bytes("prompt,crème\nmug,1\n".encode("cp1252"))
    with pytest.raises(ManifestError, match=r"h\.csv: .*not valid UTF-8 \(line 1\)"):
        ManifestReader(tmp_path / "h.csv")


def test_missing_or_fake_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such file"):
        ManifestReader(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="is not a file"):
        ManifestReader(tmp_path)
    write(tmp_path / "fake.parquet", "prompt\nmug\n")
    with pytest.raises(ManifestError, match="not a Parquet file"):
        ManifestReader(tmp_path / "fake.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + b"\x00" * 40)
    with pytest.raises(ManifestError, match=r"broken\.parquet: is not a readable Parquet"):
        ManifestReader(tmp_path / "broken.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(ManifestError, match="has no rows"):
        ManifestReader(tmp_path / "e.parquet")


@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        ("prompt", pa.array([1, 2]), "column prompt has type Int64; expected text"),
        ("seed", pa.array([[1], [2]]), "column seed has type List"),
        ("input_image", pa.array([{"a": 1}, {"a": 2}]), "column input_image has type Struct"),
        ("aspect_ratio", pa.array([1.5, 2.5]), "column aspect_ratio has type Float64"),
    ],
)
def test_parquet_columns_of_the_wrong_type(
    tmp_path: Path, column: str, values: pa.Array, expected: str
) -> None:
    data = {"prompt": pa.array(["mug", "bag"]), column: values}
    pq.write_table(pa.table(data), tmp_path / "typed.parquet")
    with pytest.raises(ManifestError) as err:
        ManifestReader(tmp_path / "typed.parquet")
    assert str(err.value).startswith("typed.parquet: ")
    assert expected in str(err.value)


def test_ragged_rows_are_rejected_and_the_rest_run(tmp_path: Path) -> None:
    text = "prompt,sku\nmug,1\nbag,with,comma\nlamp,3\nshort\ncandle,5\n"
    rows, rejections = read_all(write(tmp_path / "r.csv", text))
    assert [(r.index, r.request.prompt) for r in rows] == [(0, "mug"), (2, "lamp"), (4, "candle")]
    assert [r.index for r in rejections] == [1, 3]
    assert rejections[0].reason == (
        "r.csv row 2 (line 3): 3 fields where the header has 2; quote cells that contain "
        "the delimiter (comma)"
    )
    assert rejections[1].reason.startswith("r.csv row 4 (line 5): 1 fields")
    assert rejections[1].key == "row-4"


def test_a_ragged_row_names_its_physical_line_after_multi_line_cells(tmp_path: Path) -> None:
    """A cell spanning lines (a Shopify Body (HTML)) or blank lines put the line of a
    malformed row's message several lines above the row itself."""
    text = (
        'prompt,sku\n"a mug,\nwhite\nand round",1\n\n\nbag,with,comma\nlamp,3\n'
        '"candle\nwax",4\nshort\n'
    )
    rows, rejections = read_all(write(tmp_path / "r.csv", text))
    assert [r.index for r in rows] == [0, 2, 3]
    assert [r.reason.split(":")[0] for r in rejections] == [
        "r.csv row 2 (line 7)",
        "r.csv row 5 (line 11)",
    ]


@pytest.mark.parametrize("batch_size", [1, 2, 100])
def test_ragged_last_row(tmp_path: Path, batch_size: int) -> None:
    path = write(tmp_path / "r.csv", "prompt,sku\nmug,1\nbag,2\nlamp;3\n")
    rows, rejections = read_all(path, batch_size=batch_size)
    assert [r.index for r in rows] == [0, 1]
    assert [(r.index, r.key) for r in rejections] == [(2, "row-3")]
    assert rejections[0].reason.startswith("r.csv row 3 (line 4): 1 fields where")


def test_ragged_rows_across_many_blocks_keep_indices_unique(tmp_path: Path) -> None:
    lines = []
    for i in range(30_000):
        lines.append(f"prompt {i} {'x' * 40},{i}" + (",extra" if i % 997 == 0 else ""))
    path = write(tmp_path / "big.csv", "prompt,n\n" + "\n".join(lines) + "\n")
    rows, rejections = read_all(path, batch_size=4096)
    assert sorted([r.index for r in rows] + [r.index for r in rejections]) == list(range(30_000))
    assert {r.index for r in rejections} == set(range(0, 30_000, 997))
    assert all(r.request.prompt.startswith(f"prompt {r.index} ") for r in rows)


def test_unclosed_quote_is_explained(tmp_path: Path) -> None:
    rows, rejections = read_all(write(tmp_path / "q.csv", 'prompt,sku\nmug,1\n"bag,2\nlamp,3\n'))
    assert [r.request.prompt for r in rows] == ["mug"]
    assert "opened and never closed" in rejections[0].reason
    assert rejections[0].reason.startswith("q.csv row 2 (line 3): 1 fields")


def test_huge_cell_is_one_rejection_not_a_dead_file(tmp_path: Path) -> None:
    text = 'prompt,sku\nmug,1\n"' + "x" * 3_000_000 + '",2\nbag,3\n'
    rows, rejections = read_all(write(tmp_path / "huge.csv", text))
    assert [r.index for r in rows] == [0, 2]
    assert rejections[0].reason == (
        "huge.csv row 2, column prompt: 3000000 characters is too long; expected at most "
        "10000 characters"
    )


def test_a_long_row_after_malformed_lines_keeps_every_row_number(tmp_path: Path) -> None:
    # The read block is twice the longest row (at least 64 KB): a 100 KB cell makes the
    # blocks larger, and malformed lines before and after it still name their own rows.
    lines = []
    for i in range(5_000):
        if i in (10, 4_000):
            lines.append(f"prompt {i},{i},extra")
        elif i == 2_000:
            lines.append('"' + "y" * 100_000 + f'",{i}')
        else:
            lines.append(f"prompt {i},{i}")
    path = write(tmp_path / "long.csv", "prompt,n\n" + "\n".join(lines) + "\n")
    rows, rejections = read_all(path, batch_size=1_000)
    assert [r.index for r in rejections] == [10, 2_000, 4_000]
    assert rejections[0].reason.startswith("long.csv row 11 (line 12): 3 fields where")
    assert rejections[1].reason.startswith("long.csv row 2001, column prompt: 100000 characters")
    assert rejections[2].reason.startswith("long.csv row 4001 (line 4002): 3 fields where")
    assert [r.index for r in rows] == [i for i in range(5_000) if i not in (10, 2_000, 4_000)]
    assert all(r.request.prompt == f"prompt {r.index}" for r in rows)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("m.json", b'[{"id": 1, "prompt": "red mug"}]', "m.json: is JSON, not a CSV or Parquet"),
        ("m.jsonl", b'\xef\xbb\xbf {"id": 1}\n{"id": 2}\n', "m.jsonl: is JSON, not a CSV"),
        ("m.xls", b"\xd0\xcf\x11\xe0" + bytes(60), "m.xls: looks like an old Excel (.xls)"),
    ],
)
def test_a_file_of_another_kind_is_named_as_such(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    """Read as CSV, a JSON export or an Excel workbook got messages about headers and
    fields; the file's kind and what to do about it are what the user needs."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ManifestError) as err:
        ManifestReader(tmp_path / name)
    assert str(err.value).startswith(expected)


def test_known_columns_however_spelled_and_size_columns_named(tmp_path: Path) -> None:
    """A spreadsheet's `Aspect Ratio` is the aspect_ratio column (it was carried through
    unread, and every image came out square), and its `16:9` the widescreen preset;
    `Width`/`Height` are not read, and said so."""
    path = write(
        tmp_path / "sheet.csv",
        "ID,Prompt,Aspect Ratio,output-format,SafetyTolerance,Width,Height\n"
        "m1,red mug,16:9,png,3,1600,900\nm2,blue mug, 4/5 ,,,,\nm3,tan mug,16x10,,,,\n",
    )
    reader = ManifestReader(path)
    rows, rejections = read_all(path)
    request = rows[0].request
    assert (request.aspect_ratio, request.output_format, request.safety_tolerance) == (
        "widescreen_16_9",
        "png",
        3,
    )
    assert rows[1].request.aspect_ratio == "social_post_4_5"
    [bad] = rejections  # no preset is 16:10: the message says what is allowed
    # Named as the sheet spells it: "column aspect_ratio" named a column not in the file.
    assert "row 3, column Aspect Ratio: '16x10' is not allowed" in bad.reason
    assert "or its ratio (16:9)" in bad.reason
    assert reader.extra_columns == ["Width", "Height"]
    [notice] = reader.notices
    assert "sheet.csv: columns 'Width', 'Height' not read" in notice
    assert "aspect_ratio (one of square_1_1," in notice and "--resolution" in notice
    # Two spellings of one known column are one column too many, as before.
    both = write(tmp_path / "both.csv", "prompt,aspect_ratio,Aspect-Ratio\nmug,1:1,16:9\n")
    with pytest.raises(ManifestError, match="both mean 'aspect_ratio'"):
        ManifestReader(both)
    # WooCommerce's product dimensions are not a size request: nothing to say.
    assert ManifestReader(write(tmp_path / "w.csv", "prompt,Width (cm)\nmug,9\n")).notices == []


def test_a_european_shop_s_reference_is_an_id_and_a_photo_column_a_reference(
    tmp_path: Path,
) -> None:
    """PrestaShop's "Reference #" (a "Référence" in French) is the product's code: the
    note says it looks like an id, never that it looks like a photo. A photo column in a
    manifest that sends no reference is named with how to send it."""
    [note] = ManifestReader(write(tmp_path / "ps.csv", "Reference #,prompt\nR-1,mug\n")).notices
    assert "column 'Reference #' looks like an id" in note
    [note] = ManifestReader(write(tmp_path / "fr.csv", "Référence,prompt\nR-1,tasse\n")).notices
    assert "column 'Référence' looks like an id" in note
    [note] = ManifestReader(write(tmp_path / "p.csv", "id,prompt,Photo URL\n1,mug,x.jpg\n")).notices
    assert "column 'Photo URL' looks like product photos" in note
    assert "--reference-column 'Photo URL'" in note
    sent = write(tmp_path / "s.csv", "id,prompt,input_image,Photo URL\n1,mug,a.png,x.jpg\n")
    assert ManifestReader(sent).notices == []  # a reference is sent: nothing to say
