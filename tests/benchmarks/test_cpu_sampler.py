"""The CPU sampler counts where CPU went, and not where the process only waited."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.cpu_sampler import REST, kind_of, report, side_by_side
from benchmarks.harness import REPO

_PROGRAM = """
import sys, time
import benchmarks.cpu_sampler as sampler
sampler.start(sys.argv[1])

def burn():
    end = time.process_time() + 0.4
    while time.process_time() < end:
        sum(range(1000))

def wait():
    time.sleep(0.8)

burn()
wait()

# Ticks handled in the sampler's own code are not the program's CPU: one that falls due as
# the program exits (the handler runs in the sampler's exit code), one that falls due in
# the handler (it runs again inside itself). A function compiled under the sampler's file
# stands for that code: the handler is given its frame, and a frame called from it.
import signal
handler = signal.getsignal(signal.SIGPROF)
own = {}
exec(compile("import sys\\ndef inner(call): call(sys._getframe())", sampler.__file__, "exec"), own)
for _ in range(100):
    own["inner"](lambda frame: handler(signal.SIGPROF, frame))
    own["inner"](lambda _: handler(signal.SIGPROF, sys._getframe()))
"""


def test_samples_land_where_the_cpu_went(tmp_path: Path) -> None:
    out = tmp_path / "samples.json"
    subprocess.run([sys.executable, "-c", _PROGRAM, str(out)], check=True, cwd=REPO, timeout=60)
    counts = json.loads(out.read_text())
    innermost = dict(counts["innermost"])
    # 0.4 s of CPU at a tick of at most 10 ms: dozens of samples, nearly all in burn();
    # the 0.8 s asleep in wait() costs no CPU and gets none.
    assert counts["samples"] >= 30
    assert innermost.get("<string>:burn", 0) >= 0.8 * counts["samples"]
    assert "<string>:wait" not in innermost
    assert "samples" in report(out) and "<string>:burn" in report(out)
    # Whole stacks, outermost first: burn() under the program's module.
    burnt = sum(n for stack, n in counts["stacks"] if stack.endswith("<string>:burn"))
    assert burnt == innermost["<string>:burn"]
    odd = [s for s, _ in counts["stacks"] if not s.startswith("<string>:<module>")]
    assert not odd, odd
    assert not any("cpu_sampler.py" in stack for stack, _ in counts["stacks"])
    table = side_by_side([out, out])
    assert f"| {REST} | {counts['samples']} (100%) | {counts['samples']} (100%) |" in table


def test_each_sample_is_put_in_one_kind_by_any_frame_of_its_stack() -> None:
    run = "<string>:<module>;cli.py:main;run.py:_run_until_done;events.py:_run"
    assert kind_of(f"{run};engine.py:_outcome_of;ledger.py:record_ack;ledger.py:_commit") == (
        "journal"
    )
    # The 1/8-scale decode verifies the row and makes its thumbnail: a thumbnail's cost.
    decode = f"{run};engine.py:_fetch_and_store;verify.py:inspect_image;ImageFile.py:load"
    assert kind_of(decode) == "thumbnails"
    assert kind_of(f"{run};engine.py:_fetch_and_store;verify.py:jpeg_size") == "verification"
    # An import met anywhere is an import, whoever asked for it.
    lazy = f"{run};ledger.py:record_ack;<frozen importlib._bootstrap>:_find_and_load"
    assert kind_of(lazy) == "imports"
    assert kind_of(f"{run};engine.py:_watch_list;engine.py:_read_json") == "task list"
    # A submit waiting for a slot: the slot controller's time, not the request's.
    assert kind_of(f"{run};engine.py:_send;limits.py:acquire;limits.py:_acquire") == (
        "slot controller"
    )
    assert kind_of(f"{run};engine.py:_post_submit;client.py:_request") == "submits"
    assert kind_of(f"{run};naive_async.py:generate;common.py:store") == "image files"
    assert kind_of(f"{run};client_reqrep.py:start") == REST
