"""The process a command runs in: the uvloop event loop with a bounded thread pool, the
signal handling (a first signal cancels the run, whose finally blocks start the stack again;
a second hurries the cleanup), the S3 hang watch every command gets, the exit past threads
stuck in a read, and the malloc tuning for large part buffers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from immich_stream import cleanup
from immich_stream.errors import EXIT_SIGHUP, EXIT_SIGINT, EXIT_SIGTERM, ImmichStreamError, Interrupted, StallError

log = logging.getLogger("immich_stream")


class _BoundedExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's thread pool (file reads, hashing). A read that hangs (a dead NFS server,
    a FIFO) must not keep a failed run alive: shutting down waits a few seconds at most,
    and main() then exits without joining such a thread."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)
        if wait:
            deadline = time.monotonic() + 3.0
            for thread in list(self._threads):
                thread.join(max(0.0, deadline - time.monotonic()))


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop = asyncio.new_event_loop()
    loop.set_default_executor(_BoundedExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)))
    return loop


def exit_past_hung_threads(code: int) -> None:
    """Python joins every worker thread at exit: one stuck in a read would keep the
    process (and its host lock) alive forever. The stack is already running again."""
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if stuck:
        log.warning("exiting with %d file operations still hanging (a dead network filesystem?)", len(stuck))
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


SIGNAL_EXIT = {"SIGHUP": EXIT_SIGHUP, "SIGINT": EXIT_SIGINT, "SIGTERM": EXIT_SIGTERM}


async def _with_s3_hang_watch(fn: Callable[[], Awaitable[Any]], stall: float) -> Any:
    """Every command fails when S3 answers nothing at all (timeouts and retries included)
    for the stall timeout while requests wait: a frozen server must not keep a restore, a
    prune or a verify alive for hours. (Backup has its own, finer watchdog as well.)

    The watch cancels the command (its finally blocks run: the stack is started again);
    when the command was already failing with an error of its own (backup's watchdog,
    whose cleanup then waited on the same frozen server), that error is the one reported."""
    from immich_stream.s3.store import OPEN_STORES

    main = asyncio.current_task()
    assert main is not None
    hung: list[StallError] = []

    async def watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            for store in list(OPEN_STORES):
                if what := store.hung(stall):
                    hung.append(StallError(f"{what}: stopped; check S3 and run again"))
                    main.cancel()
                    return

    dog = asyncio.create_task(watch())
    try:
        return await fn()
    except asyncio.CancelledError as exc:
        if not hung or main.cancelling() > 1:
            raise  # a signal (as well), not the watch alone
        main.uncancel()
        own = exc.__context__
        if isinstance(own, ImmichStreamError):
            raise own from None
        raise hung[0] from None
    finally:
        dog.cancel()


async def run_with_signals(fn: Callable[[], Awaitable[Any]], stall: float = 600.0) -> Any:
    """Run fn. A first SIGINT/SIGTERM/SIGHUP cancels it (its finally blocks start the stack
    again); a second one skips the cleanup still to come (aborting uploads, releasing the
    lock: prune collects those) but never the restart, and the run exits right after it."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[str] = []

    def on_signal(name: str) -> None:
        if received:
            log.warning("%s received again: exiting as soon as the Immich stack is started again", name)
            cleanup.hurry()
            return
        received.append(name)
        cleanup.signalled(name)
        log.warning("%s received: stopping, starting the Immich stack again, cleaning up", name)
        task.cancel()

    def dump_tasks() -> None:  # kill -USR1 <pid>: what is every task waiting for?
        for t in asyncio.all_tasks(loop):
            print(f"--- task {t.get_name()}", file=sys.stderr)
            t.print_stack(limit=12, file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    try:
        return await _with_s3_hang_watch(fn, stall)
    except asyncio.CancelledError:
        if not received:
            raise
        raise Interrupted(received[0], SIGNAL_EXIT[received[0]]) from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)


def tune_malloc() -> None:
    """Part buffers are large and short-lived; glibc's dynamic mmap threshold would move
    them onto the heap after the first free, where fragmentation holds on to memory.
    A fixed threshold keeps every buffer in its own mapping, returned on free."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
