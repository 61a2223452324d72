"""Contender (a): the vendor-sample style client, one image at a time.

The API documentation's example grown into a loop over the manifest: submit, poll every
0.5 s until the task is COMPLETED, download, next row. ``requests`` with one ``Session``
(keep-alive), a 429 honoured by its Retry-After, 5xx and dropped connections retried a few
times. It can never have more than one task active, whatever the tier.

    FREEPIK_API_KEY=... python -m benchmarks.contenders.vendor_sample M.csv --api-url U --out D
"""

from __future__ import annotations

import time
from typing import Any

import requests

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


def call(session: requests.Session, method: str, url: str, **kwargs: Any) -> requests.Response:
    """One request, retried on 429 (as long as the server asks), 5xx and lost connections."""
    failures = 0
    while True:
        try:
            response = session.request(method, url, timeout=60, **kwargs)
        except requests.ConnectionError:
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


def main() -> int:
    args = parse_args(__doc__.split("\n\n")[0])
    session = requests.Session()
    headers = {KEY_HEADER: api_key()}
    done = failed = 0
    for row in read_rows(args.manifest, args.limit):
        try:
            task = call(
                session, "POST", args.api_url + SUBMIT_PATH, json=body(row), headers=headers
            ).json()
            task_id = task["data"]["task_id"]
            while True:
                time.sleep(POLL_S)
                url = f"{args.api_url}{SUBMIT_PATH}/{task_id}"
                data = call(session, "GET", url, headers=headers).json()
                if data["data"]["status"] in ("COMPLETED", "FAILED"):
                    break
            if data["data"]["status"] != "COMPLETED":
                failed += 1
                continue
            image = call(session, "GET", data["data"]["generated"][0])  # no key to result URLs
            store(args.out, row, image.content)
            done += 1
        except (requests.RequestException, KeyError, ValueError) as exc:
            print(f"row {row['id']}: {exc}")
            failed += 1
    print(f"done {done} failed {failed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
