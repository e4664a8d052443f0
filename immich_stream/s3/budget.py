"""A byte budget: bounds the bytes held in buffers across every concurrent upload/download."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waiting = 0  # acquires waiting now
        # called when an acquire starts to wait: a holder that frees budget only when told
        # (a pack being filled: PackWriter) sends itself then
        self.on_wait: list[Callable[[], None]] = []
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        # A request larger than the whole budget waits for an empty budget, then runs
        # alone: progress is guaranteed and the overshoot is bounded by one request.
        n = max(n, 0)
        async with self._cond:
            if not self.available(n):
                self.waiting += 1
                for nudge in list(self.on_wait):
                    nudge()
                try:
                    await self._cond.wait_for(lambda: self.available(n))
                finally:
                    self.waiting -= 1
            self.used += n
            self.peak = max(self.peak, self.used)

    def available(self, n: int) -> bool:
        """acquire(n) would not wait now."""
        return self.used == 0 or self.used + n <= self.limit

    async def release(self, n: int) -> None:
        async with self._cond:
            self.used -= max(n, 0)
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        await self.acquire(n)
        try:
            yield
        finally:
            await asyncio.shield(self.release(n))
