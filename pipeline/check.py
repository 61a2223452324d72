"""Checking a manifest without sending anything: what ``validate`` and ``run --dry-run`` show.

A catalog team wants to know before spending credits which rows will be refused and why,
which reference files are missing, whether two rows ask for the same image, and what the
run will cost. The manifest is streamed in batches like a real run, so checking a million
rows needs no more memory than running them (apart from the keys seen, which duplicate
detection needs: 8-byte digests and a row number, 12 MB per million rows, see ``SeenKeys``).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.contract import cost_credits, output_size
from pipeline.errors import ReferenceError
from pipeline.library import Library
from pipeline.manifest import (
    MERGED_COLUMN,
    ArrowStream,
    Defaults,
    ManifestReader,
    validate_batch,
)
from pipeline.product_exports import ExportSpec, open_manifest
from pipeline.references import Reference, ReferenceStore
from pipeline.rows import ImageRequest, Rejection, Row
from pipeline.summary import ExitCode
from pipeline.templates import markup_warning
from pipeline.variations import Catalog
from pipeline.verdicts import describe_reference, duplicate_rejection, reference_reason

#: Prices one request with the references it is sent with (their width and height are all
#: that is read): ``Provider.cost``, as ``providers.published_cost`` hands it out.
Pricer = Callable[[ImageRequest, Sequence[Reference]], float]

#: Full messages kept per column; enough to see the pattern without drowning the summary.
EXAMPLES_PER_COLUMN: Final = 3
#: Longest duplicate and reference listings printed before "... and N more".
MAX_LISTED: Final = 10
_ROW_LABEL: Final = "(whole row)"
#: Width of the by-preset/resolution/format lists before they wrap.
_WRAP: Final = 64
_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


@dataclass(slots=True)
class ColumnRejections:
    """The rows refused because of one column: how many, and the first few messages."""

    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ReferenceProblem:
    """A local reference file that cannot be used, and the rows that point at it."""

    spec: str
    problem: str
    rows: list[int] = field(default_factory=list)
    row_count: int = 0
    #: The manifest row counted last: a row's variations share its reference, once counted.
    last_row: int = 0


@dataclass(slots=True)
class CheckReport:
    """What a check found; ``render()`` is the human summary, the fields are for code."""

    source: str
    total: int = 0
    #: Rows that would be sent (or skipped as duplicates): valid with usable references.
    valid: int = 0
    rejected: int = 0
    rejections: dict[str, ColumnRejections] = field(default_factory=dict)
    #: Rows whose key an earlier row has: rejected, as the run rejects them (among
    #: ``rejected`` and ``rejections["id"]``, with the run's message).
    duplicates: int = 0
    #: Valid rows whose filled prompt still holds markup (``<p>``, ``&amp;``): sent and paid
    #: for as text unless the template uses ``{COLUMN|text}``.
    markup: int = 0
    markup_examples: list[str] = field(default_factory=list)
    #: Input lines merged into another line's image (product exports), and how it was read.
    merged: int = 0
    export: str | None = None
    references_checked: bool = True
    reference_files: int = 0
    reference_urls: int = 0
    reference_problems: dict[str, ReferenceProblem] = field(default_factory=dict)
    by_preset: Counter[str] = field(default_factory=Counter)
    by_resolution: Counter[str] = field(default_factory=Counter)
    by_format: Counter[str] = field(default_factory=Counter)
    estimated_credits: float = 0.0
    limit: int | None = None
    #: Images per manifest row and the matrix's shape, with a variation matrix.
    per_row: int = 1
    matrix: str | None = None
    #: Rows an earlier run into the same DEST finished (kept) or left in flight (polled,
    #: never paid again): a dry run into an existing DEST neither counts nor prices them.
    earlier_done: int = 0
    earlier_in_flight: int = 0
    #: Rows an earlier run rejected that a dry run cannot tell the rerun's verdict on: a
    #: reference URL that failed (fetched again: sent only if it now loads) or a request
    #: the API refused (refused again, for nothing). Not in ``to_send`` nor the estimate:
    #: ``retry_credits`` is what they would add if they all went through after all.
    earlier_rejected: int = 0
    earlier_refused: int = 0
    retry_credits: float = 0.0
    #: Reference uses among the rows to send whose image the check does not load (URLs,
    #: or every reference with ``check_references`` off): their megapixels, which the API
    #: bills, are not in ``estimated_credits``; ``input_mp_price`` says per megapixel.
    unpriced_references: int = 0
    input_mp_price: float = 0.0
    #: Rows whose image the library already holds, or an earlier row of this manifest
    #: makes (same fingerprint): copied by the run, not sent, not priced.
    library_hits: int = 0
    #: The library checked against (``--library``), for the summary line.
    library: str | None = None
    #: What the manifest's columns call for that stops nothing (``ManifestReader.notices``).
    notices: list[str] = field(default_factory=list)

    @property
    def to_send(self) -> int:
        """Images the run would pay for: valid rows not already in DEST, not in the
        library."""
        return (
            self.valid
            - self.earlier_done
            - self.earlier_in_flight
            - self.earlier_rejected
            - self.earlier_refused
            - self.library_hits
        )

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.rejected == 0 else ExitCode.PARTIAL

    def render(self) -> str:
        """A plain-text summary that reads the same in a terminal and in a CI log."""
        out: list[str] = []
        scope = f" (first {self.limit} rows)" if self.limit is not None else ""
        if self.matrix is not None:
            rows = self.total // max(self.per_row, 1)
            out.append(
                f"{self.source}: {rows} rows x {self.per_row} variations ({self.matrix}) = "
                f"{self.total} images checked{scope}"
            )
        else:
            out.append(f"{self.source}: {self.total} rows checked{scope}")
        if self.export is not None:
            out.append(
                f"  read as a {self.export}; {self.merged} input lines merged into another "
                "line's image (listed as merged in the output manifest)"
            )
        out.append(f"  valid       {self.valid}")
        out.append(f"  rejected    {self.rejected}")
        out += [f"  note: {notice}" for notice in self.notices]
        if self.duplicates:
            out.append(
                f"  of which {self.duplicates} repeat an earlier row's key (rejected: one "
                "image per key, never paid twice)"
            )
        if self.earlier_done or self.earlier_in_flight:
            out.append(
                f"  in DEST     {self.earlier_done} done by an earlier run, "
                f"{self.earlier_in_flight} in flight (polled, not sent again)"
            )
        if self.earlier_rejected:
            out.append(
                f"  retried     {self.earlier_rejected} rejected by an earlier run for a "
                "reference URL: fetched again and sent only if it now loads (not in To send; "
                f"{self.retry_credits:.2f} credits more, plus their references' megapixels, "
                "if all do)"
            )
        if self.earlier_refused:
            out.append(
                f"  refused     {self.earlier_refused} refused by the API in an earlier run: "
                "submitted again and refused again unless the request changed (not charged, "
                "not in To send)"
            )
        if self.library is not None:
            out.append(
                f"  in library  {self.library_hits} (copied from {self.library}, not sent; "
                "rows with URL references are counted as sent)"
            )
        if self.rejections:
            out += ["", "Rejected rows by column:"]
            ordered = sorted(self.rejections.items(), key=lambda item: -item[1].count)
            for column, group in ordered:
                noun = "row" if group.count == 1 else "rows"
                out.append(f"  {column}: {group.count} {noun}")
                out += [f"    {message}" for message in group.examples]
                if group.count > len(group.examples):
                    out.append(f"    ... and {group.count - len(group.examples)} more")
        if self.markup:
            noun = "prompt" if self.markup == 1 else "prompts"
            out += [
                "",
                f"Warning: {self.markup} {noun} still contain markup (sent and paid for as "
                "text; fill such holes with {COLUMN|text}):",
            ]
            out += [f"  {example}" for example in self.markup_examples]
            if self.markup > len(self.markup_examples):
                out.append(f"  ... and {self.markup - len(self.markup_examples)} more")
        out += ["", self._references_line()]
        problems = list(self.reference_problems.values())
        for problem in problems[:MAX_LISTED]:
            rows = ", ".join(str(row) for row in problem.rows)
            more = "" if problem.row_count <= len(problem.rows) else ", ..."
            noun = "row" if problem.row_count == 1 else "rows"
            out.append(
                f"  {problem.spec}: {problem.problem} ({problem.row_count} {noun}: {rows}{more})"
            )
        if len(problems) > MAX_LISTED:
            out.append(f"  ... and {len(problems) - MAX_LISTED} more files")
        out += ["", f"To send: {self.to_send} images"]
        if self.to_send:
            out.append(f"  by preset:      {_counter_line(self.by_preset)}")
            out.append(f"  by resolution:  {_counter_line(self.by_resolution)}")
            out.append(f"  by format:      {_counter_line(self.by_format)}")
        out.append(
            f"Estimated cost: {self.estimated_credits:.2f} credits "
            "(published klein price per megapixel of each image and of its local reference "
            "images; rejected rows cost nothing)"
        )
        if self.unpriced_references:
            out.append(
                f"  not included: {self.unpriced_references} reference URL uses, not fetched "
                f"by a check; the API bills each at {self.input_mp_price:g} credits per "
                "megapixel of its image (a 700 x 700 photo adds about "
                f"{self.input_mp_price * 0.49:.2f}): an estimate, the run charges more"
            )
        return "\n".join(out)

    def _references_line(self) -> str:
        if not self.references_checked:
            return "Reference files: not checked"
        bad = len(self.reference_problems)
        parts = [f"{self.reference_files} distinct local references checked, {bad} unusable"]
        if self.reference_urls:
            parts.append(f"{self.reference_urls} URL uses not fetched (the run checks them)")
        return "Reference files: " + "; ".join(parts)


def _counter_line(counter: Counter[str]) -> str:
    # Ten presets do not fit one line; continuation lines line up under the first.
    lines: list[str] = []
    line = ""
    for name, count in counter.most_common():
        item = f"{name} {count}"
        if line and len(line) + 3 + len(item) > _WRAP:
            lines.append(line + " ·")
            line = item
        else:
            line = f"{line} · {item}" if line else item
    lines.append(line)
    return ("\n" + " " * 18).join(lines)


def reference_kind(spec: str) -> str:
    """``url`` or ``local`` (a file or inline data): only local ones are checked offline."""
    match = _SCHEME.match(spec.strip())
    if match and match.group(1).lower() in ("http", "https"):
        return "url"
    return "local"


class _ReferenceChecker:
    """Loads each distinct local reference once, exactly as a run would.

    Files and inline images go through the run's own ``ReferenceStore`` (path confinement,
    size cap, decoding, conversion), so ``validate`` refuses what the run would refuse and
    nothing else. URLs are counted, not fetched: checking must not touch the network.
    """

    def __init__(
        self, base_dir: Path | None, report: CheckReport, allow_http: bool, allow_private: bool
    ) -> None:
        self._store = ReferenceStore(
            base_dir, allow_http=allow_http, allow_private_urls=allow_private
        )
        self._loop = asyncio.new_event_loop()
        self._report = report
        #: spec (or its digest) -> (problem or None, the image as sent without its bytes, or
        #: None): its digest fingerprints a row, its size prices it.
        self._seen: dict[str, tuple[str | None, Reference | None]] = {}
        self.per_row = report.per_row

    def close(self) -> None:
        self._loop.close()

    def _load(self, spec: str) -> tuple[str | None, Reference | None]:
        cache_key = spec if len(spec) <= 512 else hashlib.sha256(spec.encode()).hexdigest()
        if cache_key not in self._seen:
            self._report.reference_files += 1
            try:
                reference = self._loop.run_until_complete(self._store.load(spec))
                kept = Reference(
                    reference.digest, reference.mime, "", reference.width, reference.height, 0
                )
                self._seen[cache_key] = (None, kept)
            except ReferenceError as exc:
                self._seen[cache_key] = (str(exc), None)
        return self._seen[cache_key]

    def _problem(self, spec: str) -> str | None:
        return self._load(spec)[0]

    def sized(self, row: Row) -> tuple[list[Reference], int]:
        """The row's local references as sent (width and height, to price their megapixels
        as the API bills them), and how many of its references are URLs, whose size a check
        cannot know without fetching them."""
        found: list[Reference] = []
        urls = 0
        for _, spec in row.request.reference_specs():
            if not spec:
                continue
            if reference_kind(spec) == "url":
                urls += 1
                continue
            sized = self._load(spec)[1]
            if sized is not None:
                found.append(sized)
        return found, urls

    def digests(self, row: Row) -> tuple[str, ...] | None:
        """The row's reference digests as the run computes them (for its fingerprint);
        None when one is a URL, which a check does not fetch."""
        found: list[str] = []
        for _, spec in row.request.reference_specs():
            if not spec:
                continue
            if reference_kind(spec) == "url":
                return None
            reference = self._load(spec)[1]
            if reference is None:
                return None
            found.append(reference.digest)
        return tuple(found)

    def problems(self, row: Row, source: str) -> list[tuple[str, str]]:
        """(column, message) for each unusable reference of the row."""
        found: list[tuple[str, str]] = []
        for column, spec in row.request.reference_specs():
            if not spec:
                continue
            if reference_kind(spec) == "url":
                problem = self._store.offline_problem(spec)
                if problem is None:
                    self._report.reference_urls += 1
                    continue
            else:
                problem = self._problem(spec)
            if problem is None:
                continue
            shown = describe_reference(spec)
            entry = self._report.reference_problems.setdefault(
                shown, ReferenceProblem(spec=shown, problem=problem)
            )
            number = row.index // self.per_row + 1
            if number != entry.last_row:
                entry.last_row = number
                entry.row_count += 1
                if len(entry.rows) < MAX_LISTED:
                    entry.rows.append(number)
            found.append((column, reference_reason(source, row.where, column, spec, problem)))
        return found


class SeenKeys:
    """The keys of the rows checked so far, as 8-byte BLAKE2b digests in sorted runs.

    A Python set of a million keys costs about 94 MB (a str object and a slot per key),
    which made a dry run's memory grow with the manifest; digests in sorted numpy arrays
    cost 8 bytes a key, plus 4 for the row that had the key first (a duplicate's message
    names it, as the run's does): 12 MB per million keys. Two different keys share a
    digest with probability about n² / 2^65 (3e-8 for a million keys, 3e-6 for ten
    million). That is enough for what this serves: a check's preview. The run itself
    finds duplicates by the whole key in its ledger, so a false match could only make a
    dry run count one duplicate the run would send, never lose or pay for an image.
    16-byte digests (20 bytes a key with the row) were a third of a million-row dry
    run's growth over a 10,000-row one (issue 16: memory flat in the manifest's size).

    Runs are merged when one gets as big as the one below it (a log-structured merge), so
    adding n keys costs O(n log n) and there are at most log2(n) runs to search. The
    digests are kept in ``PARTS`` independent sets of runs, by their low bits: a merge
    then copies a sixteenth of the keys, not all of them (with one set, the last merge of
    a million keys briefly held three copies of every digest).
    """

    PARTS: Final = 16

    def __init__(self) -> None:
        self._parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(self.PARTS)]

    def first_seen(self, keys: list[str]) -> list[bool]:
        """For each key in order: True when no earlier key (earlier call or earlier in
        ``keys``) was the same; remembers them all."""
        return [first is None for first in self.earlier(keys, list(range(len(keys))))]

    def earlier(self, keys: list[str], indices: list[int]) -> list[int | None]:
        """For each key: the index of the earlier row that had it, or None when it is new.

        ``indices`` are the rows' own indices; new keys are remembered with them.
        """
        if not keys:
            return []
        digests = np.frombuffer(
            b"".join(
                hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                for key in keys
            ),
            dtype=np.uint64,
        )
        rows = np.asarray(indices, dtype=np.uint32)
        part = digests % self.PARTS
        found = np.full(len(keys), -1, dtype=np.int64)
        for number in np.unique(part):
            runs = self._parts[number]
            if not runs:
                continue
            mine = np.flatnonzero(part == number)
            wanted = digests[mine]
            for run, run_rows in runs:
                at = np.searchsorted(run, wanted)
                at[at == len(run)] = 0
                hit = (run[at] == wanted) & (found[mine] < 0)
                found[mine[hit]] = run_rows[at[hit]]
        # Repeats within this batch: the first occurrence counts as new, later ones do not.
        unique, first_index = np.unique(digests, return_index=True)
        first = first_index[np.searchsorted(unique, digests)]
        repeated = (first != np.arange(len(keys))) & (found < 0)
        found[repeated] = rows[first[repeated]]
        new = found < 0
        for number in np.unique(part[new]):
            mine = new & (part == number)
            self._add(self._parts[number], digests[mine], rows[mine])
        return [None if value < 0 else int(value) for value in found]

    @staticmethod
    def _add(
        runs: list[tuple[np.ndarray, np.ndarray]], digests: np.ndarray, rows: np.ndarray
    ) -> None:
        order = np.argsort(digests, kind="stable")
        runs.append((digests[order], rows[order]))
        while len(runs) > 1 and len(runs[-2][0]) <= 2 * len(runs[-1][0]):
            top, top_rows = runs.pop()
            below, below_rows = runs.pop()
            merged = np.concatenate([below, top])
            merged_rows = np.concatenate([below_rows, top_rows])
            del top, below, top_rows, below_rows
            order = np.argsort(merged, kind="stable")
            runs.append((merged[order], merged_rows[order]))


def _reject(report: CheckReport, column: str | None, message: str) -> None:
    group = report.rejections.setdefault(column or _ROW_LABEL, ColumnRejections())
    group.count += 1
    if len(group.examples) < EXAMPLES_PER_COLUMN:
        group.examples.append(message)


def check_manifest(
    source: str | Path | pl.DataFrame | pa.Table | ArrowStream,
    *,
    defaults: Defaults,
    limit: int | None = None,
    check_references: bool = True,
    batch_size: int = 10_000,
    catalog: Catalog | None = None,
    earlier: Callable[[list[str]], dict[str, str]] | None = None,
    export: ExportSpec | None = None,
    reference_column: str | None = None,
    library: Library | None = None,
    cost: Pricer | None = None,
    allow_http: bool = False,
    allow_private_urls: bool = False,
) -> CheckReport:
    """Validate a manifest the way a run would, without sending anything.

    With a ``catalog`` (prompt template, variation matrix) every variation of every row is
    checked and counted, so the estimate is what the run will spend. ``earlier`` maps keys
    to ``"done"`` or ``"in_flight"`` for a DEST that already holds a run
    (``Ledger.earlier_work``): those rows are counted apart, as the rerun skips or polls them.
    With a ``library`` (``pipeline/library.py``, opened) rows whose fingerprint it holds, or
    an earlier row makes, are counted apart too: the run copies them (references are
    loaded to fingerprint them, so ``check_references`` must stay on).
    ``cost`` prices one request with its references (``providers.published_cost`` of the
    run's dialect and model); without it, dialect A's published price. Local references
    are priced by their megapixels, as the API bills them; URL references are not fetched,
    so the estimate leaves theirs out and says so (``unpriced_references``).

    Raises ``ManifestError`` when the file as a whole cannot be used; every row-level
    problem is counted and grouped in the report instead.
    """
    reader = open_manifest(
        source,
        export=export,
        reference_column=reference_column,
        batch_size=batch_size,
        limit=limit,
        require_prompt=catalog is None or catalog.requires_prompt,
    )
    report = CheckReport(source=reader.name, limit=limit, references_checked=check_references)
    report.notices = list(reader.notices)
    if export is not None:
        report.export = export.describe
    if library is not None:
        report.library = library.uri
    if catalog is not None:
        catalog.check(reader)
        report.per_row = catalog.size
        report.matrix = catalog.matrix.describe() if catalog.matrix else None
    checker = (
        _ReferenceChecker(reader.base_dir, report, allow_http, allow_private_urls)
        if check_references
        else None
    )
    cost = cost or _cost
    try:
        _check_rows(report, reader, defaults, checker, catalog, earlier, library, cost)
    finally:
        if checker is not None:
            checker.close()
    report.estimated_credits = round(report.estimated_credits, 2)
    report.retry_credits = round(report.retry_credits, 2)
    if report.unpriced_references:
        report.input_mp_price = _input_mp_price(cost)
    return report


def _cost(request: ImageRequest, references: Sequence[Reference] = ()) -> float:
    """Dialect A's published price of a request with its references' megapixels."""
    pixels = sum(r.width * r.height for r in references)
    return cost_credits(*output_size(request.aspect_ratio, request.resolution), input_pixels=pixels)


def _input_mp_price(cost: Pricer) -> float:
    """What one reference megapixel adds to a price (said next to an estimate that leaves
    URL references out), from the pricer itself so it is the run's model's figure."""
    request = ImageRequest("x", "square_1_1", "1k", 0, 2, "jpeg")
    megapixel = Reference("", "image/png", "", 1000, 1000, 0)
    return round(cost(request, [megapixel]) - cost(request, []), 4)


def _check_rows(
    report: CheckReport,
    reader: ManifestReader,
    defaults: Defaults,
    checker: _ReferenceChecker | None,
    catalog: Catalog | None = None,
    earlier: Callable[[list[str]], dict[str, str]] | None = None,
    library: Library | None = None,
    cost: Pricer | None = None,
) -> None:
    cost = cost or _cost
    seen = SeenKeys()
    label = catalog.label if catalog is not None else None
    #: Fingerprints of rows counted as sent: a later row with the same one is copied.
    made = SeenKeys()
    for batch in reader.batches():
        if MERGED_COLUMN in batch.columns:
            report.merged += int(batch.get_column(MERGED_COLUMN).is_not_null().sum())
        names = reader.shown_as
        if catalog is not None:
            rows, rejections = catalog.validate(
                batch, source_name=reader.name, defaults=defaults, names=names
            )
        else:
            rows, rejections = validate_batch(
                batch, source_name=reader.name, defaults=defaults, names=names
            )
        report.total += len(rows) + len(rejections)
        _count_rejections(report, rejections)
        # Keys are taken in the order the run plans rows, before references are loaded:
        # a row the run rejects for its reference still holds its key there too.
        firsts = seen.earlier([row.key for row in rows], [row.index for row in rows])
        fresh: list[Row] = []
        for row, first in zip(rows, firsts, strict=True):
            if first is not None:
                # The run rejects it with this very message (pipeline/verdicts.py).
                report.duplicates += 1
                _count_rejections(
                    report,
                    [
                        duplicate_rejection(
                            reader.name,
                            row,
                            first,
                            label,
                            names.get("id", "id") if reader.keyed else None,
                        )
                    ],
                )
                continue
            problems = checker.problems(row, reader.name) if checker else []
            if problems:
                report.rejected += 1
                for column, message in problems:
                    _reject(report, column, message)
                continue
            fresh.append(row)
            warning = markup_warning(f"{reader.name} {row.where}", row.request.prompt)
            if warning is not None:
                report.markup += 1
                if len(report.markup_examples) < EXAMPLES_PER_COLUMN:
                    report.markup_examples.append(warning)
        report.valid += len(fresh)
        states = earlier([row.key for row in fresh]) if earlier and fresh else {}
        sent: list[Row] = []
        for row in fresh:
            state = states.get(row.key)
            if state == "done":
                report.earlier_done += 1
                continue
            if state == "in_flight":
                report.earlier_in_flight += 1
                continue
            if state == "refused":
                report.earlier_refused += 1
                continue
            if state == "rejected":
                # Rejected for a reference: a local one was checked again just now (sent
                # if it passed: the file was fixed); a URL's fate is known only to the run.
                references, urls = checker.sized(row) if checker else ([], 1)
                if urls:
                    report.earlier_rejected += 1
                    report.retry_credits += cost(row.request, references)
                    continue
            sent.append(row)
        if library is not None and checker is not None:
            sent = _library_misses(report, sent, library, checker, made)
        for row in sent:
            request = row.request
            report.by_preset[request.aspect_ratio] += 1
            report.by_resolution[request.resolution] += 1
            report.by_format[request.output_format] += 1
            if checker is not None:
                references, urls = checker.sized(row)
            else:
                references, urls = [], sum(1 for _, spec in request.reference_specs() if spec)
            report.unpriced_references += urls
            report.estimated_credits += cost(request, references)


def _library_misses(
    report: CheckReport,
    rows: list[Row],
    library: Library,
    checker: _ReferenceChecker,
    made: SeenKeys,
) -> list[Row]:
    """The rows the run would send; counts the others (in the library, or made by an
    earlier row of this manifest) as library hits."""
    misses: list[Row] = []
    fps: list[str] = []
    for row in rows:
        digests = checker.digests(row)
        if digests is None:  # a URL reference: the run fingerprints it, a check cannot
            misses.append(row)
            continue
        fp = library.fingerprint(row.request, digests)
        if library.lookup(fp) is not None:
            report.library_hits += 1
            continue
        fps.append(fp)
        misses.append(row)
    firsts = iter(made.first_seen(fps))
    kept: list[Row] = []
    for row in misses:
        digests = checker.digests(row)
        if digests is not None and not next(firsts):
            report.library_hits += 1
            continue
        kept.append(row)
    return kept


def _count_rejections(report: CheckReport, rejections: Iterable[Rejection]) -> None:
    for rejection in rejections:
        report.rejected += 1
        _reject(report, rejection.column, rejection.reason)
