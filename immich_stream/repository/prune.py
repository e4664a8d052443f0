"""`prune`: apply a retention policy (restic's `forget` rules), then collect garbage.

Garbage: data objects no remaining committed snapshot references, snapshot directories
without snapshot.json, and unfinished multipart uploads, each left alone while younger
than a threshold (a run may still be writing them) or while the run that wrote them still
has a live lock; stale locks are removed (their runs can no longer commit). Keys under the prefix that are not ours (folder markers,
stray files, ids that do not parse) are left alone with a warning; nothing outside
<prefix>/ is ever touched. The newest committed snapshot is never removed.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from immich_stream.config import Settings, format_size
from immich_stream.errors import ConfigError
from immich_stream.repository.age import Sealing
from immich_stream.repository.layout import is_pack_key, new_snapshot_id, run_of, snapshot_time
from immich_stream.repository.locks import RepoLock, list_locks, own_time, remove_locks
from immich_stream.repository.manifest import ManifestLine, key_digest
from immich_stream.repository.packs import pack_target
from immich_stream.repository.prune_locked import LockReport, deletable, extend, hold_locked_snapshots, sweep
from immich_stream.repository.repack import PackUse, RepackReport, choose, repack
from immich_stream.repository.repo import Repo
from immich_stream.repository.retention import check_bucket
from immich_stream.repository.sealed import SealedStore
from immich_stream.repository.session import LockSpec, open_locked
from immich_stream.s3.watchdog import s3_hang, with_watchdog

log = logging.getLogger(__name__)

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: str | None = None  # e.g. "1y2m3d4h"

    def empty(self) -> bool:
        """Keeps nothing: no rule, or only a zero --keep-within (0d, 0h ...)."""
        return not any(getattr(self, r) for r in RULES) and (not self.within or not any(parse_within(self.within)))

    def describe(self) -> str:
        parts = [f"keep-{r} {getattr(self, r)}" for r in RULES if getattr(self, r)]
        if self.within:
            parts.append(f"keep-within {self.within}")
        return ", ".join(parts) or "(none)"


def parse_within(text: str) -> tuple[int, int, int, int]:
    """'1y2m3d4h' -> (years, months, days, hours), restic's duration format."""
    m = re.fullmatch(r"(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)d)?(?:(\d+)h)?", text.strip())
    if not m or not text.strip():
        raise ConfigError(f"keep-within {text!r} is not a duration: write it like 30d, 6m, 1y2m3d or 12h")
    y, mo, d, h = (int(g or 0) for g in m.groups())
    return y, mo, d, h


def _sub(t: dt.datetime, y: int, mo: int, d: int, h: int) -> dt.datetime:
    """t minus a calendar duration, like Go's AddDate (days overflow into the next month)."""
    month = t.month - mo - 1
    year = t.year - y + month // 12
    month = month % 12 + 1
    base = dt.datetime(year, month, 1, t.hour, t.minute, t.second, t.microsecond, tzinfo=t.tzinfo)
    return base + dt.timedelta(days=t.day - 1 - d, hours=-h)


_BUCKETS: dict[str, Callable[[dt.datetime, int], Any]] = {
    "last": lambda t, nr: nr,
    "hourly": lambda t, nr: t.strftime("%Y%m%d%H"),
    "daily": lambda t, nr: t.strftime("%Y%m%d"),
    "weekly": lambda t, nr: t.isocalendar()[:2],
    "monthly": lambda t, nr: t.strftime("%Y%m"),
    "yearly": lambda t, nr: t.year,
}


def apply_policy(ids: list[str], policy: Policy) -> tuple[list[str], list[str]]:
    """(keep, remove), each oldest first. restic's rules: newest first, each rule keeps
    the newest snapshot of each of its last N periods (hour, day, ISO week, month, year,
    in UTC) that have snapshots; keep-within keeps everything within the duration before
    the newest snapshot. A snapshot kept by any rule is kept."""
    if policy.empty():
        what = f"retention policy keep-within {policy.within} keeps nothing" if policy.within else "no retention policy"
        raise ConfigError(
            f"{what}: give at least one of --keep-last, --keep-hourly, --keep-daily, "
            "--keep-weekly, --keep-monthly, --keep-yearly, --keep-within (or [prune] in the config)"
        )
    newest_first = sorted(ids, reverse=True)
    counts = {r: getattr(policy, r) for r in RULES}
    last: dict[str, Any] = {r: object() for r in RULES}
    cutoff = None
    if policy.within and newest_first:
        cutoff = _sub(snapshot_time(newest_first[0]), *parse_within(policy.within))
    keep: list[str] = []
    remove: list[str] = []
    for nr, sid in enumerate(newest_first):
        t = snapshot_time(sid)
        kept = False
        for rule in RULES:
            if counts[rule] > 0:
                val = _BUCKETS[rule](t, nr)
                if val != last[rule]:
                    last[rule] = val
                    counts[rule] -= 1
                    kept = True
        if cutoff is not None and t > cutoff:
            kept = True
        if nr == 0:
            kept = True  # whatever the policy: never the newest snapshot
        (keep if kept else remove).append(sid)
    return sorted(keep), sorted(remove)


@dataclass
class PruneReport:
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    objects_deleted: int = 0
    bytes_freed: int = 0
    incomplete_removed: list[str] = field(default_factory=list)
    uploads_aborted: int = 0
    # packs kept because a kept snapshot needs some of their bytes, and the bytes of them
    # none needs, after the repack (repack.py)
    packs_partly_used: int = 0
    pack_bytes_unused: int = 0
    repack: RepackReport = field(default_factory=RepackReport)
    repack_skipped: str = ""  # why no repack was tried, when that is worth saying
    lock: LockReport | None = None  # --lock-days: lock extend, what stays locked, versions (prune_locked.py)
    seconds: float = 0.0


async def prune(
    settings: Settings, policy: Policy, dry_run: bool, stale_after: float, lock_wait: float, max_unused: float = 1.0
) -> PruneReport:
    started = time.monotonic()
    settings.require("bucket")
    apply_policy([], policy)  # refuses an empty policy before anything is touched
    report = PruneReport()
    async with open_locked(
        settings, LockSpec("prune", exclusive=True, wait=lock_wait), deletes=None if dry_run else "prune"
    ) as (repo, lock):
        # A frozen S3 must not keep prune (and its exclusive lock) alive for hours of retries.
        hung = s3_hang(repo.store, settings.stall_timeout, "prune stopped; run it again")
        await with_watchdog(
            repo.store,
            math.inf,
            _prune_locked(repo.store, repo, lock, policy, dry_run, stale_after, report, max_unused, settings),
            hung,
        )
    report.seconds = time.monotonic() - started
    return report


async def _prune_locked(
    store: SealedStore,
    repo: Repo,
    lock: RepoLock,
    policy: Policy,
    dry_run: bool,
    stale_after: float,
    report: PruneReport,
    max_unused: float,
    settings: Settings,
) -> None:
    now = dt.datetime.now(dt.UTC)
    threshold = now - dt.timedelta(seconds=stale_after)
    dirs = await repo.snapshot_dirs()
    committed = [s for s, done in dirs.items() if done]
    report.kept, report.removed = apply_policy(committed, policy)
    held: list[str] = []
    if repo.lock is not None:  # what is still locked stays, whatever the policy says
        await check_bucket(store.raw, settings.lock_days)
        report.lock = LockReport()
        free = await hold_locked_snapshots(repo, report.removed, report.lock)
        held = [s for s in report.removed if s not in free]
        report.removed = free
    log.info("policy %s: keeping %d snapshots, removing %d", policy.describe(), len(report.kept), len(report.removed))
    # Runs whose lock is live may still commit: nothing of theirs goes. (Listed after taking
    # our exclusive lock: a run starting later waits for us.) A run whose lock went stale by
    # the server's clock never commits (RepoLock.ensure_held): its lock goes, and its uploads
    # are collected like any others once older than --stale-after.
    released: list[str] = []  # locks released by runs whose key cannot delete: no lock to anyone
    locks = await list_locks(repo, released)
    server_now = own_time(locks, lock.key)
    dead = [lk for lk in locks if lk.key != lock.key and lk.stale(server_now, lock.stale)]
    if dead and not dry_run:
        await remove_locks(repo, dead, server_now, lock.stale)
    for lk in dead:
        log.info("%s the stale lock of %s", "would remove" if dry_run else "removed", lk.describe())
    busy = {lk.run for lk in locks if lk.run and lk not in dead}
    if busy:
        log.info("leaving alone the uploads of runs that still hold a lock: %s", ", ".join(sorted(busy)))

    # Every key a kept snapshot references (10-byte digests: ~100 bytes per file in memory):
    # an object of its own, a blob's pack, every chunk's pack; and the bytes of each pack they use.
    referenced: set[bytes] = set()
    usage = PackUsage()
    for sid in report.kept + held:
        async for line in repo.read_manifest(sid):
            _reference(line, referenced)
            usage.add(line)
    # Snapshot directories to delete: removed ones, and incomplete ones once stale.
    incomplete = [s for s, done in dirs.items() if not done and s not in busy]
    doomed_dirs = list(report.removed)
    for sid in incomplete:
        if snapshot_time(sid) < threshold and await _newest_object(store, repo.snapshot_prefix(sid)) < threshold:
            doomed_dirs.append(sid)
            report.incomplete_removed.append(sid)
    # What an interrupted run that is not yet stale uploaded (its journal) is what the next
    # backup resumes from: objects it names are kept as if a snapshot referenced them.
    # A committed snapshot's journal is a leftover (its run could not delete it: it failed
    # right after the commit, or its key cannot delete), and so is a manifest's rewrite copy.
    journal_keys: list[str] = []
    for sid, done in dirs.items():
        if sid in doomed_dirs or sid in busy:
            continue
        if done:
            journal_keys.extend(
                [
                    obj.key
                    async for obj in store.list_objects(repo.snapshot_prefix(sid))
                    if obj.key.startswith(repo.journal_prefix(sid)) or obj.key == repo.rewrite_key(sid)
                ]
            )
            continue
        passes = await repo.journals(sid)
        keys = [k for keys in passes.values() for k in keys]
        async for line in repo.read_journal(keys, f"the journal of the interrupted run {sid}"):
            _reference(line, referenced)
            usage.resumable(line)

    # Unreferenced data objects. A run that is neither committed nor older than the
    # threshold may still be uploading: its objects are left alone.
    doomed: list[str] = []
    base = repo.data_prefix()
    async for obj in store.list_objects(base):
        rel = repo.relative_key(obj.key)
        run = _run_of(rel)
        if run is None:
            continue
        if run in busy or key_digest(rel) in referenced:
            if is_pack_key(rel):
                usage.kept(rel, obj.size, store.sealing, obj.storage_class)
            continue
        if not dirs.get(run) and _run_is_young(run, threshold, obj.last_modified):
            continue
        doomed.append(obj.key)
        report.objects_deleted += 1
        report.bytes_freed += obj.size

    # Unfinished uploads of our runs only (the listing's prefix ends in "/": a sibling
    # prefix such as immich-backup2 is another repository's).
    uploads = []
    mine = repo.object_key("")
    for key, upload_id, started in await store.list_multipart(mine):
        if not key.startswith(mine):
            continue
        rel = repo.relative_key(key)
        run = _run_of(rel) if rel.startswith(("data/", "snapshots/")) else None
        if run is None:
            if not rel.startswith(("data/", "snapshots/")):
                log.warning("leaving alone the unfinished upload of %s: not one of ours", key)
            continue
        if run not in busy and (started is None or started < threshold):
            uploads.append((key, upload_id))
    report.uploads_aborted = len(uploads)
    chosen: list[PackUse] = []
    if busy:
        report.repack_skipped = "runs that still hold a lock may name the packs it would move"
    else:
        chosen = choose(usage.partly, max_unused, usage.pack_bytes)
    report.packs_partly_used = len(usage.partly) - len(chosen)
    report.pack_bytes_unused = sum(p.unused for p in usage.partly) - sum(p.unused for p in chosen)
    if dry_run:
        report.repack.packs_repacked = len(chosen)
        report.repack.bytes_freed = sum(p.unused for p in chosen)
        return
    await lock.ensure_held()  # suspended past its staleness, another run may have begun
    if report.lock is not None:
        await extend(repo, report.kept, settings.jobs, report.lock)
        raw, lr = store.raw, report.lock
        journal_keys, doomed = await deletable(raw, journal_keys, lr), await deletable(raw, doomed, lr)
    # snapshot.json first: from that moment the snapshot no longer exists for any reader.
    commit_keys = [repo.summary_key(s) for s in report.removed]
    if commit_keys:
        await store.delete(commit_keys)
    dir_keys = []
    for sid in doomed_dirs:
        async for obj in store.list_objects(repo.snapshot_prefix(sid)):
            dir_keys.append(obj.key)
    if report.lock is not None:
        dir_keys = await deletable(store.raw, dir_keys, report.lock)
    await store.delete(dir_keys)
    await store.delete(journal_keys)
    await store.delete(doomed)
    if leftovers := released + await _probes_left(repo, server_now, lock.stale):
        log.info("removed %d released locks and probes left by runs whose key could not delete", len(leftovers))
        await store.delete(leftovers)
    for key, upload_id in uploads:
        await store.abort_multipart(key, upload_id)
    if chosen:
        unused = sum(p.unused for p in chosen)
        log.info("repacking %d packs: %s of them no kept snapshot needs", len(chosen), format_size(unused))
        target = pack_target(settings.part_size, settings.max_memory)
        report.repack = await repack(repo, lock, report.kept, chosen, new_snapshot_id(), target, settings.part_size)
        repacked = {p.key for p in chosen} - {*report.repack.damaged, *report.repack.unreadable}
        report.packs_partly_used += len(chosen) - len(repacked)
        report.pack_bytes_unused += sum(p.unused for p in chosen if p.key not in repacked)
    if report.lock is not None:  # last: the versions of all it deleted, the old packs too
        gone = {*commit_keys, *dir_keys, *journal_keys, *doomed}
        gone.update(repo.object_key(p.key) for p in chosen if p.key not in report.repack.damaged)
        await sweep(repo, gone, report.lock, referenced)


def _reference(line: ManifestLine, referenced: set[bytes]) -> None:
    """Add the keys of every object the line's bytes are in."""
    for key, _ in line.object_refs():
        referenced.add(key_digest(key))
        if "\\" in key:  # a raw \ of a key before they were escaped: SeaweedFS lists it as /
            referenced.add(key_digest(key.replace("\\", "/")))


class PackUsage:
    """How many bytes of each pack the kept snapshots use: each blob and chunk counted once
    (by a digest of where it is: ~60 bytes each in memory, like the referenced keys).
    `partly`: the packs kept with bytes none of them needs (what a repack reclaims)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._used: dict[str, int] = {}
        self._pieces: dict[str, int] = {}
        self._resumable: set[str] = set()  # packs an interrupted run's journal names
        self.partly: list[PackUse] = []
        self.pack_bytes = 0  # of every pack judged, fully used or not

    def _use(self, key: str, offset: int, length: int) -> None:
        d = key_digest(f"{key}\0{offset}\0{length}")
        if d not in self._seen:
            self._seen.add(d)
            self._used[key] = self._used.get(key, 0) + length
            self._pieces[key] = self._pieces.get(key, 0) + 1

    def add(self, line: ManifestLine) -> None:
        if line.chunks is not None:
            for c in line.chunks:
                self._use(c.key, c.offset, c.length)
        elif line.key is not None and line.offset is not None:
            self._use(line.key, line.offset, line.size)

    def resumable(self, line: ManifestLine) -> None:
        """A line of an interrupted run's journal: the run resumes from the places it names,
        so their packs are not judged (not repacked)."""
        self._resumable.update(key for key, _ in line.object_refs() if is_pack_key(key))

    def kept(self, key: str, size: int, sealing: Sealing | None, storage_class: str | None) -> None:
        """A pack of `size` bytes in the bucket is kept: note it when some of it is unused."""
        used = self._used.get(key)
        if used is None or key in self._resumable:
            return  # kept for a running or resumable run: not judged
        if sealing is not None:  # the plaintext's bytes, as sealed now (offsets are the plaintext's;
            used = sealing.size(used)  # a pack of empty files only is an age file all the same)
        self.pack_bytes += size
        if size > used:
            self.partly.append(PackUse(key, size, used, storage_class, self._pieces.get(key, 0)))


def _run_of(rel: str) -> str | None:
    """repo.run_of, with a warning for what is left alone (a folder marker is not worth one)."""
    run = run_of(rel)
    top, _, tail = rel.partition("/")
    if run is None and tail.partition("/")[::2] != ("", ""):
        log.warning("leaving alone %s/%s: not written by an immich-stream run", top, tail)
    return run


async def _probes_left(repo: Repo, server_now: dt.datetime | None, stale: float) -> list[str]:
    """Probe objects a key that cannot delete left: backups' and unlock's under preflight/
    (each is written and deleted within a second: none is needed once listed), doctor's
    under doctor/ once older than a lock's staleness (a younger one may be a running doctor's)."""
    keys = [obj.key async for obj in repo.store.list_objects(repo.preflight_prefix())]
    if server_now is not None:
        old = server_now - dt.timedelta(seconds=stale)
        keys.extend(
            [
                obj.key
                async for obj in repo.store.list_objects(repo.probes_prefix())
                if isinstance(obj.last_modified, dt.datetime) and obj.last_modified < old
            ]
        )
    return keys


def _run_is_young(run: str, threshold: dt.datetime, last_modified: Any) -> bool:
    started = snapshot_time(run)
    newest = last_modified if isinstance(last_modified, dt.datetime) else started
    return started >= threshold or newest >= threshold


async def _newest_object(store: SealedStore, prefix: str) -> dt.datetime:
    newest = dt.datetime.min.replace(tzinfo=dt.UTC)
    async for obj in store.list_objects(prefix):
        if isinstance(obj.last_modified, dt.datetime) and obj.last_modified > newest:
            newest = obj.last_modified
    return newest
