"""--limit-upload / --limit-download: one token bucket per direction, shared by every
request of a Store (coroutines in the event loop and download threads alike).

Bytes are paced as they are sent or received, in slices of at most `chunk` bytes, so a
16 MiB part leaves as a steady stream at the limit rather than as one burst followed by a
long silence (a home uplink's queue fills, and a silence looks like a hung server). The
bucket holds at most `burst` bytes, so a quiet moment does not save up a burst either.
"""

from __future__ import annotations

import asyncio
import threading
import time

MIB = 1024 * 1024
KIB = 1024


class RateLimit:
    """A token bucket of `rate` bytes per second that may go into debt: each caller
    reserves its slice and then waits out its share, so concurrent callers queue in the
    order they asked and together never exceed the rate. Thread-safe; the event loop
    never blocks on it (coroutines sleep, threads wait)."""

    def __init__(self, rate: float, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        # An eighth of a second's worth, within 16-256 KiB: smooth at any rate, and few
        # enough wake-ups (at most ~8 per slice per second) to cost nothing.
        self.burst = burst or int(min(max(rate / 8, 16 * KIB), 256 * KIB))
        self.chunk = max(KIB, min(64 * KIB, self.burst // 2))  # the slice paced at a time
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def mib_per_s(cls, value: float | None) -> RateLimit | None:
        """The limit for a setting in MiB/s; None (unlimited) for 0 or unset."""
        return cls(value * MIB) if value else None

    def _reserve(self, n: int) -> float:
        """Take n bytes' tokens; the seconds to wait before sending them."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def give_back(self, n: int) -> None:
        """Return tokens taken for bytes that were never moved (a short read, a cancel)."""
        if n > 0:
            with self._lock:
                self._tokens = min(float(self.burst), self._tokens + n)

    async def take(self, n: int) -> None:
        """Wait (asleep, in the event loop) until n more bytes may move."""
        delay = self._reserve(n)
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self.give_back(n)
                raise

    def take_blocking(self, n: int, stop: threading.Event | None = None) -> bool:
        """take() for a worker thread; False when `stop` was set while waiting."""
        delay = self._reserve(n)
        if delay <= 0:
            return True
        if stop is None:
            time.sleep(delay)
            return True
        if stop.wait(delay):
            self.give_back(n)
            return False
        return True
