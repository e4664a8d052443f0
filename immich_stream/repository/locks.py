"""Locks: a repository lock object per run under <prefix>/locks/, plus local flocks.

A backup takes a shared lock, prune an exclusive one. A lock object is JSON (host, pid,
command, the backup's run id, a random run token, start), rewritten every REFRESH seconds
while the run lasts. Staleness is judged on the S3 server's clock alone: a lock is stale
when its LastModified is more than `stale` seconds older than the server's present (the
LastModified of an object written just now), never by the holder's clock. A lock is also
stale at once when this host's state directory proves that its token belonged to a local
run that is gone (the run's flock on runs/<token>.run is free: a run killed with
SIGKILL). A hostname or pid proves nothing: containers share hostnames, pid namespaces
reuse pids. Stale locks are ignored by every run and removed by `unlock` and by prune
(which then collects the dead run's uploads once they are older than --stale-after);
prune spares the uploads of every run whose lock is live.

A run commits only after `ensure_held()`: its lock object still exists with its token,
and it was never left unrefreshed long enough for another run to judge it stale, by the
server's clock (each write of the lock reads back its LastModified: a machine suspended
for hours has a monotonic clock that saw no time pass) and by this host's boot-time clock.

`unlock` leaves a tombstone (<lock>.removed) before removing a lock: a refresh whose write
was on its way while the lock was removed sees it right after writing, removes the lock
again and stops; nothing re-creates a removed lock. Tombstones are collected once stale.

Released: a run whose S3 key cannot delete (append-only: --append-only, or detected at the
first refused delete, store.discard) releases its lock, and backs off while acquiring, by
overwriting the lock object with a released body ({"released": true, ...}, PutObject
only). Every reader takes a released lock for no lock (list_locks skips it; a run's own is
no longer "ours": its refresh never writes it again); prune, whose key may delete, removes
released locks. Versions before this one skip the body as unreadable (no host): no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

from immich_stream import cleanup
from immich_stream.errors import LockError, ObjectNotFound, StoreError
from immich_stream.host.hoststate import claim_run, forget_run, local_run_gone, release_run
from immich_stream.repository.sealed import SealedStore

log = logging.getLogger(__name__)

REFRESH = 60.0  # seconds between refreshes of a held lock (at most)
STALE = 30 * 60.0  # seconds (server clock) without refresh after which a lock is stale (restic's figure)
POLL = 2.0  # seconds between looks while waiting for a lock
TOMBSTONE = ".removed"  # beside a lock `unlock` removed: its run must not write it again
RELEASED = "released"  # the field of a released lock's body (see the module's docstring)


def _clock() -> float:
    """Seconds, counting time the machine spent suspended (CLOCK_BOOTTIME) where there is one."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def tombstone_key(lock_key: str) -> str:
    return lock_key + TOMBSTONE


def lock_stale(configured: float | None = None) -> float:
    """STALE, or the configured figure (config.Tuning.lock_stale: IMMICH_STREAM_LOCK_STALE,
    for tests, which cannot wait 30 minutes)."""
    return STALE if configured is None else configured


class LockSite(Protocol):
    """What locks need of a repository (a Repo is one): its bucket and where its lock
    objects and probes live (layout.py)."""

    @property
    def store(self) -> SealedStore: ...

    def locks_prefix(self) -> str: ...

    def lock_key(self, name: str) -> str: ...

    def preflight_key(self, name: str) -> str: ...


@dataclass
class LockInfo:
    key: str
    host: str
    pid: int
    command: str
    exclusive: bool
    started: float  # the holder's clock: shown, never compared
    run: str | None  # the backup's run id: its uploads are data/<run>/ and snapshots/<run>/
    token: str | None  # random per run; None in locks of older versions
    modified: dt.datetime | None  # LastModified: the server's clock

    def describe(self) -> str:
        since = dt.datetime.fromtimestamp(self.started, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        kind = "exclusive" if self.exclusive else "shared"
        run = f", run {self.run}" if self.run else ""
        return f"{self.command} (pid {self.pid} on {self.host}, {kind}{run}, since {since})"

    def stale(self, server_now: dt.datetime | None, stale_after: float) -> bool:
        if (
            server_now is not None
            and self.modified is not None
            and (server_now - self.modified).total_seconds() > stale_after
        ):
            return True
        return self.token is not None and local_run_gone(self.token)


# -- lock objects --------------------------------------------------------------------------------


async def list_locks(repo: LockSite, released: list[str] | None = None) -> list[LockInfo]:
    """The live locks (stale ones included: judged by the caller); the keys of released
    ones (no lock to anyone) are appended to `released` when given (prune removes them)."""
    out = []
    base = repo.locks_prefix()
    async for obj in repo.store.list_objects(base):
        if not obj.key.endswith(".json"):  # a folder marker, a tombstone or a stray file: not a lock
            if obj.key != base and not obj.key.endswith(TOMBSTONE):
                log.warning("ignoring %s: not a lock object", obj.key)
            continue
        try:
            d = json.loads(await repo.store.get(obj.key))
            if isinstance(d, dict) and d.get(RELEASED):
                if released is not None:
                    released.append(obj.key)
                continue
            out.append(
                LockInfo(
                    obj.key,
                    str(d["host"]),
                    int(d["pid"]),
                    str(d["command"]),
                    bool(d["exclusive"]),
                    float(d["started"]),
                    d.get("run") or None,
                    d.get("token") or None,
                    obj.last_modified if isinstance(obj.last_modified, dt.datetime) else None,
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignoring unreadable lock object %s (remove it with `unlock --force`)", obj.key)
        except ObjectNotFound:  # vanished between list and get: released meanwhile
            continue
    return out


def own_time(locks: list[LockInfo], key: str) -> dt.datetime | None:
    """The server's present: the LastModified of our own lock, written just before listing."""
    return next((lk.modified for lk in locks if lk.key == key), None)


async def server_now(repo: LockSite) -> dt.datetime | None:
    """The S3 server's present: the LastModified of a probe object written just now
    (None when the server does not say: then no lock is judged stale by age)."""
    # A key that cannot delete leaves the probe: then one of a fixed name, overwritten each time.
    key = repo.preflight_key("clock" if repo.store.append_only else "clock-" + secrets.token_hex(4))
    await repo.store.put(key, b"immich-stream clock probe\n")
    try:
        async for obj in repo.store.list_objects(key):
            if obj.key == key and isinstance(obj.last_modified, dt.datetime):
                return obj.last_modified
        return None
    finally:
        await repo.store.discard([key])


class RepoLock:
    """`async with RepoLock(repo, "backup", exclusive=False, wait=60, run=snap_id) as lock:` ...
    and `await lock.ensure_held()` right before committing. stale: seconds (server clock)
    after which an unrefreshed lock is stale, None for STALE."""

    def __init__(
        self,
        repo: LockSite,
        command: str,
        exclusive: bool,
        wait: float,
        stale: float | None = None,
        run: str | None = None,
    ) -> None:
        self.repo = repo
        self.command = command
        self.exclusive = exclusive
        self.wait = wait
        self.stale = lock_stale(stale)
        self.run = run
        self.token = secrets.token_hex(16)
        self.key = repo.lock_key(f"{int(time.time())}-{socket.gethostname()}-{os.getpid()}-{self.token[:8]}.json")
        self.started = time.time()
        self._refresher: asyncio.Task[None] | None = None
        self._run_fd: int | None = None
        self._last_ok: float | None = None  # _clock() at the start of our last successful write of the lock
        self._server_last: dt.datetime | None = None  # our lock's LastModified after that write
        self._lost: str | None = None  # why this run can no longer prove it holds the lock

    def _body(self) -> bytes:
        # "refreshed" (our clock) only for older versions, which require it; nobody compares it.
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "command": self.command,
                "exclusive": self.exclusive,
                "started": self.started,
                "refreshed": time.time(),
                "run": self.run,
                "token": self.token,
            }
        ).encode()

    async def _release(self) -> None:
        """Our lock object no lock to anyone: deleted, or, when this key cannot delete,
        overwritten with a released body (prune removes it)."""
        if not await self.repo.store.discard([self.key]):
            body = {RELEASED: True, "command": self.command, "run": self.run, "token": self.token}
            await self.repo.store.put(self.key, json.dumps(body).encode(), "application/json")

    async def _write(self) -> None:
        sent = _clock()
        await self.repo.store.put(self.key, self._body(), "application/json")
        if self._last_ok is not None and sent - self._last_ok > self.stale / 2 and self._lost is None:
            self._lost = (
                f"the lock went unrefreshed for {sent - self._last_ok:.0f}s: another run may have "
                "judged it stale meanwhile"
            )
        self._last_ok = sent

    def _conflicts(self, locks: list[LockInfo]) -> list[LockInfo]:
        now = own_time(locks, self.key)
        return [
            lk
            for lk in locks
            if lk.key != self.key and not lk.stale(now, self.stale) and (self.exclusive or lk.exclusive)
        ]

    async def __aenter__(self) -> RepoLock:
        self._run_fd = claim_run(self.token)  # before the lock object exists, released after it is gone
        try:
            await self._acquire()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._release())
            release_run(self.token, self._run_fd)
            raise
        self._refresher = asyncio.create_task(self._refresh())
        return self

    async def _acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        said = False
        while True:
            # Write first: our own lock's LastModified is the server's present, against which
            # the others' ages are judged; two runs that write at once both see each other.
            await self._write()
            locks = await list_locks(self.repo)
            conflicts = self._conflicts(locks)
            if not conflicts:
                self._server_last = own_time(locks, self.key)
                return
            await self._release()  # and back off, for a random while
            self._last_ok = None
            if time.monotonic() >= deadline:
                holder = conflicts[0].describe()
                raise LockError(
                    f"the repository is locked by {holder}: wait for it to finish (or raise "
                    f"--lock-wait); if that run is gone, `unlock` removes its lock once stale"
                )
            if not said:
                log.info("waiting up to %.0fs for %s to release the repository", self.wait, conflicts[0].describe())
                said = True
            await asyncio.sleep(min(POLL * (0.5 + random.random()), max(deadline - time.monotonic(), 0.05)))

    async def _still_ours(self) -> bool:
        """Does our lock object exist with our token?"""
        try:
            if await self.repo.store.head(self.key) is None:
                return False
            d: Any = json.loads(await self.repo.store.get(self.key))
        except ObjectNotFound:
            return False
        except ValueError:
            return False
        return isinstance(d, dict) and d.get("token") == self.token and not d.get(RELEASED)

    def _lose(self, why: str, said: str) -> None:
        if self._lost is None:
            self._lost = why
            log.error("the repository lock %s %s: this run will not commit", self.key, said)

    async def _rewrite(self) -> None:
        """Write our lock again if it is still ours, then read back the server's view of it:
        its LastModified (how long the server saw it unrefreshed) and whether `unlock`
        removed it while our write was on its way (its tombstone)."""
        if not await self._still_ours():
            # Never write it again: prune or unlock relied on it being gone.
            self._lose("its lock object was removed (by `unlock --force`?)", "was removed")
            return
        await self._write()
        modified: dt.datetime | None = None
        removed = False
        async for obj in self.repo.store.list_objects(self.key):
            if obj.key == self.key and isinstance(obj.last_modified, dt.datetime):
                modified = obj.last_modified
            elif obj.key == tombstone_key(self.key):
                removed = True
        if removed:
            await self._release()  # it must stay removed
            self._lose("its lock object was removed (by `unlock --force`?)", "was removed")
            return
        if modified is not None and self._server_last is not None:
            gap = (modified - self._server_last).total_seconds()
            if gap > self.stale / 2:
                self._lose(
                    f"by the S3 server's clock it went unrefreshed for {gap:.0f}s (was this machine "
                    "suspended?): another run may have judged it stale",
                    f"went unrefreshed for {gap:.0f}s by the S3 server's clock",
                )
        if modified is not None:
            self._server_last = modified

    async def _refresh(self) -> None:
        interval = min(REFRESH, self.stale / 6)
        while self._lost is None:
            await asyncio.sleep(interval)
            try:
                await self._rewrite()
            except StoreError as exc:  # ensure_held refuses the commit if this lasts
                log.warning("could not refresh the lock %s: %s", self.key, exc)

    async def ensure_held(self) -> None:
        """Raise LockError unless this run provably still holds its lock: the lock object
        exists with our token, and no gap between our successful writes of it (nor the
        time since the last) was long enough for another run to judge it stale."""
        if self._lost is None and self._last_ok is not None and _clock() - self._last_ok > self.stale / 2:
            self._lost = (
                f"the lock could not be refreshed for {_clock() - self._last_ok:.0f}s: another run "
                "may have judged it stale"
            )
        if self._lost is None:
            # Written once more now, so that the server's clock measures the time since the
            # last refresh, suspends included.
            await self._rewrite()
        if (error := self.lost()) is not None:
            raise error

    def lost(self) -> LockError | None:
        """The error to stop with once the lock is known lost (the refresher found it
        removed or unrefreshed too long), else None: a backup checks this as it goes, so a
        run that can no longer commit does not upload (or keep Immich down) for nothing."""
        if self._lost is None:
            return None
        what = f"{self.command} {self.run}" if self.run else self.command
        if self.exclusive and self.run is None:  # prune, key rotate/reencrypt: they stop where they are
            return LockError(
                f"{what} lost the repository lock ({self._lost}) and stopped: another run may have begun; run it again"
            )
        if not self.exclusive and self.run is None:  # a reader: prune may be deleting what it reads
            return LockError(
                f"{what} lost the repository lock ({self._lost}) and stopped: prune may delete the snapshot it "
                "reads; what it wrote so far stays; run it again"
            )
        return LockError(
            f"{what} lost the repository lock ({self._lost}); nothing was committed: "
            "run it again (prune collects its uploads)"
        )

    async def __aexit__(self, *exc: object) -> None:
        cancelled = False
        if self._refresher is not None:
            self._refresher.cancel()
            try:
                await asyncio.wait([self._refresher])  # never swallows a cancellation of our own
            except asyncio.CancelledError:
                cancelled = True  # remove the lock first, then pass it on

        removed = False
        try:
            # Bounded: S3 may be what failed; a lock left behind goes stale by itself (at
            # once for runs on this host, whose run file shows the process gone).
            removed = await cleanup.best_effort(f"remove the lock {self.key}", self._release())
        finally:
            if self._run_fd is not None:
                release_run(self.token, self._run_fd, lock_removed=removed)
                self._run_fd = None
        if cancelled:
            raise asyncio.CancelledError


async def unlock(
    repo: LockSite, force: bool, stale: float | None = None
) -> tuple[list[LockInfo], list[LockInfo], list[LockInfo]]:
    """Remove stale locks (every lock with force). Returns (removed stale, removed live, kept)."""
    stale = lock_stale(stale)
    now = await server_now(repo)
    locks = await list_locks(repo)
    gone = [lk for lk in locks if lk.stale(now, stale)]
    live = [lk for lk in locks if lk not in gone]
    removed_live = live if force else []
    kept = [] if force else live
    await remove_locks(repo, gone + removed_live, now, stale)
    return gone, removed_live, kept


async def remove_locks(repo: LockSite, locks: list[LockInfo], now: dt.datetime | None, stale: float) -> None:
    """Remove lock objects, each after its tombstone (see the module's docstring), and the
    tombstones that are stale themselves (their runs stopped long ago)."""
    if locks:
        await asyncio.gather(*(repo.store.put(tombstone_key(lk.key), b"removed\n") for lk in locks))
        await repo.store.delete([lk.key for lk in locks])
    for lk in locks:
        forget_run(lk.token)
    if now is None:
        return
    old = [
        obj.key
        async for obj in repo.store.list_objects(repo.locks_prefix())
        if obj.key.endswith(TOMBSTONE)
        and isinstance(obj.last_modified, dt.datetime)
        and (now - obj.last_modified).total_seconds() > stale
    ]
    if old:
        await repo.store.delete(old)
