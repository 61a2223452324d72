"""Contender (c): Prefect with a task per row (``.map``) around the same calls.

How a Prefect user would first write the job: a flow that reads the manifest and maps a
``generate`` task over its rows on a ``ThreadPoolTaskRunner`` as wide as the tier, each task
doing submit, 0.5 s polling, download and store with ``httpx`` (Prefect's own HTTP client,
one shared thread-safe ``Client``). Requests retry on 429/5xx/lost connections like the other
hand-written contenders, and the task itself has Prefect ``retries=2``. Runs in Prefect's
ephemeral mode (no server to set up), so every task run's state changes and logs go to a
local temporary API: that orchestration cost per row is what this contender measures.

    FREEPIK_API_KEY=... python -m benchmarks.contenders.prefect_map M.csv --api-url U --out D
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from prefect import flow, task, unmapped
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

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

CLIENT = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=200))


def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request, retried on 429 (as long as the server asks), 5xx and lost connections."""
    failures = 0
    while True:
        try:
            response = CLIENT.request(method, url, **kwargs)
        except httpx.TransportError:
            failures += 1
            if failures >= ATTEMPTS:
                raise
            time.sleep(1.0)
            continue
        if response.status_code == 429:
            time.sleep(retry_after(response.headers.get("Retry-After")))
            continue
        if response.status_code in RETRYABLE and failures + 1 < ATTEMPTS:
            failures += 1
            time.sleep(1.0)
            continue
        response.raise_for_status()
        return response


@task(retries=2, retry_delay_seconds=1)
def generate(row: dict[str, str], api_url: str, out: Path) -> bool:
    headers = {KEY_HEADER: api_key()}  # read here: task parameters are recorded by Prefect
    task_id = call("POST", api_url + SUBMIT_PATH, json=body(row), headers=headers).json()
    task_id = task_id["data"]["task_id"]
    while True:
        time.sleep(POLL_S)
        data = call("GET", f"{api_url}{SUBMIT_PATH}/{task_id}", headers=headers).json()["data"]
        if data["status"] in ("COMPLETED", "FAILED"):
            break
    if data["status"] != "COMPLETED":
        return False
    store(out, row, call("GET", data["generated"][0]).content)  # no key to result URLs
    return True


@flow(name="catalog-task-per-row", log_prints=True)
def catalog(manifest: Path, api_url: str, out: Path, limit: int | None) -> int:
    rows = list(read_rows(manifest, limit))
    futures = generate.map(rows, unmapped(api_url), unmapped(out))
    wait(futures)
    done = sum(1 for future in futures if future.state.is_completed() and future.result())
    print(f"done {done} failed {len(rows) - done}")
    return done


def main() -> int:
    args = parse_args(__doc__.split("\n\n")[0])
    runner = ThreadPoolTaskRunner(max_workers=args.max_active)
    catalog.with_options(task_runner=runner)(args.manifest, args.api_url, args.out, args.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
