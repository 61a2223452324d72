"""The exceptions klein-batch raises, in one place.

```
KleinError                 anything klein-batch reports to a person (no traceback needed)
├── ConfigError            the run cannot start: bad option, missing API key, bad sink URI
├── ManifestError          the manifest as a whole is unusable (unreadable, no prompt column)
├── ReferenceError         one reference image is unusable (the row is rejected, the run goes on)
├── StorageError           the output or the run's journal cannot be written (disk full,
│                          read-only, permission, S3 failing): the run stops at once
├── ApiUnreachable         the API has not answered for ``--api-outage-wait`` seconds: the
│                          run stops as cleanly, and the same command resumes it
└── KeyRefusedError        the API refused the key before taking any task
```

Row-level problems are not exceptions: they become ``Rejection`` records and the valid rows
still run. Messages never contain secrets: API keys and webhook secrets are not passed to
any of these.

A workflow (Airflow, Dagster, Prefect, a notebook) tells them apart by class or by
``exit_code``, the code ``klein-batch`` exits with for the same error; one raised by a run
that had started carries its ``summary`` (the figures of ``run.json``, written before the
error was raised), so a task can report the run's counts without reading the files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pipeline.summary import RunSummary


class KleinError(Exception):
    """A problem to report to the user as a message, not a traceback."""

    #: What ``klein-batch`` exits with for it (``pipeline.summary.ExitCode``): 2, could not
    #: start, unless a subclass says otherwise.
    exit_code: ClassVar[int] = 2
    #: The figures of the run it stopped, its outputs written; None when none had started.
    summary: RunSummary | None = None


class ConfigError(KleinError):
    """The run cannot start as configured."""


class ManifestError(KleinError):
    """The manifest file as a whole cannot be used; the message names the file."""


class ReferenceError(KleinError):
    """A reference image cannot be used; the message says why, the caller says where."""


class StorageError(KleinError):
    """The output or the run's journal cannot be written (or an S3 call failed for good).

    A run stops at once on it (exit code 74): going on would pay for images it cannot
    keep, or for tasks it cannot journal. Tasks already acknowledged stay in the journal
    without an outcome, so the rerun polls them instead of paying again.
    """

    exit_code: ClassVar[int] = 74


class ApiUnreachable(KleinError):
    """The API (or the host serving its results) has not answered for the run's
    ``--api-outage-wait``: the run stops (exit code 69) as it does on a
    ``StorageError``.

    Rows waited at the host's gate meanwhile instead of failing; those not sent stay
    pending and tasks in flight stay in the journal, so running the same command again
    polls them instead of paying again.
    """

    exit_code: ClassVar[int] = 69


class KeyRefusedError(KleinError):
    """The API refused the key before accepting any task: the run could not start.

    Raised after the outputs are written (every row ``skipped``, saying why), so a data
    team's tooling still finds a complete output manifest; ``summary`` is the run's.
    """

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


class Terminated(Exception):
    """SIGTERM (systemd, Kubernetes, Prefect) stopped the run, handled as Ctrl-C is.

    Raised after the output manifest, ``run.json`` and ``report.html`` were written from
    the journal, so the rerun of the same command resumes.
    """


class ReferenceUnreachable(ReferenceError):
    """A reference URL that could not be fetched now (timeout, refused connection, an HTTP
    error): transient, so its row ends ``failed`` and ``--retry-failed`` tries again, unlike
    a malformed or refused reference, which is ``rejected``."""
