"""A credit budget for a whole flow: per-shard caps that never add up past ``max_credits``.

Each shard is a separate run with its own journal and its own ``pipeline.budget.Budget``,
which keeps that shard's spend plus in-flight cost within the cap it is given, exactly, in
whatever process or machine it runs. The flow hands out the caps, and only the flow does:

- a shard starting gets what it already holds (earlier runs into the output) plus an equal
  part of the credits no shard holds, split among the shards that have not started yet;
- a shard finishing keeps only what it committed (spent, plus tasks left in flight): the
  rest goes back to the pool for the shards after it;
- once all shards ran, a shard that stopped on its cap while credits are left runs again,
  one at a time, with everything left (it resumes from its journal; nothing is paid twice).

So the caps sum to at most ``max_credits`` at every moment, and the flow as a whole never
commits more, whatever the number of shards or workers. The caps are stored in the output
(``credits.json``) before a shard starts, so a rerun after a crash starts from them: a shard
killed mid-run may have committed up to its cap, so its cap stays until it reports again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Final

from flows.shards import SHARDS_DIR

CREDITS_RELPATH: Final = f"{SHARDS_DIR}/credits.json"


def _cents_down(value: float) -> float:
    """Credits are counted in hundredths; a grant is rounded down so caps never overshoot."""
    return math.floor(max(0.0, value) * 100 + 1e-9) / 100


@dataclass(slots=True)
class CreditPool:
    """The flow's ``max_credits`` and the cap each shard holds of it."""

    limit: float
    caps: dict[int, float] = field(default_factory=dict)
    #: Shards not started yet in this flow run (they share what is free).
    waiting: set[int] = field(default_factory=set)

    @property
    def held(self) -> float:
        return sum(self.caps.values())

    @property
    def free(self) -> float:
        return _cents_down(self.limit - self.held)

    def grant(self, index: int, *, everything: bool = False) -> float:
        """The cap shard ``index`` runs with now: its own plus its part of what is free."""
        self.waiting.discard(index)
        part = self.free if everything else _cents_down(self.free / (len(self.waiting) + 1))
        self.caps[index] = round(self.caps.get(index, 0.0) + part, 6)
        return self.caps[index]

    def settle(self, index: int, committed: float) -> None:
        """Shard ``index`` ended having committed ``committed``; the rest of its cap is free."""
        self.caps[index] = min(self.caps.get(index, 0.0), round(committed, 6))

    def to_bytes(self) -> bytes:
        data = {
            "max_credits": self.limit,
            "caps": {str(k): v for k, v in sorted(self.caps.items())},
        }
        return (json.dumps(data, indent=2) + "\n").encode("utf-8")

    @classmethod
    def load(cls, limit: float, data: bytes | None, shards: int) -> CreditPool:
        """The pool for a flow run: caps an earlier run into the output left, and ``limit``
        (the figure given last, as for ``klein-batch run``)."""
        caps: dict[int, float] = {}
        if data:
            raw = json.loads(data.decode("utf-8"))
            caps = {int(k): float(v) for k, v in dict(raw.get("caps") or {}).items()}
        return cls(limit=float(limit), caps=caps, waiting=set(range(shards)))
