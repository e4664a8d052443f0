"""The stall watchdog: a backup that stops moving fails (and the stack starts again)
instead of keeping Immich down behind a hung connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from immich_stream.errors import ImmichStreamError, StallError
from immich_stream.s3.options import StoreOptions


class Watched(Protocol):
    """What the watchdogs read of a Store (or of a wrapper around one, the repository's)."""

    @property
    def options(self) -> StoreOptions: ...
    @property
    def last_activity(self) -> float: ...
    def touch(self) -> None: ...
    def check_moving(self) -> None: ...
    def oldest_request(self) -> tuple[str, float] | None: ...
    def hung(self, stall: float) -> str | None: ...


async def with_watchdog(
    store: Watched, stall: float, work: Awaitable[None], limit: Callable[[], ImmichStreamError | None] | None = None
) -> None:
    """Run work; fail it when nothing has moved for `stall` seconds (no byte of backup data
    taken by the connection or acknowledged by S3, however slowly they go, no byte
    downloaded, no dump output, no file walked: errors, timeouts, retries and answers to
    locks and probes do not count), or when
    `limit` returns an error (--max-downtime). A hung connection must not keep Immich down:
    the failure unwinds through StackGuard, which starts the stack again."""

    async def watch() -> None:
        while True:
            await asyncio.sleep(min(1.0, stall / 10))
            if limit is not None and (error := limit()) is not None:
                raise error
            store.check_moving()
            idle = time.monotonic() - store.last_activity
            if idle > stall:
                raise StallError(_what_hung(store, idle))

    store.touch()
    async with asyncio.TaskGroup() as tg:
        dog = tg.create_task(watch())
        try:
            await work
        finally:
            dog.cancel()


def _what_hung(store: Watched, idle: float) -> str:
    oldest = store.oldest_request()
    if oldest is not None:
        what, waited = oldest
        hung = f"S3 at {store.options.endpoint_url or 'AWS'} did not answer ({what}, waiting {waited:.0f} s)"
    else:
        hung = "no S3 request, file or dump output moved (a hung disk, network filesystem or Docker?)"
    return (
        f"no progress for {idle:.0f} s: {hung}; the stack was started again and nothing was committed; "
        "check it and run again (IMMICH_STREAM_STALL_TIMEOUT sets the limit)"
    )


def s3_hang(store: Watched, stall: float, outcome: str) -> Callable[[], StallError | None]:
    """A watchdog limit: S3 answered nothing at all (timeouts and retries included) for the
    stall timeout while requests or downloads wait."""

    def check() -> StallError | None:
        what = store.hung(stall)
        return StallError(f"{what}: {outcome}; check S3 and run again") if what else None

    return check
