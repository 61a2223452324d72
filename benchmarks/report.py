"""RESULTS.md from results.json: tables per scenario, the goals, the machine, the command.

The figures and the verdicts on the goals are computed here, from the raw numbers, so a
rerun on another machine rewrites them honestly; the discussion of why (profiles, engine
changes) lives in ``benchmarks/notes.md`` and is appended as written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NOTES = Path(__file__).resolve().parent / "notes.md"
#: Figures of the chaos soak (``tests/chaos/test_soak.py``), written when it is run with
#: ``KLEIN_SOAK_REPORT=benchmarks/soak.json``; the section is left out while it is absent.
SOAK = Path(__file__).resolve().parent / "soak.json"
#: Jobs sharing one key (``benchmarks/sharing.py``); the section is left out while absent.
SHARING = Path(__file__).resolve().parent / "sharing.json"
#: Nights with an image library (``benchmarks/library.py``); left out while absent.
LIBRARY = Path(__file__).resolve().parent / "library.json"
#: The catalog deployment on two workers beside plain run (``benchmarks/flow_scale_out.py``).
FLOW_SCALE_OUT = Path(__file__).resolve().parent / "flow_scale_out.json"
SOAK_COMMAND = (
    "KLEIN_SOAK=1 KLEIN_SOAK_REPORT=benchmarks/soak.json "
    ".venv/bin/python -m pytest -s -p no:cacheprovider tests/chaos/test_soak.py"
)
KLEIN = ("klein-batch", "klein-batch-probes", "klein-batch-webhook", "klein-batch-flow")

HEADER = (
    "| contender | rows | images | wall s | utilization | steady util. | images/s "
    "| polls/image | CPU s/1000 img | peak RSS MB | first submit s | last task noticed s "
    "| 429s | extra paid |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _row(f: dict[str, Any]) -> str:
    flags = ""
    if f["timed_out"]:
        flags = " (timed out)"
    elif f["exit_code"] not in (0, None):
        flags = f" (exit {f['exit_code']})"
    name = f"**{f['contender']}**" if f["contender"] in KLEIN else f["contender"]
    return (
        f"| {name}{flags} | {f['rows']} | {f['images']} | {_num(f['wall_s'], 1)} "
        f"| {_num(f['utilization'], 3)} | {_num(f['steady_utilization'], 3)} "
        f"| {_num(f['images_per_s'], 2)} | {_num(f['polls_per_image'], 2)} "
        f"| {_num(f['cpu_s_per_1000'], 1)} | {_num(f['peak_rss_mb'], 0)} "
        f"| {_num(f['first_submit_s'], 2)} | {_num(f.get('last_noticed_s'), 2)} "
        f"| {f['rate_limited']} | {f['extra_paid_tasks']} |"
    )


def _ceiling(sim: dict[str, Any]) -> float:
    """Little's law: limit / mean latency (lognormal mean from median and p95)."""
    import math

    sigma = math.log(sim["p95_s"] / sim["median_s"]) / 1.645
    mean = sim["median_s"] * math.exp(sigma * sigma / 2)
    return sim["max_active"] / mean


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


#: Issue 16's goals for steady utilization, by scenario and contender (polling, webhooks).
STEADY_GOALS = {
    ("standard", "klein-batch"): 0.97,
    ("standard", "klein-batch-webhook"): 0.995,
    ("scale", "klein-batch"): 0.95,
    ("scale-busy", "klein-batch"): 0.95,
}


def _goals(results: dict[str, Any]) -> list[str]:
    lines = [
        "| goal | scenario | contender | figure | verdict |",
        "|---|---|---|---|---|",
    ]
    for scenario in results["scenarios"]:
        figures = {f["contender"]: f for f in scenario["figures"]}
        name = scenario["name"]
        naive = figures.get("naive-async")
        for contender in ("klein-batch", "klein-batch-webhook"):
            ours = figures.get(contender)
            if ours is None:
                continue
            steady = ours["steady_utilization"]
            goal = STEADY_GOALS.get((name, contender), 0.95)
            # Under the production shape the goals are whole-run figures (below).
            lines.extend(
                []
                if name == "production"
                else [
                    f"| steady utilization >= {goal:g} | {name} | {contender} | {_num(steady, 3)} "
                    f"(whole run {_num(ours['utilization'], 3)}) "
                    f"| {_met(steady is not None and steady >= goal)} |"
                ]
            )
            polls = ours["polls_per_image"]
            most = 3 if name == "production" else 2
            lines.append(
                f"| polls per image <= {most} | {name} | {contender} | {_num(polls, 2)} "
                f"| {_met(polls is not None and polls <= most)} |"
            )
        ours = figures.get("klein-batch")
        if name == "production" and ours is not None and naive is not None:
            gain = ours["utilization"] - naive["utilization"]
            lines.append(
                f"| whole-run utilization >= naive-async's + 0.1 | {name} | klein-batch "
                f"| {ours['utilization']:.3f} vs {naive['utilization']:.3f} ({gain:+.3f}) "
                f"| {_met(gain >= 0.1)} |"
            )
            lines.append(
                f"| wall time below naive-async's | {name} | klein-batch "
                f"| {ours['wall_s']:.1f} s vs {naive['wall_s']:.1f} s "
                f"| {_met(ours['wall_s'] < naive['wall_s'])} |"
            )
        if ours is not None and ours["cpu_s_per_1000"] and naive and naive["cpu_s_per_1000"]:
            ratio = ours["cpu_s_per_1000"] / naive["cpu_s_per_1000"]
            lines.append(
                f"| client CPU per 1,000 images <= 1.5x naive-async's | {name} | klein-batch "
                f"| {_num(ours['cpu_s_per_1000'], 1)} s vs {naive['cpu_s_per_1000']:.1f} s "
                f"({ratio:.2f}x) | {_met(ratio <= 1.5)} |"
            )
    sweep = results.get("sweep", {})
    lines += _memory_goal("dry run", sweep.get("dry_run", []))
    lines += _memory_goal("real run", sweep.get("full_run", []))
    return lines


def _memory_goal(kind: str, entries: list[dict[str, Any]]) -> list[str]:
    """The goal table's line for peak memory: the largest run against 10,000 rows."""
    by_rows = {entry["rows"]: entry for entry in entries}
    if 10_000 not in by_rows or max(by_rows) <= 10_000:
        return []
    top = max(by_rows)
    ratio = by_rows[top]["peak_rss_mb"] / by_rows[10_000]["peak_rss_mb"]
    return [
        f"| peak RSS at {top:,} rows within 1.2x of 10,000 | sweep | {kind} "
        f"| {ratio:.2f}x ({by_rows[top]['peak_rss_mb']:.0f} / "
        f"{by_rows[10_000]['peak_rss_mb']:.0f} MB) "
        f"| {'met' if ratio <= 1.2 else '**not met**'} |"
    ]


_SOAK_LABELS = {
    "date": "date",
    "cpus": "CPUs",
    "rows": "rows in the manifest",
    "rows_processed": "rows processed (a final status in the output manifest)",
    "elapsed_s": "wall time, s",
    "faults_injected": "faults injected (all kinds, 429s included)",
    "rows_lost": "rows lost (no final status in the output manifest)",
    "ambiguous_submits": "submits whose answer was lost (charged or not, unknown)",
    "duplicate_submits": "tasks the simulator saw submitted twice (paid twice)",
    "tasks_failed": "tasks the simulator ended FAILED",
    "tasks_moderated": "tasks moderated",
    "downloads_expired": "downloads refused as expired",
}


def _soak(soak: dict[str, Any]) -> list[str]:
    """The chaos soak's figures: every fault at once on a long run, and what was lost."""
    lines = [
        "## Chaos soak",
        "",
        "`tests/chaos/test_soak.py`: klein-batch against the simulator with every fault of "
        "the chaos matrix switched on at once (its `everything-at-once` case in "
        "`tests/chaos/test_fault_matrix.py`; the faults injected are counted by kind below; "
        "the README's reliability section discusses the figures). Produced "
        f"with `{soak.get('command') or SOAK_COMMAND}` (`KLEIN_SOAK_ROWS` sets the size); "
        "this section is rendered from `benchmarks/soak.json`.",
        "",
        "| figure | value |",
        "|---|---:|",
    ]
    for name, label in _SOAK_LABELS.items():
        if name in soak:
            lines.append(f"| {label} | {_num(soak[name])} |")
    for name, value in soak.items():
        if name not in _SOAK_LABELS and name != "command" and not isinstance(value, dict | list):
            lines.append(f"| {name} | {_num(value)} |")
    for name in ("by_status", "faults"):
        if isinstance(soak.get(name), dict) and soak[name]:
            title = "rows by final status" if name == "by_status" else "faults by kind"
            parts = ", ".join(f"{key} {value}" for key, value in sorted(soak[name].items()))
            lines.append(f"| {title} | {parts} |")
    lines.append("")
    return lines


def _simulator(results: dict[str, Any]) -> list[str]:
    """What one simulator process serves here, against each scenario's ceiling."""
    measured = results.get("sim_throughput")
    if not measured:
        return []
    lines = ["## The simulator's own ceiling", ""]
    if "error" in measured:
        failed = f"`benchmarks/sim_throughput.py` failed in this run: {measured['error']}."
        return [*lines, failed, ""]
    rate = measured["figures"].get("images_per_s")
    lines += [
        f"Measured in the same run (`{measured['command']}`): one simulator process, pinned "
        "like the scenarios' simulator, driven by a minimal load generator with short tasks, "
        "so the figure is the simulator's capacity (HTTP, rendering and encoding every 1k "
        "JPEG), not a tier's.",
        "",
        "| measure | result |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in measured["table"].items()),
        "",
    ]
    if rate:
        for scenario in results["scenarios"]:
            ceiling = _ceiling(scenario["sim"])
            if ceiling >= 0.7 * rate:
                lines += [
                    f"Scenario `{scenario['name']}`: its ceiling ({ceiling:.0f} images/s) is "
                    f"{ceiling / rate:.0%} of what the simulator served here ({rate:.0f} "
                    "images/s), so there the simulator, not the tier, is (or is close to) "
                    "the limit: compare contenders with each other, not with 1.0.",
                    "",
                ]
    return lines


def _sharing(sharing: dict[str, Any]) -> list[str]:
    """Jobs and an app on one key: the 429s, the key's busy share, and who got what."""
    lines = [
        "## Sharing a key",
        "",
        f"`benchmarks/sharing.py`: pipeline jobs (each its own process) and an interactive app "
        f"(a request every ~2 s, never polled) on one simulated {sharing['slots']}-slot key, "
        "tasks of ~1 s; figures over a 40 s window after a 15 s warm-up, from the simulator's "
        "counters. **busy** is slot occupancy over the tier's limit (1.0 is the most any "
        "clients can do); **fairness** is the least-served job's images over the best-served "
        "one's. `tests/sharing` asserts the two-job webhook row (429s < 2%, busy >= 0.90, "
        "fairness >= 0.5) and the one-job webhook row (busy >= 0.80, the app at least a "
        f"third of its requests, 429s < 2%). Measured {sharing['date']} on "
        f"{sharing['nproc']} CPUs with `.venv/bin/{sharing['command']}`; RESULTS.md renders "
        "`benchmarks/sharing.json`.",
        "",
        "| jobs | delivery | 429s of jobs' submits | busy | images per job | fairness "
        "| app accepted / refused | polls/image | lists/image |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for run in sharing["runs"]:
        per_job = run["per_job"]
        fairness = min(per_job) / max(max(per_job), 1)
        lines.append(
            f"| {run['jobs']} | {run['delivery']} "
            f"| {run['refused_429'] / max(run['submits'], 1):.2%} ({run['refused_429']}) "
            f"| {run['occupancy']:.3f} | {', '.join(map(str, per_job))} | {fairness:.2f} "
            f"| {run['app_accepted']} / {run['app_refused']} | {run['polls_per_image']:.1f} "
            f"| {_num(run.get('lists_per_image'), 2)} |"
        )
    return [*lines, ""]


def _library(library: dict[str, Any]) -> list[str]:
    """Three nights into new dated folders with one library: what each one sent."""
    nights = library["nights"]
    lines = [
        "## Image library: nights that pay only for what changed",
        "",
        f"`benchmarks/library.py`: three nights of `klein-batch run` (each its own process) "
        f"of a {library['rows']:,}-row catalog into new dated folders, all with one "
        f"`--library`, against one simulated key ({library['sim']}); submits from the "
        "simulator's counters. Night 2 is the same catalog again; night 3 has "
        f"{library['changed_rows']} prompts edited. Measured {library['date']} on "
        f"{library['nproc']} CPUs, load {library['load_before']} before and "
        f"{library['load_after']} after, with `.venv/bin/{library['command']}`; RESULTS.md "
        "renders `benchmarks/library.json`.",
        "",
        "| night | rows changed | submits accepted | reused from the library | credits | wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    changed = ["first", "0 (same catalog)", str(library["changed_rows"])]
    for name, night, edits in zip(("1", "2", "3"), nights, changed, strict=True):
        lines.append(
            f"| {name} ({night['out']}) | {edits} | {night['submits_accepted']:,} "
            f"| {night['reused']:,} | {night['credits']:,.2f} | {night['wall_s']:.1f} |"
        )
    lines += [
        "",
        f"The unchanged night took {library['unchanged_time_ratio']:.1%} of the first "
        "night's wall time (reading the manifest and the index, linking the images, writing "
        "the output manifest and report); the edited night sent "
        + ("exactly the edited rows." if library["changed_sent_exactly"] else "other rows too."),
        "",
    ]
    index = library.get("index")
    if index:
        lines += [
            f"The index at {index['entries']:,} images (`.venv/bin/{index['command']}`, load "
            f"{index['load']}): {index['segments_mb']} MB of sorted Parquet segments, read in "
            f"{index['open_s']} s when a run opens the library, adding "
            f"{index['peak_rss_added_mb']} MB to the process at the peak; "
            f"{index['lookups_per_s']:,} lookups per second in memory (a HEAD per "
            "fingerprint would be one S3 round trip each).",
            "",
        ]
    return lines


def _flow_scale_out(figures: dict[str, Any]) -> list[str]:
    """The deployment's utilization beside plain run's, pair by pair, with the load."""
    lines = [
        "## The catalog deployment on two workers, beside `klein-batch run`",
        "",
        "`benchmarks/flow_scale_out.py`: one simulated standard key (24 active tasks, median "
        "task 1 s, p95 2.5 s), a 600-row manifest; plain `klein-batch run` and the "
        "`nightly-catalog` deployment (parent flow run on a worker of a local Prefect server "
        f"on {figures['prefect_database']}, shards of 150, two process workers running "
        "`catalog-shard` runners, `flows/queue.py`) alternate on the same key. "
        "**utilization** = the simulator's busy slot-seconds / (24 x wall): the plain run's "
        "process wall time, the parent flow run's start-to-end. Issue 13 asks for a ratio of "
        f"at least 0.9. Measured on {figures['cpus']} CPUs shared with other jobs (load "
        f"averages below) with `.venv/bin/{figures['command']}`; RESULTS.md renders "
        "`benchmarks/flow_scale_out.json`.",
        "",
        "| pair | load (1, 5, 15 min) | plain: wall s, utilization | deployment: wall s, "
        "utilization | ratio | 429s plain / deployment | max active | paid twice | shards by "
        "runner |",
        "|---:|---|---|---|---:|---|---:|---:|---|",
    ]
    for number, pair in enumerate(figures["pairs"], start=1):
        plain, flow = pair["plain_run"], pair["deployment"]
        runners = ", ".join(f"{k} {v}" for k, v in sorted(flow["shards_by_runner"].items()))
        lines.append(
            f"| {number} | {pair['load_before']} | {plain['wall_s']:.1f}, "
            f"{plain['utilization']:.3f} | {flow['wall_s']:.1f}, {flow['utilization']:.3f} "
            f"| **{pair['ratio']:.3f}** | {plain['submits_refused_429']} / "
            f"{flow['submits_refused_429']} | {max(plain['max_active'], flow['max_active'])} "
            f"| {plain['duplicate_submits'] + flow['duplicate_submits']} | {runners} |"
        )
    lines.append("")
    return lines


def _load(path: Path, required: str | None = None) -> dict[str, Any] | None:
    """A benchmark's figures when its JSON file exists, is readable and has ``required``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or (required is not None and not data.get(required)):
        return None
    return data


def load_sharing(path: Path = SHARING) -> dict[str, Any] | None:
    """The sharing figures when ``benchmarks/sharing.json`` exists and is readable."""
    return _load(path, "runs")


def load_soak(path: Path = SOAK) -> dict[str, Any] | None:
    """The soak figures when ``benchmarks/soak.json`` exists and is readable, else None."""
    return _load(path)


def render(results: dict[str, Any], soak: dict[str, Any] | None = None) -> str:
    """RESULTS.md; ``soak`` defaults to ``benchmarks/soak.json`` when present."""
    machine = results["machine"]
    out = [
        "# Benchmarks: how close to the tier's limit, side by side with the alternatives",
        "",
        "Generated by `benchmarks/run.py` from `benchmarks/results.json`; do not edit by hand "
        "(the discussion is `benchmarks/notes.md`).",
        "",
        f"- **Command**: `{results['command']}`"
        + (" (quick mode: smoke-sized runs)" if results.get("quick") else "")
        + (f" at commit {results['commit']}" if results.get("commit") else ""),
        f"- **Machine**: {machine['nproc']} CPUs ({machine['cpu']}), {machine['ram_gb']} GB RAM, "
        f"Python {machine['python']}, {machine['platform']}",
        f"- **Date**: {machine['date']}; whole suite took {results.get('elapsed_s', 0):.0f} s",
        f"- **Load average** (1, 5, 15 min) at start {machine.get('load_average_at_start')}, "
        f"at end {machine.get('load_average_at_end')}: anything above 0 is other work on "
        "the machine competing with the simulator and the contenders.",
        f"- **Pinning**: simulator on CPU {results['pinning']['simulator']}, each contender "
        f"(and its children) on CPU {results['pinning']['client']}",
        "",
        "## What the figures mean",
        "",
        "- **utilization** = the simulator's slot occupancy (seconds of active tasks on the "
        "key) / (tier active limit x wall time); wall time runs from starting the contender's "
        "process to its exit. Little's law makes 1.0 the best any client can do.",
        "- **steady util.** = the same ratio between the first moment the tier was full and "
        "the moment the last task was accepted (occupancy deltas from `/_sim/stats` sampled "
        "every 0.1 s): the ramp-up and the final tail, where slots drain as the last tasks "
        "finish, are physics, not client overhead. A contender that never fills the tier is "
        "measured from its first accepted submit.",
        "- **polls/image**, **429s**: the simulator's counters for the key; polls include "
        "reads of the task list (dialect A's `GET` on the submit address, one request for "
        "every task: `pipeline/task_list.py`), recorded from 2026-12-06 on. "
        "`klein-batch-probes` is klein-batch with `--no-task-list`: polls and probes alone, "
        "as every klein-batch run before that date. **extra paid**: "
        "tasks accepted (charged) beyond images stored (duplicates after lost submit answers, "
        "or work thrown away).",
        "- **CPU s/1000 img**: `wait4` on the contender process (user + system time, "
        "including children it reaped, such as Prefect's temporary server). **peak RSS**: "
        "the process's own high-water mark (`VmHWM`) plus its descendants' resident memory, "
        "sampled from `/proc` (`wait4`'s max RSS would charge the harness's memory to "
        "every child); from 2026-12-05 on, also the high-water mark a Python contender "
        "writes as it exits, so a peak in its last tenth of a second is not missed (sweeps "
        "before b14051c predate it: 38dfff9's 10,000-row real run read 228 MB sampled, "
        "about 240 MB exactly).",
        "- **first submit**: from process start to the first submit the simulator saw "
        "(imports and manifest reading included). **last task noticed**: from the key's "
        "last task ending to the poll that saw it (the simulator's `last_finish_poll_lag_s`; "
        "recorded from 2026-12-05 on): the end of the run, where a poll back-off costs wall "
        "time.",
        "- Each contender gets a fresh simulator process, the same CSV manifest (distinct 1k "
        "JPEG prompts over five presets) and the same key and tier; every contender stores every "
        "image it gets.",
        "",
        "## Goals",
        "",
        *_goals(results),
        "",
        *_simulator(results),
    ]
    for scenario in results["scenarios"]:
        ceiling = _ceiling(scenario["sim"])
        out += [
            f"## Scenario `{scenario['name']}`",
            "",
            f"{scenario['description']}. Ceiling (Little's law, limit / mean latency): "
            f"{ceiling:.1f} images/s.",
            "",
            HEADER,
            *(_row(f) for f in scenario["figures"]),
            "",
        ]
        vendor = next((f for f in scenario["figures"] if f["contender"] == "vendor-sample"), None)
        ours = next((f for f in scenario["figures"] if f["contender"] == "klein-batch"), None)
        if vendor and ours and vendor["images_per_s"]:
            hours = ours["rows"] / vendor["images_per_s"] / 60
            out += [
                f"The vendor-sample client ran {vendor['rows']} rows only (it does one image at "
                f"a time); at its measured {vendor['images_per_s']:.2f} images/s the "
                f"{ours['rows']}-row manifest would take about {hours:.0f} minutes "
                f"against {ours['wall_s'] / 60:.1f} for klein-batch.",
                "",
            ]
        prefect = next((f for f in scenario["figures"] if f["contender"] == "prefect-map"), None)
        if prefect and ours and prefect["rows"] < ours["rows"]:
            out += [
                f"Prefect with a task per row is capped at {prefect['rows']} rows to fit the "
                "time budget; its per-image figures (CPU, polls, 429s) are comparable, its "
                "utilization includes a larger share of start-up and tail.",
                "",
            ]
    if not results.get("flows_available"):
        out += [
            "## Pending: klein-batch through its Prefect flow",
            "",
            "Contender (e), `flows.generate_catalog`, had not landed when this suite ran; "
            "`benchmarks/run.py` includes it automatically once `flows/` provides it.",
            "",
        ]
    if not results.get("webhooks_available"):
        out += [
            "## Pending: klein-batch with webhooks",
            "",
            "The contender `klein-batch-webhook` (`klein-batch run --webhook-listen "
            "127.0.0.1:0`, the simulator signing its deliveries) had not landed when this "
            "suite ran: `klein-batch run --help` had no `--webhook-listen`. "
            "`benchmarks/run.py` includes it automatically once the option exists.",
            "",
        ]
    sweep = results.get("sweep")
    if sweep:
        out += ["## Manifest-size sweep", ""]
        stamp = sweep.get("measured")
        if stamp:
            out += [
                f"Measured apart from the scenarios (`{stamp['command']}` at commit "
                f"{stamp['commit']}, {stamp['date']}, load {stamp['load_before']} before and "
                f"{stamp['load_after']} after).",
                "",
            ]
        out += [
            "`klein-batch run MANIFEST --dry-run` (read, validate, plan and price every row; "
            "nothing sent), in its own process:",
            "",
            "| rows | manifest MB | wall s | CPU s | CPU µs/row | peak RSS MB |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for entry in sweep["dry_run"]:
            out.append(
                f"| {entry['rows']:,} | {entry['manifest_mb']} | {entry['wall_s']:.1f} "
                f"| {entry['cpu_s']:.1f} | {entry['cpu_us_per_row']:.1f} "
                f"| {entry['peak_rss_mb']:.0f} |"
            )
        if sweep.get("full_run"):
            out += [
                "",
                f"Full runs of klein-batch ({sweep['full_run_sim']}). The harness deletes "
                "each image once it has landed (counted first): the sweep measures the "
                "client's memory, and a million 1k JPEGs would take 60 GB of disk:",
                "",
                HEADER,
                *(_row(f) for f in sweep["full_run"]),
            ]
        for skipped in sweep.get("full_run_skipped", []):
            out += ["", f"Full run of {skipped['rows']:,} rows not made: {skipped['why']}."]
        out.append("")
    sharing = load_sharing()
    if sharing:
        out += _sharing(sharing)
    library = _load(LIBRARY, "nights")
    if library:
        out += _library(library)
    scale_out = _load(FLOW_SCALE_OUT, "pairs")
    if scale_out:
        out += _flow_scale_out(scale_out)
    soak = soak if soak is not None else load_soak()
    if soak:
        out += _soak(soak)
    else:
        out += [
            "## Chaos soak",
            "",
            "Not run for this report. To add it (a long run: about 20,000 rows with every "
            f"fault on), run `{SOAK_COMMAND}` and then "
            "`.venv/bin/python -m benchmarks.run --render`.",
            "",
        ]
    if NOTES.exists():
        out += [NOTES.read_text().rstrip(), ""]
    return "\n".join(out)
