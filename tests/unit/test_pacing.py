"""Unit tests of immich_stream/s3/pacing.py: one token bucket for threads and coroutines."""

from __future__ import annotations

import asyncio
import threading
import time

from immich_stream.s3.pacing import MIB, RateLimit


async def test_one_bucket_paces_threads_and_coroutines_together() -> None:
    limit = RateLimit(2 * MIB)  # burst: 256 KiB
    moved = 0
    lock = threading.Lock()

    def thread_side() -> None:
        nonlocal moved
        for _ in range(8):
            assert limit.take_blocking(64 << 10)
            with lock:
                moved += 64 << 10

    async def loop_side() -> None:
        nonlocal moved
        for _ in range(8):
            await limit.take(64 << 10)
            moved += 64 << 10

    start = time.monotonic()
    threads = [threading.Thread(target=thread_side) for _ in range(2)]
    for t in threads:
        t.start()
    ticks = 0

    async def ticker() -> None:  # the event loop keeps running while threads wait
        nonlocal ticks
        while any(t.is_alive() for t in threads):
            ticks += 1
            await asyncio.sleep(0.01)

    await asyncio.gather(loop_side(), loop_side(), ticker())
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert moved == 32 * (64 << 10)  # 2 MiB
    # 2 MiB at 2 MiB/s, less the 256 KiB burst: at least 0.875 s (a lower bound only)
    assert elapsed >= 0.85
    assert ticks >= 20


def test_a_stopped_thread_stops_waiting() -> None:
    limit = RateLimit(64 << 10)
    assert limit.take_blocking(limit.burst)
    stop = threading.Event()
    stop.set()
    start = time.monotonic()
    assert not limit.take_blocking(1 << 20, stop)
    assert time.monotonic() - start < 0.5
