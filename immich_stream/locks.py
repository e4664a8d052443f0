"""Locks: a repository lock object per run under <prefix>/locks/, plus a local flock.

A backup takes a shared lock, prune an exclusive one. Lock objects are JSON (host, pid,
command, start, last refresh), rewritten every REFRESH seconds while the run lasts. A lock
is stale when it has not been refreshed for `stale` seconds, or at once when it belongs
to this host and its process is gone (a run killed with SIGKILL). Stale locks are ignored
by every run and removed by `unlock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from immich_stream.errors import LockError
from immich_stream.repo import Repo

log = logging.getLogger(__name__)

REFRESH = 60.0  # seconds between refreshes of a held lock
STALE = 30 * 60.0  # seconds without refresh after which a lock is stale (restic's figure)
POLL = 2.0  # seconds between looks while waiting for a lock


@dataclass
class LockInfo:
    key: str
    host: str
    pid: int
    command: str
    exclusive: bool
    started: float
    refreshed: float

    def describe(self) -> str:
        since = dt.datetime.fromtimestamp(self.started, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        kind = "exclusive" if self.exclusive else "shared"
        return f"{self.command} (pid {self.pid} on {self.host}, {kind}, since {since})"

    def stale(self, now: float, stale_after: float) -> bool:
        if now - self.refreshed > stale_after:
            return True
        return self.host == socket.gethostname() and not run_alive(self.pid)


def run_alive(pid: int) -> bool:
    """Is pid a running immich-stream process on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie or a reused pid of another program is not a run.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"immich_stream" in cmdline or b"immich-stream" in cmdline


async def list_locks(repo: Repo) -> list[LockInfo]:
    out = []
    base = repo.object_key("locks/")
    async for obj in repo.store.list_objects(base):
        try:
            d = json.loads(await repo.store.get(obj.key))
            out.append(LockInfo(obj.key, d["host"], int(d["pid"]), d["command"], bool(d["exclusive"]),
                                float(d["started"]), float(d["refreshed"])))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable lock object %s (remove it with `unlock --force`)", obj.key)
        except Exception as exc:  # vanished between list and get: released meanwhile
            if "NoSuchKey" in str(exc) or "404" in str(exc):
                continue
            raise
    return out


class RepoLock:
    """`async with RepoLock(repo, "backup", exclusive=False, wait=60):` ..."""

    def __init__(self, repo: Repo, command: str, exclusive: bool, wait: float, stale: float = STALE) -> None:
        self.repo = repo
        self.command = command
        self.exclusive = exclusive
        self.wait = wait
        self.stale = stale
        self.key = repo.object_key(f"locks/{int(time.time())}-{socket.gethostname()}-{os.getpid()}-"
                                   f"{secrets.token_hex(3)}.json")
        self.started = time.time()
        self._refresher: asyncio.Task[None] | None = None

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                           "exclusive": self.exclusive, "started": self.started, "refreshed": time.time()}).encode()

    def _conflicts(self, locks: list[LockInfo]) -> list[LockInfo]:
        now = time.time()
        return [lk for lk in locks if lk.key != self.key and not lk.stale(now, self.stale)
                and (self.exclusive or lk.exclusive)]

    async def __aenter__(self) -> RepoLock:
        deadline = time.monotonic() + self.wait
        said = False
        while True:
            conflicts = self._conflicts(await list_locks(self.repo))
            if not conflicts:
                await self.repo.store.put(self.key, self._body(), "application/json")
                # Two runs may have looked at the same moment: look again after writing.
                conflicts = self._conflicts(await list_locks(self.repo))
                if not conflicts:
                    break
                await self.repo.store.delete([self.key])  # and both back off, for a random while
            if time.monotonic() >= deadline:
                holder = conflicts[0].describe()
                raise LockError(f"the repository is locked by {holder}: wait for it to finish (or raise "
                                f"--lock-wait); if that run is gone, `unlock` removes its lock once stale")
            if not said:
                log.info("waiting up to %.0fs for %s to release the repository", self.wait, conflicts[0].describe())
                said = True
            await asyncio.sleep(min(POLL * (0.5 + random.random()), max(deadline - time.monotonic(), 0.05)))
        self._refresher = asyncio.create_task(self._refresh())
        return self

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            try:
                await self.repo.store.put(self.key, self._body(), "application/json")
            except Exception as exc:  # the run itself notices S3 failing; a missed refresh is not fatal
                log.warning("could not refresh the lock %s: %s", self.key, exc)

    async def __aexit__(self, *exc: object) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher

        async def release() -> None:
            try:
                await self.repo.store.delete([self.key])
            except Exception as err:
                log.warning("could not remove the lock %s (%s): it goes stale by itself", self.key, err)

        await asyncio.shield(release())


@contextlib.contextmanager
def local_lock(name: str, state: Path) -> Iterator[None]:
    """An flock on this host: two backups of the same project never run at once. The
    kernel releases it when the process dies, however it dies."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise LockError(f"another immich-stream run on this host holds {path} (pid {holder}): "
                            "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def unlock(repo: Repo, force: bool, stale: float = STALE) -> tuple[list[LockInfo], list[LockInfo]]:
    """Remove stale locks (every lock with force). Returns (removed, kept)."""
    now = time.time()
    locks = await list_locks(repo)
    removed = [lk for lk in locks if force or lk.stale(now, stale)]
    kept = [lk for lk in locks if lk not in removed]
    if removed:
        await repo.store.delete([lk.key for lk in removed])
    return removed, kept
