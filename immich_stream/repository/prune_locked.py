"""prune with --lock-days on a versioned, Object Lock bucket (docs/format.md, "Object Lock"):

- `lock extend`: the objects of the snapshots the policy keeps are retained at least N days
  from now (a snapshot whose recorded guarantee reaches that far is skipped whole);
- nothing still locked is deleted: a dropped snapshot whose snapshot.json is locked stays
  (whole, with what it references), a garbage object that is locked stays, until a later
  prune finds its retention over;
- versions (`sweep`): a plain delete only adds a delete marker, so prune deletes by
  VersionId: every version of what it deleted now, every noncurrent version of the
  housekeeping objects (locks, probes, journals), and noncurrent versions of any other key
  (overwritten, or hidden by a delete marker) once they have been noncurrent for N days,
  so a restore --as-of within the lock window still finds them. Never a locked version,
  and never an older version of a data object that is still current: data objects are
  never overwritten, so that one is what an attacker's overwrite hid.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from immich_stream.repository.layout import JOURNAL_DIR, MANIFEST_REWRITE
from immich_stream.repository.manifest import key_digest
from immich_stream.repository.repo import Repo, Snapshot
from immich_stream.repository.retention import Extender, bounded, recorded_until, refs
from immich_stream.s3.store import Store
from immich_stream.s3.versions import Version, bucket_lock, delete_versions, list_versions, retention

log = logging.getLogger(__name__)


@dataclass
class LockReport:
    checked: int = 0  # objects whose retention was read for the `lock extend` step
    extended: int = 0  # ... and extended
    kept_locked: int = 0  # objects (or versions) left in place until their retention ends
    snapshots_locked: list[str] = field(default_factory=list)  # dropped by the policy, still locked
    versions_deleted: int = 0


async def locked(store: Store, key: str, now: dt.datetime, version_id: str | None = None) -> bool:
    have = await retention(store, key, version_id)
    return have is not None and have[1] > now


async def hold_locked_snapshots(repo: Repo, removed: list[str], report: LockReport) -> list[str]:
    """The dropped snapshots that may go now; those whose snapshot.json is locked stay."""
    now = dt.datetime.now(dt.UTC)
    free = []
    for sid in removed:
        if await locked(repo.store.raw, repo.summary_key(sid), now):
            report.snapshots_locked.append(sid)
            report.kept_locked += len([o async for o in repo.store.list_objects(repo.snapshot_prefix(sid))])
        else:
            free.append(sid)
    return free


async def extend(repo: Repo, kept: list[str], jobs: int, report: LockReport) -> None:
    """The `lock extend` step for the snapshots the policy keeps."""
    assert repo.lock is not None
    ext = Extender(repo.store.raw, repo.lock, jobs)
    snaps = [await repo.load_snapshot(s) for s in kept]
    short: list[Snapshot] = []
    covered: set[bytes] = set()
    for snap in snaps:
        until = recorded_until(snap.summary.lock)
        if until is not None and until >= ext.need:
            async for line in repo.read_manifest(snap.id):
                covered.update(key_digest(k) for k in refs(line))
        else:
            short.append(snap)
    todo = {repo.config_key()}
    for snap in short:
        todo.update((repo.manifest_key(snap.id), repo.summary_key(snap.id), repo.dump_key(snap.id)))
        async for line in repo.read_manifest(snap.id):
            todo.update(repo.object_key(k) for k in refs(line) if key_digest(k) not in covered)
    await ext.all(sorted(todo))
    report.checked, report.extended = ext.checked, ext.extended
    if ext.extended:
        log.info("lock extend: %d objects extended to %s", ext.extended, repo.lock.until.isoformat())


async def deletable(store: Store, keys: list[str], report: LockReport) -> list[str]:
    """keys less those still locked (each counted as kept)."""
    now = dt.datetime.now(dt.UTC)
    free: list[str] = []

    async def judge(key: str) -> None:
        if await locked(store, key, now):
            report.kept_locked += 1
        else:
            free.append(key)

    await bounded(keys, judge)
    return free


def _housekeeping(repo: Repo, key: str) -> bool:
    rel = repo.relative_key(key)
    return (
        rel.startswith(("locks/", "preflight/", "doctor/"))
        or f"/{JOURNAL_DIR}" in rel
        or rel.endswith(MANIFEST_REWRITE)
    )


async def sweep(repo: Repo, deleted: set[str], report: LockReport, referenced: set[bytes] | None = None) -> None:
    """Delete versions by VersionId (module docstring); never a locked one, never bypassing.
    referenced: key_digest of the keys the kept snapshots need (prune's set)."""
    referenced = referenced or set()
    assert repo.lock is not None
    store = repo.store.raw
    state = await bucket_lock(store)
    if state.versioning != "Enabled":
        return
    now = dt.datetime.now(dt.UTC)
    window = now - repo.lock.days * repo.lock.day
    doomed: list[tuple[str, str]] = []
    overwritten: list[str] = []  # data objects with an older version under the one they have
    top: list[tuple[Version, list[tuple[str, str]]]] = []  # newest delete markers, and what is under each

    async def judge(versions: list[Version]) -> None:
        key = versions[0].key
        at_once = key in deleted or _housekeeping(repo, key)
        # A data object is written once under its key and never overwritten: an older version
        # under a current one is what an overwrite hid (the host's key may PutObject). `lock
        # extend` extended only the current version, so it may be the only good copy: kept.
        # So is one under a delete marker while a kept snapshot needs the key (`referenced`).
        rel = repo.relative_key(key)
        hidden = (
            not at_once and rel.startswith("data/") and (not versions[0].delete_marker or key_digest(rel) in referenced)
        )
        if hidden and any(not v.delete_marker for v in versions[1:]):
            overwritten.append(key)
        pick: list[Version] = []
        for i, v in enumerate(versions):
            if i == 0 and not v.delete_marker:
                continue  # the current version stays (prune deleted what had to go already)
            if hidden and not v.delete_marker:
                continue
            successor = versions[i - 1].last_modified if i else now
            if at_once or successor < window:
                pick.append(v)
        # The newest delete marker goes only once every version under it is gone (in a second
        # request, after the first's refusals are known): removing it earlier would make a
        # version that stays (kept, locked, or refused) current again, e.g. a dropped
        # snapshot's locked older snapshot.json: the snapshot back.
        under = [v for v in versions if not v.delete_marker]
        for v in pick:
            if v.delete_marker:
                if v is versions[0]:
                    if all(u in pick for u in under):
                        top.append((v, [(u.key, u.version_id) for u in under]))
                    continue
                doomed.append((v.key, v.version_id))
            elif state.default_mode is None and _housekeeping(repo, key):
                doomed.append((v.key, v.version_id))  # we never lock these, and the bucket does not
            elif await locked(store, v.key, now, v.version_id):
                report.kept_locked += 1
            else:
                doomed.append((v.key, v.version_id))

    group: list[Version] = []
    async for v in list_versions(store, repo.object_key("")):
        if group and v.key != group[0].key:
            await judge(group)
            group = []
        group.append(v)
    if group:
        await judge(group)
    if overwritten:
        log.warning(
            "%d data objects have older versions under their current one (immich-stream never overwrites them: "
            "an attacker's overwrite, or a lost object uploaded again), first %s: their older versions are kept; "
            "run `verify --read-data`, and `restore --as-of` a time before it if it fails",
            len(overwritten),
            overwritten[0],
        )
    refused = await delete_versions(store, doomed)
    gone = set(doomed) - set(refused)
    markers = [(m.key, m.version_id) for m, under in top if all(u in gone for u in under)]
    refused += await delete_versions(store, markers)
    doomed += markers
    report.kept_locked += len(refused)
    report.versions_deleted = len(doomed) - len(refused)
    if doomed:
        log.info("deleted %d old versions, %d refused (locked)", report.versions_deleted, len(refused))
