"""The client-CPU tool's arithmetic and the command it samples naive-async with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.client_cpu import fixed_and_marginal, naive_sampled
from benchmarks.harness import REPO


def test_runs_of_two_sizes_split_into_a_run_s_cost_and_a_per_image_one() -> None:
    # 0.6 CPU-s a run and 3 ms an image, with a little noise either way.
    points = [(200, 0.6 + 0.6 + 0.01), (200, 1.2 - 0.01), (1600, 0.6 + 4.8), (1600, 5.4)]
    fixed, per_1000 = fixed_and_marginal(points)
    assert fixed == pytest.approx(0.6, abs=0.02)
    assert per_1000 == pytest.approx(3.0, abs=0.02)


def test_naive_async_sampled_runs_its_module_with_its_arguments(tmp_path: Path) -> None:
    sample = tmp_path / "naive.json"
    command = [sys.executable, "-m", "benchmarks.contenders.naive_async", "--help"]
    sampled = naive_sampled(command, sample)
    assert sampled[:2] == [sys.executable, "-c"] and sampled[3:] == ["--help"]
    done = subprocess.run(sampled, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--api-url" in done.stdout  # the contender's own usage, from its argument parser
    assert sample.exists()  # the sampler wrote its counts as the process exited
