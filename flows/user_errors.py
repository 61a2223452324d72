"""A user's mistake in a flow is said in one line, not with a traceback.

Prefect logs the exception that fails a task or flow run with its traceback. For a
manifest without a prompt column, a column of the wrong type or a template naming no
column (``KleinError``: what ``klein-batch run`` prints as one ``error:`` line, exit 2) the
message is the whole story, and a page of Prefect's and our frames above it reads as a
crash. Those records keep their message (the exception's type and words) and lose the
traceback, in the terminal and in the Prefect UI alike; any other exception, a bug, keeps
its traceback.
"""

from __future__ import annotations

import logging

from pipeline.errors import KleinError

#: The loggers Prefect's engines log a failed run's exception on.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class UserErrorsWithoutTraceback(logging.Filter):
    """Drops the traceback of a record about a ``KleinError``; passes every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, KleinError):
            record.exc_info = None
            record.exc_text = None
        return True


def install() -> None:
    """On Prefect's run loggers, once per process."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorsWithoutTraceback) for f in logger.filters):
            logger.addFilter(UserErrorsWithoutTraceback())
