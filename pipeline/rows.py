"""What flows between the stages: a validated row, a rejected row, and a row's outcome.

Kept in one small module so the manifest reader, the engine, the ledger and the output
manifest writer agree on field names without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.contract import REFERENCE_FIELDS, RowStatus


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """Every parameter of one image, as sent (the seed is always set)."""

    prompt: str
    aspect_ratio: str
    resolution: str
    seed: int
    safety_tolerance: int
    output_format: str
    #: Reference specs as the manifest gave them (path, URL, base64 or data: URI), in order.
    references: tuple[str, ...] = ()
    #: The manifest column of each reference, so that a message names the right one when
    #: an earlier reference cell is empty (default: ``input_image``, ``input_image_2``, ...).
    reference_columns: tuple[str, ...] = ()

    def reference_specs(self) -> tuple[tuple[str, str], ...]:
        """(column, spec) for each reference, in order."""
        columns = self.reference_columns or REFERENCE_FIELDS[: len(self.references)]
        return tuple(zip(columns, self.references, strict=True))


@dataclass(frozen=True, slots=True)
class Row:
    """A valid manifest row, ready to plan."""

    #: 0-based position of the row among the manifest's data rows.
    index: int
    #: Stable, path-safe key: the output file name and the resume identity.
    key: str
    request: ImageRequest
    #: How messages name the row when ``row {index + 1}`` would not (a variation of a
    #: product row: ``row 3, variation studio.1``); None for a plain manifest row.
    label: str | None = None

    @property
    def where(self) -> str:
        """``row 7`` or the label: what a message puts after the file name."""
        return self.label or f"row {self.index + 1}"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row that will not be sent, and a message a person can act on.

    ``reason`` is complete on its own, e.g. ``catalog.csv row 7, column seed: '-3' is not
    allowed; expected a whole number from 0 to 4294967295``.
    """

    index: int
    reason: str
    column: str | None = None
    key: str | None = None
    prompt: str | None = None


@dataclass(slots=True)
class Outcome:
    """How one row ended, with everything the output manifest records about it."""

    index: int
    key: str
    status: RowStatus
    request: ImageRequest | None = None
    reason: str | None = None
    reference_digests: tuple[str, ...] = ()
    task_id: str | None = None
    output_uri: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    bytes: int | None = None
    attempts: int = 0
    #: Unix seconds: when the row was queued, first submitted, and finished.
    queued_at: float | None = None
    submitted_at: float | None = None
    finished_at: float | None = None
    cost_credits: float = 0.0
    #: The library object a reused image was copied from (``pipeline/library.py``); None
    #: for an image this run paid for.
    reused_from: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
    #: The API itself ended this row's task without an image we can still collect (it
    #: failed, was forgotten, its result is gone): ``--retry-failed`` may pay for a new
    #: one. False for every end on our side: the task is then polled again, never re-paid.
    resubmit_on_retry: bool = False

    @property
    def latency_s(self) -> float | None:
        """Queue-to-done time, the figure a catalog team plans around."""
        if self.queued_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.queued_at
