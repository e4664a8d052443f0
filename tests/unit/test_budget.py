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


# -- packs hold budget until they are sent -----------------------------------------------------


class _Store:
    def __init__(self, delay: float = 0.01) -> None:
        self.puts: list[int] = []
        self.delay = delay

    async def put(self, key: str, data: bytes, **_: object) -> None:
        await asyncio.sleep(self.delay)
        self.puts.append(len(data))


async def test_a_half_full_pack_is_sent_when_the_budget_runs_out() -> None:
    """The blobs of the open pack hold budget that only its upload frees: with a budget
    not much larger than a pack (--max-memory 192KiB with 64 KiB parts: a budget of 64 KiB
    and packs of 64 KiB), a file that cannot get its bytes waited forever for a pack that
    only more files could fill (test_stack_safety's budget test stalled at 34 of 3,025)."""
    from typing import Any

    from immich_stream.repository.layout import Layout
    from immich_stream.repository.packs import PackWriter

    budget = ByteBudget(64 * 1024)
    store = _Store()
    writer = PackWriter(store, Layout(""), "run", budget, target=64 * 1024)  # type: ignore[arg-type]

    async def blob(n: int) -> Any:
        await budget.acquire(n)
        return await writer.add(b"x" * n, n)

    async def worker(sizes: list[int]) -> list[Any]:
        return [await blob(n) for n in sizes]

    # two workers, as the upload workers are: one waits in acquire while the other adds
    done = await asyncio.wait_for(asyncio.gather(worker([30_000] * 5), worker([20_000] * 5)), 10)
    await asyncio.wait_for(writer.close(), 10)
    assert sum(store.puts) == 250_000 and budget.used == 0
    assert all(f.done() for _, _, f in done[0] + done[1])
    assert budget.peak <= 64 * 1024


async def test_packs_stay_full_while_uploads_are_what_the_budget_waits_for() -> None:
    """Slow uploads keep the budget short all the time: that is what their ends free, not
    a reason to send every blob as a pack of its own."""

    from immich_stream.repository.layout import Layout
    from immich_stream.repository.packs import PackWriter

    budget = ByteBudget(200 * 1024)  # three packs: uploads in flight fill it
    store = _Store(delay=0.05)
    writer = PackWriter(store, Layout(""), "run", budget, target=64 * 1024)  # type: ignore[arg-type]

    async def worker() -> None:
        for _ in range(50):
            await budget.acquire(8 * 1024)
            await writer.add(b"x" * 8 * 1024, 8 * 1024)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(4))), 30)
    await asyncio.wait_for(writer.close(), 10)
    assert sum(store.puts) == 200 * 8 * 1024 and budget.used == 0
    assert len(store.puts) <= 200 * 8 // 64 + 2, store.puts
    assert budget.peak > 150 * 1024  # the budget did run short


async def test_a_part_waiting_for_budget_gets_the_open_pack_sent() -> None:
    """The last small files are in the open pack, the walk is done, a large file's part
    waits for the budget they hold: no blob is added any more, the wait itself sends it."""
    from immich_stream.repository.layout import Layout
    from immich_stream.repository.packs import PackWriter

    budget = ByteBudget(64 * 1024)
    store = _Store()
    writer = PackWriter(store, Layout(""), "run", budget, target=64 * 1024)  # type: ignore[arg-type]
    await budget.acquire(30_000)
    _, _, done = await writer.add(b"x" * 30_000, 30_000)
    await asyncio.wait_for(budget.acquire(64 * 1024), 5)  # a part of 64 KiB
    assert done.done() and store.puts == [30_000]
    await budget.release(64 * 1024)
    await writer.close()
    assert budget.used == 0 and budget.on_wait == []
