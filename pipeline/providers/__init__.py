"""One module per API dialect; the engine sees only the small interface defined here.

A provider turns an ``ImageRequest`` into the dialect's HTTP request and the dialect's
responses into ``Submitted`` and ``TaskState``. It performs no I/O itself, so the engine
keeps the one retry loop and the one HTTP session, and a new dialect is a new module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pipeline.errors import ConfigError
from pipeline.masking import SecretMask
from pipeline.references import Reference
from pipeline.rows import ImageRequest

Phase = Literal["pending", "completed", "failed", "moderated"]


class ProtocolError(Exception):
    """A response that does not follow the dialect: treated as a transient server fault."""


@dataclass(frozen=True, slots=True)
class Submitted:
    """The server's acknowledgement of a submit: from here on the task is polled, never resent."""

    task_id: str
    poll_url: str
    cost: float | None = None


@dataclass(frozen=True, slots=True)
class TaskState:
    """A poll's answer, reduced to what the engine acts on."""

    phase: Phase
    raw_status: str
    image_url: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class TaskList:
    """What one read of the key's task list said (``pipeline/task_list.py``).

    The statuses are kept as listed and asked about by id: the engine wants a verdict on
    its few tasks in flight, while the list holds every task of the key, so nothing is
    done per entry beyond building the map (in C where the entries allow it).
    """

    entries: int
    #: Each listed task's status as the list gave it, by task id.
    statuses: Mapping[object, object]
    #: The statuses that say a task has ended.
    final: frozenset[str]

    def has_ended(self, task_id: str) -> bool:
        return self._is_final(self.statuses.get(task_id))

    def running(self) -> Iterator[str]:
        """The ids of the listed tasks that have not ended (a status that is no string, or
        none, counts as running)."""
        for task_id, status in self.statuses.items():
            if type(task_id) is str and not self._is_final(status):
                yield task_id

    def _is_final(self, status: object) -> bool:
        return type(status) is str and status in self.final


class Provider(Protocol):
    """What the engine needs from a dialect."""

    dialect: str
    #: The provider's secrets as they may come back in an answer (``pipeline/masking.py``):
    #: whatever is stored from an answer goes through it.
    mask: SecretMask

    def submit_url(self) -> str: ...

    def auth_headers(self) -> Mapping[str, str]: ...

    def submit_body(
        self,
        request: ImageRequest,
        references: Sequence[Reference],
        webhook_url: str | None,
    ) -> dict[str, Any]: ...

    def parse_submit(self, body: Any) -> Submitted: ...

    def poll_url(self, task_id: str) -> str | None:
        """The task's poll address from its id alone, where the dialect documents one.

        For a task acknowledged but whose journal entry (the address it came with) was
        never written: a rerun can still collect it."""
        ...

    def parse_poll(self, body: Any) -> TaskState: ...

    def list_url(self) -> str | None:
        """Where one request lists the key's tasks and their statuses (``task_list``);
        None where the dialect has no such list."""
        ...

    def read_list(self, body: Any) -> TaskList:
        """A task list's answer: each listed task's status, by id."""
        ...

    def error_message(self, status: int, body: Any) -> str: ...

    def output_size(self, request: ImageRequest) -> tuple[int, int]: ...

    def cost(self, request: ImageRequest, references: Sequence[Reference] = ()) -> float:
        """The published price of ``request`` with ``references``, in credits.

        What a budget reserves before a submit, and what a row records when the API does
        not say what it charged (dialect A never does).
        """
        ...

    def parse_webhook(self, body: Any) -> tuple[str, TaskState]:
        """A verified webhook body: the task it is about and the state it reports."""
        ...


DIALECTS = ("klein", "bfl")


def published_cost(
    dialect: str, model: str | None = None
) -> Callable[[ImageRequest, Sequence[Reference]], float]:
    """What a request costs at its model's published price in ``dialect``, without a key.

    For plans (``--dry-run``) that price rows before anything is sent: the provider's own
    ``cost``, so a plan and the budget the run reserves agree, references' megapixels
    included (its base URL and key are never used: pricing is arithmetic).
    """
    return make_provider(dialect, "http://127.0.0.1", "", model=model).cost


def make_provider(
    dialect: str,
    base_url: str,
    api_key: str,
    *,
    model: str | None = None,
    webhook_secret: str | None = None,
) -> Provider:
    """The provider for a dialect name, as the CLI's ``--dialect`` spells it.

    ``model`` picks dialect B's model (``klein-4b`` or ``klein-9b``); ``webhook_secret`` is
    sent with each dialect B task so its webhooks come back signed (dialect A's signing
    secret lives in the account, so the client only verifies with it).
    """
    if dialect == "klein":
        from pipeline.providers.klein import KleinProvider

        return KleinProvider(base_url, api_key)
    if dialect == "bfl":
        from pipeline.providers.bfl import DEFAULT_MODEL, BflProvider

        return BflProvider(
            base_url, api_key, model=model or DEFAULT_MODEL, webhook_secret=webhook_secret
        )
    raise ConfigError(f"unknown dialect {dialect!r}; allowed: {', '.join(DIALECTS)}")
