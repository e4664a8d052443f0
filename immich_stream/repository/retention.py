"""Object Lock (`--lock-days N`, docs/format.md "Object Lock"): which objects get a
retention, until when, and keeping it long enough for what a snapshot reuses.

The rule: every object of a committed snapshot (its data objects, packs, manifest, dump,
snapshot.json) and config.json is retained until at least N days after the commit. A run
writes its objects with a retain-until of its start + 2N days (the margin: an object is
then extended at most about once every N days). At the commit, the objects the snapshot
reuses are checked: those of the parent snapshot when the parent's recorded guarantee
(`lock.until` in its snapshot.json) still reaches N days from now are fine as they are;
every other one is read (HeadObject) and, when its retention ends earlier, extended
(PutObjectRetention) to the run's start + 2N. snapshot.json records the guarantee: the
earliest retain-until of its objects. prune extends the kept snapshots' objects the same
way (retention_sweep in prune_versions.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from immich_stream.config import Settings
from immich_stream.errors import ConfigError, ObjectNotFound, StoreError
from immich_stream.repository.layout import DUMP, MANIFEST, SUMMARY, Layout
from immich_stream.repository.manifest import ManifestLine, key_digest
from immich_stream.s3.store import Store
from immich_stream.s3.versions import bucket_lock, retention, set_retention

if TYPE_CHECKING:
    from immich_stream.repository.repo import Repo, Snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")
SLACK = dt.timedelta(hours=1)  # a commit this much after the check still has its N days


@dataclass(frozen=True)
class LockPolicy:
    mode: str  # GOVERNANCE or COMPLIANCE (S3's spelling)
    days: int
    day: dt.timedelta  # a day (shorter only in tests: IMMICH_STREAM_LOCK_DAY)
    until: dt.datetime  # what this run writes and extends to: its start + 2N days

    @classmethod
    def of(cls, settings: Settings, now: dt.datetime | None = None) -> LockPolicy | None:
        if not settings.lock_days:
            return None
        day = dt.timedelta(seconds=settings.tuning.lock_day or 86400)
        now = now or dt.datetime.now(dt.UTC)
        return cls(settings.lock_mode.upper(), settings.lock_days, day, now + 2 * settings.lock_days * day)

    def needed(self, now: dt.datetime | None = None) -> dt.datetime:
        """The retention an object must reach now: N days from now (and the slack)."""
        return (now or dt.datetime.now(dt.UTC)) + self.days * self.day + min(SLACK, self.day / 24)

    def record(self, until: dt.datetime) -> dict[str, object]:
        """snapshot.json's `lock`."""
        return {"mode": self.mode, "days": self.days, "until": until.astimezone(dt.UTC).isoformat()}


def locked_key(layout: Layout, rel: str) -> bool:
    """Is the object at rel (relative to the prefix) one of a snapshot's, retained? Data
    objects, a snapshot's manifest, dump and snapshot.json, config.json; not journals,
    locks, probes or a manifest on its way back (all deleted again)."""
    if rel == "config.json" or rel.startswith("data/"):
        return True
    parts = rel.split("/")
    return len(parts) == 3 and parts[0] == "snapshots" and parts[2] in (MANIFEST, DUMP, SUMMARY)


def recorded_until(lock: dict[str, object] | None) -> dt.datetime | None:
    """The guarantee a snapshot.json records, if any."""
    try:
        return dt.datetime.fromisoformat(str((lock or {})["until"]))
    except (KeyError, ValueError):
        return None


async def check_bucket(store: Store, lock_days: int) -> None:
    """Preflight of a run with --lock-days: the bucket must have versioning and Object Lock."""
    state = await bucket_lock(store)
    if state.versioning != "Enabled" or not state.object_lock:
        raise ConfigError(
            f"--lock-days {lock_days}: bucket {store.bucket!r} has {state.describe()}; Object Lock needs both "
            "(create the bucket with Object Lock enabled, which enables versioning) or drop --lock-days"
        )


class Extender:
    """Brings objects' retention up to what is needed, each looked at once: HeadObject, and
    PutObjectRetention when it ends too early. `until`: the earliest retention seen."""

    def __init__(self, store: Store, policy: LockPolicy, jobs: int) -> None:
        self.store = store
        self.policy = policy
        self.need = policy.needed()
        self.until = policy.until
        self.checked = 0
        self.extended = 0
        self._gate = asyncio.Semaphore(max(jobs, 1))

    async def one(self, key: str) -> None:
        async with self._gate:
            have = await retention(self.store, key)
            self.checked += 1
            if have is not None and have[1] >= self.need:
                self.until = min(self.until, have[1])
                return
            # extended in its own mode: S3 refuses to weaken COMPLIANCE, and turning GOVERNANCE
            # into COMPLIANCE would need the right to bypass governance
            mode = have[0] if have is not None else self.policy.mode
            try:
                await set_retention(
                    self.store, key, mode, max(self.policy.until, have[1] if have else self.policy.until)
                )
            except StoreError as exc:
                if isinstance(exc, ObjectNotFound) or exc.code in ("NoSuchKey", "404", "NotFound"):
                    log.warning("%s is missing: its retention cannot be extended (verify names what needs it)", key)
                    return
                raise
            self.extended += 1

    async def all(self, keys: Iterable[str]) -> None:
        await bounded(keys, self.one)


async def bounded(items: Iterable[T], fn: Callable[[T], Coroutine[Any, Any, None]], batch: int = 512) -> None:
    """fn of every item, `batch` tasks alive at a time (memory stays bounded however many)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, batch)):
        async with asyncio.TaskGroup() as tg:
            for item in chunk:
                tg.create_task(fn(item))


def refs(line: ManifestLine) -> list[str]:
    return [key for key, _ in line.object_refs()]


async def secure_snapshot(repo: Repo, snap_id: str, parent: Snapshot | None, jobs: int) -> dict[str, object]:
    """Before the commit of snap_id: the retention of what it reuses brought up to N days
    from now (see the module docstring); snapshot.json's `lock` record."""
    policy = repo.lock
    assert policy is not None
    ext = Extender(repo.store.raw, policy, jobs)
    covered: set[bytes] = set()
    if parent is not None:
        parent_until = recorded_until(parent.summary.lock)
        if parent_until is not None and parent_until >= ext.need:
            async for line in repo.read_manifest(parent.id):
                covered.update(key_digest(k) for k in refs(line))
            ext.until = min(ext.until, parent_until)
    mine = f"data/{snap_id}/"
    todo: set[str] = {repo.config_key()}
    async for line in repo.read_manifest(snap_id):
        for key in refs(line):
            if not key.startswith(mine) and key_digest(key) not in covered:
                todo.add(repo.object_key(key))
    await ext.all(sorted(todo))
    log.info(
        "Object Lock: %d reused objects checked, %d extended to %s", ext.checked, ext.extended, policy.until.isoformat()
    )
    return policy.record(ext.until)
