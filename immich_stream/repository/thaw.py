"""Thawing archived objects (GLACIER, DEEP_ARCHIVE) before restore, drill or verify read them.

S3 will not GET an object in those classes until a RestoreObject request made a temporary
copy of it (hours later, kept `--thaw-days`). Before a command downloads anything, the
objects it needs that are archived are found (one listing of data/, or a HEAD per object
for a handful), a thaw is requested for each one not thawed or thawing already (x-amz-restore
on its HEAD), and the command waits, asking again every `thaw_poll`, or with --no-wait stops
with ThawPending (exit 75): run again later, it sees the thaws in progress and requests
nothing twice. Everything else (manifests, snapshot.json, the dump) is always STANDARD.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from immich_stream.config import Settings
from immich_stream.errors import ThawPending
from immich_stream.progress import Reporter
from immich_stream.repository.manifest import ManifestLine, key_digest
from immich_stream.repository.repo import Repo
from immich_stream.repository.sealed import SealedStore
from immich_stream.s3.store import ARCHIVED_CLASSES

log = logging.getLogger(__name__)


@dataclass
class ThawReport:
    archived: int = 0  # needed objects in an archived class
    requested: int = 0  # thaws this run asked for
    thawed: int = 0  # of `archived`, readable now
    seconds: float = 0.0


async def archived_digests(repo: Repo) -> set[bytes]:
    """key_digest of every data/ object the listing shows in an archived class (one listing,
    no HEAD): usually none, and then nothing else is asked."""
    out: set[bytes] = set()
    async for obj in repo.store.list_objects(repo.data_prefix()):
        if obj.storage_class in ARCHIVED_CLASSES:
            out.add(key_digest(repo.relative_key(obj.key)))
    return out


def need_thawed(repo: Repo, line: ManifestLine, archived: set[bytes], needed: dict[bytes, str]) -> None:
    """Add to `needed` (digest -> bucket key) the archived objects the line's bytes are in:
    its object, its blob's pack, or every chunk's pack (docs/format.md)."""
    if line.type != "file":
        return
    for key, _ in line.object_refs():
        if (d := key_digest(key)) in archived:
            needed.setdefault(d, repo.object_key(key))


def _thawed(restore: str | None) -> bool | None:
    """From x-amz-restore: True (a thawed copy is there), False (thawing), None (never asked)."""
    if restore is None:
        return None
    return 'ongoing-request="false"' in restore.replace(" ", "")


async def thaw(
    store: SealedStore,
    keys: Iterable[str],
    settings: Settings,
    reporter: Reporter,
    wait: bool,
    check_class: bool = False,
) -> ThawReport:
    """Make the objects `keys` (bucket keys, archived ones as far as the caller knows)
    readable. check_class: HEAD tells which of them are archived at all (the caller has
    no listing). Raises ThawPending when not `wait`ing and some are still thawing."""
    started = time.monotonic()
    report = ThawReport()
    pending: list[str] = []
    limit = asyncio.Semaphore(settings.jobs * 4)

    async def first(key: str) -> None:
        async with limit:
            info = await store.head_info(key)
            if info is None:  # missing: the download reports it as it does any missing object
                return
            if check_class and info.storage_class not in ARCHIVED_CLASSES:
                return
            report.archived += 1
            state = _thawed(info.restore)
            if state is None:
                answer = await store.restore_object(key, settings.thaw_days, settings.thaw_tier)
                if answer == "requested":
                    report.requested += 1
                state = answer == "thawed"
            if state:
                report.thawed += 1
            else:
                pending.append(key)

    async with asyncio.TaskGroup() as tg:
        for key in keys:
            tg.create_task(first(key))
    if not report.archived:
        return report
    phase = reporter.phase("thaw archived objects", total_files=report.archived)
    try:
        phase.update(files=report.thawed)
        log.info(
            "%d of %d archived objects thawed (%d thaws requested now, tier %s, kept %d days)",
            report.thawed,
            report.archived,
            report.requested,
            settings.thaw_tier,
            settings.thaw_days,
        )
        while pending:
            if not wait:
                raise ThawPending(
                    f"{len(pending)} of {report.archived} archived objects are still being thawed (tier "
                    f"{settings.thaw_tier}: Expedited takes minutes, Standard hours, Bulk up to two days): run "
                    "the same command again later"
                )
            await asyncio.sleep(settings.thaw_poll)
            still: list[str] = []

            async def poll(key: str, still: list[str] = still) -> None:
                async with limit:
                    info = await store.head_info(key)
                    if info is not None and _thawed(info.restore) is False:
                        still.append(key)
                    elif info is not None and _thawed(info.restore) is None:
                        # the thawed copy expired meanwhile (or the request was lost): ask again
                        await store.restore_object(key, settings.thaw_days, settings.thaw_tier)
                        still.append(key)

            async with asyncio.TaskGroup() as tg:
                for key in pending:
                    tg.create_task(poll(key))
            phase.update(files=len(pending) - len(still))
            report.thawed += len(pending) - len(still)
            pending = still
            log.info("%d of %d archived objects thawed", report.thawed, report.archived)
    finally:
        phase.close()
    report.seconds = time.monotonic() - started
    return report
