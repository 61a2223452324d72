"""Webhook delivery: one POST per status change, signed the Svix way, with injected faults.

Signing (the contract's algorithm, Svix convention):

- headers ``webhook-id`` (the same on a duplicated delivery, so receivers can deduplicate),
  ``webhook-timestamp`` (unix seconds) and ``webhook-signature: v1,<base64 sig>``;
- ``sig = HMAC-SHA256(key, f"{id}.{timestamp}.{body}")`` over the exact body bytes sent;
- the key bytes: a secret written ``whsec_<base64>`` means the base64-decoded bytes after
  the prefix; any other string means its UTF-8 bytes.

Deliveries go through one ``aiohttp.ClientSession`` with a timeout. A receiver that is
down, slow or answers non-2xx is counted in ``webhooks_failed`` and never breaks the server.
Only tasks with a ``webhook_url`` get a timer, so plain polling clients cost nothing here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from pipeline.contract import KleinStatus
from pipeline.sim.state import COMPLETED, SimState, Task

log = logging.getLogger(__name__)


def secret_bytes(secret: str) -> bytes:
    """The HMAC key a signing secret stands for (Svix convention, see module docstring)."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode("utf-8")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    payload = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), payload, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class WebhookSender:
    """Schedules and sends a task's status-change deliveries."""

    def __init__(
        self,
        state: SimState,
        body_for: Callable[[Task, KleinStatus], dict[str, Any]],
        *,
        timeout_s: float,
    ) -> None:
        self._state = state
        self._body_for = body_for
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def close(self) -> None:
        self.cancel_all()
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def cancel_all(self) -> None:
        for job in list(self._jobs):
            job.cancel()

    def schedule(self, task: Task) -> None:
        """Start the timeline of a task's deliveries: CREATED now, then each later change."""
        self._spawn(self._timeline(task))

    def _spawn(self, coro: Any) -> None:
        job = asyncio.get_running_loop().create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _timeline(self, task: Task) -> None:
        final = KleinStatus.COMPLETED if task.outcome == COMPLETED else KleinStatus.FAILED
        for status, at in (
            (KleinStatus.CREATED, task.created_at),
            (KleinStatus.IN_PROGRESS, task.started_at),
            (final, task.finished_at),
        ):
            if status == KleinStatus.IN_PROGRESS and task.started_at >= task.finished_at:
                continue
            delay = at - self._state.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            self._deliver(task, status)

    def _deliver(self, task: Task, status: KleinStatus) -> None:
        state = self._state
        faults = state.config.faults
        identity = f"{task.identity}:{status.value}"
        if state.fault(task.key, "webhook_lost", identity, 0, faults.webhook_lost):
            return
        late = state.fault(task.key, "webhook_late", identity, 0, faults.webhook_late)
        copies = (
            2
            if state.fault(task.key, "webhook_duplicate", identity, 0, faults.webhook_duplicate)
            else 1
        )
        body = json.dumps(self._body_for(task, status), separators=(",", ":")).encode()
        msg_id = f"msg_{task.task_id}_{status.value.lower()}"
        delay = faults.webhook_late_s if late else 0.0
        for _ in range(copies):
            self._spawn(self._post(task, msg_id, body, delay))

    async def _post(self, task: Task, msg_id: str, body: bytes, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        session = self._session
        if session is None or task.webhook_url is None:
            return
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
        }
        secret = task.key.config.webhook_secret
        if secret:
            headers["webhook-signature"] = sign(secret, msg_id, timestamp, body)
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
