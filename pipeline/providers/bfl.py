"""Dialect B: Black Forest Labs' own API for FLUX.2 [klein] (``--dialect bfl``).

The differences from dialect A stay here: explicit ``width``/``height`` (the preset table,
capped to 4 MP), the ``x-key`` header, an absolute ``polling_url`` that is used exactly as
given (it may name a regional host), FastAPI error bodies, the cost returned at submit, and
webhooks signed by a secret the client sends with each task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.contract import (
    BFL_KEY_HEADER,
    BFL_MODELS,
    REFERENCE_FIELDS,
    BflStatus,
    bfl_size,
    cost_credits,
)
from pipeline.errors import ConfigError
from pipeline.masking import SecretMask
from pipeline.providers import (
    ProtocolError,
    Submitted,
    TaskList,
    TaskState,
)
from pipeline.references import Reference
from pipeline.rows import ImageRequest

#: ``--model`` names and the API path each stands for.
MODELS = {name.removeprefix("flux-2-"): name for name in BFL_MODELS}
DEFAULT_MODEL = "klein-4b"

_MODERATED = {BflStatus.REQUEST_MODERATED, BflStatus.CONTENT_MODERATED}


class BflProvider:
    """Builds dialect B requests and reads its responses (unknown statuses are not final)."""

    dialect = "bfl"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        model: str = DEFAULT_MODEL,
        webhook_secret: str | None = None,
    ) -> None:
        path = MODELS.get(model) or (model if model in BFL_MODELS else None)
        if path is None:
            allowed = ", ".join(MODELS)
            raise ConfigError(
                f"--model {model!r} is not allowed for dialect bfl; expected {allowed}"
            )
        self._base = base_url.rstrip("/")
        self._model = path
        self._path = "/v1/" + path
        self._headers = {BFL_KEY_HEADER: api_key}
        self._webhook_secret = webhook_secret
        self.mask = SecretMask.of_run(base_url, api_key, webhook_secret)

    def __repr__(self) -> str:  # never show the key or the webhook secret
        return f"BflProvider({self._base!r}, {self._path!r})"

    def submit_url(self) -> str:
        return self._base + self._path

    def auth_headers(self) -> Mapping[str, str]:
        return self._headers

    def submit_body(
        self,
        request: ImageRequest,
        references: Sequence[Reference],
        webhook_url: str | None,
    ) -> dict[str, Any]:
        width, height = self.output_size(request)
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "width": width,
            "height": height,
            "seed": request.seed,
            "safety_tolerance": request.safety_tolerance,
            "output_format": request.output_format,
        }
        for field, reference in zip(REFERENCE_FIELDS, references, strict=False):
            body[field] = reference.b64
        if webhook_url:
            body["webhook_url"] = webhook_url
            if self._webhook_secret:
                body["webhook_secret"] = self._webhook_secret
        return body

    def parse_submit(self, body: Any) -> Submitted:
        if not isinstance(body, dict):
            raise ProtocolError("submit response is not a JSON object")
        task_id = body.get("id")
        polling_url = body.get("polling_url")
        if not isinstance(task_id, str) or not task_id:
            raise ProtocolError("submit response has no id")
        if not isinstance(polling_url, str) or not polling_url.startswith(("http://", "https://")):
            raise ProtocolError("submit response has no absolute polling_url")
        cost = body.get("cost")
        cost = float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None
        return Submitted(task_id=task_id, poll_url=polling_url, cost=cost)

    def poll_url(self, task_id: str) -> None:
        """None: each task's address names the cluster that took it, and is never rebuilt."""
        return None

    def list_url(self) -> None:
        """None: this dialect has no list of a key's tasks."""
        return None

    def read_list(self, body: Any) -> TaskList:
        raise ProtocolError("dialect bfl has no task list")

    def parse_poll(self, body: Any) -> TaskState:
        if not isinstance(body, dict):
            raise ProtocolError("poll response is not a JSON object")
        status = str(body.get("status", ""))
        if status == BflStatus.READY:
            result = body.get("result")
            sample = result.get("sample") if isinstance(result, dict) else None
            if not isinstance(sample, str) or not sample:
                raise ProtocolError("Ready task without a result sample URL")
            return TaskState("completed", status, image_url=sample)
        if status in _MODERATED:
            return TaskState("moderated", status, reason=f"moderated by the API ({status})")
        if status in (BflStatus.ERROR, BflStatus.FAILED):
            return TaskState("failed", status, reason=f"the API reported the task {status}")
        if status == BflStatus.TASK_NOT_FOUND:
            return TaskState(
                "failed",
                status,
                reason="the API no longer knows this task (Task not found); rerun with "
                "--retry-failed to submit it again",
            )
        # Pending, and any status the contract does not know: not finished.
        return TaskState("pending", status)

    def parse_webhook(self, body: Any) -> tuple[str, TaskState]:
        """A webhook body is ``{"id", "status", "result"}``: the poll answer's shape."""
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise ProtocolError("webhook body has no task id")
        return body["id"], self.parse_poll(body)

    def error_message(self, status: int, body: Any) -> str:
        """The answer's own words (any secret it echoes masked): they become row reasons."""
        return self.mask.mask(self._error_message(status, body))

    def _error_message(self, status: int, body: Any) -> str:
        if isinstance(body, dict):
            detail = body.get("detail")
            if isinstance(detail, list) and detail:
                parts = []
                for item in detail:
                    if isinstance(item, dict):
                        loc = item.get("loc")
                        where = (
                            ".".join(str(p) for p in loc[1:] or loc)
                            if isinstance(loc, list)
                            else ""
                        )
                        parts.append(
                            f"{where}: {item.get('msg')}" if where else str(item.get("msg"))
                        )
                return f"HTTP {status}: invalid request ({'; '.join(parts)})"
            if isinstance(detail, str) and detail:
                return f"HTTP {status}: {detail}"
        return f"HTTP {status}"

    def output_size(self, request: ImageRequest) -> tuple[int, int]:
        return bfl_size(request.aspect_ratio, request.resolution)

    def cost(self, request: ImageRequest, references: Sequence[Reference] = ()) -> float:
        """The model's published price; the submit's answer says what was really charged."""
        pixels = sum(r.width * r.height for r in references)
        return cost_credits(*self.output_size(request), model=self._model, input_pixels=pixels)
