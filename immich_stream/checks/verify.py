"""`verify`: every object a snapshot needs exists with the right size; with --read-data,
its bytes match the manifest's sha256 and the dump decompresses completely.

Existence and sizes come from one listing of data/ (a HEAD per object would cost a
request per file); the listing is held as 64-bit key digests -> size.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from immich_stream.config import Settings
from immich_stream.errors import RepoError, StoreError
from immich_stream.problems import Problems
from immich_stream.progress import Reporter
from immich_stream.repository.age import DecryptError
from immich_stream.repository.locks import RepoLock
from immich_stream.repository.manifest import DamagedLine, gunzip_stream, key_digest
from immich_stream.repository.repo import Repo, Snapshot
from immich_stream.repository.sealed import SealedStore
from immich_stream.repository.session import open_locked, reader, still_reading
from immich_stream.repository.thaw import thaw
from immich_stream.s3.store import ARCHIVED_CLASSES

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    snapshots: list[str] = field(default_factory=list)
    objects: int = 0
    bytes_read: int = 0
    # every problem is listed, at error level: finding them is what verify is for
    problems: Problems = field(default_factory=lambda: Problems(logging.ERROR, limit=None))
    seconds: float = 0.0

    def problem(self, text: str) -> None:
        self.problems.add(text)


async def verify(
    settings: Settings, reporter: Reporter, which: str | None, all_: bool, read_fraction: float, wait: bool = True
) -> VerifyReport:
    started = time.monotonic()
    report = VerifyReport()
    async with open_locked(settings, reader(settings, "verify")) as (repo, lock):
        store = repo.store
        snaps = await repo.snapshots() if all_ else [await repo.resolve(which or "latest")]
        if not snaps:
            raise RepoError(f"no snapshots in s3://{store.bucket}/{repo.prefix}: run `backup` first")
        listing: dict[bytes, int] = {}
        archived: set[bytes] = set()  # GLACIER, DEEP_ARCHIVE: sizes need no thaw, contents do
        base = repo.data_prefix()
        async for obj in store.list_objects(base):
            d = key_digest(repo.relative_key(obj.key))
            listing[d] = obj.size
            if obj.storage_class in ARCHIVED_CLASSES:
                archived.add(d)
        if read_fraction > 0 and archived:
            # --read-data(-subset) thaws every archived object the snapshots reference first,
            # with the same --thaw-days/--thaw-tier/--no-wait as restore
            needed: dict[bytes, str] = {}
            for snap in snaps:
                async for line in repo.read_manifest(snap.id, damaged=True):
                    if line.type == "file" and line.key is not None and key_digest(line.key) in archived:
                        needed.setdefault(key_digest(line.key), repo.object_key(line.key))
            await thaw(store, needed.values(), settings, reporter, wait)
        read_done: set[bytes] = set()
        rng = random.Random()
        for snap in snaps:
            report.snapshots.append(snap.id)
            await _verify_snapshot(
                store, repo, lock, snap, listing, read_fraction, read_done, rng, report, reporter, settings.jobs
            )
    report.seconds = time.monotonic() - started
    return report


async def _verify_snapshot(
    store: SealedStore,
    repo: Repo,
    lock: RepoLock,
    snap: Snapshot,
    listing: dict[bytes, int],
    fraction: float,
    read_done: set[bytes],
    rng: random.Random,
    report: VerifyReport,
    reporter: Reporter,
    jobs: int,
) -> None:
    phase = reporter.phase(f"verify {snap.id}")
    queue: asyncio.Queue[tuple[str, str, int, str] | None] = asyncio.Queue(jobs * 4)

    async def produce() -> None:
        async for line in repo.read_manifest(snap.id, damaged=True):
            still_reading(lock)
            if isinstance(line, DamagedLine):
                report.problem(f"snapshot {snap.id}: {line.root}/{line.path}: damaged manifest line ({line.damage})")
                continue
            if line.type != "file":
                continue
            report.objects += 1
            where = f"{line.root}/{line.path}"
            if line.key is None or line.sha256 is None:
                report.problem(f"snapshot {snap.id}: {where} has no object key: damaged manifest")
                continue
            d = key_digest(line.key)
            size = listing.get(d)
            if size is None:
                report.problem(f"snapshot {snap.id}: missing object {line.key} ({where})")
            elif size != line.object_size and not (
                # re-encrypted by a `key reencrypt` that stopped before it rewrote this manifest
                store.sealing is not None and size == store.sealing.size(line.size)
            ):
                report.problem(
                    f"snapshot {snap.id}: object {line.key} has {size} bytes, the manifest says {line.object_size} "
                    f"({where})"
                )
            elif fraction > 0 and d not in read_done and (fraction >= 1 or rng.random() < fraction):
                read_done.add(d)
                await queue.put((line.key, line.sha256, line.size, where))
            phase.update(line.size, files=1)
        for _ in range(jobs):
            await queue.put(None)

    async def check() -> None:
        while (item := await queue.get()) is not None:
            key, sha, size, where = item
            h = hashlib.sha256()
            n = 0
            try:
                async for chunk in store.iter_object(repo.object_key(key)):
                    still_reading(lock)
                    h.update(chunk)
                    n += len(chunk)
            except DecryptError as exc:  # an encrypted object that does not authenticate
                report.problem(f"snapshot {snap.id}: corrupt object {key} ({where}): {exc.detail}")
                continue
            finally:
                report.bytes_read += n
            if n != size or h.hexdigest() != sha:
                report.problem(
                    f"snapshot {snap.id}: corrupt object {key} ({where}): sha256 {h.hexdigest()[:16]}... "
                    f"does not match the manifest's {sha[:16]}..."
                )

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            for _ in range(jobs):
                tg.create_task(check())
            tg.create_task(_verify_dump(store, repo, snap, fraction > 0, report))
    finally:
        phase.close()


async def _verify_dump(store: SealedStore, repo: Repo, snap: Snapshot, read: bool, report: VerifyReport) -> None:
    key = repo.dump_key(snap.id)
    db = snap.summary.database
    size = await store.head(key)
    if size is None:
        report.problem(f"snapshot {snap.id}: missing database dump {key}")
        return
    expected = db.stored_size if db.stored_size is not None else db.compressed_size
    if expected is not None and size != expected:
        report.problem(f"snapshot {snap.id}: database dump has {size} bytes, snapshot.json says {expected}")
        return
    if not read:
        return
    gz, raw = hashlib.sha256(), hashlib.sha256()

    async def counted() -> AsyncIterator[bytes]:
        async for chunk in store.iter_object(key):
            gz.update(chunk)
            yield chunk

    try:
        async for data in gunzip_stream(counted()):
            raw.update(data)
    except (RepoError, StoreError) as exc:
        report.problem(f"snapshot {snap.id}: database dump does not decompress: {exc}")
        return
    report.bytes_read += size
    if db.compressed_sha256 and gz.hexdigest() != db.compressed_sha256:
        report.problem(f"snapshot {snap.id}: database dump is corrupt (sha256 of {key} does not match snapshot.json)")
    elif db.sha256 and raw.hexdigest() != db.sha256:
        report.problem(f"snapshot {snap.id}: database dump decompresses to other bytes than were dumped")
