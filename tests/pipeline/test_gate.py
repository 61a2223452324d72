"""The host gate's rule on its own (``pipeline/gate.py``): when it closes, who goes while it
is closed, what opens it, when it gives up, and whose failure a failure is.

End to end, against the simulator taken down mid-run, in ``test_pipeline_outage.py``.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import ApiUnreachable, ConfigError
from pipeline.gate import CLOSE_AFTER, FIRST_PROBE_S, Gates, HostGate, no_answer, origin_of
from pipeline.progress import format_line
from pipeline.spec import RunSpec
from pipeline.summary import ProgressSnapshot


def _gates(give_up_s: float = 60.0) -> tuple[Gates, list[ApiUnreachable]]:
    stops: list[ApiUnreachable] = []
    return Gates(give_up_s, stops.append), stops


async def _fail(gate: HostGate, times: int, reason: str = "connection refused") -> list[bool]:
    said = []
    for _ in range(times):
        passage = await gate.enter()
        said.append(passage.failed(reason))
        passage.close()
    return said


async def test_three_failures_in_a_row_close_the_gate_and_an_answer_between_them_does_not() -> None:
    gates, _ = _gates()
    gate = gates.for_url("http://127.0.0.1:1/v1/x")
    assert await _fail(gate, CLOSE_AFTER - 1) == [True] * (CLOSE_AFTER - 1)
    (await gate.enter()).heard(404)  # any answer, even a refusal: the host is there
    await _fail(gate, CLOSE_AFTER - 1)
    assert not gate.closed
    (await gate.enter()).heard(502)  # a gateway that cannot reach the API: no answer
    assert gate.closed
    assert gates.outages.count == 1
    gates.stop()


async def test_while_closed_one_probe_goes_at_a_time_and_its_answer_lets_everyone_through() -> None:
    gates, _ = _gates()
    gate = gates.for_url("http://127.0.0.1:1/")
    await _fail(gate, CLOSE_AFTER)
    closed_at = time.monotonic()
    waiting = [asyncio.create_task(gate.enter()) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in waiting)  # nobody before the first probe is due

    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    assert time.monotonic() - closed_at >= FIRST_PROBE_S * 0.95
    (probe,) = [task.result() for task in done]
    assert probe.probe
    await asyncio.sleep(0.05)
    assert sum(task.done() for task in waiting) == 1  # the others wait for its answer

    probe.answered()
    passages = await asyncio.gather(*waiting)
    assert not gate.closed
    assert not any(p.probe for p in passages if p is not probe)
    assert gates.outages.seconds() >= FIRST_PROBE_S * 0.95
    assert gates.outages.closed == 0


async def test_a_failed_probe_waits_longer_for_the_next_and_an_abandoned_one_lets_another_go() -> (
    None
):
    gates, _ = _gates()
    gate = gates.for_url("http://127.0.0.1:1/")
    await _fail(gate, CLOSE_AFTER)
    first = await gate.enter()
    assert first.failed("connection refused")  # the host's failure: no attempt spent
    started = time.monotonic()
    second = await gate.enter()
    assert second.probe
    assert time.monotonic() - started >= 2 * FIRST_PROBE_S * 0.95  # 1 s, then 2 s
    second.close()  # its row ended without sending: another request probes at once
    third = await asyncio.wait_for(gate.enter(), timeout=0.5)
    assert third.probe
    third.answered()
    gates.stop()


async def test_a_host_silent_for_the_wait_stops_the_run_with_its_last_error() -> None:
    gates, stops = _gates(give_up_s=0.3)
    gate = gates.for_url("http://user:secret@127.0.0.1:9/v1/ai/x")
    await _fail(gate, CLOSE_AFTER, "connection refused")
    await asyncio.sleep(0.5)
    assert stops == []  # nothing of the run waits for this host: no reason to stop it
    waiter = asyncio.create_task(gate.enter())
    for _ in range(100):
        if stops:
            break
        await asyncio.sleep(0.05)
    assert len(stops) == 1
    (await waiter).close()
    gates.stop()
    message = str(stops[0])
    assert message.startswith("the API at http://127.0.0.1:9 has not answered for 0.3 s")
    assert "secret" not in message
    assert "last error: connection refused" in message
    assert "run the same command again" in message


async def test_a_failure_is_the_rows_when_the_host_answered_someone_meanwhile() -> None:
    gates, _ = _gates()
    gate = gates.for_url("http://127.0.0.1:1/")
    slow = await gate.enter()
    (await gate.enter()).answered()  # another request got its answer after ``slow`` began
    assert slow.failed("server disconnected") is False
    fresh = await gate.enter()
    assert fresh.failed("server disconnected") is True
    gates.stop()


def test_hosts_have_gates_of_their_own() -> None:
    gates, _ = _gates()
    api = gates.for_url("https://API.example:443/v1/ai/text-to-image/x?y=1")
    assert gates.for_url("https://api.example:443/other") is api
    assert gates.for_url("https://cdn.example/results/1.png") is not api
    assert origin_of("http://u:p@h:8/a/b?c#d") == "http://u:p@h:8"
    assert api.where == "the API at https://api.example:443"
    cdn = gates.for_url("https://cdn.example/results/2.png", "the host of the results")
    assert cdn.where == "the API at https://cdn.example"  # named by the first to meet it
    assert gates.for_url("https://x.example/", "the host of the results").where == (
        "the host of the results at https://x.example"
    )


async def test_only_failures_that_say_the_host_is_away_count() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError) as refused:
            await session.get("http://127.0.0.1:9/")
    assert no_answer(refused.value) == "connection refused"
    assert no_answer(aiohttp.ServerDisconnectedError()) == "server disconnected"
    assert no_answer(aiohttp.ClientConnectionResetError()) == "connection reset"
    assert no_answer(aiohttp.ClientOSError(104, "reset")) == "connection reset"
    assert no_answer(TimeoutError()) is not None
    assert no_answer(aiohttp.ClientPayloadError("cut")) is None  # its headers came: an answer
    assert no_answer(ValueError("ours")) is None


def test_the_outage_wait_is_an_option_of_run_and_flow_with_its_checks() -> None:
    assert RunSpec(api_outage_wait=30).api_outage_wait == 30.0
    with pytest.raises(ConfigError, match=r"spec.api_outage_wait = 0.0 is not allowed"):
        RunSpec.model_validate({"out": "o", "api_outage_wait": 0})
    done = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    assert "--api-outage-wait" in done.output
    assert "69 the API did not answer" in " ".join(done.output.split())


def test_the_progress_line_says_the_run_waits_for_the_api() -> None:
    snapshot = ProgressSnapshot(
        total=10,
        counts={"succeeded": 4},
        in_flight=6,
        images_per_s=1.0,
        credits=0.0,
        elapsed_s=30.0,
        eta_s=None,
        api_unreachable_s=12.0,
    )
    assert "API unreachable for 12s, waiting" in format_line(snapshot)
    snapshot.api_unreachable_s = None
    assert "unreachable" not in format_line(snapshot)


async def test_a_poll_probes_before_a_submit_and_a_submit_probes_when_alone() -> None:
    gates, _ = _gates()
    gate = gates.for_url("http://127.0.0.1:1/")
    await _fail(gate, CLOSE_AFTER)
    submit = asyncio.create_task(gate.enter(idempotent=False))
    poll = asyncio.create_task(gate.enter())
    probe = await asyncio.wait_for(poll, timeout=3 * FIRST_PROBE_S)
    assert probe.probe and not submit.done()  # a cut-off submit may be paid: a poll is not
    probe.close()  # left without a word: the submit may go now
    alone = await asyncio.wait_for(submit, timeout=1.0)
    assert alone.probe
    alone.answered()
    assert not gate.closed
