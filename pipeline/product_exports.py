"""Product exports read as the shop writes them: Shopify, WooCommerce, or any PIM by mapping.

A shop's product export is not a manifest: one product spans several lines. Shopify writes
the product's fields (Title, Body (HTML), Vendor, ...) on its first line only, then one line
per further variant (Handle and the variant columns) and one per further image (Handle and
Image Src); WooCommerce writes a ``variable`` product and then its ``variation`` lines,
each pointing at it in ``Parent`` (``id:44`` or the parent's SKU). Running such a file as
it is rejects every variant line ("Title is empty") and sends placeholders such as
Shopify's ``Default Title``.

``read_export`` turns the file into one table with every input line kept, in order:

- product fields are filled down onto the variant lines of their product (Shopify: within
  the Handle; WooCommerce: from the parent; a mapping: within its group column);
- ``--per product`` makes one image per product (its first line), ``--per variant`` one per
  variant (Shopify: each variant line; WooCommerce: each variation, simple products as
  they are);
- the id is the Handle (plus the variant's option values, per variant) or the SKU;
- with a reference column (``--reference-column "Image Src"`` / ``Images``) the reference
  is the product's first image (the variant's own image first, per variant);
- placeholders (Shopify's ``Title`` / ``Default Title`` option of a product without
  options) are treated as empty cells;
- a line that makes no image of its own (an image-only line, a variant per product, a
  variable parent per variant) is marked with what became of it: the output manifest
  lists it as ``merged`` with that reason, so every input line is accounted for.

Exports are read whole (grouping needs every line of a product); the lines are then served
in batches like any manifest, a product's lines in one batch (``ManifestReader._cut``: a
budget keeps a product's variants together). The derived columns start with ``__`` and
never reach the output, which keeps every input column as the shop wrote it: filled-down
cells, the placeholder and unescaped line breaks are for prompts and ids only
(``_keep_cells``). A Handle that comes back after other products' lines is rejected, line
by line, rather than merged into the first product of that name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import polars as pl
import pyarrow as pa

from pipeline.errors import ConfigError, ManifestError
from pipeline.export_spec import ExportMapping, ExportSpec
from pipeline.manifest import (
    ERROR_COLUMN,
    MERGED_COLUMN,
    ArrowStream,
    ManifestReader,
    _LineFinder,
    is_derived,
)

#: The id and reference the pipeline reads are taken from these derived columns.
ID_COLUMN: Final = "__catalog_id"
REFERENCE_COLUMN: Final = "__catalog_reference"
#: Per line, the position (0-based) of its product's first line: what a budget keeps whole.
PRODUCT_COLUMN: Final = "__catalog_product"
#: Prefix of the columns holding an input column's cells as read (``_keep_cells``).
CELL_PREFIX: Final = "__catalog_cell_"

#: Shopify: the columns a variant line fills in (everything else is the product's and is
#: filled down onto its variants). Market columns ("Price / United States") are per variant.
_SHOPIFY_VARIANT_COLUMNS: Final = frozenset(
    (
        "Option1 Value",
        "Option2 Value",
        "Option3 Value",
        "Image Src",
        "Image Position",
        "Image Alt Text",
        "Cost per item",
        "Handle",
    )
)
_SHOPIFY_VARIANT_PREFIXES: Final = (
    "Variant ",
    "Price / ",
    "Compare At Price / ",
    "Included / ",
    "Unit Price ",
)
#: Cells that say a variant line is a variant (not an image-only line).
_SHOPIFY_VARIANT_MARKERS: Final = (
    "Option1 Value",
    "Option2 Value",
    "Option3 Value",
    "Variant SKU",
    "Variant Price",
    "Variant Grams",
    "Variant Barcode",
    "Variant Inventory Qty",
)
#: Shopify's placeholder option of a product without options (``Title`` / ``Default Title``).
_SHOPIFY_PLACEHOLDER_NAME: Final = "Title"
SHOPIFY_PLACEHOLDER_VALUE: Final = "Default Title"
_SHOPIFY_REQUIRED: Final = ("Handle",)

#: WooCommerce: columns a variation never takes from its parent (nor its attribute values:
#: an empty one means "any").
_WOO_OWN_COLUMNS: Final = frozenset(
    ("ID", "Type", "SKU", "Parent", "Position", "GTIN, UPC, EAN, or ISBN", "Grouped products")
)
_WOO_TYPES: Final = ("simple", "variable", "variation", "grouped", "external")
_WOO_REQUIRED: Final = ("Type",)
#: Columns whose line breaks WooCommerce's exporter escapes (``_woo_line_breaks``).
_WOO_DESCRIPTIONS: Final = ("Description", "Short description")
_WOO_ATTRIBUTE_VALUES = re.compile(r"^Attribute (\d+) value\(s\)$")

_SLUG_UNSAFE = re.compile(r"[^a-z0-9]+")


def open_manifest(
    source: str | Path | pl.DataFrame | pa.Table | ArrowStream,
    *,
    export: ExportSpec | None = None,
    reference_column: str | None = None,
    batch_size: int = 10_000,
    limit: int | None = None,
    offset: int = 0,
    require_prompt: bool = True,
) -> ManifestReader:
    """The reader a run, a validation or a dry run uses: a plain manifest, or an export.

    ``reference_column`` names the column whose cell is each row's reference image
    (``input_image`` otherwise); the column keeps its own name in the output manifest.
    """
    if export is None:
        roles = {"input_image": reference_column} if reference_column else None
        if reference_column == "input_image":
            roles = None
        return ManifestReader(
            source,
            batch_size=batch_size,
            limit=limit,
            offset=offset,
            require_prompt=require_prompt,
            roles=roles,
        )
    return read_export(
        source,
        export,
        reference_column=reference_column,
        batch_size=batch_size,
        limit=limit,
        offset=offset,
        require_prompt=require_prompt,
    )


def read_export(
    source: str | Path | pl.DataFrame | pa.Table | ArrowStream,
    export: ExportSpec,
    *,
    reference_column: str | None = None,
    batch_size: int = 10_000,
    limit: int | None = None,
    offset: int = 0,
    require_prompt: bool = False,
) -> ManifestReader:
    """Read a whole export, shape it by ``export``, and serve it as a manifest reader."""
    raw = ManifestReader(source, batch_size=50_000, require_prompt=False)
    renames = {column: name for column, name in raw.input_columns}
    parts = [batch.rename(renames) for batch in raw.batches()]
    frame = pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()
    frame = frame.drop("__index", strict=False)
    as_read = frame
    if export.mapping is not None and reference_column is None:
        reference_column = export.mapping.reference_column
    if export.layout == "shopify":
        shaped = _shopify(frame, raw.name, export.per, reference_column, _lines_of(raw))
    elif export.layout == "woocommerce":
        shaped = _woocommerce(frame, raw.name, export.per, reference_column)
    else:
        assert export.mapping is not None
        shaped = _mapped(frame, raw.name, export.per, export.mapping, reference_column)
    shaped, cells = _keep_cells(as_read, shaped)
    roles = {"id": ID_COLUMN}
    if reference_column is not None:
        roles["input_image"] = REFERENCE_COLUMN
    reader = ManifestReader(
        shaped,
        batch_size=batch_size,
        limit=limit,
        offset=offset,
        require_prompt=require_prompt,
        roles=roles,
        name=raw.name,
        base_dir=raw.base_dir,
    )
    # The output manifest writes each input column from the cells as the shop wrote them.
    reader.input_columns = [
        (cells.get(column, column), name) for column, name in reader.input_columns
    ]
    # A product's lines go together under a budget (``pipeline/run.py``): per input line,
    # the position of its product's first line.
    products = shaped.get_column(PRODUCT_COLUMN).to_list()
    reader.products = products
    # Messages name the export's own columns, not the derived ones.
    reader.shown_as = {"id": _id_source(export)}
    if reference_column is not None:
        reader.shown_as["input_image"] = reference_column
    return reader


def _lines_of(raw: ManifestReader) -> Callable[[int], int | None]:
    """The physical line a data row (0-based) starts on in a CSV export, for messages
    about a line that is not used (a Shopify Body (HTML) spans lines, so row + 1 is not
    always the line); None for a table or Parquet file."""
    fmt = raw._csv
    if raw.path is None or fmt is None:
        return lambda position: None
    finder = _LineFinder(raw.path, fmt.encoding, fmt.delimiter)
    return lambda position: finder.line_of(position + 2)


def _keep_cells(as_read: pl.DataFrame, shaped: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, str]]:
    """The shaped export with a copy of each input column whose cells shaping changed.

    Shaping fills product fields down onto variant lines, reads Shopify's ``Default Title``
    placeholder as no option and WooCommerce's escaped ``\\n`` as line breaks: that is
    what prompts and ids are built from, under the columns' own names, so templates and the
    prompts of earlier runs stay as they were. The output manifest, though, promises every
    column "as it came", and a merchandiser joins it back to the shop (and ``klein-batch
    export`` writes Shopify's ``Default Title`` back from it): the cells as read are kept
    in ``__catalog_cell_<n>`` columns, and only for the columns that changed, and returns
    which input column is written from which.
    """
    cells: dict[str, str] = {}
    added: list[pl.Series] = []
    for number, column in enumerate(as_read.columns):
        if is_derived(column) or column not in shaped.columns:
            continue
        before, after = as_read.get_column(column), shaped.get_column(column)
        if before.dtype == after.dtype and bool(before.eq_missing(after).all()):
            continue
        cells[column] = f"{CELL_PREFIX}{number}"
        added.append(before.alias(cells[column]))
    return (shaped.with_columns(added) if added else shaped), cells


def _id_source(export: ExportSpec) -> str:
    if export.layout == "shopify":
        return "Handle"
    if export.layout == "woocommerce":
        return "SKU"
    assert export.mapping is not None
    return export.mapping.id_column or export.mapping.group_column or "id"


# --- helpers ------------------------------------------------------------------------------


def _prepare(
    frame: pl.DataFrame,
    name: str,
    layout: str,
    required: Sequence[str],
    reference_column: str | None,
) -> tuple[pl.DataFrame, list[str]]:
    """The export checked for its layout's columns, blank cells as nulls, and its input
    columns (the derived ones left out)."""
    _need(frame, required, name, layout)
    if reference_column is not None and reference_column not in frame.columns:
        raise ConfigError(f"--reference-column {reference_column!r}: {name} has no such column")
    inputs = [c for c in frame.columns if not is_derived(c)]
    return _blank_to_null(frame, inputs), inputs


def _need(frame: pl.DataFrame, columns: Sequence[str], name: str, layout: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        shown = ", ".join(repr(c) for c in frame.columns if not is_derived(c))
        raise ManifestError(
            f"{name}: has no column {missing[0]!r}, so it is not a {layout} product export; "
            f"found {shown[:400]}"
        )


def _cell(column: str) -> pl.Expr:
    """A cell as text, null when empty or blank."""
    text = pl.col(column).cast(pl.String).str.strip_chars()
    return pl.when(text != "").then(text)


def _blank_to_null(frame: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
    text = [c for c in columns if frame.schema[c] == pl.String]
    return frame.with_columns(
        pl.when(pl.col(c).str.strip_chars() != "").then(pl.col(c)).alias(c) for c in text
    )


def _slug(value: str) -> str:
    return _SLUG_UNSAFE.sub("-", value.lower()).strip("-") or "x"


def _keep_variants_apart(ids: list[str | None], options: Mapping[int, tuple[str, ...]]) -> None:
    """Give variants whose option values differ but slug alike an id each.

    A variant's id is its product's plus its option values made safe for file names
    (lower case, one ``-`` for any run of other characters), so 大 and 小, ``S/M`` and
    ``S M``, or ``Café`` and ``CAFÉ`` came out as one id, and every variant but the first
    was rejected as a repeat of it, with a message about the Handle that the user could not
    act on. Only ids shared by different option values change (a digest of the values is
    appended), so every other variant keeps the id earlier runs gave it; the same values
    twice are still one id, and still a repeat. ``options`` maps the position of each
    variant's id to its option values.
    """
    seen: dict[str, set[tuple[str, ...]]] = {}
    for i, values in options.items():
        key = ids[i]
        if key is not None:
            seen.setdefault(key, set()).add(values)
    for i, values in options.items():
        key = ids[i]
        if key is not None and len(seen[key]) > 1:
            digest = hashlib.sha256("\x1f".join(values).encode()).hexdigest()[:8]
            ids[i] = f"{key}-{digest}"


def _first_url(cell: str | None) -> str | None:
    """The first image of a comma-separated list (WooCommerce's ``Images``)."""
    if not cell:
        return None
    for part in cell.split(","):
        if part.strip():
            return part.strip()
    return None


def _rows_text(rows: Sequence[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    noun = "row" if len(rows) == 1 else "rows"
    return f"{noun} {shown}{more}"


def _finish(
    frame: pl.DataFrame,
    ids: list[str | None],
    merged: list[str | None],
    errors: list[str | None],
    references: list[str | None] | None,
    products: list[int],
) -> pl.DataFrame:
    previous = (
        frame.get_column(ERROR_COLUMN).to_list()
        if ERROR_COLUMN in frame.columns
        else [None] * frame.height
    )
    columns = [
        pl.Series(ID_COLUMN, ids, dtype=pl.String),
        pl.Series(MERGED_COLUMN, merged, dtype=pl.String),
        pl.Series(
            ERROR_COLUMN,
            [p if p is not None else e for p, e in zip(previous, errors, strict=True)],
            dtype=pl.String,
        ),
    ]
    if references is not None:
        columns.append(pl.Series(REFERENCE_COLUMN, references, dtype=pl.String))
    columns.append(pl.Series(PRODUCT_COLUMN, products, dtype=pl.Int64))
    return frame.with_columns(columns)


# --- Shopify --------------------------------------------------------------------------------


def shopify_variant_column(column: str) -> bool:
    """Whether a Shopify export column is a variant's own (else the product's, written on
    its first line only)."""
    return (
        column in _SHOPIFY_VARIANT_COLUMNS
        or column.startswith(_SHOPIFY_VARIANT_PREFIXES)
        or ("variant.metafields" in column)
    )


def _shopify(
    frame: pl.DataFrame,
    name: str,
    per: str,
    reference_column: str | None,
    line_of: Callable[[int], int | None] = lambda position: None,
) -> pl.DataFrame:
    frame, inputs = _prepare(frame, name, "Shopify", _SHOPIFY_REQUIRED, reference_column)
    # The placeholder option of a product without options is no option at all.
    for number in (1, 2, 3):
        option, value = f"Option{number} Name", f"Option{number} Value"
        if value in frame.columns:
            placeholder = pl.col(value) == SHOPIFY_PLACEHOLDER_VALUE
            frame = frame.with_columns(
                pl.when(placeholder).then(None).otherwise(pl.col(value)).alias(value)
            )
            if option in frame.columns:
                frame = frame.with_columns(
                    pl.when(pl.col(option) == _SHOPIFY_PLACEHOLDER_NAME)
                    .then(None)
                    .otherwise(pl.col(option))
                    .alias(option)
                )
    handle = _cell("Handle")
    frame = frame.with_columns(handle.alias("__catalog_handle"))
    product_fields = [c for c in inputs if not shopify_variant_column(c)]
    frame = frame.with_columns(
        pl.col(c).forward_fill().over("__catalog_handle") for c in product_fields
    )
    markers = [c for c in _SHOPIFY_VARIANT_MARKERS if c in frame.columns]
    lines = frame.select(
        "__catalog_handle",
        (pl.int_range(pl.len()).over("__catalog_handle") == 0).alias("first"),
        (
            pl.any_horizontal([pl.col(c).is_not_null() for c in markers])
            if markers
            else pl.lit(False)
        ).alias("variant"),
        *(
            pl.col(c)
            for c in ("Image Src", "Image Position", "Variant Image")
            if c in frame.columns
        ),
        *(pl.col(f"Option{n} Value") for n in (1, 2, 3) if f"Option{n} Value" in frame.columns),
    ).to_dicts()
    # A product's lines come together. A Handle that comes back after another product's
    # lines (two exports pasted one after the other) is a second product under the same
    # name: its lines are rejected, naming the first block, rather than merged into the
    # first product (per product) or made as extra variants (per variant).
    blocks: dict[str, tuple[int, int]] = {}
    repeats: dict[int, str] = {}
    previous: str | None = None
    for position, line in enumerate(lines):
        key = line["__catalog_handle"]
        if key is None:
            continue  # rejected for its empty Handle; it does not end a product's lines
        if key in blocks and (key != previous or position - 1 in repeats):
            start, end = blocks[key]
            where = line_of(position)
            repeats[position] = (
                f"{f' (line {where})' if where else ''}, column Handle: {key!r} comes back "
                f"after other products' lines; its product is on rows {start + 1}-{end + 1} "
                "and a product's lines must come together, so this line is not used (give "
                "it its own Handle if it is another product, or move it up to its product)"
            )
        else:
            blocks[key] = (blocks.get(key, (position, position))[0], position)
        previous = key
    # Each product's first image: the lowest Image Position, else the first Image Src.
    first_image: dict[str, tuple[float, int, str]] = {}
    first_row: dict[str, int] = {}
    variant_rows: dict[str, list[int]] = {}
    for position, line in enumerate(lines):
        key = line["__catalog_handle"]
        if key is None or position in repeats:
            continue
        if line["first"]:
            first_row[key] = position
        if line["first"] or line["variant"]:
            variant_rows.setdefault(key, []).append(position + 1)
        src = line.get("Image Src")
        if src:
            try:
                rank = float(line.get("Image Position") or "inf")
            except ValueError:
                rank = float("inf")
            candidate = (rank, position, src)
            if key not in first_image or candidate < first_image[key]:
                first_image[key] = candidate
    ids: list[str | None] = []
    options: dict[int, tuple[str, ...]] = {}
    merged: list[str | None] = []
    errors: list[str | None] = []
    references: list[str | None] = []
    products: list[int] = []
    for position, line in enumerate(lines):
        key = line["__catalog_handle"]
        product_image = first_image[key][2] if key in first_image else None
        products.append(position if key is None else first_row.get(key, position))
        if position in repeats:
            ids.append(None)
            merged.append(None)
            references.append(None)
            errors.append(repeats[position])
            continue
        if key is None:
            ids.append(None)
            merged.append(None)
            references.append(None)
            errors.append(
                ", column Handle: is empty; every line of a Shopify product export names its "
                "product's Handle"
            )
            continue
        errors.append(None)
        head = first_row[key] + 1
        values = [line.get(f"Option{n} Value") for n in (1, 2, 3)]
        values = [v for v in values if v]
        is_variant = line["first"] or line["variant"]
        if per == "product":
            ids.append(key)
            references.append(product_image)
            if line["first"]:
                merged.append(None)
            elif is_variant:
                merged.append(
                    f"{name} row {position + 1}: variant {' / '.join(values) or '(no options)'}"
                    f" of {key!r}, merged into its product (row {head}): --per product makes "
                    "one image per product"
                )
            else:
                merged.append(_shopify_other_line(name, position, key, line, f"row {head}"))
            continue
        # per variant
        ids.append(key + "".join("." + _slug(v) for v in values))
        own = line.get("Variant Image")
        references.append(own or product_image)
        if is_variant:
            options[position] = tuple(values)
            merged.append(None)
        else:
            merged.append(
                _shopify_other_line(name, position, key, line, _rows_text(variant_rows[key]))
            )
    frame = frame.drop("__catalog_handle")
    if reference_column is not None and reference_column not in ("Image Src", "Variant Image"):
        references = [
            None if v is None else str(v) for v in frame.get_column(reference_column).to_list()
        ]
    _keep_variants_apart(ids, options)
    return _finish(frame, ids, merged, errors, references if reference_column else None, products)


def _shopify_other_line(
    name: str, position: int, key: str, line: Mapping[str, object], made_on: str
) -> str:
    if line.get("Image Src"):
        number = line.get("Image Position") or "?"
        return (
            f"{name} row {position + 1}: image {number} of {key!r}, an image line with no "
            f"product or variant of its own; the product's images are made on {made_on}"
        )
    return (
        f"{name} row {position + 1}: a line of {key!r} with neither variant nor image "
        f"cells; nothing to make (the product's images are made on {made_on})"
    )


# --- WooCommerce ----------------------------------------------------------------------------


def _woo_type(cell: str | None) -> str | None:
    if not cell:
        return None
    tokens = [t.strip().lower() for t in cell.split(",")]
    return next((t for t in tokens if t in _WOO_TYPES), None)


def _woocommerce(
    frame: pl.DataFrame, name: str, per: str, reference_column: str | None
) -> pl.DataFrame:
    if "Handle" in frame.columns and not {"ID", "Name"} & set(frame.columns):
        # Both exports have a Type column; read as WooCommerce, a Shopify export got one
        # "not a WooCommerce product type" per line instead of this.
        raise ManifestError(
            f"{name}: has a Handle column and neither ID nor Name, so it is a Shopify "
            "product export, not a WooCommerce one; use --catalog shopify"
        )
    frame, inputs = _prepare(frame, name, "WooCommerce", _WOO_REQUIRED, reference_column)
    frame = frame.with_columns(
        _woo_line_breaks(column)
        for column in _WOO_DESCRIPTIONS
        if column in frame.columns and frame.schema[column] == pl.String
    )
    records = frame.select(inputs).to_dicts()
    by_id: dict[str, int] = {}
    by_sku: dict[str, int] = {}
    for position, record in enumerate(records):
        if record.get("ID"):
            by_id.setdefault(str(record["ID"]).strip(), position)
        if record.get("SKU"):
            by_sku.setdefault(str(record["SKU"]).strip(), position)
    parents: list[int | None] = []
    errors: list[str | None] = []
    children: dict[int, list[int]] = {}
    for position, record in enumerate(records):
        kind = _woo_type(record.get("Type"))
        parent: int | None = None
        error: str | None = None
        if kind is None:
            error = (
                f", column Type: {record.get('Type')!r} is not a WooCommerce product type; "
                f"expected {', '.join(_WOO_TYPES)}"
            )
        elif kind == "variation":
            link = str(record.get("Parent") or "").strip()
            if link.lower().startswith("id:"):
                parent = by_id.get(link[3:].strip())
            elif link:
                parent = by_sku.get(link)
            if parent is None:
                error = (
                    f", column Parent: {link!r} names no product in this export; a variation "
                    "needs its variable product (id:NN or its SKU)"
                    if link
                    else ", column Parent: is empty; a variation needs its variable product "
                    "(id:NN or its SKU)"
                )
            else:
                children.setdefault(parent, []).append(position + 1)
        parents.append(parent)
        errors.append(error)
    # Fill down: a variation's empty cells take its parent's (Description, Categories, ...).
    filled: list[dict[str, object]] = []
    for record, parent in zip(records, parents, strict=True):
        if parent is None:
            filled.append(record)
            continue
        source = records[parent]
        filled.append(
            {
                column: (
                    value
                    if value is not None
                    or column in _WOO_OWN_COLUMNS
                    or _WOO_ATTRIBUTE_VALUES.match(column)
                    else source.get(column)
                )
                for column, value in record.items()
            }
        )
    ids: list[str | None] = []
    options: dict[int, tuple[str, ...]] = {}
    merged: list[str | None] = []
    references: list[str | None] = []
    for position, (record, parent) in enumerate(zip(filled, parents, strict=True)):
        kind = _woo_type(record.get("Type"))  # type: ignore[arg-type]
        sku = str(record.get("SKU") or "").strip()
        own_id = str(record.get("ID") or "").strip()
        if errors[position] is not None:
            ids.append(sku or own_id or None)
            merged.append(None)
            references.append(None)
            continue
        images = record.get("Images")
        if reference_column is not None and reference_column != "Images":
            images = record.get(reference_column)
        reference = _first_url(str(images)) if images else None
        if per == "product" and parent is not None:
            head = records[parent]
            ids.append(
                str(head.get("SKU") or "").strip()
                or (f"id-{head.get('ID')}" if head.get("ID") else None)
            )
            references.append(reference)
            merged.append(
                f"{name} row {position + 1}: variation {record.get('Name') or sku or own_id!r} "
                f"merged into its variable product (row {parent + 1}): --per product makes one "
                "image per product"
            )
            continue
        if per == "variant" and kind == "variable" and position in children:
            ids.append(sku or (f"id-{own_id}" if own_id else None))
            references.append(reference)
            merged.append(
                f"{name} row {position + 1}: variable product {record.get('Name') or sku!r}: "
                f"--per variant makes one image per variation ({_rows_text(children[position])})"
            )
            continue
        if sku:
            ids.append(sku)
        elif parent is not None:
            head = records[parent]
            base = str(head.get("SKU") or "").strip() or f"id-{head.get('ID')}"
            values = _woo_values(record)
            ids.append(base + "".join("." + _slug(v) for v in values) or f"id-{own_id}")
            options[position] = tuple(values)
        else:
            ids.append(f"id-{own_id}" if own_id else None)
        references.append(reference)
        merged.append(None)
    out = (
        pl.DataFrame(filled, schema=frame.select(inputs).schema) if filled else frame.select(inputs)
    )
    extra = [c for c in frame.columns if is_derived(c)]
    if extra:
        out = out.with_columns(frame.select(extra))
    _keep_variants_apart(ids, options)
    products = [position if parent is None else parent for position, parent in enumerate(parents)]
    return _finish(out, ids, merged, errors, references if reference_column else None, products)


def _woo_line_breaks(column: str) -> pl.Expr:
    """WooCommerce's exporter writes a description's line breaks as the two characters
    ``\\n`` (and a literal backslash-n as ``\\\\n``); its importer turns them back
    (``WC_Product_CSV_Importer::parse_description_field``), and so does this, so that a
    prompt built from ``{Description|text}`` gets paragraphs, not a stray ``\\n``."""
    return (
        pl.col(column)
        .str.replace_all("\\\\n", "\x00", literal=True)
        .str.replace_all("\\n", "\n", literal=True)
        .str.replace_all("\x00", "\\n", literal=True)
    )


def _woo_values(record: Mapping[str, object]) -> list[str]:
    values: list[tuple[int, str]] = []
    for column, value in record.items():
        match = _WOO_ATTRIBUTE_VALUES.match(column)
        if match and value:
            values.append((int(match.group(1)), str(value)))
    return [value for _, value in sorted(values)]


# --- a mapping --------------------------------------------------------------------------------


def _mapped(
    frame: pl.DataFrame, name: str, per: str, mapping: ExportMapping, reference_column: str | None
) -> pl.DataFrame:
    named = [
        c
        for c in (mapping.id_column, mapping.group_column, *mapping.fill_down, reference_column)
        if c is not None
    ]
    for column in named:
        if column not in frame.columns:
            shown = ", ".join(repr(c) for c in frame.columns if not is_derived(c))
            raise ConfigError(
                f"[catalog] names column {column!r}, but {name} has no such column; "
                f"found {shown[:400]}"
            )
    inputs = [c for c in frame.columns if not is_derived(c)]
    frame = _blank_to_null(frame, inputs)
    group = mapping.group_column
    if group is not None:
        frame = frame.with_columns(pl.col(group).forward_fill().alias(group))
        fill = [pl.col(c).forward_fill().over(group) for c in mapping.fill_down if c != group]
    else:
        fill = [pl.col(c).forward_fill() for c in mapping.fill_down]
    if fill:
        frame = frame.with_columns(fill)
    groups = frame.get_column(group).cast(pl.String).to_list() if group else [None] * frame.height
    own_ids = (
        frame.get_column(mapping.id_column).cast(pl.String).to_list()
        if mapping.id_column
        else [None] * frame.height
    )
    refs = (
        frame.get_column(reference_column).cast(pl.String).to_list()
        if reference_column
        else [None] * frame.height
    )
    first_of: dict[str, int] = {}
    ids: list[str | None] = []
    merged: list[str | None] = []
    errors: list[str | None] = [None] * frame.height
    references: list[str | None] = []
    products: list[int] = []
    for position, (key, own, ref) in enumerate(zip(groups, own_ids, refs, strict=True)):
        first = first_of.setdefault(key, position) if key is not None else position
        products.append(first)
        if per == "product" and group is not None:
            head = first
            ids.append((own_ids[head] or key) if mapping.id_column else key)
            references.append(refs[head] if ref is None else ref)
            merged.append(
                None
                if position == head
                else f"{name} row {position + 1}: a line of product {key!r}, merged into its "
                f"first line (row {head + 1}): --per product makes one image per product"
            )
            continue
        ids.append(own if own else (f"{key}.{position - first + 1}" if key else None))
        references.append(ref if ref is not None else refs[first])
        merged.append(None)
    return _finish(frame, ids, merged, errors, references if reference_column else None, products)
