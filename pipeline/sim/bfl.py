"""Dialect B ("bfl", Black Forest Labs' own API): submit, poll by ``polling_url``, webhooks.

It shares ``SimState`` with dialect A, so a key's limits, credits and counters are the same
whichever dialect a client speaks (the stats use the same per-key names); its tasks are its
own (dialect A's list and polls never show them, nor this dialect's polls A's tasks).
What differs:

- submit ``POST /v1/flux-2-klein-4b`` (or ``-9b``) with explicit ``width``/``height``, auth
  in ``x-key``; the answer carries the task's ``cost`` in credits (the model's price, see
  ``SimConfig.price``), ``input_mp``/``output_mp`` and an absolute ``polling_url``.
- ``polling_url`` names a second listener standing for the regional cluster that took the
  task (another port; production: another host such as ``api.us1.bfl.ai``), with the usual
  path ``/v1/get_result?id=``. The global host's ``/v1/get_result`` is documented and
  answers, but says ``Task not found`` for every task, as another cluster does: a client
  that rebuilds the URL from its base, or swaps the host, fails here as in production.
- a ``Ready`` task's ``result`` is ``{sample, seed, prompt, start_time, end_time,
  duration}`` (unix seconds; what BFL's examples and webhooks carry), in polls and webhooks.
- errors are FastAPI bodies: ``{"detail": "..."}``, and for 422
  ``{"detail": [{"loc", "msg", "type"}]}`` with one entry per bad field; unknown paths
  ``404 {"detail": "Not Found"}`` and wrong methods ``405 {"detail": "Method Not Allowed"}``.
- task ids are random UUIDs per server start (``task_id_seed`` makes them repeatable).
- statuses ``Pending``, ``Ready``, ``Error``, ``Request Moderated`` (the prompt tripped
  the moderation words: refused before generation, so the first poll already shows it,
  with no progress, and its slot is free at once), ``Content Moderated`` (random
  moderation of the output, shown when the task ends) and ``Task not found``. Moderated
  and failed tasks are refunded, as dialect A's are.
- one webhook when the task ends, ``{"id", "status", "result"}``, signed with
  ``X-BFL-Signature: sha256=<hex HMAC-SHA256(webhook_secret, body)>`` when the submit
  carried a ``webhook_secret``; the fault settings (late, duplicated, lost) apply.

Order of checks on submit, as in dialect A: key (401 missing, 403 unknown), sliding-minute
limit (429), body (422), injected 503/500, active tasks (429), credits (402), then accept.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from pipeline.contract import (
    BFL_KEY_HEADER,
    BFL_MAX_PIXELS,
    BFL_MIN_SIDE,
    BFL_MODELS,
    DEFAULT_OUTPUT_FORMAT,
    DEFAULT_SAFETY,
    OUTPUT_FORMATS,
    REFERENCE_FIELDS,
    SAFETY_MAX,
    SAFETY_MIN,
    SEED_MAX,
    SEED_MIN,
    SIDE_MULTIPLE,
    BflStatus,
)
from pipeline.sim import images
from pipeline.sim.responses import cut, dumps, is_loopback_host, json_response
from pipeline.sim.results import Results
from pipeline.sim.state import (
    COMPLETED,
    FAILED,
    KeyState,
    SimState,
    SubmitRequest,
    Task,
)

log = logging.getLogger(__name__)

RESULT_PATH = "/v1/get_result"
#: Tasks this dialect took; dialect A's task list and polls never show them.
DIALECT = "bfl"
DEFAULT_SIDE = 1024
_MAX_REFERENCE_FETCH_S = 10.0


class Unprocessable(Exception):
    """A 422: every problem found, as FastAPI reports them."""

    def __init__(self, problems: list[tuple[str, str, str]]) -> None:
        super().__init__("; ".join(f"{loc}: {msg}" for loc, msg, _ in problems))
        self.problems = problems

    def body(self) -> dict[str, Any]:
        return {
            "detail": [
                {"loc": ["body", loc], "msg": msg, "type": kind} for loc, msg, kind in self.problems
            ]
        }


@dataclass(slots=True)
class _Extra:
    """What dialect B remembers about a task beyond the shared state."""

    model: str
    webhook_secret: str | None
    request_moderated: bool


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _url_problem(value: str, allow_external: bool) -> str | None:
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


class BflApi:
    """The dialect B routes, over the state dialect A uses too."""

    def __init__(self, state: SimState, results: Results) -> None:
        self.state = state
        self.results = results
        #: Base URL of the regional listener that answers this dialect's polls, once it
        #: listens (``SimServer`` starts it); ``polling_url`` points there.
        self.regional_url: str | None = None
        self._extra: dict[str, _Extra] = {}
        self._session: aiohttp.ClientSession | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        words = [re.escape(w) for w in state.config.moderation.words if w.strip()]
        self._words = (
            re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE) if words else None
        )

    def add_routes(self, app: web.Application) -> None:
        """The global host's routes: submits, and a ``get_result`` that knows no task.

        ``get_result`` is documented on the global host too, so it is there and validates
        like the real one; but every task lives on the regional cluster its
        ``polling_url`` names, and asking another cluster answers ``Task not found``
        (shared/api-contract.md). Without a regional listener (``create_app`` served
        alone) the global host answers its tasks itself.
        """
        for model in BFL_MODELS:
            app.router.add_post(f"/v1/{model}", self.submit)
        app.router.add_get(RESULT_PATH, self.poll_global)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)

    def add_regional_routes(self, app: web.Application) -> None:
        """The regional cluster's routes: ``get_result`` for the tasks it took."""
        app.router.add_get(RESULT_PATH, self.poll)

    async def _startup(self, _: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=self.state.config.webhook_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def _cleanup(self, _: web.Application) -> None:
        self.cancel_all()
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def cancel_all(self) -> None:
        """Stop pending webhook deliveries and forget dialect B's task notes (a reset)."""
        for job in list(self._jobs):
            job.cancel()
        self._extra.clear()

    # --- helpers ----------------------------------------------------------------------------

    def _key(self, request: web.Request) -> KeyState | web.Response:
        value = request.headers.get(BFL_KEY_HEADER)
        key = self.state.authenticate(value)
        if key is not None:
            return key
        self.state.unauthorized += 1
        if not value:
            return json_response(
                {"detail": f"Not authenticated: send the API key in the {BFL_KEY_HEADER} header"},
                status=401,
            )
        return json_response({"detail": "Invalid API key"}, status=403)

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

    def _status(self, task: Task, now: float) -> BflStatus:
        if now < task.finished_at:
            return BflStatus.PENDING
        if task.outcome == COMPLETED:
            return BflStatus.READY
        if task.outcome == FAILED:
            return BflStatus.ERROR
        extra = self._extra.get(task.task_id)
        if extra is not None and extra.request_moderated:
            return BflStatus.REQUEST_MODERATED
        return BflStatus.CONTENT_MODERATED

    def _result(self, task: Task, status: BflStatus, base_url: str) -> dict[str, Any] | None:
        """A Ready task's ``result``: the fields the API's examples and webhooks carry.

        ``start_time``/``end_time`` are unix seconds (generation start, after the queue,
        and finish) and ``duration`` their difference, as BFL's examples show them.
        """
        if status != BflStatus.READY:
            return None
        start, end = round(task.started_at, 3), round(task.finished_at, 3)
        return {
            "sample": self.results.url(task, base_url),
            "seed": task.seed,
            "prompt": task.prompt,
            "start_time": start,
            "end_time": end,
            "duration": round(end - start, 3),
        }

    def _forget_pruned(self) -> None:
        """Drop notes of tasks the shared state has pruned (memory stays flat)."""
        if len(self._extra) > 2 * len(self.state.tasks) + 1024:
            tasks = self.state.tasks
            self._extra = {k: v for k, v in self._extra.items() if k in tasks}

    # --- submit -----------------------------------------------------------------------------

    async def _parse(
        self, raw: bytes, model: str
    ) -> tuple[SubmitRequest, str | None, float, bool] | Unprocessable:
        config = self.state.config
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            return Unprocessable([("body", "Input should be a valid JSON object", "json_invalid")])
        if not isinstance(body, dict):
            return Unprocessable([("body", "Input should be a valid dictionary", "dict_type")])
        problems: list[tuple[str, str, str]] = []
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(("prompt", "Field required: a non-empty string", "missing"))
        sides: dict[str, int] = {}
        for name in ("width", "height"):
            value = body.get(name, DEFAULT_SIDE)
            if not _is_int(value) or value < BFL_MIN_SIDE or value % SIDE_MULTIPLE:
                problems.append(
                    (
                        name,
                        f"Input should be a multiple of {SIDE_MULTIPLE} of at least {BFL_MIN_SIDE}",
                        "value_error",
                    )
                )
            else:
                sides[name] = value
        if len(sides) == 2 and sides["width"] * sides["height"] > BFL_MAX_PIXELS:
            problems.append(
                ("width", f"width x height must be at most {BFL_MAX_PIXELS} pixels", "value_error")
            )
        seed = body.get("seed")
        if seed is not None and not (_is_int(seed) and SEED_MIN <= seed <= SEED_MAX):
            problems.append(
                ("seed", f"Input should be an integer from {SEED_MIN} to {SEED_MAX}", "int_type")
            )
        safety = body.get("safety_tolerance", DEFAULT_SAFETY)
        if not (_is_int(safety) and SAFETY_MIN <= safety <= SAFETY_MAX):
            problems.append(
                (
                    "safety_tolerance",
                    f"Input should be an integer from {SAFETY_MIN} to {SAFETY_MAX}",
                    "int_type",
                )
            )
        fmt = body.get("output_format", DEFAULT_OUTPUT_FORMAT)
        if fmt not in OUTPUT_FORMATS:
            problems.append(("output_format", "Input should be 'jpeg' or 'png'", "enum"))
        webhook_url = body.get("webhook_url")
        if webhook_url is not None:
            reason = (
                _url_problem(webhook_url, config.allow_external_webhooks)
                if isinstance(webhook_url, str)
                else "must be an http(s) URL"
            )
            if reason is not None:
                problems.append(("webhook_url", reason, "url_parsing"))
        secret = body.get("webhook_secret")
        if secret is not None and (not isinstance(secret, str) or not secret):
            problems.append(("webhook_secret", "Input should be a non-empty string", "string_type"))
        references: list[bytes] = []
        input_pixels = 0
        for name in REFERENCE_FIELDS:
            value = body.get(name)
            if value is None:
                continue
            reason, data = await self._reference(value)
            if reason is not None:
                problems.append((name, reason, "value_error"))
            elif data is not None:
                references.append(data)
                input_pixels += images.reference_pixels(data)
        if problems:
            return Unprocessable(problems)
        request = SubmitRequest(
            prompt=prompt,
            width=sides["width"],
            height=sides["height"],
            seed=seed,
            safety_tolerance=safety,
            fmt=fmt,
            references=tuple(references),
            webhook_url=webhook_url,
            model=model,
            input_pixels=input_pixels,
        )
        moderated = bool(
            self._words is not None
            and safety < config.moderation.pass_tolerance
            and self._words.search(prompt)
        )
        return request, secret, input_pixels / 1_000_000, moderated

    async def _reference(self, value: object) -> tuple[str | None, bytes | None]:
        """Base64 (optionally a data: URL) or an http(s) URL the simulator may fetch."""
        max_bytes = self.state.config.max_reference_bytes
        if not isinstance(value, str) or not value:
            return "Input should be base64 of a JPEG or PNG, or its URL", None
        if value.startswith(("http://", "https://")):
            problem = _url_problem(value, self.state.config.allow_external_webhooks)
            if problem is not None:
                return problem, None
            data = await self._fetch(value, max_bytes)
            if isinstance(data, str):
                return data, None
        else:
            if value.startswith("data:"):
                value = value.partition(",")[2]
            if len(value) > (max_bytes * 4) // 3 + 4:
                return f"image is larger than {max_bytes} bytes", None
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return "is neither a URL nor valid base64", None
        if len(data) > max_bytes:
            return f"image is larger than {max_bytes} bytes", None
        reason = images.check_reference(data)
        if reason is not None:
            return f"not a usable JPEG or PNG: {reason}", None
        return None, data

    async def _fetch(self, url: str, max_bytes: int) -> bytes | str:
        session = self._session
        if session is None:
            return "cannot fetch reference URLs right now"
        try:
            async with session.get(
                url, timeout=aiohttp.ClientTimeout(total=_MAX_REFERENCE_FETCH_S)
            ) as resp:
                if resp.status != 200:
                    return f"fetching the URL answered HTTP {resp.status}"
                data = await resp.content.read(max_bytes + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"cannot fetch the URL ({type(exc).__name__})"
        if len(data) > max_bytes:
            return f"image is larger than {max_bytes} bytes"
        return data

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
                    "detail": f"Rate limit exceeded: at most {key.tier.submits_per_minute} "
                    "requests per minute"
                },
                state.retry_after(wait, now),
            )
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = state.config.max_body_bytes()
            return self._refuse(key, 413, {"detail": f"Request body is larger than {limit} bytes"})
        model = request.path.rsplit("/", 1)[-1]
        parsed = await self._parse(raw, model)
        if isinstance(parsed, Unprocessable):
            return self._refuse(key, 422, parsed.body())
        submit, secret, input_mp, request_moderated = parsed
        now = state.clock()
        digest = submit.digest()
        n = state.see_body(key, digest, now)
        identity = f"{key.name}:{digest.hex()}"
        faults = state.config.faults.submit
        if state.fault(key, "submit_503", identity, n, faults.error_503):
            return self._refuse(key, 503, {"detail": "Service temporarily unavailable"})
        if state.fault(key, "submit_500", identity, n, faults.error_500):
            return self._refuse(key, 500, {"detail": "Internal server error"})
        wait = state.active_wait(key, now)
        if wait is not None:
            return self._refuse(
                key,
                429,
                {
                    "detail": f"You have reached the limit of {key.tier.max_active} active "
                    "tasks; wait for one to finish"
                },
                state.retry_after(wait, now),
            )
        cents = state.cost_cents(submit)
        if not state.can_pay(key, cents):
            remaining = (key.credits_cents or 0) / 100
            message = f"Insufficient credits: this costs {cents / 100:.2f}, {remaining:.2f} left"
            return self._refuse(key, 402, {"detail": message})
        base_url = f"{request.scheme}://{request.host}"
        task = state.accept(
            key, submit, digest, n, now, base_url,
            dialect=DIALECT, request_moderated=request_moderated,
        )  # fmt: skip
        self._forget_pruned()
        self._extra[task.task_id] = _Extra(model, secret, request_moderated)
        if task.webhook_url:
            self._spawn(self._deliver_when_done(task))
        body = dumps(
            {
                "id": task.task_id,
                "polling_url": f"{self.regional_url or base_url}{RESULT_PATH}?id={task.task_id}",
                "cost": task.cost_cents / 100,
                "input_mp": round(input_mp, 2),
                "output_mp": round(task.width * task.height / 1_000_000, 2),
            }
        )
        delay = state.config.faults.submit_answer_delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        if state.fault(key, "submit_drop", identity, n, faults.drop):
            return await cut(request, body, send=len(body) // 2)
        return web.Response(body=body, content_type="application/json")

    # --- poll -------------------------------------------------------------------------------

    async def poll_global(self, request: web.Request) -> web.StreamResponse:
        """``get_result`` on the global host: ``Task not found`` once regions take tasks."""
        return await self._poll(request, found=self.regional_url is None)

    async def poll(self, request: web.Request) -> web.StreamResponse:
        """``get_result`` on the regional cluster, where ``polling_url`` points."""
        return await self._poll(request, found=True)

    async def _poll(self, request: web.Request, *, found: bool) -> web.StreamResponse:
        key = self._key(request)
        if isinstance(key, web.Response):
            return key
        state = self.state
        now = state.clock()
        task_id = request.query.get("id", "")
        if not task_id:
            return json_response(
                {"detail": [{"loc": ["query", "id"], "msg": "Field required", "type": "missing"}]},
                status=422,
            )
        key.counters.polls += 1
        task = state.get_task(key, task_id, now, DIALECT) if found else None
        if task is None:
            return json_response(
                {"id": task_id, "status": BflStatus.TASK_NOT_FOUND.value, "result": None,
                 "progress": None}
            )  # fmt: skip
        n = state.polled(task, now)
        faults = state.config.faults.poll
        if state.fault(key, "poll_503", task.identity, n, faults.error_503):
            return json_response({"detail": "Service temporarily unavailable"}, status=503)
        if state.fault(key, "poll_500", task.identity, n, faults.error_500):
            return json_response({"detail": "Internal server error"}, status=500)
        status = self._status(task, now)
        progress = None
        if status == BflStatus.PENDING and now >= task.started_at:
            span = max(task.finished_at - task.started_at, 1e-9)
            progress = round(min(0.99, (now - task.started_at) / span), 2)
        base_url = f"{request.scheme}://{request.host}"
        body = dumps(
            {
                "id": task.task_id,
                "status": status.value,
                "result": self._result(task, status, base_url),
                "progress": progress,
            }
        )
        if state.fault(key, "poll_drop", task.identity, n, faults.drop):
            return await cut(request, body, send=len(body) // 2)
        return web.Response(body=body, content_type="application/json")

    # --- webhooks ---------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        job = asyncio.get_running_loop().create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _deliver_when_done(self, task: Task) -> None:
        delay = task.finished_at - self.state.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        state = self.state
        faults = state.config.faults
        identity = f"{task.identity}:final"
        if state.fault(task.key, "webhook_lost", identity, 0, faults.webhook_lost):
            return
        late = state.fault(task.key, "webhook_late", identity, 0, faults.webhook_late)
        duplicate = state.fault(
            task.key, "webhook_duplicate", identity, 0, faults.webhook_duplicate
        )
        status = self._status(task, state.clock())
        body = dumps(
            {
                "id": task.task_id,
                "status": status.value,
                "result": self._result(task, status, self.regional_url or task.base_url),
            }
        )
        for _ in range(2 if duplicate else 1):
            self._spawn(self._post(task, body, faults.webhook_late_s if late else 0.0))

    async def _post(self, task: Task, body: bytes, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        session = self._session
        if session is None or task.webhook_url is None:
            return
        headers = {"content-type": "application/json"}
        extra = self._extra.get(task.task_id)
        if extra is not None and extra.webhook_secret:
            headers["X-BFL-Signature"] = bfl_signature(extra.webhook_secret, body)
        counters = task.key.counters
        try:
            async with session.post(task.webhook_url, data=body, headers=headers) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("webhook delivery for task %s failed: %s", task.task_id, exc)
            ok = False
        if ok:
            counters.webhooks_sent += 1
        else:
            counters.webhooks_failed += 1


def bfl_signature(secret: str, body: bytes) -> str:
    """The ``X-BFL-Signature`` header value: ``sha256=`` and the hex HMAC of the body."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
