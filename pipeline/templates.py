"""Prompt templates: one sentence with ``{column}`` holes, filled from each manifest row.

Catalog tables hold facts (title, colour, material), not prompts; a template such as
``Studio photo of {title} in {color}, {style}`` turns every row into a prompt, and a
variation axis (``--vary style=studio,lifestyle``) can fill a hole too. The filled prompt is
what is sent, keyed and recorded in the output manifest.

Filling is plain substitution, never ``str.format``: format strings can reach attributes
(``{x.__class__}``) and a manifest is untrusted input. Holes name columns, ``{{`` and ``}}``
are literal braces, and a row whose cell for a hole is empty is rejected naming that column,
because a prompt with a silent gap ("Studio photo of  in red") would still be paid for.

Product exports are not written for prompts, so a hole can say more:

- ``{Option1 Value?}``: optional; an empty cell leaves the hole out (and the spaces and
  commas around it are tidied), instead of rejecting every product without options;
- ``{color|neutral}``: a default for an empty cell;
- ``{Body (HTML)|text}``: the cell's HTML as plain text (tags dropped, entities decoded,
  paragraphs and list items become sentences), so no ``<p>`` is sent and paid for.
  Filters and a default combine: ``{Body (HTML)|text|a ceramic pot}``.

``markup_in`` finds markup that is still in a filled prompt; validate, the dry run and the
report warn about it.
"""

from __future__ import annotations

import difflib
import functools
import html
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import polars as pl

from pipeline.errors import ConfigError, ManifestError

#: Where a template came from when a message needs to say so.
FLAG: Final = "--prompt-template"
#: Filters a hole may name after ``|``; anything else after ``|`` is the hole's default.
FILTERS: Final = ("text",)

#: An HTML/XML tag or a character entity: what a prompt should not carry to the API.
_MARKUP: Final = re.compile(
    r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>"
    r"|&(?:[A-Za-z][A-Za-z0-9]{1,9}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});"
)
#: Tags that end a sentence when HTML becomes text.
_BLOCK_TAGS: Final = frozenset(
    {"p", "div", "br", "li", "ul", "ol", "tr", "td", "th", "table", "section", "article"}
    | {"blockquote", "dd", "dt", "hr", "h1", "h2", "h3", "h4", "h5", "h6"}
)


@dataclass(frozen=True, slots=True)
class Hole:
    """One ``{...}`` of a template: the column it reads and what to do with the cell."""

    column: str
    #: ``{column?}``: an empty cell leaves the hole out instead of rejecting the row.
    optional: bool = False
    #: ``{column|value}``: the text used when the cell is empty.
    default: str | None = None
    #: ``{column|text}``: the cell is HTML; send its plain text.
    as_text: bool = False

    @property
    def required(self) -> bool:
        """Whether an empty cell rejects the row."""
        return not self.optional and self.default is None


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """A parsed template: literal text and holes, in order."""

    text: str
    #: Literal strings and holes, in template order.
    parts: tuple[str | Hole, ...]
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
        parts: list[str | Hole] = []
        fields: list[str] = []
        for literal, name, spec, conversion in pieces:
            if literal:
                parts.append(literal)
            if name is None:
                continue
            inner = name + ("!" + conversion if conversion else "") + (":" + spec if spec else "")
            hole = _parse_hole(inner, text, source)
            parts.append(hole)
            if hole.column not in fields:
                fields.append(hole.column)
        if not fields:
            raise ConfigError(
                f"{source} {text!r} names no column, so every row would get the same prompt; "
                "put column names in braces, e.g. 'Studio photo of {title}'"
            )
        return cls(text=text, parts=tuple(parts), fields=tuple(fields), source=source)

    @property
    def holes(self) -> tuple[Hole, ...]:
        return tuple(part for part in self.parts if isinstance(part, Hole))

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

    def fill(
        self, batch: pl.DataFrame, source_name: str = "the manifest"
    ) -> tuple[pl.Series, dict[str, pl.Series]]:
        """The filled prompt of every row, and per required hole a mask of rows where it is
        empty (``source_name`` names the manifest in the message for a column no template
        can use).

        A row with any empty required hole gets a null prompt; the caller rejects it by the
        masks. Optional holes that are empty leave no double spaces or stray commas behind.
        """
        required: dict[str, pl.Expr] = {}
        gaps: list[pl.Expr] = []
        pieces: list[pl.Expr] = []
        for part in self.parts:
            if isinstance(part, str):
                pieces.append(pl.lit(part))
                continue
            cell = _as_text(batch, part.column)
            if cell is None:
                raise ManifestError(
                    f"{self.source} uses {{{part.column}}}, but {source_name} column "
                    f"{part.column!r} has type {batch.schema[part.column]}; a template takes "
                    "text, numbers or lists of them: put what the prompt needs in a column "
                    "of its own"
                )
            if part.as_text:
                cell = cell.map_elements(html_to_text, return_dtype=pl.String, skip_nulls=True)
            empty = cell.is_null() | (cell == "")
            if part.required:
                previous = required.get(part.column)
                required[part.column] = empty if previous is None else previous | empty
                pieces.append(cell)
            elif part.default is not None:
                pieces.append(pl.when(empty).then(pl.lit(part.default)).otherwise(cell))
            else:
                gaps.append(empty)
                pieces.append(pl.when(empty).then(pl.lit("")).otherwise(cell))
        prompt = pl.concat_str(pieces)
        if gaps:
            prompt = pl.when(pl.any_horizontal(gaps)).then(_tidy(prompt)).otherwise(prompt)
        frame = batch.select(
            prompt.alias("__prompt"),
            *(mask.alias(column) for column, mask in required.items()),
        )
        masks = {column: frame.get_column(column) for column in required}
        return frame.get_column("__prompt").alias("prompt"), masks

    def too_long_reason(self, where: str, length: int, limit: int, column: str, part: int) -> str:
        """The rejection message for a row whose filled prompt is over the API's limit: it
        names the template and the cell that made it long, since the row has no prompt
        cell of its own to shorten."""
        return (
            f"{where}, column {column}: the prompt {self.source} builds is {length:,} "
            f"characters; at most {limit:,} are allowed, and {{{column}}} gives {part:,} of "
            f"them: shorten the cell or leave {{{column}}} out of {self.source}"
        )

    def missing_reason(self, where: str, column: str) -> str:
        """The rejection message for a row whose cell for ``column`` is empty."""
        return (
            f"{where}, column {column}: is empty, but the prompt template needs {{{column}}}; "
            f"fill the cell, write {{{column}?}} to leave it out when empty or "
            f"{{{column}|default}} for a default, or leave {{{column}}} out of {self.source}"
        )


def _parse_hole(inner: str, text: str, source: str) -> Hole:
    column, *options = inner.split("|")
    column = column.strip()
    optional = column.endswith("?")
    if optional:
        column = column[:-1].rstrip()
    shown = "{" + inner + "}"
    if not column or column.isdigit():
        raise ConfigError(
            f"{source} {text!r}: {shown} does not name a column; write the column "
            "name in the braces, e.g. {title}"
        )
    if any(mark in column for mark in "!:"):
        plain = re.split(r"[!:]", column, maxsplit=1)[0].strip()
        raise ConfigError(
            f"{source} {text!r}: {shown} has a format or conversion; write just "
            f"{{{plain}}} (cells are used as they are written)"
        )
    as_text = False
    default: str | None = None
    for option in options:
        if option.strip() in FILTERS and default is None:
            as_text = True
        elif default is None:
            default = option
        else:
            raise ConfigError(
                f"{source} {text!r}: {shown} has two defaults; write one, e.g. "
                f"{{{column}|neutral}} (filters: {', '.join(FILTERS)})"
            )
    if optional and default is not None:
        raise ConfigError(
            f"{source} {text!r}: {shown} is optional (?) and has a default; use one: "
            f"{{{column}?}} leaves it out when empty, {{{column}|{default}}} fills it in"
        )
    return Hole(column=column, optional=optional, default=default, as_text=as_text)


def _tidy(prompt: pl.Expr) -> pl.Expr:
    """A prompt whose optional holes were empty, without the gaps they leave."""
    return (
        prompt.str.replace_all(r"\(\s*\)|\[\s*\]", "")
        .str.replace_all(r"\s+([,.;:!?])", "$1")
        .str.replace_all(r"([,;:])(?:\s*[,;:])+", "$1")
        .str.replace_all(r"\s{2,}", " ")
        .str.strip_chars(" ,;:-")
    )


#: A tag (its name in group 2, ``/`` in group 1 for an end tag) or a comment.
_TAG: Final = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)\b[^>]*>|<!--.*?-->", re.S)
#: Elements whose content is not text a shopper reads.
_HIDDEN: Final = re.compile(
    r"<(script|style|template|head)\b[^>]*>.*?</\1\s*>", re.S | re.IGNORECASE
)
_BREAK: Final = "\x00"


@functools.lru_cache(maxsize=65_536)
def html_to_text(markup: str) -> str:
    """Plain text of an HTML fragment: what a person reads on the product page.

    Tags go, entities are decoded, whitespace collapses, and each paragraph, list item or
    line break ends a sentence (``<p>Blown clay</p><p>Made in Italy</p>`` becomes
    ``Blown clay. Made in Italy``). Regular expressions rather than a parser: a catalog has
    a description per product and a run fills it once per variation (hence the cache too).
    """
    if "<" not in markup and "&" not in markup:
        return " ".join(markup.split())
    text = _HIDDEN.sub(" ", markup)
    text = _TAG.sub(lambda m: _BREAK if (m.group(2) or "").lower() in _BLOCK_TAGS else " ", text)
    sentences = [" ".join(html.unescape(block).split()) for block in text.split(_BREAK)]
    out = ""
    for sentence in sentences:
        if not sentence:
            continue
        if out:
            out += " " if out[-1] in ".!?:;," else ". "
        out += sentence
    return out


def markup_in(prompt: str | None) -> str | None:
    """The first tag or entity in a prompt (``<p>``, ``&amp;``), or None when it has none."""
    if not prompt:
        return None
    found = _MARKUP.search(prompt)
    return found.group(0) if found else None


def markup_warning(where: str, prompt: str) -> str | None:
    """The warning for a filled prompt that still holds markup, or None."""
    found = markup_in(prompt)
    if found is None:
        return None
    return (
        f"{where}: the prompt still contains markup ({found!r}), which is sent and paid for "
        "as text; fill it with {COLUMN|text} to send plain text"
    )


def _plain(dtype: pl.DataType) -> bool:
    """A type whose values a person would write as they are: text, numbers, true/false."""
    return (
        dtype in (pl.String, pl.Categorical, pl.Boolean, pl.Null)
        or isinstance(dtype, pl.Enum)
        or dtype.is_numeric()
    )


def _as_text(batch: pl.DataFrame, column: str) -> pl.Expr | None:
    """A cell as the text a person would type: trimmed, whole floats without ``.0``, a list
    (a PIM's tags or materials) as its items joined by ", ". None for what no prompt can
    hold as it is (binary data, a record of fields, lists of lists)."""
    dtype = batch.schema[column]
    expr = pl.col(column)
    if isinstance(dtype, pl.Array):
        expr, dtype = expr.arr.to_list(), pl.List(dtype.inner)
    if isinstance(dtype, pl.List):
        if not _plain(dtype.inner):
            return None
        item = pl.element().str.strip_chars()
        items = expr.cast(pl.List(pl.String)).list.eval(item.filter(item != ""))
        return items.list.join(", ")
    if not _plain(dtype):
        return None
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
