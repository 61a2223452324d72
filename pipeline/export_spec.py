"""Which product export a run reads and how (``--catalog``, ``--per``, a ``[catalog]`` table).

The settings only, apart from the reader in ``pipeline/product_exports.py``: the run
specification and the config file check them for every command, and importing the reader
(Polars, pyarrow, the manifest code) to check two words would make ``klein-batch --help``,
``status`` and the start of every run pay for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from pipeline.errors import ConfigError

#: ``--catalog`` values with a built-in layout.
CATALOG_FORMATS: Final = ("shopify", "woocommerce")
#: ``--per`` values: one image per product, or one per variant.
PER_CHOICES: Final = ("product", "variant")


@dataclass(frozen=True, slots=True)
class ExportMapping:
    """How to read an export that is neither Shopify's nor WooCommerce's (config ``[catalog]``).

    ``group_column`` names the product a line belongs to (lines of one product share it);
    ``fill_down`` the product fields written on its first line only; ``id_column`` the id
    of each line (per variant) or product (per product); ``reference_column`` the image.
    """

    id_column: str | None = None
    group_column: str | None = None
    fill_down: tuple[str, ...] = ()
    reference_column: str | None = None

    @classmethod
    def from_settings(cls, raw: Mapping[str, object], where: str) -> ExportMapping:
        """The ``[catalog]`` table of a config file, checked; ConfigError names ``where``."""
        allowed = ("id_column", "group_column", "fill_down", "reference_column")
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{where}: [catalog] has an unknown setting {unknown[0]!r}; allowed: "
                + ", ".join(allowed)
            )
        values: dict[str, object] = {}
        for name in ("id_column", "group_column", "reference_column"):
            value = raw.get(name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(
                    f"{where}: [catalog] {name} = {value!r} is not allowed; expected a column name"
                )
            values[name] = value.strip() if isinstance(value, str) else None
        fill = raw.get("fill_down", [])
        if not isinstance(fill, list) or not all(isinstance(c, str) and c.strip() for c in fill):
            raise ConfigError(
                f"{where}: [catalog] fill_down = {fill!r} is not allowed; expected a list of "
                'column names, e.g. ["title", "description"]'
            )
        if not values["id_column"] and not values["group_column"]:
            raise ConfigError(
                f"{where}: [catalog] needs id_column or group_column (or both) to tell "
                "products apart"
            )
        return cls(
            id_column=values["id_column"],  # type: ignore[arg-type]
            group_column=values["group_column"],  # type: ignore[arg-type]
            fill_down=tuple(c.strip() for c in fill),
            reference_column=values["reference_column"],  # type: ignore[arg-type]
        )


@dataclass(frozen=True, slots=True)
class ExportSpec:
    """Which export layout to read and how many images it makes (``--catalog``, ``--per``)."""

    layout: str
    per: str = "product"
    mapping: ExportMapping | None = field(default=None)

    def __post_init__(self) -> None:
        if self.layout not in (*CATALOG_FORMATS, "mapping"):
            raise ConfigError(
                f"--catalog {self.layout!r} is not allowed; expected one of "
                f"{', '.join(CATALOG_FORMATS)} (or a [catalog] mapping in the config file)"
            )
        if self.per not in PER_CHOICES:
            raise ConfigError(
                f"--per {self.per!r} is not allowed; expected one of {', '.join(PER_CHOICES)}"
            )
        if self.layout == "mapping" and self.mapping is None:
            raise ConfigError("a [catalog] mapping needs id_column or group_column")

    @property
    def describe(self) -> str:
        """``Shopify export, one image per variant``: for the dry run and the report."""
        names = {"shopify": "Shopify", "woocommerce": "WooCommerce", "mapping": "mapped"}
        return f"{names[self.layout]} export, one image per {self.per}"
