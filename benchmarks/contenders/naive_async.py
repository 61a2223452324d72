"""Contender (b): the naive async client, ``asyncio.gather`` under a semaphore.

What most people write after the vendor sample: one coroutine per row, a semaphore at the
tier's active-task limit, fixed 0.5 s polling, aiohttp with one session. It holds a slot
from its submit until it has *learned* that the task finished (and downloaded it), so the
server's slot sits idle for the detection delay of every task.

    FREEPIK_API_KEY=... python -m benchmarks.contenders.naive_async M.csv --api-url U --out D
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.contenders.common import (
    ATTEMPTS,
    KEY_HEADER,
    POLL_S,
    RETRYABLE,
    SUBMIT_PATH,
    api_key,
    body,
    parse_args,
    read_rows,
    retry_after,
    store,
)


class Failed(Exception):
    pass


async def call(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> bytes:
    """The body of one request, retried on 429, 5xx and lost connections."""
    failures = 0
    while True:
        try:
            async with session.request(method, url, **kwargs) as response:
                data = await response.read()
                status = response.status
                wait = retry_after(response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            failures += 1
            if failures >= ATTEMPTS:
                raise Failed(str(exc)) from None
            await asyncio.sleep(1.0)
            continue
        if status == 429:
            await asyncio.sleep(wait)
            continue
        if status in RETRYABLE and failures + 1 < ATTEMPTS:
            failures += 1
            await asyncio.sleep(1.0)
            continue
        if status != 200:
            raise Failed(f"HTTP {status}")
        return data


async def generate(
    session: aiohttp.ClientSession,
    semaphore: asyncio.Semaphore,
    api_url: str,
    out: Path,
    row: dict[str, str],
    headers: dict[str, str],
) -> bool:
    async with semaphore:
        try:
            raw = await call(
                session, "POST", api_url + SUBMIT_PATH, json=body(row), headers=headers
            )
            task_id = json.loads(raw)["data"]["task_id"]
            while True:
                await asyncio.sleep(POLL_S)
                raw = await call(
                    session, "GET", f"{api_url}{SUBMIT_PATH}/{task_id}", headers=headers
                )
                data = json.loads(raw)["data"]
                if data["status"] in ("COMPLETED", "FAILED"):
                    break
            if data["status"] != "COMPLETED":
                return False
            image = await call(session, "GET", data["generated"][0])  # no key to result URLs
        except (Failed, KeyError, ValueError) as exc:
            print(f"row {row['id']}: {exc}")
            return False
    await asyncio.to_thread(store, out, row, image)
    return True


async def main_async() -> int:
    args = parse_args(__doc__.split("\n\n")[0])
    semaphore = asyncio.Semaphore(args.max_active)
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {KEY_HEADER: api_key()}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(
            *(
                generate(session, semaphore, args.api_url, args.out, row, headers)
                for row in read_rows(args.manifest, args.limit)
            )
        )
    print(f"done {sum(results)} failed {len(results) - sum(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main_async()))
