"""A credit budget: spend plus in-flight cost never passes ``--max-credits``.

The check has to happen before a submit, not after: once the API accepts a task it will be
charged, so each submit first reserves what its image will cost (``contract.cost_credits``
of the size it asks for) and the reservation turns into spend when the image arrives, or
is released when the task fails or is moderated (neither is charged). A row whose image
does not fit waits while other reservations might still be released, and ends ``skipped``
with reason ``budget`` once nothing can free room for it.

With a variation matrix the budget stops at whole products: the first image of a product
holds the cost of all of that product's images in the run (``reserve(..., group=,
group_cost=)``), its siblings draw on that hold, and a product whose whole matrix does not
fit is skipped whole. A catalog cut short by its budget then has complete products, not
three of every product's six variations. In a shop export (``--catalog``) a product is all
of its variant lines (``run._product_of``), so a product is never made for some variants
only. Groups are numbered in file order, and once one did not fit no later product starts
(``_stop_at``): room that a failed task frees later would otherwise go to some product
further down, leaving a hole the rerun's "continues at the next whole product" does not
describe; the products before it that are under way are finished.

A submit whose answer never came may have been charged: it counts as spent, and its row
is sent again only while that still fits (``lost``); a rerun counts such submits of earlier
runs at their price (``Ledger.destination_credits``).

The budget covers the destination, not one invocation: what earlier runs into the same
DEST spent, and tasks they left in flight, count from the start. So a run stopped by its
budget continues where it stopped when rerun with a higher ``--max-credits``, and the
total spent into that DEST never passes the figure given last.
"""

from __future__ import annotations

import asyncio
from typing import Final

#: Credits are rounded to hundredths (``contract.cost_credits``); this absorbs float sums.
_EPSILON: Final = 1e-6


class Budget:
    """Reservations against a credit limit, shared by every row of a run (one event loop)."""

    def __init__(self, limit: float, *, committed: float = 0.0, unanswered: float = 0.0) -> None:
        if limit < 0:
            raise ValueError(f"a budget must be 0 or more credits, got {limit}")
        self.limit = float(limit)
        #: Spent or in flight before this run started (earlier runs into the same DEST).
        self.committed = float(committed)
        #: The part of ``committed`` and ``spent`` for submits whose answer never came
        #: (``lost``): perhaps charged, so counted, and said apart in ``reason``.
        self.unanswered = float(unanswered)
        #: Spent by this run's own submits.
        self.spent = 0.0
        #: Reserved by this run's submits whose outcome is not known yet.
        self.reserved = 0.0
        #: Held for the not yet submitted images of products already started (groups).
        self.holding = 0.0
        self.skipped = 0
        self._held: dict[object, float] = {}
        self._refused: set[object] = set()
        #: The first product (in file order) that did not fit: no later one starts.
        self._stop_at: int | None = None
        #: Products waiting for room to start (ints in file order; ``_behind``).
        self._waiting: set[object] = set()
        #: Images taken by the engine and not yet at their reservation, per product: its
        #: references still loading, say (``expect``).
        self._coming: dict[object, int] = {}
        self._changed = asyncio.Condition()

    @property
    def used(self) -> float:
        return self.committed + self.spent + self.reserved + self.holding

    @property
    def stopped(self) -> bool:
        """Whether any image was skipped because it did not fit."""
        return self.skipped > 0

    def fits(self, cost: float) -> bool:
        return self.used + cost <= self.limit + _EPSILON

    async def reserve(
        self,
        cost: float,
        *,
        group: object | None = None,
        group_cost: float = 0.0,
        expected: bool = False,
    ) -> bool:
        """Hold ``cost`` for a submit; False when it cannot fit, now or after releases.

        With ``group`` (a product), its first image holds ``group_cost`` (every image of
        the product this run submits) and later ones draw on it; once a product did not fit,
        its other images are refused too, and so is every product numbered after it that has
        not started (groups are ints in file order: ``run._product_of``). ``expected``: the
        image was counted by ``expect``, and arrives here.
        """
        async with self._changed:
            if expected:
                # Under the lock: the product is waiting, held or refused from here on, so
                # no later product sees a moment when it is none of these (and goes first).
                self._leave(group)
            if group is not None:
                held = self._held.get(group)
                if group in self._refused or (held is None and self._after_stop(group)):
                    self._refused.add(group)
                    self.skipped += 1
                    return False
                if held is not None:
                    if not await self._wait_for_share(group, cost):
                        return False
                    take = min(cost, self._held[group])
                    self._held[group] -= take
                    self.holding -= take
                    self.reserved += cost
                    return True
                else:
                    need = max(group_cost, cost)
                    self._waiting.add(group)
                    try:
                        fits = await self._wait_for(need, group)
                    finally:
                        self._waiting.discard(group)
                        self._changed.notify_all()
                    if not fits:
                        self._refused.add(group)
                        if isinstance(group, int) and (
                            self._stop_at is None or group < self._stop_at
                        ):
                            self._stop_at = group
                        return False
                    self._held[group] = need - cost
                    self.holding += need - cost
                    self.reserved += cost
                    return True
            if not await self._wait_for(cost):
                return False
            self.reserved += cost
            return True

    def expect(self, group: object) -> None:
        """An image of ``group`` is on its way to its reservation: products after it wait
        until it is there (``arrive``).

        Taken in file order, images reach their reservations out of it: one whose
        references take a while to load (a shop's 4 MP variant images) let a later product
        without any reserve first, fill the room, and leave the earlier one skipped: the
        holes in file order the budget means not to leave.
        """
        self._coming[group] = self._coming.get(group, 0) + 1

    def arrive(self, group: object) -> None:
        """An image ``expect`` counted will not reserve (it ended, or waits on another)."""
        if self._leave(group):
            asyncio.get_running_loop().create_task(self._notify())

    def _leave(self, group: object) -> bool:
        """One image of ``group`` fewer on its way; True when it was the last."""
        left = self._coming.get(group, 0) - 1
        if left > 0:
            self._coming[group] = left
            return False
        self._coming.pop(group, None)
        return True

    def holds(self, group: object) -> bool:
        """Whether ``group``'s first image has taken the product's hold (its siblings draw
        on it and need not price the product again)."""
        return group in self._held

    def _after_stop(self, group: object) -> bool:
        return isinstance(group, int) and self._stop_at is not None and group > self._stop_at

    def _behind(self, group: object) -> bool:
        """Whether an earlier product is still waiting to start, or on its way to: this
        one waits its turn, or room freed for the earlier one would go to it first."""
        if not isinstance(group, int):
            return False
        return any(other < group for other in self._waiting) or any(
            isinstance(other, int)
            and other < group
            and other not in self._held
            and other not in self._refused
            for other in self._coming
        )

    async def _wait_for(self, cost: float, group: object | None = None) -> bool:
        # Called with the condition held. Only tasks in flight can free room: a hold is
        # spent by its own product's images, so waiting on one could wait for ever.
        while not self.fits(cost) or self._behind(group):
            if self._after_stop(group) or (self.reserved <= _EPSILON and not self._behind(group)):
                self.skipped += 1
                return False
            await self._changed.wait()
        if self._after_stop(group):
            self.skipped += 1
            return False
        return True

    async def _wait_for_share(self, group: object, cost: float) -> bool:
        """Called with the condition held: whether an image of a started product fits, the
        part of ``cost`` its product's hold does not cover on top of everything else.

        A hold can fall short of an image's price (an image's references are priced only
        once loaded, and a sibling's may differ). The rest then waits for other tasks in
        flight only: it used to be reserved before the wait, so the image waited on its
        own reservation for ever (the run hung) and, refused, left it reserved.
        """
        while True:
            rest = cost - min(cost, self._held.get(group, 0.0))
            if rest <= _EPSILON or self.fits(rest):
                return True
            if self.reserved <= _EPSILON:
                self.skipped += 1
                return False
            await self._changed.wait()

    def forgo(self, group: object, cost: float) -> None:
        """An image of ``group`` ended without a submit (its reference was refused, say):
        what the product held for it is free again."""
        held = self._held.get(group)
        if held is None:
            return
        take = min(cost, held)
        self._held[group] = held - take
        self.holding -= take
        asyncio.get_running_loop().create_task(self._notify())

    def commit(self, extra: float) -> None:
        """An earlier run's task in flight costs ``extra`` more than ``committed`` counted
        (its journal entry had no cost, and its references are priced only once loaded)."""
        if extra > 0:
            self.committed += extra

    def lost(self, cost: float) -> bool:
        """A submit's answer was lost (the connection dropped, the answer timed out): the
        API may have charged ``cost`` for a task nobody can name. Counted as spent when it
        fits beside everything else, so that the row may go again on its reservation;
        False, and nothing counted, when sending it again could pass the limit."""
        if not self.fits(cost):
            return False
        self.spent += cost
        self.unanswered += cost
        return True

    def settle(self, reserved: float, charged: float) -> None:
        """The submit's outcome is known: ``charged`` was spent (0 when failed/moderated)."""
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += charged
        # Waiters re-check from the loop; notify needs the lock, so hand it to a task.
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def reason(self, cost: float, group_cost: float | None = None) -> str:
        """The ``skipped`` reason: starts with ``budget`` so it can be filtered on."""
        what = (
            f"this product's images cost {group_cost:.2f} together"
            if group_cost is not None
            else f"this image costs {cost:.2f}"
        )
        unanswered = (
            f" ({self.unanswered:.2f} of them for submits whose answer never came: perhaps "
            "charged, so counted)"
            if self.unanswered > _EPSILON
            else ""
        )
        return (
            f"budget: --max-credits {self.limit:g} reached ({self.used:.2f} credits spent or "
            f"in flight in this output{unanswered}, {what}); rerun with a higher "
            "--max-credits to continue"
        )
