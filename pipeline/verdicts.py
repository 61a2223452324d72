"""The verdicts ``validate`` and ``run`` share, so both say the same thing about every row.

``validate`` (and ``run --dry-run``) must predict what a run does: a row a run rejects is
counted as rejected, with the message the run's output manifest will hold, and the exit
code follows. Contract checks live in ``manifest.validate_batch`` (both call it); the
verdicts that need more than one row live here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pipeline.rows import Rejection, Row

_URL = re.compile(r"^\s*https?://", re.IGNORECASE)


def duplicate_rejection(
    source_name: str,
    row: Row,
    first_index: int,
    label: Callable[[int], str] | None = None,
    column: str | None = "id",
) -> Rejection:
    """A row whose key an earlier row (``first_index``, a planned index) already has.

    Such a row is never sent: its image would be the earlier row's, paid twice. ``label``
    names planned indices (``row 3, variation studio``) when a variation matrix is used;
    ``column`` is where the id came from (``Handle`` in a Shopify export), None when the
    manifest has no id column and a row's key is its request: then the message says so,
    rather than blaming an ``id`` column the file does not have for a key it never wrote.
    """
    first = label(first_index) if label is not None else f"row {first_index + 1}"
    if column is None:
        return Rejection(
            index=row.index,
            reason=(
                f"{source_name} {row.where}: asks for the same image as {first} (the same "
                "prompt and settings; without an id column a row's key is its request); "
                "give the rows an id column to make both"
            ),
            column="prompt",
            key=row.key,
            prompt=row.request.prompt,
        )
    return Rejection(
        index=row.index,
        reason=(
            f"{source_name} {row.where}, column {column}: key {row.key!r} repeats {first}; "
            "each row needs its own id (or a different request)"
        ),
        column=column,
        key=row.key,
        prompt=row.request.prompt,
    )


def describe_reference(spec: str) -> str:
    """A reference as a message shows it: quoted, or its size when it is inline data."""
    text = spec.strip()
    if len(text) <= 120:
        return repr(text)
    return f"inline image ({len(text)} characters)"


def reference_reason(source_name: str, where: str, column: str, spec: str, problem: str) -> str:
    """Why a row's reference cannot be used, as validate and the run both say it.

    A file or inline image is named (``reference 'shots/red.png': not found``); a URL's
    problem already names the URL.
    """
    shown = "" if _URL.match(spec) else f"reference {describe_reference(spec)}: "
    return f"{source_name} {where}, column {column}: {shown}{problem}"
