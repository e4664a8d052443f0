"""Unit tests of immich_stream/s3/budget.py: the byte budget."""

from __future__ import annotations

import asyncio

from immich_stream.s3.budget import ByteBudget

# -- bounds ------------------------------------------------------------------------------------


async def test_byte_budget_bounds_what_is_held() -> None:
    budget = ByteBudget(100)
    await budget.acquire(60)
    waiter = asyncio.create_task(budget.acquire(60))
    await asyncio.sleep(0.01)
    assert not waiter.done() and budget.used == 60
    await budget.release(60)
    await asyncio.wait_for(waiter, 1)
    await budget.release(60)
    async with budget.hold(500):  # larger than the budget: runs alone
        assert budget.used == 500
    assert budget.used == 0 and budget.peak == 500
