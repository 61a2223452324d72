"""Prompt templates: one sentence with ``{column}`` holes, filled from each manifest row.

Catalog tables hold facts (title, colour, material), not prompts; a template such as
``Studio photo of {title} in {color}, {style}`` turns every row into a prompt, and a
variation axis (``--vary style=studio,lifestyle``) can fill a hole too. The filled prompt is
what is sent, keyed and recorded in the output manifest.

Filling is plain substitution, never ``str.format``: format strings can reach attributes
(``{x.__class__}``) and a manifest is untrusted input. Holes name columns, ``{{`` and ``}}``
are literal braces, and a row whose cell for a hole is empty is rejected naming that column,
because a prompt with a silent gap ("Studio photo of  in red") would still be paid for.
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import polars as pl

from pipeline.errors import ConfigError, ManifestError

#: Where a template came from when a message needs to say so.
FLAG: Final = "--prompt-template"


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """A parsed template: literal text and column holes, in order."""

    text: str
    #: Literal strings and ``(column,)`` tuples for holes, in template order.
    parts: tuple[str | tuple[str], ...]
    #: Each column named by a hole, once, in order of first use.
    fields: tuple[str, ...]
    source: str = FLAG

    @classmethod
    def parse(cls, text: str, *, source: str = FLAG) -> PromptTemplate:
        """Parse ``text``; a ConfigError says what is wrong and how to write it instead."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                f"{source} is empty; expected text with column names in braces, "
                "e.g. 'Studio photo of {title} in {color}'"
            )
        try:
            pieces = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ConfigError(
                f"{source} {text!r}: {exc}; put column names in braces ({{title}}) and write "
                "a literal brace as {{ or }}"
            ) from None
        parts: list[str | tuple[str]] = []
        fields: list[str] = []
        for literal, name, spec, conversion in pieces:
            if literal:
                parts.append(literal)
            if name is None:
                continue
            hole = (
                "{"
                + name
                + ("!" + conversion if conversion else "")
                + (":" + spec if spec else "")
                + "}"
            )
            column = name.strip()
            if not column or column.isdigit():
                raise ConfigError(
                    f"{source} {text!r}: {hole} does not name a column; write the column "
                    "name in the braces, e.g. {title}"
                )
            if spec or conversion:
                raise ConfigError(
                    f"{source} {text!r}: {hole} has a format or conversion; write just "
                    f"{{{column}}} (cells are used as they are written)"
                )
            parts.append((column,))
            if column not in fields:
                fields.append(column)
        if not fields:
            raise ConfigError(
                f"{source} {text!r} names no column, so every row would get the same prompt; "
                "put column names in braces, e.g. 'Studio photo of {title}'"
            )
        return cls(text=text, parts=tuple(parts), fields=tuple(fields), source=source)

    def check_columns(
        self, columns: Sequence[str], axes: Iterable[str], manifest_name: str
    ) -> None:
        """Refuse holes that no column and no variation axis can fill, before anything runs."""
        available = [*columns, *axes]
        for column in self.fields:
            if column in available:
                continue
            close = difflib.get_close_matches(column, available, n=1)
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            shown = ", ".join(c for c in columns if not c.startswith("__"))
            raise ConfigError(
                f"{self.source} uses {{{column}}}, but {manifest_name} has no column "
                f"{column!r} and no variation axis has that name{hint}; columns: {shown}"
            )

    def fill(self, batch: pl.DataFrame) -> tuple[pl.Series, dict[str, pl.Series]]:
        """The filled prompt of every row, and per hole a mask of rows where it is empty.

        A row with any empty hole gets a null prompt; the caller rejects it by the masks.
        """
        texts = {column: _as_text(batch, column) for column in self.fields}
        missing = batch.select(
            [(texts[c].is_null() | (texts[c] == "")).alias(c) for c in self.fields]
        )
        pieces = [pl.lit(part) if isinstance(part, str) else texts[part[0]] for part in self.parts]
        prompt = batch.select(pl.concat_str(pieces).alias("prompt")).get_column("prompt")
        return prompt, {c: missing.get_column(c) for c in self.fields}

    def missing_reason(self, where: str, column: str) -> str:
        """The rejection message for a row whose cell for ``column`` is empty."""
        return (
            f"{where}, column {column}: is empty, but the prompt template needs {{{column}}}; "
            f"fill the cell or leave {{{column}}} out of {self.source}"
        )


def _as_text(batch: pl.DataFrame, column: str) -> pl.Expr:
    """A cell as the text a person would type: trimmed, whole floats without ``.0``."""
    dtype = batch.schema[column]
    expr = pl.col(column)
    if dtype == pl.Binary:
        raise ManifestError(
            f"column {column!r} holds binary data; a prompt template can only use text or "
            "number columns"
        )
    if dtype.is_float():
        whole = expr.is_finite() & (expr == expr.floor()) & (expr.abs() < 2**53)
        expr = (
            pl.when(whole)
            .then(expr.cast(pl.Int64, strict=False).cast(pl.String))
            .otherwise(expr.cast(pl.String))
        )
    elif dtype != pl.String:
        expr = expr.cast(pl.String)
    return expr.str.strip_chars()
