"""Client CPU per 1,000 images, contenders alternating round by round, and a profile.

The suite (``benchmarks/run.py``) runs each contender once, one after the other; on a
shared machine its CPU figures move 20-30% between invocations. This runs the contenders
in turn for several rounds against a fresh simulator each (the suite's, pinned the same
way), so a change is judged by ratios measured side by side, and optionally profiles one
klein-batch run (cProfile on the CPU clock around ``pipeline.cli.main``: the profile's top
entries in ``benchmarks/notes.md`` come from here)::

    python -m benchmarks.client_cpu --scenario scale --rows 2000 --rounds 2
    python -m benchmarks.client_cpu --scenario standard --rows 200 1600 --rounds 2
    python -m benchmarks.client_cpu --contenders klein-batch --profile /tmp/kb.prof
    python -m benchmarks.client_cpu --contenders klein-batch --sample /tmp/kb.json

``--sample`` counts where klein-batch's CPU goes by sampling its stack on the CPU clock
(``benchmarks/cpu_sampler.py``): cProfile's own cost distorts the shares, this does not.
naive-async's last run is sampled too (into ``<FILE stem>.naive-async.json`` beside it),
and the two are printed side by side by kind (imports, the task list, the journal ...).

With two run sizes or more (``--rows 200 1600``) each contender's runs also give a line:
the CPU a run costs whatever its size (imports, start-up, report.html's 200 thumbnails)
and the CPU per 1,000 images past it. One size's ratio mixes the two, so a short run
shows klein-batch's larger start-up and a long one its per-image path.

``klein-batch-probes`` is klein-batch with ``--no-task-list`` (polls and probes alone):
what reading the task list costs. ``klein-batch-no-thumbnails`` is the same klein-batch
with report.html's thumbnails off (the engine decodes nothing, the page makes none): what
the thumbnails cost.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.cpu_sampler import report, side_by_side
from benchmarks.harness import REPO, Simulator
from benchmarks.run import Scenario, command_for, contender_env, scenarios, write_manifest

CONTENDERS = ("naive-async", "klein-batch", "klein-batch-no-thumbnails", "klein-batch-probes")
#: Run before ``pipeline.cli.main`` for ``klein-batch-no-thumbnails``.
_NO_THUMBNAILS = (
    "import pipeline.engine as engine, pipeline.html_report as page\n"
    "engine.INLINE_THUMBS = 0\n"
    "page.thumbnail = lambda data, size=128: b''\n"
)
#: Run first when ``--sample`` is given.
_SAMPLED = "import benchmarks.cpu_sampler\nbenchmarks.cpu_sampler.start({path!r})\n"
#: naive-async run under the sampler: its own code is ``benchmarks/contenders``.
_NAIVE_SAMPLED = (
    "import os, runpy, sys\n"
    "import benchmarks.cpu_sampler as sampler\n"
    "sampler.OWN = (os.sep + 'contenders' + os.sep,)\n"
    "sampler.start({path!r})\n"
    "sys.argv[0] = {module!r}\n"
    "runpy.run_module({module!r}, run_name='__main__')\n"
)
_PROFILED = (
    "import cProfile, time\n"
    "profile = cProfile.Profile(time.process_time)\n"
    "profile.enable()\n"
    "try:\n"
    "    main()\n"
    "except SystemExit:\n"
    "    pass\n"
    "profile.disable()\n"
    "profile.dump_stats({path!r})\n"
)


def klein_command(
    command: list[str], contender: str, profile: Path | None, sample: Path | None = None
) -> list[str]:
    """The suite's ``klein-batch run ...`` as ``python -c``, so the variant and the
    profiler or sampler can run in the process itself."""
    code = _NO_THUMBNAILS if contender == "klein-batch-no-thumbnails" else ""
    if sample is not None:
        code = _SAMPLED.format(path=str(sample)) + code
    code += "from pipeline.cli import main\n"
    code += _PROFILED.format(path=str(profile)) if profile is not None else "main()\n"
    return [sys.executable, "-c", code, *command[1:]]


def naive_sampled(command: list[str], sample: Path) -> list[str]:
    """naive-async's ``python -m MODULE ARGS`` as ``python -c``, sampled into ``sample``."""
    at = command.index("-m")
    module = command[at + 1]
    code = _NAIVE_SAMPLED.format(path=str(sample), module=module)
    return [command[0], "-c", code, *command[at + 2 :]]


def naive_sample_path(sample: Path) -> Path:
    return sample.with_name(f"{sample.stem}.naive-async.json")


def cpu_of(command: list[str], env: dict[str, str], cpus: list[int]) -> float:
    """User + system CPU seconds of ``command`` and the children it reaped."""
    if cpus and shutil.which("taskset"):
        command = ["taskset", "-c", ",".join(map(str, cpus)), *command]
    before = os.times()
    subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = os.times()
    return (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="scale", help="a suite scenario (default scale)")
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[2000],
        help="rows per run; two sizes or more also give each contender's CPU a run and "
        "per 1,000 images (a line through its runs)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument(
        "--profile", type=Path, help="cProfile klein-batch into this file (its last run)"
    )
    parser.add_argument(
        "--sample",
        type=Path,
        help="sample klein-batch's stack on the CPU clock into this file (its last run)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the runs write (default: the system's temporary folder); on this "
        "machine's /tmp a file's creation costs 0.03-1.2 ms of CPU depending on the files "
        "deleted there lately (benchmarks/notes.md, session 28), /dev/shm keeps that out",
    )
    args = parser.parse_args()
    scenario = {s.name: s for s in scenarios(False)}[args.scenario]
    #: (rows asked, images made, CPU seconds) of each run, by contender.
    runs: dict[str, list[tuple[int, int, float]]] = {name: [] for name in args.contenders}
    with tempfile.TemporaryDirectory(prefix="client-cpu-", dir=args.work_dir) as tmp:
        root = Path(tmp)
        for round_no in range(args.rounds):
            for rows in args.rows:
                manifest = root / f"manifest-{rows}.csv"
                if not manifest.exists():
                    write_manifest(manifest, rows)
                for contender in args.contenders:
                    images, cpu = one_run(args, scenario, root, manifest, rows, contender, round_no)
                    runs[contender].append((rows, images, cpu))
                    print(
                        f"{contender}: {images} images, {cpu / max(1, images) * 1000:.2f} "
                        f"CPU s/1000, load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
    for contender, done in runs.items():
        for rows in args.rows:
            figures = [cpu / max(1, images) * 1000 for r, images, cpu in done if r == rows]
            print(f"{contender} ({rows} rows): " + " ".join(f"{f:.2f}" for f in figures))
    if len(set(args.rows)) > 1:
        for contender, done in runs.items():
            fixed, per_1000 = fixed_and_marginal([(images, cpu) for _, images, cpu in done])
            print(f"{contender}: {fixed:.2f} CPU s a run, {per_1000:.2f} CPU s per 1,000 images")
    if args.sample is not None and args.sample.exists():
        print(report(args.sample))
        naive = naive_sample_path(args.sample)
        print(side_by_side([naive, args.sample] if naive.exists() else [args.sample]))


def one_run(
    args: argparse.Namespace,
    scenario: Scenario,
    root: Path,
    manifest: Path,
    rows: int,
    contender: str,
    round_no: int,
) -> tuple[int, float]:
    """One contender's run of ``manifest`` against a fresh simulator: (images, CPU s)."""
    key = "bench-" + secrets.token_hex(12)
    workdir = root / f"{contender}-{rows}-{round_no}"
    workdir.mkdir()
    out = workdir / "out"
    with Simulator(scenario.sim, workdir, key, [0]) as sim:
        suite_name = (
            contender if contender in ("naive-async", "klein-batch-probes") else "klein-batch"
        )
        command = command_for(suite_name, manifest, sim.url, out, scenario.sim, rows)
        if suite_name != "naive-async":
            profile = args.profile if contender == "klein-batch" else None
            sample = args.sample if contender == "klein-batch" else None
            command = klein_command(command, contender, profile, sample)
        elif args.sample is not None:
            command = naive_sampled(command, naive_sample_path(args.sample))
        cpu = cpu_of(command, contender_env(root / "prefect-home", key), [1])
    return sum(1 for _ in (out / "images").glob("*")), cpu


def fixed_and_marginal(points: list[tuple[int, float]]) -> tuple[float, float]:
    """CPU seconds a run costs before its first image and per 1,000 images after it: the
    least-squares line through (images, CPU seconds) of runs of two sizes or more. A
    ratio of whole runs at one size mixes the two, so it depends on the size chosen."""
    fit = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return fit.intercept, fit.slope * 1000


if __name__ == "__main__":
    main()
