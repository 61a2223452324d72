"""Deterministic chance: fault decisions and task latencies that repeat under a fixed seed.

A shared RNG stream would make a faulty run depend on the order in which concurrent
requests happen to arrive. Instead every decision hashes (seed, what is being decided, a
stable identity of the request, how many times that identity was seen before), so the
n-th poll of a given task meets the same fault in every run, whatever else is in flight.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from statistics import NormalDist

from pipeline.sim.config import LatencyConfig

_SCALE = float(1 << 64)
_NORMAL = NormalDist()
#: z-score of the 95th percentile: p95 = median * exp(1.645 sigma).
_Z95 = 1.645


def unit(seed: int, kind: str, identity: str, n: int) -> float:
    """A uniform number in [0, 1) fixed by its inputs."""
    digest = hashlib.blake2b(f"{seed}|{kind}|{identity}|{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def decide(seed: int, kind: str, identity: str, n: int, rate: float) -> bool:
    """Whether a fault of ``kind`` hits this request; never hashes when the rate is 0."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    return unit(seed, kind, identity, n) < rate


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Lognormal task duration, clamped to an optional floor and cap."""

    median_s: float
    sigma: float
    floor_s: float = 0.0
    cap_s: float | None = None

    @classmethod
    def from_config(cls, config: LatencyConfig) -> LatencyModel:
        sigma = math.log(config.p95_s / config.median_s) / _Z95 if config.p95_s > 0 else 0.0
        return cls(config.median_s, max(sigma, 0.0), config.floor_s, config.cap_s)

    def duration(self, u: float) -> float:
        """The duration at quantile ``u`` (from ``unit``) of the distribution."""
        u = min(max(u, 1e-12), 1.0 - 1e-12)
        value = self.median_s * math.exp(self.sigma * _NORMAL.inv_cdf(u))
        value = max(value, self.floor_s)
        if self.cap_s is not None:
            value = min(value, self.cap_s)
        return value
