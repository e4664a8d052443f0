"""The one way a command opens the repository (restic's openWithReadLock/ExclusiveLock):
require a bucket, open the S3 client, check (or create) the format, take the lock.

Who locks how: backups share the repository (each with its run id); restore, verify and
drill share it as readers (`reader()`), so that prune, which deletes, waits for them or
refuses naming them; prune and key rewrites hold it alone."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from immich_stream.age import load_keys
from immich_stream.config import Settings
from immich_stream.errors import ForgedError, ImmichStreamError, RepoError
from immich_stream.locks import RepoLock, list_locks, own_time
from immich_stream.repo import Repo
from immich_stream.store import Store, why_no_repository


@dataclass(frozen=True)
class LockSpec:
    """A repository lock: backups share it (each with its run id), prune takes it alone."""

    command: str
    exclusive: bool
    wait: float
    run: str | None = None


def reader(settings: Settings, command: str) -> LockSpec:
    """The shared lock of a command that reads snapshots: many at once, and beside backups."""
    return LockSpec(command, exclusive=False, wait=settings.lock_wait)


def reading(repo: Repo, limit: Callable[[], ImmichStreamError | None]) -> Callable[[], ImmichStreamError | None]:
    """A reader's watchdog limit: its lost lock first (the refresher has stopped, so prune may
    delete the snapshot being read), then `limit`."""

    def check() -> ImmichStreamError | None:
        return (repo.lock.lost() if repo.lock is not None else None) or limit()

    return check


def still_reading(repo: Repo) -> None:
    """Raise the lost lock's error of a reader (see reading) between the files it reads."""
    if repo.lock is not None and (error := repo.lock.lost()) is not None:
        raise error


async def _alone(repo: Repo, held: RepoLock) -> bool:
    """No live lock but ours (ours is written before this lists: of two runs, one sees the other)."""
    locks = await list_locks(repo)
    now = own_time(locks, held.key)
    return all(lk.key == held.key or lk.stale(now, held.stale) for lk in locks)


@contextlib.asynccontextmanager
async def open_repo(
    settings: Settings, *, lock: LockSpec | None = None, create_for: str | None = None, check: bool = True
) -> AsyncIterator[Repo]:
    """`async with open_repo(settings) as repo:` ... `repo.store` is the bucket.

    create_for: a run id; prove the bucket writable (a probe object named by it) and create
    config.json in a new repository (backup). check=False skips the format check (unlock
    must work on whatever is there). With `lock`, repo.lock holds it until the block ends."""
    settings.require("bucket")
    keys = load_keys(settings.age_identity, settings.age_recipients)
    async with Store(settings) as store:
        repo = Repo(store, settings.prefix)
        if create_for is not None:
            key = repo.preflight_key(create_for)
            await store.put(key, b"immich-stream preflight\n")
            await store.delete([key])
            await repo.ensure_config(keys)
        elif check:
            try:
                await repo.check_config(keys, defer=lock is not None and lock.exclusive)
            except ForgedError:
                raise
            except RepoError:  # no (readable) config.json: the bucket or the server may be why
                reason = await why_no_repository(store, settings.endpoint_url)
                if reason is not None:
                    raise reason from None
                raise
        if lock is None:
            yield repo
            return
        async with RepoLock(repo, lock.command, exclusive=lock.exclusive, wait=lock.wait, run=lock.run) as held:
            repo.lock = held
            if create_for is not None or check:
                # Again, now that nobody holds the repository alone: a `key rotate` that held it
                # while this waited has changed config.json's recipients and the identity file
                # (objects written for the old ones would not open with the new key alone).
                # A writer holding it (a backup, prune, key rotate) also sets up the repository's
                # authentication when it has none yet (auth.py: trust on first use).
                upgrade = create_for is not None or lock.exclusive
                await repo.check_config(
                    load_keys(settings.age_identity, settings.age_recipients),
                    writing=create_for is not None,
                    upgrade=upgrade,
                    # under a shared lock only alone: two backups at once would each create a key
                    alone=lock.exclusive or not upgrade or await _alone(repo, held),
                )
            try:
                yield repo
            finally:
                repo.lock = None
