"""A credit budget: spend plus in-flight cost never passes ``--max-credits``.

The check has to happen before a submit, not after: once the API accepts a task it will be
charged, so each submit first reserves what its image will cost (``contract.cost_credits``
of the size it asks for) and the reservation turns into spend when the image arrives, or
is released when the task fails or is moderated (neither is charged). A row whose image
does not fit waits while other reservations might still be released, and ends ``skipped``
with reason ``budget`` once nothing can free room for it.

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

    def __init__(self, limit: float, *, committed: float = 0.0) -> None:
        if limit < 0:
            raise ValueError(f"a budget must be 0 or more credits, got {limit}")
        self.limit = float(limit)
        #: Spent or in flight before this run started (earlier runs into the same DEST).
        self.committed = float(committed)
        #: Spent by this run's own submits.
        self.spent = 0.0
        #: Reserved by this run's submits whose outcome is not known yet.
        self.reserved = 0.0
        self.skipped = 0
        self._changed = asyncio.Condition()

    @property
    def used(self) -> float:
        return self.committed + self.spent + self.reserved

    def fits(self, cost: float) -> bool:
        return self.used + cost <= self.limit + _EPSILON

    async def reserve(self, cost: float) -> bool:
        """Hold ``cost`` for a submit; False when it cannot fit, now or after releases."""
        async with self._changed:
            while not self.fits(cost):
                if self.reserved <= _EPSILON:
                    self.skipped += 1
                    return False
                await self._changed.wait()
            self.reserved += cost
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

    def reason(self, cost: float) -> str:
        """The ``skipped`` reason: starts with ``budget`` so it can be filtered on."""
        return (
            f"budget: --max-credits {self.limit:g} reached ({self.used:.2f} credits spent or "
            f"in flight in this output, this image costs {cost:.2f}); rerun with a higher "
            "--max-credits to continue"
        )
