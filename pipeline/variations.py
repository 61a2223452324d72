"""Variation matrices: every product row in every style, aspect ratio and seed.

A catalog team keeps one row per product and crosses it with a few axes, given on the
command line (``--vary style=studio,lifestyle --vary seed=1,2``) or as small CSVs
(``--variations styles.csv``, one variation per CSV row, its columns varying together).
All axes and CSVs are crossed: 2 styles x 3 aspect ratios x 2 seeds is 12 images per row.

An axis named like a request column (``aspect_ratio``, ``resolution``, ``seed``,
``safety_tolerance``, ``output_format``, ``input_image``...) sets that parameter; any other
axis is a value for the prompt template (``{style}``) and is recorded in the output manifest.

Identity. Variation ``v`` of data row ``p`` is planned as row index ``p * V + v`` (``V``
variations per row), so the ledger, resume and the output manifest keep one record per
(row, variation). Its key is ``<product key>--<slug>``, the slug being the variation's
values in axis-name order (``mug-red--studio.square_1_1.1``), made path-safe by
``keys.safe_key``: it depends on the product's id and the values only, never on the order
of flags, so reruns and resumes line up. Rows without an id are keyed by what they ask
for (prompt, size, seed...), which already differs between variations.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import polars as pl

from pipeline import contract
from pipeline.errors import ConfigError
from pipeline.keys import safe_key
from pipeline.manifest import (
    KNOWN_COLUMNS,
    Defaults,
    ManifestReader,
    known_column,
    lines_to_validate,
    validate_batch,
)
from pipeline.reserved import (
    ERROR_COLUMN,
    INDEX_COLUMN,
    MERGED_COLUMN,
    PRODUCT_INDEX_COLUMN,
    WORKING_COLUMNS,
)
from pipeline.rows import Rejection, Row
from pipeline.templates import PromptTemplate

#: Output-manifest column holding each row's variation slug.
VARIATION_COLUMN: Final = "variation"
#: Axis names that cannot vary: keys derive from ``id``; prompts vary through a template.
_FORBIDDEN: Final = {"id", "prompt", VARIATION_COLUMN, *WORKING_COLUMNS}
_SLUG_SAFE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_VARIATIONS: Final = 100_000


@dataclass(frozen=True, slots=True)
class Variation:
    """One combination of axis values; an empty value keeps the row's own cell."""

    number: int
    values: dict[str, str]
    slug: str


@dataclass(frozen=True, slots=True)
class _Factor:
    """Axes that vary together: one ``--vary`` flag, or one variations CSV."""

    source: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def _canonical(name: str, source: str) -> str:
    stripped = name.strip()
    column = known_column(stripped) or stripped
    if not column:
        raise ConfigError(f"{source}: an axis has no name; expected AXIS=VALUE,VALUE...")
    if column in _FORBIDDEN:
        hint = (
            "; vary prompts through --prompt-template, e.g. '{prompt}, {style}'"
            if column == "prompt"
            else ""
        )
        raise ConfigError(f"{source}: {column!r} cannot be a variation axis{hint}")
    return column


def _check_value(column: str, value: str, where: str) -> str:
    """Request parameters are checked here, once, instead of failing every row later."""
    if value == "":
        return value
    allowed: str | None = None
    named = contract.ASPECT_RATIO_ALIASES.get(value.strip().lower(), value)
    if column == "aspect_ratio" and named not in contract.ASPECT_RATIOS:
        allowed = "one of " + ", ".join(contract.ASPECT_RATIOS) + ", or its ratio (16:9)"
    elif column == "resolution" and value.lower() not in contract.RESOLUTIONS:
        allowed = "1k or 2k"
    elif column == "output_format" and value.lower() not in (*contract.OUTPUT_FORMATS, "jpg"):
        allowed = "png or jpeg"
    elif column in ("seed", "safety_tolerance"):
        low, high = (
            (contract.SEED_MIN, contract.SEED_MAX)
            if column == "seed"
            else (contract.SAFETY_MIN, contract.SAFETY_MAX)
        )
        if not (value.isdigit() and low <= int(value) <= high):
            allowed = f"a whole number from {low} to {high}"
    if allowed is not None:
        raise ConfigError(f"{where}: {value!r} is not allowed; expected {allowed}")
    # `16:9` and `widescreen_16_9` are one image: one name in its key and its slug.
    return named if column == "aspect_ratio" else value


def parse_vary(spec: str) -> _Factor:
    """``--vary AXIS=V1,V2,...``: one axis and its values."""
    source = f"--vary {spec}"
    name, sep, rest = spec.partition("=")
    if not sep:
        raise ConfigError(
            f"{source}: expected AXIS=VALUE,VALUE..., e.g. style=studio,lifestyle "
            "or aspect_ratio=square_1_1,portrait_2_3"
        )
    column = _canonical(name, source)
    values = [value.strip() for value in rest.split(",")]
    if any(not value for value in values):
        raise ConfigError(f"{source}: has an empty value; separate values with single commas")
    values = [_check_value(column, value, f"--vary {column}") for value in values]
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ConfigError(f"{source}: value {repeated[0]!r} is listed twice")
    return _Factor(source, (column,), tuple((value,) for value in values))


def read_variations_csv(path: str | Path) -> _Factor:
    """A CSV of variations: a header of axis names, one variation per row."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{name}: variations file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{name}: cannot read the variations file ({exc.__class__.__name__}); "
            "expected a UTF-8 CSV"
        ) from None
    lines = [row for row in csv.reader(text.splitlines()) if any(cell.strip() for cell in row)]
    if not lines:
        raise ConfigError(f"{name}: is empty; expected a header of axis names and a row each")
    columns = tuple(_canonical(cell, f"{name} header") for cell in lines[0])
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise ConfigError(f"{name}: column {repeated[0]!r} appears twice")
    rows: list[tuple[str, ...]] = []
    for number, cells in enumerate(lines[1:], start=1):
        if len(cells) != len(columns):
            raise ConfigError(
                f"{name} row {number}: has {len(cells)} fields but the header has "
                f"{len(columns)}; quote cells that contain commas"
            )
        values = tuple(
            _check_value(column, cell.strip(), f"{name} row {number}, column {column}")
            for column, cell in zip(columns, cells, strict=True)
        )
        if values in rows:
            raise ConfigError(f"{name} row {number}: repeats row {rows.index(values) + 1}")
        rows.append(values)
    if not rows:
        raise ConfigError(f"{name}: has a header but no rows; expected one row per variation")
    return _Factor(name, columns, tuple(rows))


def _slug(value: str) -> str:
    if value == "":
        return "default"
    if _SLUG_SAFE.fullmatch(value):
        return value
    cleaned = _SLUG_UNSAFE.sub("-", value).strip("-")[:24] or "v"
    return f"{cleaned}-{hashlib.sha256(value.encode()).hexdigest()[:6]}"


@dataclass(frozen=True, slots=True)
class VariationMatrix:
    """The cross product of every factor; ``variations`` in a fixed, documented order."""

    factors: tuple[_Factor, ...]
    variations: tuple[Variation, ...]

    @classmethod
    def build(
        cls, vary: Sequence[str] = (), files: Sequence[str | Path] = ()
    ) -> VariationMatrix | None:
        """The matrix of ``--vary`` specs and variation CSVs; None when there are none."""
        factors = [parse_vary(spec) for spec in vary]
        factors += [read_variations_csv(path) for path in files]
        if not factors:
            return None
        seen: dict[str, str] = {}
        for factor in factors:
            for column in factor.columns:
                if column in seen:
                    raise ConfigError(
                        f"axis {column!r} is given twice ({seen[column]} and {factor.source}); "
                        "give each axis once"
                    )
                seen[column] = factor.source
        total = math.prod(len(factor.rows) for factor in factors)
        if total > _MAX_VARIATIONS:
            raise ConfigError(
                f"the variation matrix makes {total:,} variations per row; at most "
                f"{_MAX_VARIATIONS:,} are allowed"
            )
        ordered = sorted(seen)
        variations: list[Variation] = []
        for number, combo in enumerate(itertools.product(*(f.rows for f in factors))):
            values: dict[str, str] = {}
            for factor, row in zip(factors, combo, strict=True):
                values.update(zip(factor.columns, row, strict=True))
            slug = ".".join(_slug(values[column]) for column in ordered)
            variations.append(Variation(number, values, slug))
        return cls(tuple(factors), tuple(variations))

    @property
    def axes(self) -> tuple[str, ...]:
        """Every axis name, in the order given."""
        return tuple(column for factor in self.factors for column in factor.columns)

    def describe(self) -> str:
        """``style 2 x aspect_ratio 3 x seed 2``: the shape, for the dry-run report."""
        return " x ".join(
            f"{'+'.join(factor.columns)} {len(factor.rows)}" for factor in self.factors
        )


@dataclass(slots=True)
class Catalog:
    """A manifest's rows turned into image requests through a template and a matrix.

    Stands between ``ManifestReader`` batches and the ledger: ``validate`` replaces
    ``manifest.validate_batch`` for a run, a validation or a dry run, and ``expand_output``
    gives the output manifest one row per (row, variation).
    """

    template: PromptTemplate | None = None
    matrix: VariationMatrix | None = None
    _plain: tuple[Variation, ...] = field(default=(Variation(0, {}, ""),), repr=False)

    @classmethod
    def build(
        cls,
        *,
        prompt_template: str | None = None,
        vary: Sequence[str] = (),
        variations: Sequence[str | Path] = (),
    ) -> Catalog | None:
        """A catalog from the CLI's or config's settings; None when nothing is asked for."""
        template = PromptTemplate.parse(prompt_template) if prompt_template is not None else None
        matrix = VariationMatrix.build(vary, variations)
        if template is None and matrix is None:
            return None
        return cls(template=template, matrix=matrix)

    @property
    def size(self) -> int:
        """Images per manifest row."""
        return len(self.matrix.variations) if self.matrix else 1

    @property
    def requires_prompt(self) -> bool:
        return self.template is None

    def _variations(self) -> tuple[Variation, ...]:
        return self.matrix.variations if self.matrix else self._plain

    def check(self, reader: ManifestReader) -> None:
        """Whole-manifest problems, before anything is sent."""
        if self.template is not None:
            axes = self.matrix.axes if self.matrix else ()
            self.template.check_columns(reader.columns, axes, reader.name)
        if self.matrix is not None and VARIATION_COLUMN in reader.columns:
            raise ConfigError(
                f"{reader.name}: has a column named {VARIATION_COLUMN!r}, which the output "
                "manifest of a variation matrix uses for each image's variation; rename it"
            )

    def label(self, index: int) -> str:
        """How messages name planned row ``index``: ``row 3, variation studio.1``."""
        if self.matrix is None:
            return f"row {index + 1}"
        product, number = divmod(index, self.size)
        return f"row {product + 1}, variation {self.matrix.variations[number].slug}"

    # --- validation ------------------------------------------------------------------------

    def validate(
        self,
        batch: pl.DataFrame,
        *,
        source_name: str,
        defaults: Defaults,
        names: Mapping[str, str] | None = None,
    ) -> tuple[list[Row], list[Rejection]]:
        """``validate_batch`` for every variation of every row of ``batch``.

        Product-major: a row's variations come together, in matrix order, so the run
        makes a product's whole matrix before it starts the next and a budget stops at
        whole products.
        """
        batch = lines_to_validate(batch)
        if batch.height == 0:
            return [], []
        size = self.size
        ids = _ids(batch) if self.matrix is not None else None
        all_rows: list[Row] = []
        all_rejections: list[Rejection] = []
        for variation in self._variations():
            frame = batch
            if variation.values:
                frame = frame.with_columns(
                    pl.lit(value, dtype=pl.String).alias(column)
                    for column, value in variation.values.items()
                    if value != ""
                )
            if ids is not None:
                frame = frame.with_columns(
                    pl.Series(
                        "id",
                        [f"{safe_key(raw)}--{variation.slug}" if raw else None for raw in ids],
                        dtype=pl.String,
                    )
                )
            rejections: list[Rejection] = []
            if self.template is not None:
                frame, rejections = self._fill(frame, variation, source_name)
            rows, invalid = validate_batch(
                frame, source_name=source_name, defaults=defaults, names=names
            )
            rejections += invalid
            if self.matrix is None:
                all_rows += rows
                all_rejections += rejections
                continue
            for row in rows:
                index = row.index * size + variation.number
                all_rows.append(dataclasses.replace(row, index=index, label=self.label(index)))
            for rejection in rejections:
                all_rejections.append(self._relabel(rejection, variation, source_name, size))
        if self.matrix is not None:
            all_rows.sort(key=lambda row: row.index)
        return all_rows, all_rejections

    def _fill(
        self, frame: pl.DataFrame, variation: Variation, source_name: str
    ) -> tuple[pl.DataFrame, list[Rejection]]:
        assert self.template is not None
        prompt, missing = self.template.fill(frame, source_name)
        frame = frame.with_columns(prompt.alias("prompt"))
        bad: pl.Series | None = None
        for mask in missing.values():
            bad = mask if bad is None else bad | mask
        lengths = prompt.str.len_chars()
        too_long = (lengths > contract.PROMPT_MAX_CHARS).fill_null(False)
        if bad is not None:
            too_long = too_long & ~bad
        bad = too_long if bad is None else bad | too_long
        if ERROR_COLUMN in frame.columns:
            # A line the export itself rejected (an empty Handle, an orphan variation) is
            # rejected for that: its empty fields follow from it, and the message about
            # them would send the user to the wrong cell.
            bad = bad & frame.get_column(ERROR_COLUMN).is_null()
        if not bad.any():
            return frame, []
        rejections: list[Rejection] = []
        indices = frame.get_column(INDEX_COLUMN).to_list()
        ids = _ids(frame)
        columns = {name: mask.to_list() for name, mask in missing.items()}
        long_flags = too_long.to_list()
        for position in bad.arg_true().to_list():
            index = indices[position]
            where = f"{source_name} row {index + 1}"
            if long_flags[position]:
                column, part = self._longest_hole(frame, position)
                reason = self.template.too_long_reason(
                    where, lengths[position], contract.PROMPT_MAX_CHARS, column, part
                )
            else:
                column = next(name for name, flags in columns.items() if flags[position])
                reason = self.template.missing_reason(where, column)
            raw = ids[position] if ids is not None else None
            key = safe_key(raw) if raw else f"row-{index + 1}"
            if self.matrix is not None and not raw:
                key = f"{key}--{variation.slug}"
            rejections.append(
                Rejection(index=index, reason=reason, column=column, key=safe_key(key))
            )
        return frame.filter(~bad), rejections

    def _longest_hole(self, frame: pl.DataFrame, position: int) -> tuple[str, int]:
        """The template's column whose cell is longest in this row, and its length."""
        assert self.template is not None
        sizes = {
            hole.column: len(str(frame.get_column(hole.column)[position] or ""))
            for hole in self.template.holes
            if hole.column in frame.columns
        }
        if not sizes:  # a template without holes, itself too long
            return "prompt", len(self.template.text)
        column = max(sizes, key=sizes.__getitem__)
        return column, sizes[column]

    def _relabel(
        self, rejection: Rejection, variation: Variation, source_name: str, size: int
    ) -> Rejection:
        index = rejection.index * size + variation.number
        prefix = f"{source_name} row {rejection.index + 1}"
        reason = rejection.reason
        if reason.startswith(prefix):
            reason = f"{source_name} {self.label(index)}" + reason[len(prefix) :]
        return dataclasses.replace(rejection, index=index, reason=reason)

    def iter_rows(
        self, reader: ManifestReader, defaults: Defaults
    ) -> Iterator[tuple[list[Row], list[Rejection]]]:
        """``manifest.iter_rows`` through this catalog."""
        for batch in reader.batches():
            yield self.validate(
                batch, source_name=reader.name, defaults=defaults, names=reader.shown_as
            )

    # --- output manifest -------------------------------------------------------------------

    def output_columns(self, extra_columns: Sequence[str]) -> list[str]:
        """The output manifest's extra columns: the variation and its axes, then the input's."""
        if self.matrix is None:
            return list(extra_columns)
        added = [
            axis
            for axis in self.matrix.axes
            if axis not in KNOWN_COLUMNS and axis not in extra_columns
        ]
        return [VARIATION_COLUMN, *added, *extra_columns]

    def expand_output(self, batch: pl.DataFrame) -> pl.DataFrame:
        """One copy of each input row per variation, in row order, with its axis values.

        ``__index`` becomes the planned index (what the ledger knows the image by) and
        ``__row`` keeps the input row, which the output manifest reports as ``row``.
        """
        if self.matrix is None or batch.height == 0:
            return batch
        size = self.size
        product = pl.col(INDEX_COLUMN)
        copies: list[pl.DataFrame] = []
        if MERGED_COLUMN in batch.columns:
            # A line that makes no image (an image-only line of a product export) is listed
            # once, not once per variation.
            merged = batch.filter(pl.col(MERGED_COLUMN).is_not_null())
            batch = batch.filter(pl.col(MERGED_COLUMN).is_null())
            copies.append(
                merged.with_columns(
                    product.alias(PRODUCT_INDEX_COLUMN), (product * size).alias(INDEX_COLUMN)
                )
            )
        for variation in self.matrix.variations:
            overrides = [
                pl.lit(value, dtype=pl.String).alias(column)
                for column, value in variation.values.items()
                if column not in KNOWN_COLUMNS and (value != "" or column not in batch.columns)
            ]
            copies.append(
                batch.with_columns(
                    product.alias(PRODUCT_INDEX_COLUMN),
                    (product * size + variation.number).alias(INDEX_COLUMN),
                    pl.lit(variation.slug, dtype=pl.String).alias(VARIATION_COLUMN),
                    *overrides,
                )
            )
        return pl.concat(copies, how="diagonal_relaxed").sort(INDEX_COLUMN)


def _ids(batch: pl.DataFrame) -> list[str | None] | None:
    if "id" not in batch.columns:
        return None
    column = batch.get_column("id")
    if column.dtype.is_float():
        values = [
            None if v is None else (str(int(v)) if float(v).is_integer() else str(v))
            for v in column.to_list()
        ]
    else:
        values = [None if v is None else str(v) for v in column.to_list()]
    return [v.strip() or None if v is not None else None for v in values]


def catalog_from_settings(settings: Mapping[str, object]) -> Catalog | None:
    """A ``Catalog`` from config/CLI settings (``prompt_template``, ``vary``, ``variations``)."""
    vary = settings.get("vary") or ()
    files = settings.get("variations") or ()
    template = settings.get("prompt_template")
    return Catalog.build(
        prompt_template=template if isinstance(template, str) else None,
        vary=[str(v) for v in vary],  # type: ignore[union-attr]
        variations=[str(f) for f in files],  # type: ignore[union-attr]
    )
