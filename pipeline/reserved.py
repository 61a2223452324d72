"""Column names the pipeline keeps for itself, in one place, and how clashing inputs are renamed.

Two kinds: the output manifest's own columns (``row``, ``key``, ``status``, ... as
``output_manifest.FIXED_SCHEMA`` lists them), and the working columns the reader, the
product-export reader and the variation expander add to batches (``__index``, ``__error``,
``__merged``, ``__row``, and every name starting with ``__catalog_``). An input column
with one of these names is kept, under ``input_<name>`` (``input_input_<name>`` if that is
taken too): working names are renamed as the manifest is read, so an input ``__row`` can
neither crash the output manifest nor replace its row numbers; output names are renamed
as the output manifest is written, so templates still see the input's own ``{status}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

#: 0-based data row index the reader adds to every batch (what the ledger knows rows by).
INDEX_COLUMN: Final = "__index"
#: Per-row read error the reader adds (a CSV line it could not parse).
ERROR_COLUMN: Final = "__error"
#: Set by ``pipeline/product_exports.py`` on input lines that make no image of their own (a
#: Shopify image-only line, a variant under ``--per product``): what became of the line.
#: Such lines are never validated or planned; the output manifest lists them as ``merged``.
MERGED_COLUMN: Final = "__merged"
#: The input row a variation belongs to (added by ``variations.Catalog.expand_output``).
PRODUCT_INDEX_COLUMN: Final = "__row"
#: Prefix of the columns ``pipeline/product_exports.py`` derives from an export.
DERIVED_PREFIX: Final = "__catalog_"
WORKING_COLUMNS: Final = frozenset(
    {INDEX_COLUMN, ERROR_COLUMN, MERGED_COLUMN, PRODUCT_INDEX_COLUMN}
)
#: The same set under the name ``pipeline.manifest`` gave it.
RESERVED_COLUMNS: Final = WORKING_COLUMNS

RENAME_PREFIX: Final = "input_"


def is_derived(name: str) -> bool:
    """Whether a batch column is the pipeline's own, not one of the input's."""
    return name in WORKING_COLUMNS or name.startswith(DERIVED_PREFIX)


def renamed(name: str, taken: Iterable[str]) -> str:
    """``name``, or ``input_name`` (repeated) until it is not among ``taken``."""
    used = set(taken)
    while name in used:
        name = RENAME_PREFIX + name
    return name
