"""Dialect A: the FLUX.2 [klein] task API as sold by Freepik/Magnific."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

from pipeline.contract import (
    KLEIN_MODEL,
    KLEIN_PATH,
    REFERENCE_FIELDS,
    KleinStatus,
    cost_credits,
    output_size,
)
from pipeline.masking import SecretMask
from pipeline.providers import (
    ProtocolError,
    Submitted,
    TaskList,
    TaskState,
)
from pipeline.references import Reference
from pipeline.rows import ImageRequest

#: The statuses a task ends in (a moderated one ends FAILED, or COMPLETED with has_nsfw).
_ENDED = frozenset({KleinStatus.COMPLETED.value, KleinStatus.FAILED.value})
_TASK_ID = itemgetter("task_id")
_STATUS = itemgetter("status")


def _statuses_one_by_one(data: list[Any]) -> dict[object, object]:
    """The task list's statuses by id, skipping entries that are no object or have no
    string id; an entry without a status is listed with none (running)."""
    statuses: dict[object, object] = {}
    for entry in data:
        if isinstance(entry, dict):
            task_id = entry.get("task_id")
            if type(task_id) is str:
                statuses[task_id] = entry.get("status")
    return statuses


class KleinProvider:
    """Builds dialect A requests and reads its responses (tolerant of unknown statuses)."""

    dialect = "klein"

    def __init__(self, base_url: str, api_key: str) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"x-freepik-api-key": api_key}
        self.mask = SecretMask.of_run(base_url, api_key)

    def __repr__(self) -> str:  # never show the key
        return f"KleinProvider({self._base!r})"

    def submit_url(self) -> str:
        return self._base + KLEIN_PATH

    def auth_headers(self) -> Mapping[str, str]:
        return self._headers

    def submit_body(
        self,
        request: ImageRequest,
        references: Sequence[Reference],
        webhook_url: str | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "aspect_ratio": request.aspect_ratio,
            "resolution": request.resolution,
            "seed": request.seed,
            "safety_tolerance": request.safety_tolerance,
            "output_format": request.output_format,
        }
        for field, reference in zip(REFERENCE_FIELDS, references, strict=False):
            body[field] = reference.b64
        if webhook_url:
            body["webhook_url"] = webhook_url
        return body

    def parse_submit(self, body: Any) -> Submitted:
        data = _data(body)
        task_id = data.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise ProtocolError("submit response has no task_id")
        return Submitted(task_id=task_id, poll_url=self.poll_url(task_id))

    def poll_url(self, task_id: str) -> str:
        return f"{self.submit_url()}/{task_id}"

    def parse_poll(self, body: Any) -> TaskState:
        data = _data(body)
        status = str(data.get("status", ""))
        nsfw = data.get("has_nsfw") or []
        flagged = isinstance(nsfw, list) and any(v is True for v in nsfw)
        if status == KleinStatus.COMPLETED:
            if flagged:
                # Production may answer COMPLETED with a blanked image: still moderated.
                return TaskState("moderated", status, reason="moderated by the API (has_nsfw)")
            generated = data.get("generated") or []
            if (
                not isinstance(generated, list)
                or not generated
                or not isinstance(generated[0], str)
            ):
                raise ProtocolError("COMPLETED task without a generated image URL")
            return TaskState("completed", status, image_url=generated[0])
        if status == KleinStatus.FAILED:
            if flagged:
                return TaskState("moderated", status, reason="moderated by the API (has_nsfw)")
            return TaskState("failed", status, reason="the API reported the task FAILED")
        # CREATED, IN_PROGRESS, and any status the contract does not know: not finished.
        return TaskState("pending", status)

    def list_url(self) -> str:
        """``GET`` on the submit address lists the key's tasks with their statuses."""
        return self.submit_url()

    def read_list(self, body: Any) -> TaskList:
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise ProtocolError("task list has no data array")
        # Read once per task that ends, over every task the key kept: the map is built by
        # C loops (``map``, ``zip``, ``dict``) while every entry is an object with both
        # fields, which is what the API sends; an odd entry anywhere sends the whole list
        # through the entry-by-entry reader, which skips what is no task.
        try:
            statuses = dict(zip(map(_TASK_ID, data), map(_STATUS, data), strict=True))
        except (TypeError, KeyError):
            statuses = _statuses_one_by_one(data)
        return TaskList(len(data), statuses, _ENDED)

    def parse_webhook(self, body: Any) -> tuple[str, TaskState]:
        """A webhook body is the poll answer's ``data`` object, without the wrapper."""
        if not isinstance(body, dict) or not isinstance(body.get("task_id"), str):
            raise ProtocolError("webhook body has no task_id")
        return body["task_id"], self.parse_poll({"data": body})

    def error_message(self, status: int, body: Any) -> str:
        """The answer's own words (any secret it echoes masked): they become row reasons."""
        return self.mask.mask(self._error_message(status, body))

    def _error_message(self, status: int, body: Any) -> str:
        if isinstance(body, dict):
            message = body.get("message") or body.get("detail")
            params = body.get("invalid_params")
            if isinstance(params, list) and params:
                details = "; ".join(
                    f"{p.get('name')}: {p.get('reason')}" for p in params if isinstance(p, dict)
                )
                return f"HTTP {status}: {message} ({details})"
            if message:
                return f"HTTP {status}: {message}"
        return f"HTTP {status}"

    def output_size(self, request: ImageRequest) -> tuple[int, int]:
        return output_size(request.aspect_ratio, request.resolution)

    def cost(self, request: ImageRequest, references: Sequence[Reference] = ()) -> float:
        pixels = sum(r.width * r.height for r in references)
        return cost_credits(*self.output_size(request), model=KLEIN_MODEL, input_pixels=pixels)


def _data(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise ProtocolError("response is not an object with a 'data' object")
    return body["data"]
