"""The slot controller alone: cancellation, sharing a key, and what a lone job keeps.

Driven by hand (no server), so each rule is checked exactly: the controller is told what
the server answered and must decide what the next submit may do.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from types import SimpleNamespace

import pytest

from pipeline import limits
from pipeline.limits import Permit, SlotController


async def full(limit: int, **options: object) -> tuple[SlotController, list[Permit]]:
    """A controller holding ``limit`` accepted tasks: every slot believed busy."""
    slots = SlotController(limit, **options)  # type: ignore[arg-type]
    permits = [await slots.acquire() for _ in range(limit)]
    for permit in permits:
        slots.accepted(permit)
    return slots, permits


async def test_a_cancelled_waiter_ends_even_when_a_slot_frees_at_that_moment() -> None:
    # Ctrl-C cancels every row at once, and a cancelled row frees its slot: the waiters'
    # event is set in the same loop turn as they are cancelled. They must still end.
    slots, _ = await full(1, expected_latency_s=100.0)  # waits with a timeout (next probe)
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    slots.finished()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 5)


async def test_a_refused_probe_alone_is_not_contention() -> None:
    slots, _ = await full(4, expected_latency_s=0.05)
    probe = await asyncio.wait_for(slots.acquire(), 5)
    assert probe.speculative
    slots.refused(probe)
    assert slots.refused_probes == 1 and slots.refused_contention == 0
    assert slots.effective_limit == 4 and not slots.contended


async def test_a_refused_probe_after_our_own_task_finished_is_not_contention() -> None:
    # The 429 was decided before we noticed one of our tasks finish: still just a probe.
    slots, _ = await full(4, expected_latency_s=0.05)
    probe = await asyncio.wait_for(slots.acquire(), 5)
    slots.finished()
    slots.refused(probe)
    assert slots.refused_contention == 0 and slots.effective_limit == 4
    assert not slots.contended


async def test_contention_cuts_to_our_share_once_per_task_duration_and_stops_probing() -> None:
    slots = SlotController(10, expected_latency_s=10.0)
    permits = [await slots.acquire() for _ in range(6)]
    # The key is full although we hold 6 of 10: someone else is using it. Our share of
    # the full key is what we hold (5 others) plus the refused one: the cut starts there.
    slots.refused(permits[0])
    assert slots.refused_contention == 1 and slots.contended
    assert slots.effective_limit == 5  # 6 x 0.9
    slots.refused(permits[1])  # an answer about the same full moment: no second cut
    assert slots.effective_limit == 5
    for permit in permits[2:]:
        slots.accepted(permit)
    # Four held, window 5: a slot is free by our count, but the key was full a moment ago,
    # so the next submit waits (half a task, or until one of ours finishes); no probes.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slots.acquire(), 0.2)


async def test_a_429_after_the_cut_brings_the_window_to_what_we_hold_not_below() -> None:
    # Beside another client the key is full: once ours have been cut, each of our finishes
    # frees a slot that only our refill should take. A window above what we hold would send
    # one submit more at every finish, and each would be refused until the next cut. (A
    # submit still in the air at the cut does not count: the test above.)
    slots = SlotController(10, expected_latency_s=10.0, contention_hold_s=60.0)
    permits = [await slots.acquire() for _ in range(6)]
    for permit in permits[1:]:
        slots.accepted(permit)
    slots.refused(permits[0])  # the key is full with 5 of ours: window 6 x 0.9 ** 1.5
    assert slots.effective_limit == 5 and slots.held == 5
    slots.finished(permits[1])  # one of ours ends; its refill goes ...
    refill = await asyncio.wait_for(slots.acquire(), 5)
    slots.refused(refill)  # ... but someone else took that slot first: the key is full
    assert slots.refused_contention == 2
    assert slots.effective_limit == 4 and slots.held == 4  # what we hold, not below it
    slots.finished(permits[2])  # the next of ours ends: its refill, and nothing more
    slots.accepted(await asyncio.wait_for(slots.acquire(), 5))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slots.acquire(), 0.2)


async def test_a_job_holding_little_lowers_its_window_a_cut_s_step_at_a_time() -> None:
    # A job joining a key another job fills has nearly all its submits refused: dropping
    # its window to what it holds at the first refusal after the cut would leave it at one
    # slot, to grow back from there, when the other job's cut makes room.
    slots = SlotController(24, expected_latency_s=10.0, contention_hold_s=60.0)
    permits = [await slots.acquire() for _ in range(12)]
    for permit in permits[:2]:
        slots.accepted(permit)
    slots.refused(permits[2])  # the key is full: 12 x 0.9 (we held 12, the others 12)
    for permit in permits[3:]:
        slots.refused(permit)  # in the air at the cut: the same full moment, no change
    assert slots.effective_limit == 10 and slots.held == 2
    slots.finished(permits[0])
    late = await asyncio.wait_for(slots.acquire(), 5)
    slots.refused(late)  # sent after the cut, refused: one step down (10.8 x 0.9), not to 1
    assert slots.effective_limit == 9 and slots.held == 1


async def test_a_job_shut_out_of_a_full_key_tries_again_sooner() -> None:
    # A job joining a key another job keeps full with webhooks gets a slot only by landing
    # a submit between one of the other's tasks ending and its refill: a draw per try, so
    # with none of ours running (nothing of ours can end the pause) it tries several times
    # a task duration. A job with tasks running keeps the half-duration pause.
    async def after_the_key_was_full(accepted: int) -> SlotController:
        slots = SlotController(24, expected_latency_s=2.0, contention_hold_s=60.0)
        permits = [await slots.acquire() for _ in range(12)]
        for permit in permits[:accepted]:
            slots.accepted(permit)
        for permit in permits[accepted:]:
            slots.refused(permit)  # the first cuts the window to 10; all say "full"
        assert slots.effective_limit == 10 and slots.held == accepted
        return slots

    shut_out = await after_the_key_was_full(0)
    refused_at = time.monotonic()
    await asyncio.wait_for(shut_out.acquire(), 1.5)
    waited = time.monotonic() - refused_at
    assert 0.2 <= waited < 0.6, waited  # an eighth of the 2 s duration (at 1e996c2: 1 s)

    holding = await after_the_key_was_full(2)
    with pytest.raises(TimeoutError):  # half the duration, though the window has room
        await asyncio.wait_for(holding.acquire(), 0.6)


async def test_one_submit_at_a_time_just_after_the_key_was_full() -> None:
    slots = SlotController(10, expected_latency_s=0.01, contention_hold_s=60.0)
    slots.refused(await slots.acquire())  # contention seen; window cut to 1 x 0.8 -> 1
    assert slots.contended
    for _ in range(60):  # keep the window full: it grows back with accepted submits
        while slots.held < slots.effective_limit:
            slots.accepted(await asyncio.wait_for(slots.acquire(), 5))
        slots.finished()
    assert slots.effective_limit > 3
    slots.set_latency(5.0)  # so the last cut is recent: the key was full a moment ago
    slots.finished()
    slots.finished()  # now at least two slots are free by our own count
    first = await asyncio.wait_for(slots.acquire(), 5)
    with pytest.raises(TimeoutError):  # a free slot, but the first answer is not in yet
        await asyncio.wait_for(slots.acquire(), 0.1)
    slots.accepted(first)
    second = await asyncio.wait_for(slots.acquire(), 5)
    assert not second.speculative


async def test_the_window_grows_only_while_it_holds_us_back() -> None:
    slots = SlotController(10, expected_latency_s=0.01, contention_hold_s=0.0)
    permits = [await slots.acquire() for _ in range(6)]
    slots.refused(permits[0])  # share 6 of 10 -> window 6 x 0.9 ** 1.5 = 5.1
    for permit in permits[1:]:
        slots.abandoned(permit)
    assert slots.effective_limit == 5
    for _ in range(200):  # one task at a time: the window never binds, so it stays
        permit = await asyncio.wait_for(slots.acquire(), 5)
        slots.accepted(permit)
        slots.finished()
    assert slots.effective_limit == 5
    held = [await asyncio.wait_for(slots.acquire(), 5) for _ in range(5)]
    for permit in held:
        slots.accepted(permit)
    for _ in range(400):  # now it binds: it grows back to the tier, never past it
        slots.finished()
        while slots.held < slots.effective_limit:
            slots.accepted(await asyncio.wait_for(slots.acquire(), 5))
    assert slots.effective_limit == 10


async def test_a_job_holding_most_of_a_full_key_gives_up_more_at_once() -> None:
    # 20 of 24 slots when the key is full: far above any fair share, so the cut is deep
    # (0.9 ** (20 / 4) = 0.59, at most by half, and never below half the key) and a
    # newcomer gets room in seconds. At an even split the cut stays the plain 10%.
    async def cut(holding: int) -> int:
        slots = SlotController(24, expected_latency_s=10.0)
        for _ in range(holding - 1):
            slots.accepted(await slots.acquire())
        slots.refused(await slots.acquire())
        assert slots.refused_contention == 1
        return slots.effective_limit

    assert await cut(20) == 12  # 20 x 0.59 = 11.8, floored at half the key; not 18
    assert await cut(21) == 12  # 21 x 0.5 = 10.5 (before session 36): below half the key
    assert await cut(12) == 10  # 12 x 0.9


async def grown_with(slots: SlotController, accepts: int) -> int:
    """The window after ``accepts`` accepted submits, keeping it full all along."""
    for _ in range(accepts):
        while slots.held >= slots.effective_limit:
            slots.finished()
        slots.accepted(await asyncio.wait_for(slots.acquire(), 5))
    return slots.effective_limit


async def after_an_app_s_request(**options: object) -> SlotController:
    """A controller that held 23 of 24 slots when the 24th was refused (an app's task took
    it), cut to half the key, and then had no 429 for five task durations of 10 ms."""
    slots = SlotController(24, expected_latency_s=0.01, **options)  # type: ignore[arg-type]
    for _ in range(23):
        slots.accepted(await slots.acquire())
    slots.refused(await slots.acquire())
    assert slots.effective_limit == 12
    assert await grown_with(slots, 10) == 12  # within four durations: AIMD's pace
    await asyncio.sleep(0.05)
    return slots


async def test_the_room_a_deep_cut_gave_up_is_taken_back_once_nobody_claims_it() -> None:
    # An app's request or two on a key the job fills looks, at that moment, like a job's
    # first slot, and the job cuts to half the key. A joining job claims that room within a
    # task duration or two; an app does not, and AIMD took tens of seconds to grow back
    # (one job beside the app: 66-73% busy). After four task durations without a 429 the
    # window grows a slot per accepted submit (c98388d: AIMD's step, 12 after these 11);
    # from then on, others holding up to three slots get the plain cut, and a 429 showing
    # them on more gets the deep one again.
    slots = await after_an_app_s_request(contention_hold_s=60.0)
    assert await grown_with(slots, 11) == 23 and slots.held == 22
    slots.refused(await asyncio.wait_for(slots.acquire(), 5))  # the others hold 2
    assert slots.effective_limit == 20  # 23 x 0.9, not 12

    slots = await after_an_app_s_request(contention_hold_s=60.0)
    assert await grown_with(slots, 11) == 23
    for _ in range(2):
        slots.finished()
    slots.refused(await asyncio.wait_for(slots.acquire(), 5))  # the others hold 4: a job
    assert slots.effective_limit == 12  # 21 x 0.9 ** 7 is below half the key


async def test_with_webhooks_beside_an_app_the_window_stops_two_slots_below_the_tier() -> None:
    # With webhooks a job refills each slot within milliseconds, so an app's request finds
    # the key full whenever the job holds all of it, and the job, refused nothing, never
    # learns that it starves the app (one job and the app: 4-11 of 36 app requests taken;
    # 0 of 22 when the room lasted only while 429s came: with the room, none came). Once
    # the others took none of a deep cut's room and held no more than three slots, the room
    # taken back stops two slots below the tier, for the rest of the run or until a 429
    # shows the others on more. Polling leaves the app room by itself (its finishes are
    # noticed late).
    webhooks = {"probing": False, "prompt_finishes": True}
    app = await after_an_app_s_request(contention_hold_s=0.2, **webhooks)
    assert await grown_with(app, 20) == 22
    await asyncio.sleep(0.2)
    assert not app.contended
    assert await grown_with(app, 400) == 22  # the contention has passed; the app has not
    for _ in range(3):
        app.finished()
    app.refused(await asyncio.wait_for(app.acquire(), 5))  # the others hold 5: a job
    assert app.effective_limit == 12
    await asyncio.sleep(0.05)
    assert await grown_with(app, 100) == 24  # its room unclaimed, taken back to the tier
    assert await grown_with(await after_an_app_s_request(contention_hold_s=60.0), 100) == 24
    small_key = SlotController(8, expected_latency_s=0.01, contention_hold_s=60.0, **webhooks)
    for _ in range(7):
        small_key.accepted(await small_key.acquire())
    small_key.refused(await small_key.acquire())
    await asyncio.sleep(0.05)
    assert await grown_with(small_key, 100) == 8  # two of eight slots: too much of the key


async def accepted_submits_to_grow(slots: SlotController, by: int) -> int:
    """Keep the window full and count the accepted submits until it has grown ``by``."""
    target = slots.effective_limit + by
    count = 0
    while slots.effective_limit < target:
        while slots.held < slots.effective_limit:
            slots.accepted(await asyncio.wait_for(slots.acquire(), 5))
            count += 1
        slots.finished()
        assert count < 10_000
    return count


async def quiet_after_a_full_key(limit: int, latency_s: float, *, holding: int) -> SlotController:
    """A controller holding ``holding`` tasks whose next submit found the key full, 50 ms
    later (50 task durations of 1 ms, or none of 10 s), with its tasks ended."""
    slots = SlotController(limit, expected_latency_s=latency_s, contention_hold_s=60.0)
    for _ in range(holding):
        slots.accepted(await slots.acquire())
    slots.refused(await slots.acquire())  # the key is full
    assert slots.contended and slots.effective_limit == 1
    await asyncio.sleep(0.05)
    for _ in range(holding):
        slots.finished()  # ends the pause after the 429
    return slots


async def test_a_small_window_beside_large_others_grows_faster_once_the_key_had_room() -> None:
    # Each job holds 2 slots when the key fills. Beside 22 slots held by others (a newcomer
    # next to an incumbent that just cut deep) the window grows up to four times faster
    # than beside 2 (an even split: plain AIMD), but only after three task durations
    # without a 429: where 429s keep coming the key has no room to grow into.
    async def grown_after_refusal(limit: int, latency_s: float) -> int:
        slots = await quiet_after_a_full_key(limit, latency_s, holding=1)  # window 1.8
        return await accepted_submits_to_grow(slots, 2)

    newcomer = await grown_after_refusal(24, latency_s=0.001)
    newcomer_amid_429s = await grown_after_refusal(24, latency_s=10.0)
    even_split = await grown_after_refusal(4, latency_s=0.001)
    assert newcomer * 3 <= even_split, (newcomer, even_split)
    assert newcomer_amid_429s == even_split


async def test_a_job_joining_a_full_key_grows_a_slot_per_accept_once_quiet() -> None:
    # A job whose first submit finds the key full (another job holds all of it, then cuts
    # deep) grows a slot per accepted submit (TCP's slow start), where a job that held a
    # share when the key filled grows by AIMD's step (up to 4x faster beside others holding
    # far more) even then: four jobs at an even split each hold less than half of the
    # others, and slow starts there took the 429s from 4% to 9-17% of submits. And only
    # after a task duration without a 429.
    newcomer = await quiet_after_a_full_key(24, 0.001, holding=0)
    for window in (2, 3, 4, 5):  # at 1e996c2 (four times AIMD's pace) 11 accepts for these
        newcomer.accepted(await asyncio.wait_for(newcomer.acquire(), 5))
        assert newcomer.effective_limit == window
    newcomer.refused(await asyncio.wait_for(newcomer.acquire(), 5))  # it outgrew the room
    assert newcomer.effective_limit == 4 and newcomer.held == 4  # 5 x 0.9
    await asyncio.sleep(0.05)
    newcomer.finished()
    newcomer.accepted(await asyncio.wait_for(newcomer.acquire(), 5))
    assert newcomer.effective_limit == 4  # AIMD's step from here on, a fraction of a slot
    amid_429s = await accepted_submits_to_grow(await quiet_after_a_full_key(24, 10.0, holding=0), 2)
    holder = await accepted_submits_to_grow(await quiet_after_a_full_key(24, 0.001, holding=1), 2)
    assert amid_429s >= 10 and holder >= 5, (amid_429s, holder)  # here 13 and 6


async def test_a_learned_distribution_sends_probes_when_several_tasks_likely_ended() -> None:
    slots, permits = await full(8, expected_latency_s=10.0)
    slots.set_distribution(10.0, 0.5)
    for permit in permits:  # acknowledged three medians ago: nearly all have likely ended
        permit.acked_at -= 30.0
        permit.running_at -= 30.0
    probes = [await asyncio.wait_for(slots.acquire(), 5) for _ in range(2)]
    assert all(probe.speculative for probe in probes)
    # A refused probe proves every slot was busy when it left: the expectation starts again
    # from there, and the next probe waits for time to pass (about a second here).
    for probe in probes:
        slots.refused(probe)
    assert slots.refused_probes == 2 and not slots.contended
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slots.acquire(), 0.1)
    # A poll that finds one finished frees its slot for an ordinary submit at once.
    slots.finished(permits[0])
    permit = await asyncio.wait_for(slots.acquire(), 5)
    assert not permit.speculative


async def test_probes_may_be_refused_more_often_when_tasks_end_seldom(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused probe costs a request; an idle slot costs its share of the key until a
    task ends into it. Under the real API's latency (about 3 finishes a second on 24 slots)
    a refusal buys seven times the slot-seconds it buys at the ``standard`` tier's pace (20
    a second), so more of the probes may be refused there; the pace is what the key's
    accepted submits show, and the share rises only where the per-minute limit (which
    counts refused submits too) has room."""
    clock = [1000.0]
    monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    async def share_at(per_s: float, submits_per_minute: int = 3600) -> float:
        slots = SlotController(24, submits_per_minute=submits_per_minute)
        for _ in range(int(per_s * 15)):  # 15 s of tasks ending, each slot refilled
            permit = await slots.acquire()
            slots.accepted(permit)
            slots.finished(permit)
            clock[0] += 1.0 / per_s
            if clock[0] - slots._first_accept < limits.PACE_WINDOW_S - 1.0:
                assert slots._refusal_share(clock[0]) == 0.25  # the first window: no pace yet
        return slots._refusal_share(clock[0])

    assert await share_at(20.5) == 0.25  # standard: 24 slots, 1 s tasks
    assert await share_at(165.0, submits_per_minute=14400) == 0.25  # scale
    production = await share_at(3.2)  # the real API's latency on 24 slots
    assert production == limits.SLOW_FINISHES_REFUSAL
    between = await share_at(10.0)
    assert 0.25 < between < production
    # The trial tier's 120 a minute are its pace: refusals would slow it down.
    assert await share_at(1.8, submits_per_minute=120) == 0.25
    # A configured share above the slow one is kept as it is.
    assert SlotController(24, refusal_target=0.6)._refusal_share(clock[0]) == 0.6


async def test_an_accepted_probe_pulls_the_next_one_closer_when_tasks_end_seldom(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    async def scale_after_an_accepted_probe(per_s: float) -> float:
        slots = SlotController(8, expected_latency_s=8 / per_s)
        for _ in range(int(per_s * 12)):  # tasks ending at ``per_s``, each slot refilled
            permit = await slots.acquire()
            slots.accepted(permit)
            slots.finished(permit)
            clock[0] += 1.0 / per_s
        permits = [await slots.acquire() for _ in range(8)]
        for permit in permits:
            slots.accepted(permit)
        clock[0] += 30 * 8 / per_s  # thirty task durations: the next submit is a probe
        probe = await asyncio.wait_for(slots.acquire(), 5)
        assert probe.speculative
        before = slots._probe_scale
        slots.accepted(probe)
        return slots._probe_scale / before

    fast = await scale_after_an_accepted_probe(40.0)
    slow = await scale_after_an_accepted_probe(2.0)
    assert slow < fast < 1.0


async def test_waiting_rows_get_slots_lowest_rank_first() -> None:
    # A row refused with 429 asks again with its own rank: it goes before the rows taken
    # after it instead of queueing behind all of them (manifest order is kept).
    slots, permits = await full(1, probing=False)
    order: list[int] = []

    async def row(rank: int) -> None:
        permit = await slots.acquire(rank)
        order.append(rank)
        slots.accepted(permit)

    waiters = [asyncio.create_task(row(rank)) for rank in (5, 7, 6)]
    await asyncio.sleep(0.01)
    late = asyncio.create_task(row(2))  # a refused row coming back
    await asyncio.sleep(0.01)
    assert order == []
    for _ in range(4):
        slots.finished(permits.pop() if permits else None)
        await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(late, *waiters), 5)
    # The first waiter had the turn already (it waits inside for a slot); then by rank.
    assert order == [5, 2, 6, 7]


async def test_a_waiter_cancelled_while_handed_the_turn_passes_it_on() -> None:
    slots, _ = await full(1, probing=False)
    first = asyncio.create_task(slots.acquire(1))
    second = asyncio.create_task(slots.acquire(2))
    third = asyncio.create_task(slots.acquire(3))
    await asyncio.sleep(0.01)
    second.cancel()
    slots.finished()  # the first takes the freed slot and hands the turn on
    permit = await asyncio.wait_for(first, 5)
    slots.accepted(permit)
    slots.finished(permit)
    assert isinstance(await asyncio.wait_for(third, 5), Permit)
    assert second.cancelled()


async def test_a_submit_whose_answer_was_lost_holds_its_slot_until_it_has_surely_ended() -> None:
    # The server may have made the task (a dropped connection after it accepted): counted
    # as ours, the key is full, so the next submit is a probe and its 429 says "not yet",
    # not "another client" (which would halve the window and stop probing).
    slots = SlotController(4, expected_latency_s=0.05)
    permits = [await slots.acquire() for _ in range(4)]
    for permit in permits[:3]:
        slots.accepted(permit)
    slots.lost(permits[3])
    assert slots.held == 4 and slots.unnamed == 1
    probe = await asyncio.wait_for(slots.acquire(), 5)
    assert probe.speculative
    slots.refused(probe)
    assert slots.refused_contention == 0 and not slots.contended
    assert slots.effective_limit == 4
    # Past four first-poll times the unnamed task has surely ended: its slot comes back.
    await asyncio.sleep(0.3)
    permit = await asyncio.wait_for(slots.acquire(), 5)
    assert not permit.speculative
    assert slots.unnamed == 0


async def test_a_429_into_an_unnamed_task_s_slot_given_back_on_a_guess_is_no_other_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The unnamed task outlived its hold (a slow task): the submit sent into its slot is
    # refused. Read as another client, that one 429 halved the window and stopped probing
    # (standard-faults: one run in four kept the key two thirds busy to its end).
    clock = [1000.0]
    monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    slots = SlotController(2, expected_latency_s=0.05)
    first, second = await slots.acquire(), await slots.acquire()
    slots.accepted(first)
    slots.lost(second)
    clock[0] += 0.25  # past its hold (four first-poll times): given back
    into_its_slot = await asyncio.wait_for(slots.acquire(), 5)
    assert not into_its_slot.speculative and slots.unnamed == 0
    clock[0] += 0.01  # the 429 comes back at once
    slots.refused(into_its_slot)
    assert slots.refused_contention == 0 and not slots.contended
    assert slots.effective_limit == 2
    assert slots.unnamed == 1 and slots.held == 2  # held again, for a typical task time
    # Past that time the slot comes back again; a 429 long after any guess is another
    # client, as before.
    slots.finished(first)
    clock[0] += 0.1
    permit = await asyncio.wait_for(slots.acquire(), 5)
    assert not permit.speculative and slots.unnamed == 0
    clock[0] += 0.1  # its answer comes two typical task times after the guess
    slots.refused(permit)
    assert slots.refused_contention == 1 and slots.contended


async def test_a_task_list_gives_back_the_slots_of_unnamed_tasks_it_shows_ended() -> None:
    # Two answers lost, a list asked after both: it shows one task we cannot name still
    # running (ours or another client's), so at least one of ours has ended.
    slots = SlotController(4, expected_latency_s=10.0)
    permits = [await slots.acquire() for _ in range(3)]
    slots.accepted(permits[0])
    slots.lost(permits[1])
    slots.lost(permits[2])
    asked = time.monotonic()
    assert slots.unnamed_ended(running=2, listed_at=asked) == 0
    assert slots.unnamed == 2 and slots.held == 3
    assert slots.unnamed_ended(running=1, listed_at=asked) == 1
    assert slots.unnamed == 1 and slots.held == 2
    # A list asked before an answer was lost may not show that task yet: it proves nothing.
    later = await slots.acquire()
    slots.lost(later)
    assert slots.unnamed_ended(running=0, listed_at=asked) == 1  # only the one lost before
    assert slots.unnamed == 1 and slots.held == 2
    assert slots.unnamed_ended(running=0, listed_at=time.monotonic()) == 1
    assert slots.unnamed == 0 and slots.held == 1


async def test_an_acknowledged_task_the_run_will_not_poll_gives_its_slot_back() -> None:
    # An error of ours right after the acknowledgement ends the row before its task is
    # tracked: nobody will report it finished. Its slot stayed held for the rest of the run;
    # a key's worth of them and no ordinary submit was allowed again.
    slots = SlotController(2, expected_latency_s=0.05)
    permits = [await slots.acquire() for _ in range(2)]
    for permit in permits:
        slots.accepted(permit)
        slots.orphaned(permit)
    assert slots.held == 2 and slots.unnamed == 2
    # Past four first-poll times both tasks have surely ended: their slots come back.
    await asyncio.sleep(0.3)
    permit = await asyncio.wait_for(slots.acquire(), 5)
    assert not permit.speculative
    assert slots.unnamed == 0


def exact_expected_finishes(slots: SlotController, now: float) -> float:
    """The sum in its plain form, over every live task: the oracle for the reused one."""
    mu, sigma = slots._dist  # type: ignore[misc]

    def survival(t: float) -> float:
        return 0.5 * math.erfc((math.log(t) - mu) / (sigma * math.sqrt(2.0))) if t > 0 else 1.0

    total = 0.0
    for permit in slots._live:
        age = now - permit.acked_at
        known = max(permit.running_at, slots._all_running_at) - permit.acked_at
        survived = survival(known)
        if age > 0.0 and survived >= 1e-9:
            total += (survived - survival(age)) / survived
    return total


async def test_one_full_sum_serves_the_calls_after_it_and_finishes_come_out_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The expected-finishes sum is taken in full at most every 2% of the median task time;
    calls in between extrapolate it, tasks seen to end are taken out of it, and a poll's
    "still running" starts it again. Driven through a long random run of a ``scale``-sized
    key, it must match the sum over every live task each time."""
    clock = [1000.0]
    monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    slots = SlotController(96, expected_latency_s=0.5)
    slots.set_distribution(0.5, 0.55)
    rng = random.Random(16)
    live: list[Permit] = []
    full_sums = 0
    for _ in range(4000):
        clock[0] += rng.expovariate(400.0)
        now = clock[0]
        draw = rng.random()
        if len(live) < 90 and draw < 0.45:
            permit = await slots.acquire()
            slots.accepted(permit)
            live.append(permit)
        elif live and draw < 0.9:
            # The oldest tasks are likelier to be the ones seen to end.
            slots.finished(live.pop(min(rng.randrange(len(live)) for _ in range(3))))
        elif live:
            slots.still_running(rng.choice(live))
        before = slots._sum_t
        reused, _ = slots._expected_finishes(now)
        full_sums += slots._sum_t != before
        assert reused == pytest.approx(exact_expected_finishes(slots, now), abs=0.02)
    # Far fewer full passes than calls (one per event here, about 400 a second).
    assert full_sums < 4000 / 2, full_sums
