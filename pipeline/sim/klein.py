"""Dialect A ("klein", as sold by Freepik/Magnific): submit, poll one task, list tasks.

Order of checks on submit, fixed so tests and clients can rely on it: key (401), the
sliding-minute submit limit (429; every submit with a valid key counts, refused or not),
the body (400 naming every bad field), injected 503/500, the active-task limit (429),
credits (402), then the task is created and charged; an injected drop cuts the connection
only after that, which is the ambiguous case a careful client must handle by polling its
task list rather than paying twice.

The task list and polls show tasks submitted through this dialect only, even when the same
key also submits through dialect B (limits and credits stay shared). Prices are
``SimConfig.price("flux-2-klein")``: Freepik publishes no per-megapixel figure, so the
default is klein 4B's. Errors, unknown paths included (``{"message": "Not Found"}``), are
``{"message": ...}`` bodies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from pipeline.contract import (
    ASPECT_RATIOS,
    DEFAULT_ASPECT_RATIO,
    DEFAULT_OUTPUT_FORMAT,
    DEFAULT_RESOLUTION,
    DEFAULT_SAFETY,
    KLEIN_KEY_HEADERS,
    KLEIN_PATH,
    OUTPUT_FORMATS,
    REFERENCE_FIELDS,
    RESOLUTIONS,
    SAFETY_MAX,
    SAFETY_MIN,
    SEED_MAX,
    SEED_MIN,
    KleinStatus,
    output_size,
)
from pipeline.sim import images
from pipeline.sim.responses import cut, dumps, is_loopback_host, json_response
from pipeline.sim.results import Results
from pipeline.sim.state import KeyState, SimState, SubmitRequest, Task
from pipeline.sim.webhooks import WebhookSender

_HEADERS_TEXT = " or ".join(KLEIN_KEY_HEADERS)
#: Tasks this dialect took; the task list and polls show these only (a key's dialect B
#: tasks live on BFL's own clusters, which Freepik's API knows nothing of).
DIALECT = "klein"


class BadRequest(Exception):
    """A body that cannot be accepted; carries every problem found, by field."""

    def __init__(self, problems: list[tuple[str, str]], message: str | None = None) -> None:
        super().__init__(message)
        self.problems = problems
        self.message = message or (
            "Invalid parameters: " + "; ".join(f"{name}: {reason}" for name, reason in problems)
        )

    def body(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "invalid_params": [{"name": name, "reason": reason} for name, reason in self.problems],
        }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_submit(
    raw: bytes, *, allow_external_webhooks: bool, max_reference_bytes: int
) -> SubmitRequest:
    """Validate a dialect A submit body; unknown fields are ignored as production does."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(
            [("body", "expected a JSON object")], "Request body is not valid JSON"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest([("body", "expected a JSON object")], "Request body must be a JSON object")
    problems: list[tuple[str, str]] = []

    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(("prompt", "required; a non-empty string"))

    aspect_ratio = body.get("aspect_ratio", DEFAULT_ASPECT_RATIO)
    if not isinstance(aspect_ratio, str) or aspect_ratio not in ASPECT_RATIOS:
        problems.append(("aspect_ratio", "must be one of " + ", ".join(ASPECT_RATIOS)))

    resolution = body.get("resolution", DEFAULT_RESOLUTION)
    if not isinstance(resolution, str) or resolution not in RESOLUTIONS:
        problems.append(("resolution", "must be one of " + ", ".join(RESOLUTIONS)))

    seed = body.get("seed")
    if "seed" in body and not (_is_int(seed) and SEED_MIN <= seed <= SEED_MAX):
        problems.append(("seed", f"must be an integer from {SEED_MIN} to {SEED_MAX}"))

    safety = body.get("safety_tolerance", DEFAULT_SAFETY)
    if not (_is_int(safety) and SAFETY_MIN <= safety <= SAFETY_MAX):
        problems.append(
            ("safety_tolerance", f"must be an integer from {SAFETY_MIN} to {SAFETY_MAX}")
        )

    fmt = body.get("output_format", DEFAULT_OUTPUT_FORMAT)
    if not isinstance(fmt, str) or fmt not in OUTPUT_FORMATS:
        problems.append(("output_format", "must be one of " + ", ".join(OUTPUT_FORMATS)))

    references: list[bytes] = []
    input_pixels = 0
    for name in REFERENCE_FIELDS:
        if name not in body:
            continue
        reason, data = _reference(body[name], max_reference_bytes)
        if reason is not None:
            problems.append((name, reason))
        elif data is not None:
            references.append(data)
            input_pixels += images.reference_pixels(data)

    webhook_url = body.get("webhook_url")
    if "webhook_url" in body:
        reason = _webhook_problem(webhook_url, allow_external_webhooks)
        if reason is not None:
            problems.append(("webhook_url", reason))

    if problems:
        raise BadRequest(problems)
    width, height = output_size(aspect_ratio, resolution)
    return SubmitRequest(
        prompt=prompt,
        width=width,
        height=height,
        seed=seed,
        safety_tolerance=safety,
        fmt=fmt,
        references=tuple(references),
        webhook_url=webhook_url,
        input_pixels=input_pixels,
    )


def _reference(value: object, max_bytes: int) -> tuple[str | None, bytes | None]:
    if not isinstance(value, str) or not value:
        return "must be a non-empty string: base64 of a JPEG or PNG", None
    if len(value) > (max_bytes * 4) // 3 + 4:
        return f"image is larger than {max_bytes} bytes", None
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "is not valid base64 (send the image bytes base64-encoded, no data: prefix)", None
    if len(data) > max_bytes:
        return f"image is larger than {max_bytes} bytes", None
    reason = images.check_reference(data)
    if reason is not None:
        return f"not a usable JPEG or PNG: {reason}", None
    return None, data


def _webhook_problem(value: object, allow_external: bool) -> str | None:
    if not isinstance(value, str) or not value:
        return "must be an http(s) URL"
    try:
        parts = urlsplit(value)
        host = parts.hostname
        _ = parts.port
    except ValueError:
        return "must be an http(s) URL"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an http(s) URL"
    if not allow_external and not is_loopback_host(host):
        return "must point to a loopback host (127.0.0.1, ::1, localhost) on this simulator"
    return None


class KleinApi:
    """The dialect A routes, over the shared state."""

    def __init__(self, state: SimState, results: Results, webhooks: WebhookSender) -> None:
        self.state = state
        self.results = results
        self.webhooks = webhooks

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(KLEIN_PATH, self.submit)
        app.router.add_get(KLEIN_PATH, self.list_tasks)
        app.router.add_get(KLEIN_PATH + "/{task_id}", self.poll)

    # --- shapes -----------------------------------------------------------------------------

    def task_body(self, task: Task, status: KleinStatus, base_url: str) -> dict[str, Any]:
        """The poll body's ``data`` (also a webhook's whole body)."""
        generated = [self.results.url(task, base_url)] if status == KleinStatus.COMPLETED else []
        return {
            "task_id": task.task_id,
            "status": status.value,
            "generated": generated,
            "has_nsfw": task.has_nsfw(status),
        }

    def webhook_body(self, task: Task, status: KleinStatus) -> dict[str, Any]:
        return self.task_body(task, status, task.base_url)

    # --- helpers ----------------------------------------------------------------------------

    def _key(self, request: web.Request) -> KeyState | web.Response:
        value = None
        for header in KLEIN_KEY_HEADERS:
            value = request.headers.get(header)
            if value:
                break
        key = self.state.authenticate(value)
        if key is not None:
            return key
        self.state.unauthorized += 1
        message = (
            f"Missing API key: send it in the {_HEADERS_TEXT} header"
            if not value
            else "Invalid API key"
        )
        return json_response({"message": message}, status=401)

    def _refuse(
        self,
        key: KeyState,
        status: int,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        key.counters.submits_refused += 1
        if status == 429:
            key.counters.rate_limited += 1
        return json_response(body, status=status, headers=headers)

    @staticmethod
    def _base_url(request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    # --- routes -----------------------------------------------------------------------------

    async def submit(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        if isinstance(key, web.Response):
            return key
        state = self.state
        now = state.clock()
        wait = state.record_submit(key, now)
        if wait is not None:
            return self._refuse(
                key,
                429,
                {
                    "message": f"Rate limit exceeded: at most {key.tier.submits_per_minute} "
                    f"submits per minute on tier {key.tier.name}"
                },
                state.retry_after(wait, now),
            )
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = self.state.config.max_body_bytes()
            return self._refuse(key, 413, {"message": f"Request body is larger than {limit} bytes"})
        try:
            parsed = parse_submit(
                raw,
                allow_external_webhooks=state.config.allow_external_webhooks,
                max_reference_bytes=state.config.max_reference_bytes,
            )
        except BadRequest as exc:
            return self._refuse(key, 400, exc.body())
        digest = parsed.digest()
        n = state.see_body(key, digest, now)
        identity = f"{key.name}:{digest.hex()}"
        faults = state.config.faults.submit
        if state.fault(key, "submit_503", identity, n, faults.error_503):
            return self._refuse(key, 503, {"message": "Service temporarily unavailable"})
        if state.fault(key, "submit_500", identity, n, faults.error_500):
            return self._refuse(key, 500, {"message": "Internal server error"})
        wait = state.active_wait(key, now)
        if wait is not None:
            return self._refuse(
                key,
                429,
                {
                    "message": f"Too many active tasks: at most {key.tier.max_active} at once "
                    f"on tier {key.tier.name}"
                },
                state.retry_after(wait, now),
            )
        cents = state.cost_cents(parsed)
        if not state.can_pay(key, cents):
            remaining = (key.credits_cents or 0) / 100
            return self._refuse(
                key,
                402,
                {
                    "message": f"Not enough credits: this image costs {cents / 100:.2f}, "
                    f"{remaining:.2f} left"
                },
            )
        task = state.accept(key, parsed, digest, n, now, self._base_url(request), dialect=DIALECT)
        if task.webhook_url:
            self.webhooks.schedule(task)
        body = dumps({"data": {"task_id": task.task_id, "status": KleinStatus.CREATED.value}})
        delay = state.config.faults.submit_answer_delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        if state.fault(key, "submit_drop", identity, n, faults.drop):
            return await cut(request, body, send=len(body) // 2)
        return web.Response(body=body, content_type="application/json")

    async def poll(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        if isinstance(key, web.Response):
            return key
        state = self.state
        now = state.clock()
        task_id = request.match_info["task_id"]
        key.counters.polls += 1
        task = state.get_task(key, task_id, now, DIALECT)
        if task is None:
            return json_response({"message": f"Task {task_id} not found"}, status=404)
        n = state.polled(task, now)
        faults = state.config.faults.poll
        if state.fault(key, "poll_503", task.identity, n, faults.error_503):
            return json_response({"message": "Service temporarily unavailable"}, status=503)
        if state.fault(key, "poll_500", task.identity, n, faults.error_500):
            return json_response({"message": "Internal server error"}, status=500)
        body = dumps({"data": self.task_body(task, task.status(now), self._base_url(request))})
        if state.fault(key, "poll_drop", task.identity, n, faults.drop):
            return await cut(request, body, send=len(body) // 2)
        return web.Response(body=body, content_type="application/json")

    async def list_tasks(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        if isinstance(key, web.Response):
            return key
        state = self.state
        now = state.clock()
        n = key.counters.list_calls
        key.counters.list_calls += 1
        faults = state.config.faults.list
        if state.fault(key, "list_503", key.name, n, faults.error_503):
            return json_response({"message": "Service temporarily unavailable"}, status=503)
        if state.fault(key, "list_500", key.name, n, faults.error_500):
            return json_response({"message": "Internal server error"}, status=500)
        state.advance(key, now)
        body = dumps(
            {
                "data": [
                    {"task_id": task.task_id, "status": task.status(now).value}
                    for task in key.tasks.values()
                    if task.dialect == DIALECT
                ]
            }
        )
        if state.fault(key, "list_drop", key.name, n, faults.drop):
            return await cut(request, body, send=len(body) // 2)
        return web.Response(body=body, content_type="application/json")
