"""The one way a command opens the repository (restic's openWithReadLock/ExclusiveLock):
require a bucket, open the S3 client, check (or create) the format, take the lock.

Who locks how: backups share the repository (each with its run id); restore, verify and
drill share it as readers (`reader()`), so that prune, which deletes, waits for them or
refuses naming them; prune and key rewrites hold it alone. The lock is the caller's, not
the Repo's: open_locked yields it beside the repository to whoever must see it.

The repository's knobs from settings.tuning (lock staleness, journal interval, trusting
the bucket) are handed to Repo and RepoLock here, once: nothing below reads the environment."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NamedTuple

from immich_stream.config import Settings
from immich_stream.errors import ConfigError, DeleteDenied, ForgedError, ImmichStreamError, NoRepository, RepoError
from immich_stream.repository.age import load_keys
from immich_stream.repository.locks import RepoLock, list_locks, own_time
from immich_stream.repository.repo import Repo
from immich_stream.repository.retention import LockPolicy, check_bucket
from immich_stream.s3.asof import AsOfStore
from immich_stream.s3.classify import why_no_repository
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store


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


class Locked(NamedTuple):
    """What open_locked yields: `async with open_locked(...) as (repo, lock):`."""

    repo: Repo
    lock: RepoLock


def reading(
    lock: RepoLock | None, limit: Callable[[], ImmichStreamError | None]
) -> Callable[[], ImmichStreamError | None]:
    """A reader's watchdog limit: its lost lock first (the refresher has stopped, so prune may
    delete the snapshot being read), then `limit`."""

    def check() -> ImmichStreamError | None:
        return (lock.lost() if lock is not None else None) or limit()

    return check


def still_reading(lock: RepoLock | None) -> None:
    """Raise the lost lock's error of a reader (see reading) between the files it reads."""
    if lock is not None and (error := lock.lost()) is not None:
        raise error


async def _alone(repo: Repo, held: RepoLock) -> bool:
    """No live lock but ours (ours is written before this lists: of two runs, one sees the other)."""
    locks = await list_locks(repo)
    now = own_time(locks, held.key)
    return all(lk.key == held.key or lk.stale(now, held.stale) for lk in locks)


@contextlib.asynccontextmanager
async def open_repo(
    settings: Settings,
    *,
    lock: LockSpec | None = None,
    create_for: str | None = None,
    check: bool = True,
    deletes: str | None = None,
    new: bool = False,
) -> AsyncIterator[Repo]:
    """`async with open_repo(settings) as repo:` ... `repo.store` is the bucket.

    create_for: a run id; prove the bucket writable (a probe object named by it); a missing
    repository is refused (NoRepository) unless `new` (init, copy's destination) allows
    creating its config.json (and, with check=False, a prefix without one: copy's look at its
    destination). check=False skips the format check (unlock
    must work on whatever is there). With `lock`, it is held until the block ends (a
    command that must see it, to commit or judge others' locks, uses open_locked).
    deletes: the command's name when it needs a key that may delete (prune, unlock): a
    key that cannot is refused (DeleteDenied) before the lock is taken or anything touched."""
    async with _open(settings, lock, create_for, check, deletes, new) as (repo, _):
        yield repo


@contextlib.asynccontextmanager
async def open_locked(
    settings: Settings,
    lock: LockSpec,
    *,
    create_for: str | None = None,
    check: bool = True,
    deletes: str | None = None,
    new: bool = False,
) -> AsyncIterator[Locked]:
    """open_repo, yielding the held lock beside the repository (`lock.ensure_held()`
    before a commit; its key and staleness for judging other runs' locks)."""
    async with _open(settings, lock, create_for, check, deletes, new) as (repo, held):
        assert held is not None
        yield Locked(repo, held)


@contextlib.asynccontextmanager
async def open_reader(settings: Settings, command: str) -> AsyncIterator[tuple[Repo, RepoLock | None]]:
    """A reader's open_locked (restore, verify, drill): the shared lock, or none at all in an
    --as-of view (which writes nothing; what it reads is locked versions, which no prune
    deletes within the lock window)."""
    async with _open(settings, reader(settings, command), None, True, None, False) as opened:
        yield opened


async def _has_repository(repo: Repo) -> bool:
    if await repo.store.head(repo.config_key()) is not None:
        return True
    async for _ in repo.store.list_objects(repo.snapshots_prefix()):
        return True
    return False


async def repository_exists(settings: Settings) -> bool:
    """Whether the bucket/prefix holds a repository (config.json, or an older version's
    snapshots): `init` refuses to create one over it."""
    settings.require("bucket")
    async with Store(StoreOptions.from_settings(settings)) as store:
        return await _has_repository(Repo(store, settings.prefix))


async def _require_repository(repo: Repo, store: Store, endpoint: str | None) -> None:
    """A writer's refusal of a bucket/prefix without a repository: config.json, or (written by
    a version before it, or by a run cut before it) a snapshot directory. The bucket or the
    server may be why there is none: then that is said."""
    if await _has_repository(repo):
        return
    reason = await why_no_repository(store, endpoint)
    if reason is not None:
        raise reason
    raise NoRepository(repo.where())


@contextlib.asynccontextmanager
async def _open(
    settings: Settings,
    lock: LockSpec | None,
    create_for: str | None,
    check: bool,
    deletes: str | None,
    new: bool,
) -> AsyncIterator[tuple[Repo, RepoLock | None]]:
    settings.require("bucket")
    keys = load_keys(settings.age_identity, settings.age_recipients)
    tuning = settings.tuning
    options = StoreOptions.from_settings(settings)
    as_of = settings.as_of
    if as_of is not None and (create_for is not None or (lock is not None and (lock.exclusive or lock.run))):
        raise ConfigError(f"--as-of {as_of.isoformat()}: the repository as it was then can only be read")
    async with AsOfStore(options, as_of) if as_of is not None else Store(options) as store:
        repo = Repo(store, settings.prefix, journal_interval=tuning.journal_interval, trust_bucket=tuning.trust_bucket)
        repo.lock = LockPolicy.of(settings)
        store.retention_for = repo.retention_for
        if (create_for is not None or not check) and not new and not settings.tuning.auto_init:
            await _require_repository(repo, store, settings.endpoint_url)  # before anything is written or stopped
        if create_for is not None and repo.lock is not None:  # before anything is written or stopped
            await check_bucket(store, settings.lock_days)
        if deletes is not None and not await store.can_delete(repo.preflight_key("delete")):
            raise DeleteDenied(
                f"this S3 key cannot delete (AccessDenied on DeleteObject): {deletes} needs a key that can; "
                f"run {deletes} with one (README: keys that cannot delete)"
            )
        # Append-only when set so (a backup, or a reader, sends no delete at all: its lock is
        # released by overwriting it), or from the first refused delete on (store.discard).
        store.append_only = settings.append_only and deletes is None
        if create_for is not None:
            # The probe's name is fixed per host: what a key that cannot delete leaves of it
            # stays one object (prune removes it).
            key = repo.preflight_key("backup")
            await store.put(key, b"immich-stream preflight\n")
            await store.discard([key])
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
        if lock is None or as_of is not None:  # an as-of view writes nothing, not even a lock
            yield repo, None
            return
        async with RepoLock(
            repo, lock.command, exclusive=lock.exclusive, wait=lock.wait, stale=tuning.lock_stale, run=lock.run
        ) as held:
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
            yield repo, held
