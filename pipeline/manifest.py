"""Read a manifest in batches and turn each row into a request or a rejection.

Catalog manifests run to millions of rows and come from spreadsheets, data warehouses and
hand edits, so this module never holds the whole file, never lets one bad row stop the
others, and says exactly which file, row and column is wrong and what would be allowed.
CSV cells stay text (SKU ``00123`` stays ``00123``); Parquet columns keep their types.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import re
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import contract
from pipeline.errors import ConfigError, ManifestError
from pipeline.keys import content_key, derive_seed, safe_key
from pipeline.references import SPEC_SCHEMES
from pipeline.reserved import (  # noqa: F401 (MERGED_COLUMN, RESERVED_COLUMNS: re-exported)
    DERIVED_PREFIX,
    ERROR_COLUMN,
    INDEX_COLUMN,
    MERGED_COLUMN,
    RESERVED_COLUMNS,
    is_derived,
    renamed,
)
from pipeline.rows import ImageRequest, Rejection, Row

#: Columns the pipeline reads; every other column is carried through untouched.
KNOWN_COLUMNS: Final = (
    "id",
    "prompt",
    "aspect_ratio",
    "resolution",
    "seed",
    "safety_tolerance",
    "output_format",
    *contract.REFERENCE_FIELDS,
)
# The columns the pipeline adds to batches (``__index``, ``__error``, ``__merged``, the
# ``__catalog_*`` an export derives) are reserved in ``pipeline/reserved.py``; an input
# column of the same name is carried through as ``input_<name>``.

_DELIMITERS: Final = (",", ";", "\t")
_DELIMITER_NAMES: Final = {",": "comma", ";": "semicolon", "\t": "tab"}
_PARQUET_SUFFIXES: Final = (".parquet", ".pq")
_HEAD_BYTES: Final = 64 * 1024
#: The largest CSV read block: a row must fit in one (an inline ``data:`` reference of up to
#: 10 MB needs this), so a longer row is an error naming it.
_CSV_BLOCK_BYTES: Final = 16 << 20
#: The smallest read block, used when every row is far shorter (``_csv_block_size``): 32
#: blocks of read-ahead are then 2 MB (256 KB blocks held 8 MB, a million-row dry run's
#: peak 6 MB above a 10,000-row one's; the CPU is the same, issue 16).
_CSV_MIN_BLOCK_BYTES: Final = 64 << 10
#: How much of the file the block-size scan looks at a time.
_SCAN_BYTES: Final = 1 << 20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_OUTPUT_FORMAT_ALIASES: Final = {"jpg": "jpeg"}
#: How a binary (Parquet) reference cell is passed on: its bytes as a data: URI.
BINARY_REFERENCE_PREFIX: Final = "data:image/binary;base64,"


@dataclass(frozen=True, slots=True)
class Defaults:
    """Values for cells left empty (or columns left out): the contract's, or the user's."""

    aspect_ratio: str = contract.DEFAULT_ASPECT_RATIO
    resolution: str = contract.DEFAULT_RESOLUTION
    safety_tolerance: int = contract.DEFAULT_SAFETY
    output_format: str = contract.DEFAULT_OUTPUT_FORMAT
    seed: int | None = None

    def __post_init__(self) -> None:
        # Defaults come from the command line or config: a bad one stops the run up front.
        named = contract.ASPECT_RATIO_ALIASES.get(self.aspect_ratio.strip().lower())
        if named is not None:
            object.__setattr__(self, "aspect_ratio", named)
        if self.aspect_ratio not in contract.ASPECT_RATIOS:
            raise ConfigError(
                f"default aspect_ratio {self.aspect_ratio!r} is not allowed; expected one of "
                + ", ".join(contract.ASPECT_RATIOS)
            )
        if self.resolution not in contract.RESOLUTIONS:
            raise ConfigError(
                f"default resolution {self.resolution!r} is not allowed; expected 1k or 2k"
            )
        if self.output_format not in contract.OUTPUT_FORMATS:
            raise ConfigError(
                f"default output_format {self.output_format!r} is not allowed; expected png or jpeg"
            )
        safety = self.safety_tolerance
        if (
            isinstance(safety, bool)
            or not isinstance(safety, int)
            or not contract.SAFETY_MIN <= safety <= contract.SAFETY_MAX
        ):
            raise ConfigError(
                f"default safety_tolerance {safety!r} is not allowed; expected a whole "
                f"number from {contract.SAFETY_MIN} to {contract.SAFETY_MAX}"
            )
        seed = self.seed
        if seed is not None and (
            isinstance(seed, bool)
            or not isinstance(seed, int)
            or not contract.SEED_MIN <= seed <= contract.SEED_MAX
        ):
            raise ConfigError(
                f"default seed {seed!r} is not allowed; expected a whole number from "
                f"{contract.SEED_MIN} to {contract.SEED_MAX}"
            )


# --- reading ------------------------------------------------------------------------------


@dataclass(slots=True)
class _CsvFormat:
    encoding: str
    delimiter: str
    header: list[str]


@dataclass(slots=True)
class _BadLine:
    target: int
    line: int | None
    text: str


class _LineFinder:
    """The physical line a CSV record starts on, for the message about a malformed row.

    pyarrow numbers a malformed row by records (the header is 1; blank lines are not
    records), which is the line only while no cell spans several lines: after a
    multi-line cell (a Shopify ``Body (HTML)``) or blank lines the message sent the user to
    the wrong line. Python's csv reader knows the physical line it stopped on, so this
    reads the file up to each malformed record, once, in order: only when a row is bad,
    and never further than the last bad one.
    """

    def __init__(self, path: Path, encoding: str, delimiter: str) -> None:
        self._path, self._delimiter = path, delimiter
        self._encoding = "utf-8-sig" if encoding == "utf-8" else encoding
        self._handle: io.TextIOWrapper | None = None
        self._reader: Iterator[list[str]] | None = None
        self._records = 0

    def line_of(self, record: int) -> int | None:
        """The line record ``record`` starts on (1-based, the header being record 1)."""
        if self._reader is None:
            self._handle = open(self._path, encoding=self._encoding, newline="")  # noqa: SIM115
            self._reader = csv.reader(self._handle, delimiter=self._delimiter)
        reader = self._reader
        while self._records < record:
            start = reader.line_num + 1  # type: ignore[attr-defined]
            try:
                cells = next(reader)
            except (StopIteration, csv.Error, UnicodeDecodeError):
                return None
            if cells:  # a blank line is no record, for pyarrow either
                self._records += 1
                if self._records == record:
                    return start
        return None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


@dataclass(slots=True)
class _Columns:
    """The source's column names, as found and as the pipeline uses them."""

    source: list[str]
    names: list[str]
    extra: list[str] = field(default_factory=list)
    #: What a user should know about the columns that stops nothing (``size_notice``).
    notices: list[str] = field(default_factory=list)


#: Columns a manifest may carry hoping to set the image's size, which the API does not
#: take (as ``_loose`` spells them): they are carried through, and the run says so.
_SIZE_LIKE: Final = frozenset(
    {"width", "height", "imagewidth", "imageheight", "widthpx", "heightpx", "dimensions"}
    | {"aspect", "ratio", "imageratio", "imagesize", "pixels"}
)


def _loose(name: str) -> str:
    """A column name without case, spaces, hyphens or underscores: ``Aspect Ratio``,
    ``aspect-ratio`` and ``AspectRatio`` all mean ``aspect_ratio``."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


_KNOWN_LOOSE: Final = {_loose(name): name for name in KNOWN_COLUMNS}


def known_column(name: str) -> str | None:
    """The column the pipeline reads that ``name`` means (``_loose``), else None: for a
    manifest's header and a variation's axis alike."""
    return _KNOWN_LOOSE.get(_loose(name))


def _named_like(columns: list[str], kind: frozenset[str]) -> list[str]:
    """The columns whose name (as ``_loose`` spells it) is one of ``kind``: what the
    notices below name."""
    return [name for name in columns if _loose(name) in kind]


def size_notice(file_name: str, columns: list[str]) -> str | None:
    """Columns that look like a size request the pipeline does not read, named once."""
    found = _named_like(columns, _SIZE_LIKE)
    if not found:
        return None
    shown = ", ".join(repr(name) for name in found)
    noun = "column" if len(found) == 1 else "columns"
    return (
        f"{file_name}: {noun} {shown} not read (carried through to the output manifest): "
        f"an image's shape is its aspect_ratio (one of {', '.join(contract.ASPECT_RATIOS)}, "
        "or its ratio, e.g. 16:9) "
        f"and its size its resolution ({', '.join(contract.RESOLUTIONS)}), per row in "
        "columns of those names, or for every row with --aspect-ratio / --resolution"
    )


#: Columns a data team's table or a PIM dump keys its products by (as ``_loose`` spells
#: them), which the pipeline does not read as the row's id unless named ``id``.
_ID_LIKE: Final = frozenset(
    {"productid", "itemid", "sku", "variantsku", "handle", "productcode", "articleid"}
    | {"articlenumber", "articleno", "itemnumber", "itemno", "productnumber", "gtin", "ean"}
    | {"upc", "mpn", "styleid", "key", "uuid", "guid"}
    # PrestaShop's and many European PIMs' product code ("Reference #", "Référence"): an
    # id, not a reference image.
    | {"reference", "référence"}
)


def id_notice(file_name: str, columns: list[str]) -> str | None:
    """A manifest without an ``id`` column but with a column that looks like one: its rows
    are keyed by their request, so two products asking for the same image are made once
    (the second rejected as a repeat) and a changed prompt is a new row; said once."""
    found = _named_like(columns, _ID_LIKE)
    if not found:
        return None
    return (
        f"{file_name}: no 'id' column, so each row is keyed by its request (rows asking for "
        f"the same image are made once); column {found[0]!r} looks like an id: name it "
        "'id' to key rows by it"
    )


#: Columns a shop export, a PIM dump or a data team's table holds its product photos in (as
#: ``_loose`` spells them), which the pipeline does not send as references unless told.
_REFERENCE_LIKE: Final = frozenset(
    {"image", "images", "imageurl", "imageurls", "imagesrc", "imagelink", "imagepath"}
    | {"imagefile", "mainimage", "productimage", "productimageurl", "variantimage", "picture"}
    | {"pictureurl", "photo", "photourl", "productphoto", "referenceimage"}
    | {"referenceurl", "refimage", "sourceimage", "packshot"}
)


def reference_notice(file_name: str, columns: list[str]) -> str | None:
    """A manifest that sends no reference but has a column that looks like the product's
    photo: every image would be made from its prompt alone, the photo unseen, for a whole
    night, while the run looked as it should; said once, with how to use it."""
    found = _named_like(columns, _REFERENCE_LIKE)
    if not found:
        return None
    return (
        f"{file_name}: no reference image column, so every image is made from its prompt "
        f"alone; column {found[0]!r} looks like product photos: name it 'input_image' "
        f"('input_image_2' .. '_4' for more), or pass --reference-column {found[0]!r}, to "
        "send them as references"
    )


def _normalise_columns(
    found: list[str],
    file_name: str,
    *,
    require_prompt: bool = True,
    roles: Mapping[str, str] | None = None,
    derived_ok: bool = False,
) -> _Columns:
    roles = roles or {}
    # A column a role stands in for keeps its own name (WooCommerce's ``ID`` is not the
    # ``id`` the pipeline keys by when the id comes from the SKU).
    names: list[str] = []
    for position, raw in enumerate(found, start=1):
        stripped = raw.strip()
        if not stripped:
            stripped = f"column_{position}"
        if stripped in roles:
            raise ManifestError(
                f"{file_name}: has a column {stripped!r}, and {stripped} is also taken from "
                f"column {roles[stripped]!r} as asked; rename or drop one of them"
            )
        known = known_column(stripped)
        names.append(known if known is not None and known not in roles else stripped)
    seen: dict[str, str] = {}
    for raw, name in zip(found, names, strict=True):
        if name in seen:
            if seen[name].strip() == raw.strip():
                raise ManifestError(
                    f"{file_name}: column {raw.strip()!r} appears twice; column names must "
                    "be unique"
                )
            raise ManifestError(
                f"{file_name}: columns {seen[name]!r} and {raw!r} both mean {name!r} "
                "(names are compared after trimming spaces, and known columns "
                "ignoring case, spaces, hyphens and underscores); keep one of them"
            )
        seen[name] = raw
    if not derived_ok:
        # Names the pipeline works with are kept for it: such an input column is carried
        # through under ``input_<name>`` (pipeline/reserved.py), never mistaken for its own.
        for position, name in enumerate(names):
            if is_derived(name):
                names[position] = renamed(name, names)
    for role, source in roles.items():
        if source not in names:
            shown = ", ".join([repr(name) for name in names if not is_derived(name)][:20])
            raise ManifestError(
                f"{file_name}: has no column {source!r} to take {role} from; columns: {shown}"
            )
    if require_prompt and "prompt" not in names and "prompt" not in roles:
        shown = ", ".join(repr(name) for name in found[:20])
        if len(found) > 20:
            shown += f", ... ({len(found)} columns)"
        hint = ""
        if len(found) == 1 and any(d in found[0] for d in _DELIMITERS):
            hint = (
                " The header was read as a single column: is the delimiter right? "
                "Use commas, semicolons or tabs (or a .tsv name for tabs)."
            )
        raise ManifestError(
            f"{file_name}: no 'prompt' column; found {shown or 'no columns'}. Every "
            f"manifest needs a 'prompt' column; the others it understands are "
            f"{', '.join(c for c in KNOWN_COLUMNS if c != 'prompt')}.{hint}"
        )
    extra = [name for name in names if name not in KNOWN_COLUMNS]
    carried = [name for name in extra if not is_derived(name)]
    notices = [size_notice(file_name, carried)]
    if "id" not in names and "id" not in roles:
        notices.append(id_notice(file_name, carried))
    if not any(field in names or field in roles for field in contract.REFERENCE_FIELDS):
        notices.append(reference_notice(file_name, carried))
    return _Columns(source=list(found), names=names, extra=extra, notices=[n for n in notices if n])


def _input_columns(columns: _Columns) -> list[tuple[str, str]]:
    """(batch column, name as the input spelled it) of every input column, in input order.

    Known columns are read under their canonical names (``Prompt`` as ``prompt``), but the
    output manifest gives each back as it came; derived columns are not input columns.
    """
    pairs: list[tuple[str, str]] = []
    for raw, name in zip(columns.source, columns.names, strict=True):
        if is_derived(name):
            continue
        pairs.append((name, raw.strip() or name))
    return pairs


def _check_types(schema: pl.Schema, file_name: str, roles: Mapping[str, str] | None = None) -> None:
    """Refuse known columns whose type cannot hold what the contract asks for, and columns
    ``roles`` takes a known column from (``--reference-column``) alike.

    A whole column of the wrong type is a file problem, not a row problem: reporting it
    once beats rejecting every row with the same message.
    """
    taken = {role: source for role, source in (roles or {}).items() if source in schema}
    for name, dtype in [*schema.items(), *((role, schema[s]) for role, s in taken.items())]:
        if name not in KNOWN_COLUMNS:
            continue
        shown = name
        if name in taken:
            shown = f"{taken[name]!r} (taken as {name})"
        textual = dtype in (pl.String, pl.Categorical, pl.Null) or isinstance(dtype, pl.Enum)
        if name in ("seed", "safety_tolerance"):
            ok = textual or dtype.is_numeric()
            expected = "whole numbers (or text holding them)"
        elif name == "id":
            ok = textual or dtype.is_integer() or dtype.is_float()
            expected = "text or whole numbers"
        elif name in contract.REFERENCE_FIELDS:
            ok = textual or dtype == pl.Binary
            expected = "text (a path, URL, data: URI or base64) or binary image bytes"
            if isinstance(dtype, pl.List | pl.Array):
                expected += (
                    ", one image a cell (a row's several images go in columns input_image, "
                    "input_image_2 .. input_image_4)"
                )
        else:
            ok = textual
            expected = "text"
        if not ok:
            raise ManifestError(
                f"{file_name}: column {shown} has type {dtype}; expected {expected}"
            )


class ArrowStream(Protocol):
    """A table another library made that speaks the Arrow PyCapsule stream interface
    (pandas 2.2 and later, DuckDB, ...)."""

    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object: ...


def _foreign_table(source: object) -> pa.Table | None:
    """Another library's table as Arrow: a pandas DataFrame, or anything with the Arrow
    PyCapsule stream interface (a DuckDB relation, ...); None for anything else.

    pandas converts without its index: a named or custom index would otherwise come back
    as an input column ``__index_level_0__`` (``pa.table`` keeps it).
    """
    kind = type(source)
    try:
        if kind.__module__.split(".")[0] == "pandas" and kind.__name__ == "DataFrame":
            return pa.Table.from_pandas(source, preserve_index=False)
        if hasattr(source, "__arrow_c_stream__"):
            return pa.table(source)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        # pyarrow names the column ("Conversion failed for column sku with type object").
        raise ManifestError(f"<dataframe>: cannot be read as a table: {exc}") from None
    return None


def _wide_decimal(dtype: pa.DataType) -> bool:
    """Whether ``dtype`` is, or holds, a ``decimal256`` (polars holds 128-bit decimals)."""
    if pa.types.is_decimal256(dtype):
        return True
    if pa.types.is_dictionary(dtype):
        return _wide_decimal(dtype.value_type)
    return any(_wide_decimal(dtype.field(i).type) for i in range(dtype.num_fields))


def _utf8_error_line(path: Path) -> int | None:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def _not_utf8(name: str, line: int | None, encoding: str = "utf-8") -> ManifestError:
    where = f" (line {line})" if line else ""
    label = "UTF-16" if encoding == "utf-16" else "UTF-8"
    return ManifestError(
        f"{name}: bytes that are not valid {label}{where}; the manifest must be UTF-8 "
        "(with or without a byte-order mark) or UTF-16 with a byte-order mark. "
        "Re-save it as 'CSV UTF-8'."
    )


def _sniff_csv(path: Path, name: str) -> _CsvFormat:
    with path.open("rb") as handle:
        head = handle.read(_HEAD_BYTES)
        whole = len(head) < _HEAD_BYTES
    if head.startswith(b"PK\x03\x04"):
        raise ManifestError(
            f"{name}: looks like an Excel workbook or a zip archive; export it as CSV "
            "(UTF-8) or Parquet"
        )
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        raise ManifestError(
            f"{name}: looks like an old Excel (.xls) workbook; export it as CSV (UTF-8) or Parquet"
        )
    if head.removeprefix(codecs.BOM_UTF8).lstrip()[:1] in (b"{", b"["):
        # Read as CSV, JSON got "has a header line but no data rows" and the like.
        raise ManifestError(
            f"{name}: is JSON, not a CSV or Parquet manifest; convert it first, e.g. "
            "polars.read_json(path).write_parquet('manifest.parquet') (read_ndjson for one "
            "object per line)"
        )
    encoding = "utf-8"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif head.count(b"\x00") > len(head) // 8:
        # A stray NUL in a cell is text; NULs everywhere mean UTF-16 without a BOM or binary.
        raise ManifestError(
            f"{name}: is full of NUL bytes: it looks like UTF-16 without a byte-order mark "
            "or a binary file; the manifest must be UTF-8 text (or UTF-16 with a "
            "byte-order mark), CSV or Parquet"
        )
    decoder = codecs.getincrementaldecoder("utf-8-sig" if encoding == "utf-8" else encoding)()
    try:
        text = decoder.decode(head, final=whole)
    except UnicodeDecodeError as exc:
        line = head[: exc.start].count(b"\n") + 1 if encoding == "utf-8" else None
        raise _not_utf8(name, line, encoding) from None
    if not text.strip():
        raise ManifestError(
            f"{name}: the file is empty; expected a header line naming the columns "
            "(at least 'prompt') and one row per image"
        )
    header_line, _, rest = text.lstrip("\r\n").partition("\n")
    header_line = header_line.rstrip("\r")
    if whole and not rest.strip():
        raise ManifestError(
            f"{name}: has a header line but no data rows; expected one row per image"
        )
    if path.suffix.lower() == ".tsv":
        delimiter = "\t"
    else:
        unquoted = re.sub(r'"[^"]*"', "", header_line)
        counts = {d: unquoted.count(d) for d in _DELIMITERS}
        delimiter = max(_DELIMITERS, key=lambda d: counts[d])
        if counts[delimiter] == 0:
            delimiter = ","
    header = next(csv.reader([header_line], delimiter=delimiter))
    return _CsvFormat(encoding=encoding, delimiter=delimiter, header=header)


class _RowTooLarge(Exception):
    """A CSV row longer than the largest read block: pyarrow cannot read the file."""

    def __init__(self, row: int) -> None:
        super().__init__(row)
        self.row = row


def _csv_block_size(path: Path, encoding: str) -> int:
    """The read block for this CSV: twice its longest row, between 64 KB and 16 MB.

    pyarrow's streaming CSV reader reads up to 32 blocks ahead of the rows handed out
    (on its I/O thread), so its memory is 32 blocks, whatever the file's size: 16 MB
    blocks held the whole of a 100 MB, million-row manifest in memory at once (the
    dry run's peak grew with the manifest: issue 16). One pass over the bytes finds the
    longest row (newlines outside double quotes; doubled quotes keep the count even), so
    the blocks are as small as the rows allow, and a file with one 3 MB inline reference
    still gets blocks it fits in. A row of 16 MB or more raises ``_RowTooLarge`` with its
    data row number, before pyarrow opens the file: pyarrow would fail on it too, and a
    process ending while its read-ahead thread still reads past the failure is aborted
    by the C++ runtime (exit -6 after the message, seen on a busy machine). Encodings
    other than UTF-8 (UTF-16) are not scanned: they get the largest block.
    """
    if encoding != "utf-8":
        return _CSV_BLOCK_BYTES
    longest = 0
    row_start = 0
    offset = 0
    odd = 0
    rows_ended = 0  # rows (the header first) whose newline has been seen
    with path.open("rb") as handle:
        while chunk := handle.read(_SCAN_BYTES):
            data = np.frombuffer(chunk, dtype=np.uint8)
            quotes = np.flatnonzero(data == 0x22)
            ends = np.flatnonzero(data == 0x0A)
            # A newline ends a row when an even number of quotes came before it.
            ends = ends[((np.searchsorted(quotes, ends) + odd) & 1) == 0] + offset
            if len(ends):
                lengths = np.diff(ends, prepend=row_start)
                over = np.flatnonzero(lengths >= _CSV_BLOCK_BYTES)
                if len(over):
                    raise _RowTooLarge(max(1, rows_ended + int(over[0])))
                longest = max(longest, int(lengths.max()))
                rows_ended += len(ends)
                row_start = int(ends[-1])
            odd = (odd + len(quotes)) & 1
            offset += len(chunk)
            if offset - row_start >= _CSV_BLOCK_BYTES:
                raise _RowTooLarge(max(1, rows_ended))
    longest = max(longest, offset - row_start)
    block = _CSV_MIN_BLOCK_BYTES
    while block < 2 * longest and block < _CSV_BLOCK_BYTES:
        block *= 2
    return block


class ManifestReader:
    """A manifest opened for reading in batches; problems with the whole file show up here.

    The file is checked on construction (exists, readable, has a header with a prompt
    column, has rows, known columns have usable types) so a run fails before it starts
    rather than halfway through.
    """

    def __init__(
        self,
        source: str | Path | pl.DataFrame | pa.Table | ArrowStream,
        *,
        batch_size: int = 10_000,
        limit: int | None = None,
        offset: int = 0,
        require_prompt: bool = True,
        roles: Mapping[str, str] | None = None,
        name: str | None = None,
        base_dir: Path | str | None = None,
    ) -> None:
        """``roles`` maps a column the pipeline reads (``id``, ``input_image``) to the input
        column it is taken from (``--reference-column "Image Src"``); the input column keeps
        its name in the output manifest. ``name`` and ``base_dir`` name an in-memory table
        made from a file (a product export read by ``pipeline/product_exports.py``)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if limit is not None and limit < 0:
            raise ConfigError(f"limit must be 0 or more, got {limit}")
        if offset < 0:
            raise ConfigError(f"offset must be 0 or more, got {offset}")
        self.batch_size = batch_size
        self.limit = limit
        #: Data rows skipped before the first batch; ``__index`` keeps counting from the file's
        #: first row, so a shard's messages and output rows name the original row numbers.
        self.offset = offset
        self._frame: pl.DataFrame | None = None
        self._table: pa.Table | None = None
        self._csv: _CsvFormat | None = None
        #: The read block of a CSV, chosen when it is read (``_csv_block_size``).
        self._csv_block = _CSV_BLOCK_BYTES
        self._parquet: pq.ParquetFile | None = None
        self.path: Path | None = None
        if isinstance(source, pl.DataFrame):
            self.name, self.base_dir = "<dataframe>", None
            self._frame = source
            found = list(source.columns)
            schema = source.schema
        elif isinstance(source, pa.Table):
            self.name, self.base_dir = "<dataframe>", None
            self._table = source
            found = list(source.column_names)
            schema = self._polars_schema(source.schema)
        elif (table := _foreign_table(source)) is not None:
            self.name, self.base_dir = "<dataframe>", None
            self._table = table
            found = list(table.column_names)
            schema = self._polars_schema(table.schema)
        elif isinstance(source, str) and source[:5].lower() == "s3://":
            from pipeline.s3 import delete_when_collected, fetch_manifest

            # A local copy, streamed to disk: read (and re-read) like a file, memory flat.
            copy = fetch_manifest(source)
            delete_when_collected(self, copy.path)
            self.path = copy.path
            self.name = copy.name
            #: For S3 manifests, the ``s3://bucket/folder/`` relative references resolve in.
            self.base_dir = copy.base_uri  # type: ignore[assignment]
            found, schema = self._open_file(copy.path)
        elif isinstance(source, str | Path):
            path = Path(source)
            self.path = path
            self.name = path.name
            self.base_dir = path.resolve().parent
            found, schema = self._open_file(path)
        else:
            raise ConfigError(
                f"a manifest must be a file path, a polars DataFrame, a pyarrow Table, a "
                f"pandas DataFrame or a table with the Arrow stream interface, not "
                f"{type(source).__name__}"
            )
        if name is not None:
            self.name = name
        if base_dir is not None:
            self.base_dir = base_dir  # type: ignore[assignment]
        self.roles: dict[str, str] = dict(roles or {})
        #: How messages name a column the pipeline reads under another name (a role's
        #: source, e.g. ``input_image`` as ``Image Src``); set by whoever derived it.
        self.shown_as: dict[str, str] = {
            role: source for role, source in self.roles.items() if not is_derived(source)
        }
        # A prompt template (pipeline/templates.py) builds prompts from other columns.
        self._columns = _normalise_columns(
            found,
            self.name,
            require_prompt=require_prompt,
            roles=self.roles,
            derived_ok=self._frame is not None and name is not None,
        )
        # A known column the input spells its own way (``Aspect Ratio``) is named in
        # messages as the input spells it: "column aspect_ratio" was a column not in the file.
        for raw, used in zip(self._columns.source, self._columns.names, strict=True):
            if used in KNOWN_COLUMNS and raw.strip() != used:
                self.shown_as.setdefault(used, raw.strip())
        #: Whether rows are keyed by an id (a column, or a role such as a Shopify Handle);
        #: without one a row's key is its request (``keys.request_key``).
        self.keyed = "id" in self._columns.names or "id" in self.roles
        self.columns: list[str] = [*self._columns.names, *self.roles]
        self.extra_columns: list[str] = self._columns.extra
        #: Things about the columns worth saying that stop nothing (a run and a check say
        #: them; ``size_notice``).
        self.notices: list[str] = list(self._columns.notices)
        #: (batch column, output name) of every input column, as the input spelled it.
        self.input_columns: list[tuple[str, str]] = _input_columns(self._columns)
        #: A product export's lines by product (``pipeline/product_exports.py``): per data
        #: row, the row its product starts on; None for a plain manifest (a row each).
        self.products: list[int] | None = None
        if schema is not None:
            renamed = pl.Schema(dict(zip(self._columns.names, schema.values(), strict=True)))
            _check_types(renamed, self.name, self.roles)
        #: Each column's Arrow type in a Parquet file or an Arrow table (by batch column):
        #: the output manifest writes the input's columns back with them, not with the
        #: types polars reads them as (``string``, not ``large_string``). Empty for CSV
        #: and polars frames, whose types are polars' own.
        self.arrow_types: dict[str, pa.DataType] = {}
        arrow_schema = (
            self._table.schema
            if self._table is not None
            else self._parquet.schema_arrow
            if self._parquet is not None
            else None
        )
        if arrow_schema is not None:
            self.arrow_types = dict(zip(self._columns.names, arrow_schema.types, strict=True))

    def _polars_schema(self, schema: pa.Schema) -> pl.Schema:
        """The schema polars reads ``schema`` as; a column polars cannot hold is refused
        here, by name, before anything runs.

        Each column is tried with one null value, not with none: polars takes an empty
        ``decimal256`` column (a BigQuery BIGNUMERIC) and then panics on the first batch of
        data, a Rust panic that is no ``Exception`` a caller can catch.
        """
        types: dict[str, pl.DataType] = {}
        for position, field_ in enumerate(schema):
            unreadable = "polars holds no decimal256" if _wide_decimal(field_.type) else ""
            if not unreadable:
                try:
                    probe = pa.Table.from_arrays([pa.nulls(1, field_.type)], names=["c"])
                    frame = pl.from_arrow(probe)
                    assert isinstance(frame, pl.DataFrame)
                    types[f"{position}"] = frame.schema["c"]
                    continue
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # polars refuses, or panics on, some types
                    unreadable = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ManifestError(
                f"{self.name}: column {field_.name!r} has type {field_.type}, which cannot "
                f"be read ({unreadable or 'not supported'}); cast it to a supported type "
                "(decimal128 with a precision of 38 or less, float64 or string) or leave it "
                "out of the manifest"
            )
        return pl.Schema(dict(zip(schema.names, types.values(), strict=True)))

    def _open_file(self, path: Path) -> tuple[list[str], pl.Schema | None]:
        if not path.exists():
            raise ManifestError(f"{path}: no such file; expected a CSV or Parquet manifest")
        if not path.is_file():
            raise ManifestError(f"{path}: is not a file; expected a CSV or Parquet manifest")
        try:
            with path.open("rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            raise ManifestError(f"{path}: cannot be read ({exc.strerror})") from None
        if magic == b"PAR1":
            return self._open_parquet(path)
        if path.suffix.lower() in _PARQUET_SUFFIXES and magic:
            raise ManifestError(
                f"{self.name}: has a Parquet name but is not a Parquet file (it does not "
                "start with PAR1); expected a Parquet file, or rename it to .csv"
            )
        self._csv = _sniff_csv(path, self.name)
        return self._csv.header, None

    def _open_parquet(self, path: Path) -> tuple[list[str], pl.Schema]:
        try:
            # No pre-buffering: pyarrow's read-range cache races across threads and now
            # and then fails a read ('ReadRangeCache did not find matching cache entry');
            # for a local file the coalesced reads it buys are worth nothing.
            parquet = pq.ParquetFile(path, pre_buffer=False)
        except Exception as exc:
            raise ManifestError(
                f"{self.name}: is not a readable Parquet file ({exc}); expected a Parquet "
                "file written by polars, pyarrow, pandas or Spark"
            ) from None
        if parquet.metadata.num_rows == 0:
            raise ManifestError(f"{self.name}: has no rows; expected one row per image")
        self._parquet = parquet
        schema = parquet.schema_arrow
        return list(schema.names), self._polars_schema(schema)

    # -- batches -----------------------------------------------------------------------------

    def batches(self) -> Iterator[pl.DataFrame]:
        """Batches of at most ``batch_size`` rows, in file order, with ``__index`` added.

        With ``offset`` the rows before it are skipped (``limit`` then counts from there).
        """
        remaining = self.limit
        pending: list[pl.DataFrame] = []
        held = 0
        for chunk in self._chunks():
            if self.offset:
                chunk = chunk.filter(pl.col(INDEX_COLUMN) >= self.offset)
                if chunk.height == 0:
                    continue
            if remaining is not None:
                if remaining <= 0:
                    break
                chunk = chunk.head(remaining)
                remaining -= chunk.height
            pending.append(chunk)
            held += chunk.height
            # A product export's batch waits for the row after it, to know where the
            # product at its end ends (``_cut``).
            while held > self.batch_size or (held == self.batch_size and self.products is None):
                joined = pl.concat(pending, how="diagonal_relaxed")
                cut = self._cut(joined)
                yield self._with_roles(joined.head(cut))
                rest = joined.slice(cut)
                pending, held = ([rest], rest.height) if rest.height else ([], 0)
        if held:
            yield self._with_roles(pl.concat(pending, how="diagonal_relaxed"))

    def _cut(self, joined: pl.DataFrame) -> int:
        """How many rows of ``joined`` (more than a batch) the next batch takes: a batch,
        or fewer so that a product export's product is not split between two batches (a
        budget plans a product's images from one batch: ``run._products``). A product
        longer than a batch is split all the same."""
        if self.products is None or joined.height <= self.batch_size:
            return self.batch_size
        first = int(joined[INDEX_COLUMN][0])
        start = self.products[int(joined[INDEX_COLUMN][self.batch_size])]
        return start - first if first < start < first + self.batch_size else self.batch_size

    def _with_roles(self, frame: pl.DataFrame) -> pl.DataFrame:
        if not self.roles:
            return frame
        return frame.with_columns(pl.col(source).alias(role) for role, source in self.roles.items())

    def _chunks(self) -> Iterator[pl.DataFrame]:
        names = self._columns.names
        if self._frame is not None:
            frame = self._frame.rename(dict(zip(self._frame.columns, names, strict=True)))
            for offset in range(self.offset, frame.height, self.batch_size):
                part = frame.slice(offset, self.batch_size)
                yield part.with_columns(
                    pl.int_range(offset, offset + part.height, dtype=pl.Int64).alias(INDEX_COLUMN)
                )
            return
        if self._table is not None:
            table = self._table.slice(min(self.offset, self._table.num_rows))
            yield from self._indexed(
                table.to_batches(max_chunksize=self.batch_size),
                first=self._table.num_rows - table.num_rows,
            )
            return
        if self._parquet is not None:
            # Whole row groups before the offset are never decoded: a late shard of a big
            # file starts near its rows instead of reading everything before them.
            groups, skipped = self._row_groups_from(self.offset)
            try:
                yield from self._indexed(
                    self._parquet.iter_batches(batch_size=self.batch_size, row_groups=groups),
                    first=skipped,
                )
            except (OSError, pa.ArrowException) as exc:
                raise ManifestError(f"{self.name}: Parquet data cannot be read ({exc})") from None
            return
        yield from self._csv_chunks()

    def _row_groups_from(self, row: int) -> tuple[list[int], int]:
        """Row groups holding data row ``row`` and later, and how many rows come before them."""
        assert self._parquet is not None
        metadata = self._parquet.metadata
        skipped = 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if skipped + rows > row:
                return list(range(group, metadata.num_row_groups)), skipped
            skipped += rows
        return [], skipped

    def _indexed(
        self, batches: Iterator[pa.RecordBatch] | list[pa.RecordBatch], *, first: int = 0
    ) -> Iterator[pl.DataFrame]:
        offset = first
        for batch in batches:
            if batch.num_rows == 0:
                continue
            for start in range(0, batch.num_rows, self.batch_size):
                frame = pl.from_arrow(batch.slice(start, self.batch_size))
                assert isinstance(frame, pl.DataFrame)
                frame.columns = self._columns.names
                yield frame.with_columns(
                    pl.int_range(offset, offset + frame.height, dtype=pl.Int64).alias(INDEX_COLUMN)
                )
                offset += frame.height

    def _csv_chunks(self) -> Iterator[pl.DataFrame]:
        assert self._csv is not None and self.path is not None
        fmt = self._csv
        width = len(fmt.header)
        positional = [f"f{i}" for i in range(width)]
        bad: deque[_BadLine] = deque()
        lines = _LineFinder(self.path, fmt.encoding, fmt.delimiter)

        def on_invalid(row: pacsv.InvalidRow) -> str:
            # pyarrow numbers records (the header is 1), so number - 2 is the data row's
            # position; the physical line, for the message, is ``_LineFinder``'s.
            record = row.number
            target = record - 2 if record is not None else -1
            line = lines.line_of(record) if record is not None else None
            text = (
                f"{row.actual_columns} fields where the header has {row.expected_columns}; "
                f"quote cells that contain the delimiter "
                f"({_DELIMITER_NAMES[fmt.delimiter]})"
            )
            if row.text is not None and row.text.count('"') % 2:
                text += (
                    ', and check for a quote (") that is opened and never closed: it joins '
                    "the following lines into this row"
                )
            bad.append(_BadLine(target=target, line=line, text=text))
            return "skip"

        try:
            try:
                block = self._csv_block = _csv_block_size(self.path, fmt.encoding)
            except _RowTooLarge as huge:
                raise self._row_too_large(huge.row) from None
            try:
                reader = pacsv.open_csv(
                    self.path,
                    read_options=pacsv.ReadOptions(
                        column_names=positional,
                        skip_rows=1,
                        block_size=block,
                        encoding=fmt.encoding,
                        use_threads=False,
                    ),
                    parse_options=pacsv.ParseOptions(
                        delimiter=fmt.delimiter,
                        newlines_in_values=True,
                        invalid_row_handler=on_invalid,
                    ),
                    convert_options=pacsv.ConvertOptions(
                        column_types=dict.fromkeys(positional, pa.string()),
                        strings_can_be_null=False,
                    ),
                )
            except UnicodeDecodeError:
                raise _not_utf8(self.name, None, fmt.encoding) from None
            except pa.ArrowInvalid as exc:  # the first block is read here: a huge first row
                raise self._csv_failure(exc, fmt.encoding, 0) from None
            next_index = 0
            names = self._columns.names
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except UnicodeDecodeError:
                    raise _not_utf8(self.name, None, fmt.encoding) from None
                except pa.ArrowInvalid as exc:
                    raise self._csv_failure(exc, fmt.encoding, next_index) from None
                good = batch.num_rows
                indices: list[int] = []
                placed: list[tuple[int, _BadLine]] = []
                if not bad or bad[0].target >= next_index + good + len(bad):
                    indices = list(range(next_index, next_index + good))
                    next_index += good
                else:
                    while len(indices) < good:
                        if bad and bad[0].target <= next_index:
                            placed.append((next_index, bad.popleft()))
                        else:
                            indices.append(next_index)
                        next_index += 1
                # Convert to polars a batch_size slice at a time (arrow slices are zero-copy), so
                # a 16 MB block never exists as one polars frame next to its arrow original.
                waiting = deque(placed)
                for start in range(0, max(good, 1), self.batch_size):
                    part = batch.slice(start, self.batch_size)
                    part_indices = indices[start : start + self.batch_size]
                    frame = pl.from_arrow(part)
                    assert isinstance(frame, pl.DataFrame)
                    frame.columns = names
                    frame = frame.with_columns(
                        pl.Series(INDEX_COLUMN, part_indices, dtype=pl.Int64)
                    )
                    last_part = start + self.batch_size >= good
                    upto = part_indices[-1] if part_indices and not last_part else None
                    mine: list[tuple[int, _BadLine]] = []
                    while waiting and (upto is None or waiting[0][0] < upto):
                        mine.append(waiting.popleft())
                    if mine:
                        frame = pl.concat(
                            [frame, self._bad_frame(mine)], how="diagonal_relaxed"
                        ).sort(INDEX_COLUMN)
                    if frame.height:
                        yield frame
            if bad:
                leftovers = [(next_index + offset, item) for offset, item in enumerate(bad)]
                yield self._bad_frame(leftovers)
        finally:
            lines.close()

    def _csv_failure(self, exc: pa.ArrowInvalid, encoding: str, next_index: int) -> ManifestError:
        """One line for a CSV pyarrow cannot read (bad UTF-8, a row larger than a block)."""
        if "UTF8" in str(exc) or "utf-8" in str(exc).lower():
            line = _utf8_error_line(self.path) if encoding == "utf-8" else None
            return _not_utf8(self.name, line, encoding)
        if "straddl" in str(exc):
            return self._row_too_large(next_index + 1)
        return ManifestError(f"{self.name}: cannot be read as CSV ({exc})")

    def _row_too_large(self, row: int) -> ManifestError:
        return ManifestError(
            f"{self.name}: a single row is larger than "
            f"{_megabytes(self._csv_block)} (row {row} or later); "
            'look for a quote (") that is opened and never closed; prompts are '
            f"capped at {contract.PROMPT_MAX_CHARS} characters anyway"
        )

    def _bad_frame(self, placed: list[tuple[int, _BadLine]]) -> pl.DataFrame:
        columns: dict[str, pl.Series] = {
            name: pl.Series(name, [None] * len(placed), dtype=pl.String)
            for name in self._columns.names
        }
        columns[INDEX_COLUMN] = pl.Series(INDEX_COLUMN, [i for i, _ in placed], dtype=pl.Int64)
        columns[ERROR_COLUMN] = pl.Series(
            ERROR_COLUMN,
            [
                (f" (line {item.line}): " if item.line is not None else ": ") + item.text
                for _, item in placed
            ],
            dtype=pl.String,
        )
        return pl.DataFrame(columns)


# --- validation -----------------------------------------------------------------------------


def _megabytes(size: int) -> str:
    return f"{size >> 20} MB" if size >= 1 << 20 else f"{size >> 10} KB"


def _text(batch: pl.DataFrame, name: str) -> pl.Expr:
    """A known column as text (null where absent), whatever type the source gave it."""
    if name not in batch.columns:
        return pl.lit(None, dtype=pl.String)
    column = pl.col(name)
    dtype = batch.schema[name]
    if dtype == pl.String:
        return column
    if dtype == pl.Binary:
        # Bytes are an image, never a path: as a data: URI, a short or broken one is still
        # checked as an image instead of being looked up as a file named like its base64.
        return pl.concat_str(pl.lit(BINARY_REFERENCE_PREFIX), column.bin.encode("base64"))
    if dtype.is_float():
        # NaN is how pandas (and a Parquet file written from it) says "missing" in a float
        # column: an id of NaN was the key "NaN", shared by every row that had none.
        column = column.fill_nan(None)
        whole = column.is_finite() & (column == column.floor()) & (column.abs() < 2**53)
        return (
            pl.when(whole)
            .then(column.cast(pl.Int64, strict=False).cast(pl.String))
            .otherwise(column.cast(pl.String))
        )
    return column.cast(pl.String)


def _number(batch: pl.DataFrame, name: str, low: int, high: int) -> tuple[pl.Expr, pl.Expr]:
    """Parsed whole numbers (null = use the default) and a mask of cells that are not."""
    if name not in batch.columns:
        return pl.lit(None, dtype=pl.Int64), pl.lit(False)
    column = pl.col(name)
    if batch.schema[name].is_numeric():
        # NaN stays a value, and is refused: missing in pandas, but in a seed more often a
        # computation gone wrong (0/0) than a seed left out, which an empty cell says.
        value = column.cast(pl.Float64)
        given = value.is_not_null()
    else:
        text = column.cast(pl.String).str.strip_chars()
        given = text.is_not_null() & (text != "")
        value = text.cast(pl.Float64, strict=False)
    ok = (
        value.is_finite() & (value == value.floor()) & (value >= low) & (value <= high)
    ).fill_null(False)
    return pl.when(ok).then(value.cast(pl.Int64, strict=False)), given & ~ok


def _choice(
    text: pl.Expr, allowed: tuple[str, ...], aliases: dict[str, str]
) -> tuple[pl.Expr, pl.Expr]:
    cleaned = text.str.strip_chars().str.to_lowercase()
    if aliases:
        cleaned = cleaned.replace(aliases)
    given = cleaned.is_not_null() & (cleaned != "")
    bad = (given & ~cleaned.is_in(list(allowed))).fill_null(False)
    return pl.when(given).then(cleaned), bad


def _show(value: object, limit: int = 60) -> str:
    """A cell as its sheet shows it: text quoted, numbers as written (Python's repr of a
    Parquet decimal, ``Decimal('1.50')``, is not what a data team's table holds)."""
    if isinstance(value, str):
        if len(value) > limit:
            return repr(value[:limit]) + f"... ({len(value)} characters)"
        return repr(value)
    if isinstance(value, Decimal | int | float):
        return str(value)
    return repr(value)


def _expected(name: str, defaults: Defaults) -> str:
    if name == "aspect_ratio":
        return (
            f"one of {', '.join(contract.ASPECT_RATIOS)}, or its ratio (16:9) "
            f"(empty means {defaults.aspect_ratio})"
        )
    if name == "resolution":
        return f"1k or 2k (empty means {defaults.resolution})"
    if name == "output_format":
        return f"png or jpeg (jpg also accepted; empty means {defaults.output_format})"
    if name == "seed":
        return f"a whole number from {contract.SEED_MIN} to {contract.SEED_MAX}"
    if name == "safety_tolerance":
        return (
            f"a whole number from {contract.SAFETY_MIN} (strict) to {contract.SAFETY_MAX} "
            f"(lenient) (empty means {defaults.safety_tolerance})"
        )
    return (
        "a file path relative to the manifest, an https:// URL, a data:image/...;base64, "
        "URI or base64 text"
    )


def lines_to_validate(batch: pl.DataFrame) -> pl.DataFrame:
    """The batch without the lines that make no image of their own (``MERGED_COLUMN``)."""
    if MERGED_COLUMN not in batch.columns:
        return batch
    return batch.filter(pl.col(MERGED_COLUMN).is_null())


def validate_batch(
    batch: pl.DataFrame,
    *,
    source_name: str,
    defaults: Defaults,
    names: Mapping[str, str] | None = None,
) -> tuple[list[Row], list[Rejection]]:
    """Check one batch against the contract: valid rows become requests, others rejections.

    Every check is one polars expression evaluated in a single pass; Python touches each
    row once to build its request and key, and writes messages only for rejected rows.
    ``names`` says how messages name a column taken from another one
    (``ManifestReader.shown_as``: ``input_image`` read from ``Image Src``).
    """
    names = names or {}
    batch = lines_to_validate(batch)
    if batch.height == 0:
        return [], []
    prompt = _text(batch, "prompt")
    aspect, aspect_bad = _choice(
        _text(batch, "aspect_ratio"), tuple(contract.ASPECT_RATIOS), contract.ASPECT_RATIO_ALIASES
    )
    resolution, resolution_bad = _choice(_text(batch, "resolution"), contract.RESOLUTIONS, {})
    fmt, fmt_bad = _choice(
        _text(batch, "output_format"), contract.OUTPUT_FORMATS, _OUTPUT_FORMAT_ALIASES
    )
    seed, seed_bad = _number(batch, "seed", contract.SEED_MIN, contract.SEED_MAX)
    safety, safety_bad = _number(
        batch, "safety_tolerance", contract.SAFETY_MIN, contract.SAFETY_MAX
    )
    checks: list[tuple[str, pl.Expr]] = [
        ("aspect_ratio", aspect_bad),
        ("resolution", resolution_bad),
        ("seed", seed_bad),
        ("safety_tolerance", safety_bad),
        ("output_format", fmt_bad),
    ]
    refs: list[pl.Expr] = []
    for name in contract.REFERENCE_FIELDS:
        spec = _text(batch, name).str.strip_chars()
        scheme = spec.str.extract(_SCHEME.pattern, 1).str.to_lowercase()
        checks.append(
            (name, (scheme.is_not_null() & ~scheme.is_in(sorted(SPEC_SCHEMES))).fill_null(False))
        )
        refs.append(pl.when(spec != "").then(spec).alias(name))
    prompt_bad = (
        prompt.is_null()
        | (prompt.str.strip_chars() == "")
        | (prompt.str.len_chars() > contract.PROMPT_MAX_CHARS)
    ).fill_null(True)
    any_bad = pl.any_horizontal(prompt_bad, *(mask for _, mask in checks))
    if ERROR_COLUMN in batch.columns:
        any_bad = any_bad | pl.col(ERROR_COLUMN).is_not_null()
    table = batch.select(
        pl.col(INDEX_COLUMN).alias("index"),
        _text(batch, "id").str.strip_chars().alias("id"),
        prompt.alias("prompt"),
        aspect.alias("aspect_ratio"),
        resolution.alias("resolution"),
        fmt.alias("output_format"),
        seed.alias("seed"),
        safety.alias("safety_tolerance"),
        *refs,
        any_bad.alias("bad"),
    )
    rows: list[Row] = []
    bad_positions: list[int] = []
    default_seed = defaults.seed
    default_aspect = defaults.aspect_ratio
    default_resolution = defaults.resolution
    default_format = defaults.output_format
    default_safety = defaults.safety_tolerance
    columns = [table.get_column(name).to_list() for name in table.columns]
    for position, (
        index,
        raw_id,
        prompt_text,
        aspect_value,
        resolution_value,
        format_value,
        seed_value,
        safety_value,
        ref1,
        ref2,
        ref3,
        ref4,
        bad,
    ) in enumerate(zip(*columns, strict=True)):
        if bad:
            bad_positions.append(position)
            continue
        if ref1 is None and ref2 is None and ref3 is None and ref4 is None:
            references = reference_columns = ()
        else:
            given = [
                (column, spec)
                for column, spec in zip(
                    contract.REFERENCE_FIELDS, (ref1, ref2, ref3, ref4), strict=True
                )
                if spec is not None
            ]
            references = tuple(spec for _, spec in given)
            reference_columns = tuple(names.get(column, column) for column, _ in given)
        if seed_value is None:
            seed_value = default_seed
        aspect_value = aspect_value or default_aspect
        resolution_value = resolution_value or default_resolution
        format_value = format_value or default_format
        if safety_value is None:
            safety_value = default_safety
        if raw_id:
            key = safe_key(raw_id)
        else:
            key = content_key(
                prompt_text,
                aspect_value,
                resolution_value,
                safety_value,
                format_value,
                references,
                seed_value,
            )
        request = ImageRequest(
            prompt=prompt_text,
            aspect_ratio=aspect_value,
            resolution=resolution_value,
            seed=derive_seed(key) if seed_value is None else seed_value,
            safety_tolerance=safety_value,
            output_format=format_value,
            references=references,
            reference_columns=reference_columns,
        )
        rows.append(Row(index=index, key=key, request=request))
    rejections: list[Rejection] = []
    if bad_positions:
        # The index column makes literal masks (absent columns) broadcast to every row.
        masks = batch.select(pl.col(INDEX_COLUMN), *(mask.alias(name) for name, mask in checks))
        errors = (
            batch.get_column(ERROR_COLUMN)
            if ERROR_COLUMN in batch.columns
            else pl.Series([None] * batch.height, dtype=pl.String)
        )
        ids, prompts, indices = columns[1], columns[2], columns[0]
        for position in bad_positions:
            rejections.append(
                _reject(
                    batch,
                    {name: masks.get_column(name)[position] for name, _ in checks},
                    position,
                    indices[position],
                    ids[position],
                    prompts[position],
                    errors[position],
                    source_name,
                    defaults,
                    names,
                )
            )
    return rows, rejections


def _reject(
    batch: pl.DataFrame,
    problems: dict[str, bool],
    position: int,
    index: int,
    raw_id: str | None,
    prompt: str | None,
    row_error: str | None,
    source_name: str,
    defaults: Defaults,
    names: Mapping[str, str],
) -> Rejection:
    number = index + 1
    key = safe_key(raw_id) if raw_id else f"row-{number}"
    where = f"{source_name} row {number}"
    if row_error is not None:
        return Rejection(index=index, reason=f"{where}{row_error}", key=key)
    column: str
    if prompt is None or not prompt.strip():
        column = "prompt"
        reason = f"{where}, column prompt: is empty; every row needs a prompt"
    elif len(prompt) > contract.PROMPT_MAX_CHARS:
        column = "prompt"
        reason = (
            f"{where}, column prompt: {len(prompt)} characters is too long; expected at "
            f"most {contract.PROMPT_MAX_CHARS} characters"
        )
    else:
        column = next(name for name, problem in problems.items() if problem)
        value = batch.get_column(column)[position]
        if isinstance(value, bytes):
            value = f"<{len(value)} bytes>"
        elif isinstance(value, float) and math.isnan(value):
            value = "NaN"
        expected = _expected(column, defaults)
        column = names.get(column, column)  # as the input spells it
        reason = f"{where}, column {column}: {_show(value)} is not allowed; expected {expected}"
    return Rejection(index=index, reason=reason, column=column, key=key, prompt=prompt)


def iter_rows(
    reader: ManifestReader, defaults: Defaults
) -> Iterator[tuple[list[Row], list[Rejection]]]:
    """Validated rows and rejections, batch by batch, in manifest order."""
    for batch in reader.batches():
        yield validate_batch(
            batch, source_name=reader.name, defaults=defaults, names=reader.shown_as
        )
