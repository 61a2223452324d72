"""Images back to the shop: the import file that puts a run's images on the products.

``klein-batch export DEST --catalog shopify --image-base-url URL`` reads DEST's
``manifest.parquet`` (every input column is kept there, the shop's ids included) and writes
what the platform's own product import takes, each image pointing at
``URL/images/<key>.jpg`` (where DEST's images are served from: a CDN, a public bucket):

- Shopify: ``Handle, Image Src, Image Position, Image Alt Text`` (plus the option values,
  ``Variant SKU`` and ``Variant Image`` of a per-variant run, so each variant shows its own
  image): imported with "Overwrite products with matching handles", the images are added
  to the products the export came from;
- WooCommerce: ``ID, SKU, Images`` (a comma-separated list; a variation takes one image),
  imported with "Update existing products";
- ``csv`` / ``json`` for any other system: one record per image with its row, key, URL,
  alt text, size and digest, and the columns asked for with ``--columns``.

Alt text is the prompt, or ``--alt-template`` filled from the row (the same holes as a
prompt template: ``{Title} in {style?}``). Only images that succeeded are exported.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final
from urllib.parse import quote

import polars as pl

from pipeline.contract import RowStatus
from pipeline.errors import ConfigError
from pipeline.output_manifest import FIXED_COLUMNS
from pipeline.product_exports import SHOPIFY_PLACEHOLDER_VALUE, shopify_variant_column
from pipeline.templates import PromptTemplate

#: ``--catalog`` values of ``klein-batch export``.
EXPORT_TARGETS: Final = ("shopify", "woocommerce", "csv", "json")
#: Shopify refuses alt text over 512 characters.
_ALT_MAX: Final = 512
_OPTION_VALUES: Final = ("Option1 Value", "Option2 Value", "Option3 Value")


@dataclass(frozen=True, slots=True)
class ShopExport:
    """An import file's bytes, its suggested name and how many images it carries."""

    data: bytes
    name: str
    content_type: str
    images: int


def build_export(
    manifest: pl.DataFrame,
    target: str,
    *,
    image_base_url: str | None,
    alt_template: str | None = None,
    columns: Sequence[str] = (),
) -> ShopExport:
    """The import file for ``target`` from an output manifest (pure: no I/O)."""
    if target not in EXPORT_TARGETS:
        raise ConfigError(
            f"--catalog {target!r} is not allowed for export; expected one of "
            f"{', '.join(EXPORT_TARGETS)}"
        )
    if target in ("shopify", "woocommerce") and not image_base_url:
        raise ConfigError(
            f"export --catalog {target} needs --image-base-url URL: the shop downloads each "
            "image from URL/images/<key>.jpg, so DEST must be served there (a CDN, a public "
            "bucket)"
        )
    if image_base_url and not image_base_url.startswith(("https://", "http://")):
        raise ConfigError(
            f"--image-base-url {image_base_url!r} is not allowed; expected an http(s):// URL "
            "the shop can download from"
        )
    missing = [c for c in columns if c not in manifest.columns]
    if missing:
        raise ConfigError(
            f"--columns names {missing[0]!r}, which manifest.parquet does not have; columns: "
            + ", ".join(manifest.columns)
        )
    succeeded = (pl.col("status") == RowStatus.SUCCEEDED) & pl.col("output_uri").is_not_null()
    done = manifest.filter(succeeded).sort("row", maintain_order=True)
    urls = [_image_url(uri, image_base_url) for uri in done["output_uri"].to_list()]
    alts = _alt_texts(_product_view(manifest).filter(succeeded), alt_template)
    if target == "shopify":
        return _shopify(done, urls, alts)
    if target == "woocommerce":
        return _woocommerce(done, urls)
    records: list[dict[str, object]] = []
    for position, row in enumerate(done.iter_rows(named=True)):
        record: dict[str, object] = {"row": row["row"], "key": row["key"]}
        if "variation" in done.columns:
            record["variation"] = row["variation"]
        record.update(
            image_url=urls[position],
            alt_text=alts[position],
            width=row["width"],
            height=row["height"],
            format=row["format"],
            sha256=row["sha256"],
        )
        record.update({column: row[column] for column in columns})
        records.append(record)
    if target == "json":
        text = json.dumps(records, indent=2, ensure_ascii=False, default=str) + "\n"
        return ShopExport(text.encode("utf-8"), "images.json", "application/json", len(records))
    header = list(records[0]) if records else ["row", "key", "image_url", "alt_text"]
    return ShopExport(_csv(header, records), "images.csv", "text/csv", len(records))


def _image_url(output_uri: str, base: str | None) -> str:
    name = PurePosixPath(output_uri).name
    if not base:
        return output_uri
    return f"{base.rstrip('/')}/images/{quote(name)}"


def _alt_texts(done: pl.DataFrame, alt_template: str | None) -> list[str]:
    prompts = [str(p or "") for p in done["prompt"].to_list()]
    if alt_template is None or done.height == 0:
        return [p[:_ALT_MAX] for p in prompts]
    template = PromptTemplate.parse(alt_template, source="--alt-template")
    template.check_columns(done.columns, (), "manifest.parquet")
    filled, _ = template.fill(done, "manifest.parquet")
    # A row whose required hole is empty gets its prompt rather than no alt text.
    return [
        (text if text else prompt)[:_ALT_MAX]
        for text, prompt in zip(filled.to_list(), prompts, strict=True)
    ]


def _product_view(manifest: pl.DataFrame) -> pl.DataFrame:
    """The manifest as an alt text template reads it, sorted by row.

    ``manifest.parquet`` keeps a Shopify export's cells as the shop wrote them: Title,
    Vendor, Tags... on a product's first line only, ``Default Title`` as the option of a
    product without options. A template's ``{Title}`` means the product's title on every
    variant's image, so here (as when the prompts were built) product fields are filled
    down within the Handle and the placeholder option counts as empty.
    """
    ordered = manifest.sort("row", maintain_order=True)
    if "Handle" not in ordered.columns:
        return ordered
    own = {*FIXED_COLUMNS, "variation"}
    fill = [
        c
        for c in ordered.columns
        if c not in own and c != "Handle" and not shopify_variant_column(c)
    ]
    ordered = ordered.with_columns(_filled_down(c, ordered.schema[c]) for c in fill)
    return ordered.with_columns(
        pl.when(pl.col(c) == SHOPIFY_PLACEHOLDER_VALUE).then(None).otherwise(pl.col(c)).alias(c)
        for c in _OPTION_VALUES
        if c in ordered.columns and ordered.schema[c] == pl.String
    )


def _filled_down(column: str, dtype: pl.DataType) -> pl.Expr:
    """``column`` filled down within the Handle; an empty cell (as the CSV had it) is no
    value."""
    cell = pl.col(column)
    if dtype == pl.String:
        cell = pl.when(cell.str.strip_chars() != "").then(cell)
    return cell.forward_fill().over("Handle").alias(column)


def _need(done: pl.DataFrame, names: Sequence[str], target: str, catalog: str) -> None:
    if not any(name in done.columns for name in names):
        raise ConfigError(
            f"export --catalog {target}: manifest.parquet has no {' or '.join(names)} column; "
            f"export a run of the shop's own product export (run --catalog {catalog})"
        )


def _shopify(done: pl.DataFrame, urls: list[str], alts: list[str]) -> ShopExport:
    _need(done, ("Handle",), "shopify", "shopify")
    options = [c for c in _OPTION_VALUES if c in done.columns]
    rows = done.select("Handle", *options, *(["Variant SKU"] if "Variant SKU" in done else []))
    records = rows.to_dicts()
    # Per variant when one handle's images belong to different option values.
    per_variant = (
        bool(options)
        and (rows.group_by("Handle").agg(pl.struct(options).n_unique().alias("n"))["n"].max() or 0)
        > 1
    )
    header = ["Handle", "Image Src", "Image Position", "Image Alt Text"]
    if per_variant:
        header = ["Handle", *options, "Variant SKU", "Variant Image", *header[1:]]
    positions: dict[str, int] = {}
    seen_variants: set[tuple[object, ...]] = set()
    out: list[dict[str, object]] = []
    for record, url, alt in zip(records, urls, alts, strict=True):
        handle = record["Handle"]
        positions[handle] = positions.get(handle, 0) + 1
        line: dict[str, object] = {
            "Handle": handle,
            "Image Src": url,
            "Image Position": positions[handle],
            "Image Alt Text": alt,
        }
        if per_variant:
            variant = (handle, *(record[c] for c in options))
            first = variant not in seen_variants
            seen_variants.add(variant)
            for column in options:
                line[column] = record[column] if first else ""
            if first and options[0] == "Option1 Value" and not any(record[c] for c in options):
                # A product without options: Shopify's importer finds its one variant
                # by the placeholder (manifests of earlier versions held no cell here).
                line["Option1 Value"] = SHOPIFY_PLACEHOLDER_VALUE
            line["Variant SKU"] = record.get("Variant SKU") or "" if first else ""
            line["Variant Image"] = url if first else ""
        out.append(line)
    return ShopExport(_csv(header, out), "shopify-images.csv", "text/csv", len(out))


def _woocommerce(done: pl.DataFrame, urls: list[str]) -> ShopExport:
    _need(done, ("ID", "SKU"), "woocommerce", "woocommerce")
    keys = [c for c in ("ID", "SKU", "Type") if c in done.columns]
    records = done.select(keys).to_dicts()
    products: dict[tuple[object, ...], dict[str, object]] = {}
    images: dict[tuple[object, ...], list[str]] = {}
    for record, url in zip(records, urls, strict=True):
        ident = (record.get("ID"), record.get("SKU"))
        if ident not in products:
            products[ident] = {"ID": record.get("ID") or "", "SKU": record.get("SKU") or ""}
            images[ident] = []
        # A variation holds one image; a product a gallery (its first is the main image).
        variation = "variation" in str(record.get("Type") or "").lower()
        if not (variation and images[ident]):
            images[ident].append(url)
    out = [{**product, "Images": ", ".join(images[ident])} for ident, product in products.items()]
    count = sum(len(urls) for urls in images.values())
    return ShopExport(
        _csv(["ID", "SKU", "Images"], out), "woocommerce-images.csv", "text/csv", count
    )


def _csv(header: Sequence[str], records: Sequence[dict[str, object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return buffer.getvalue().encode("utf-8")
