"""`verify`: every object a snapshot needs exists with the right size; with --read-data,
its bytes match the manifest's sha256 and the dump decompresses completely.

Existence and sizes come from one listing of data/ (a HEAD per object would cost a
request per file); the listing is held as 64-bit key digests -> size. Lines of every
format are checked by their shape (docs/format.md): an object of its own by its size, a
blob by its pack being listed (a pack's size is not recorded), chunks by each chunk's
pack. --read-data reads an object of its own whole, the blobs of a pack in runs of close
blobs (one ranged read each, like a restore), and each chunk once (its size and sha256);
a file whose bytes are wrong or missing is named, every file that shares them too.
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
from immich_stream.errors import RepoError, StoreError, bytes_lost
from immich_stream.problems import Problems
from immich_stream.progress import Reporter
from immich_stream.repository.age import DecryptError
from immich_stream.repository.locks import RepoLock
from immich_stream.repository.manifest import Chunk, DamagedLine, ManifestLine, gunzip_stream, key_digest
from immich_stream.repository.packs import BATCH_FILES, PackReader, blob_runs
from immich_stream.repository.repo import Repo, Snapshot
from immich_stream.repository.sealed import SealedStore
from immich_stream.repository.session import open_reader, still_reading
from immich_stream.repository.thaw import need_thawed, thaw
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.store import ARCHIVED_CLASSES

log = logging.getLogger(__name__)

# blob lines held while they are grouped per pack (in manifest order, the files of a pack
# are mostly together; unchanged files of older packs come between them)
WINDOW_LINES = 8192


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


def _blob_digest(line: ManifestLine) -> bytes:
    return key_digest(f"{line.key}\0{line.offset}\0{line.size}\0{line.sha256}")


def _chunk_digest(c: Chunk) -> bytes:
    return key_digest(f"{c.key}\0{c.offset}\0{c.length}\0{c.sha256}")


def _read_digests(line: ManifestLine) -> list[bytes]:
    """What --read-data reads a file's bytes as: its object, its blob, or its chunks."""
    if line.chunks is not None:
        return [_chunk_digest(c) for c in line.chunks]
    if line.offset is not None:
        return [_blob_digest(line)]
    return [key_digest(line.key)] if line.key is not None else []


def _why(exc: Exception) -> str:
    return exc.detail if isinstance(exc, DecryptError) else str(exc)


@dataclass
class _State:
    """What the snapshots of one verify share: the listing, what was read (digests of
    objects, blobs and chunks: each is read once), what was found damaged, and the files
    named already (the others that share damaged bytes are named after the reads)."""

    listing: dict[bytes, int]
    fraction: float
    read_done: set[bytes] = field(default_factory=set)
    bad: dict[bytes, str] = field(default_factory=dict)  # digest -> the problem's object key
    named: set[tuple[str, str]] = field(default_factory=set)  # (snapshot, root/path)
    rng: random.Random = field(default_factory=random.Random)


async def verify(
    settings: Settings, reporter: Reporter, which: str | None, all_: bool, read_fraction: float, wait: bool = True
) -> VerifyReport:
    started = time.monotonic()
    report = VerifyReport()
    async with open_reader(settings, "verify") as (repo, lock):
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
            # --read-data(-subset) thaws every archived object the snapshots reference first
            # (a blob's pack, every chunk's pack), with the same --thaw-days/--thaw-tier/--no-wait as restore
            needed: dict[bytes, str] = {}
            for snap in snaps:
                async for line in repo.read_manifest(snap.id, damaged=True):
                    need_thawed(repo, line, archived, needed)
            await thaw(store, needed.values(), settings, reporter, wait)
        state = _State(listing, read_fraction)
        packs = PackReader(store, repo)
        budget = ByteBudget(settings.max_memory)
        for snap in snaps:
            report.snapshots.append(snap.id)
            await _verify_snapshot(store, repo, packs, budget, lock, snap, state, report, reporter, settings.jobs)
        if state.bad:  # a damaged blob, chunk or object fails every file whose bytes are in it
            for snap in snaps:
                await _name_sharers(repo, lock, snap, state, report)
    report.seconds = time.monotonic() - started
    return report


async def _name_sharers(repo: Repo, lock: RepoLock | None, snap: Snapshot, state: _State, report: VerifyReport) -> None:
    """Name the files (of any snapshot verified) whose bytes are in what was found damaged,
    beside the file that was read for them."""
    async for line in repo.read_manifest(snap.id, damaged=True):
        still_reading(lock)
        if line.type != "file" or isinstance(line, DamagedLine):
            continue
        where = f"{line.root}/{line.path}"
        if (snap.id, where) in state.named:
            continue
        for d in _read_digests(line):
            if d in state.bad:
                state.named.add((snap.id, where))
                report.problem(
                    f"snapshot {snap.id}: corrupt object {state.bad[d]} ({where}): its bytes are where a file "
                    "found damaged has them"
                )
                break


# a unit of --read-data: an object of its own, a run of blobs of one pack, or a chunk (and the file it is read for)
_Item = ManifestLine | list[ManifestLine] | tuple[Chunk, str]


async def _verify_snapshot(
    store: SealedStore,
    repo: Repo,
    packs: PackReader,
    budget: ByteBudget,
    lock: RepoLock | None,
    snap: Snapshot,
    state: _State,
    report: VerifyReport,
    reporter: Reporter,
    jobs: int,
) -> None:
    phase = reporter.phase(f"verify {snap.id}")
    queue: asyncio.Queue[_Item | None] = asyncio.Queue(jobs * 4)
    sid = snap.id

    def problem(where: str, text: str) -> None:
        state.named.add((sid, where))
        report.problem(f"snapshot {sid}: {text}")

    def listed(key: str, size: int | None, line: ManifestLine, where: str) -> bool:
        """The object is in the listing (an object of its own with its size); names the file if not."""
        have = state.listing.get(key_digest(key))
        if have is None:
            problem(where, f"missing object {key} ({where})")
            return False
        if (
            size is not None
            and have != size
            and not (
                # re-encrypted by a `key reencrypt` that stopped before it rewrote this manifest
                store.sealing is not None and have == store.sealing.size(line.size)
            )
        ):
            problem(where, f"object {key} has {have} bytes, the manifest says {size} ({where})")
            return False
        return True

    async def produce() -> None:
        pending: dict[str, list[ManifestLine]] = {}  # pack -> its blobs to read, oldest pack first
        held = 0

        async def flush(key: str) -> None:
            nonlocal held
            lines = pending.pop(key)
            held -= len(lines)
            for run in blob_runs(lines):
                await queue.put(run)

        async for line in repo.read_manifest(sid, damaged=True):
            still_reading(lock)
            if isinstance(line, DamagedLine):
                report.problem(f"snapshot {sid}: {line.root}/{line.path}: damaged manifest line ({line.damage})")
                continue
            if line.type != "file":
                continue
            report.objects += 1
            where = f"{line.root}/{line.path}"
            phase.update(line.size, files=1)
            if not line.has_object:
                problem(where, f"{where} has no object key: damaged manifest")
                continue
            if line.chunks is not None and sum(c.size for c in line.chunks) != line.size:
                problem(
                    where,
                    f"its chunks hold {sum(c.size for c in line.chunks)} bytes, the manifest says {line.size} ({where})",
                )
                continue
            refs = dict.fromkeys(line.object_refs())  # a file's chunks may share a pack
            if not all([listed(key, size, line, where) for key, size in refs]):
                continue
            if state.fraction <= 0 or (state.fraction < 1 and state.rng.random() >= state.fraction):
                continue
            if line.chunks is not None:
                for c in line.chunks:
                    if (d := _chunk_digest(c)) not in state.read_done:
                        state.read_done.add(d)
                        await queue.put((c, where))
            elif line.offset is not None:
                assert line.key is not None
                if (d := _blob_digest(line)) in state.read_done:
                    continue
                state.read_done.add(d)
                pending.setdefault(line.key, []).append(line)
                held += 1
                if len(pending[line.key]) >= BATCH_FILES:
                    await flush(line.key)
                while held > WINDOW_LINES:
                    await flush(next(iter(pending)))
            elif (d := key_digest(line.key or "")) not in state.read_done:
                state.read_done.add(d)
                await queue.put(line)
        for key in list(pending):
            await flush(key)
        for _ in range(jobs):
            await queue.put(None)

    def mismatch(line: ManifestLine, key: str, d: bytes, data_sha: str, n: int) -> None:
        assert line.sha256 is not None
        if n != line.size or data_sha != line.sha256:
            state.bad[d] = key
            problem(
                f"{line.root}/{line.path}",
                f"corrupt object {key} ({line.root}/{line.path}): sha256 {data_sha[:16]}... does not match the "
                f"manifest's {line.sha256[:16]}...",
            )

    async def whole(line: ManifestLine) -> None:
        assert line.key is not None
        where = f"{line.root}/{line.path}"
        h = hashlib.sha256()
        n = 0
        try:
            async for chunk in store.iter_object(repo.object_key(line.key)):
                still_reading(lock)
                h.update(chunk)
                n += len(chunk)
        except (RepoError, StoreError) as exc:  # an encrypted object that does not authenticate, or gone
            if not bytes_lost(exc):
                raise
            state.bad[key_digest(line.key)] = line.key
            problem(where, f"corrupt object {line.key} ({where}): {_why(exc)}")
            return
        finally:
            report.bytes_read += n
        mismatch(line, line.key, key_digest(line.key), h.hexdigest(), n)

    async def blobs(run: list[ManifestLine]) -> None:
        key = run[0].key
        assert key is not None
        start = min(ln.offset or 0 for ln in run)
        end = max((ln.offset or 0) + ln.size for ln in run)
        try:
            async with budget.hold(end - start):
                data = await packs.read(key, start, end)
                still_reading(lock)
                report.bytes_read += len(data)
                sums = await asyncio.to_thread(
                    lambda: [
                        hashlib.sha256(
                            memoryview(data)[(ln.offset or 0) - start : (ln.offset or 0) - start + ln.size]
                        ).hexdigest()
                        for ln in run
                    ]
                )
        except (RepoError, StoreError) as exc:
            if not bytes_lost(exc):
                raise
            if len(run) > 1:  # which of them: each read alone (a truncated pack fails only the files past its end)
                for ln in run:
                    await blobs([ln])
                return
            line = run[0]
            state.bad[_blob_digest(line)] = key
            where = f"{line.root}/{line.path}"
            problem(where, f"corrupt object {key} ({where}): {_why(exc)}")
            return
        for ln, sha in zip(run, sums, strict=True):
            mismatch(ln, key, _blob_digest(ln), sha, ln.size)

    async def chunk(c: Chunk, where: str) -> None:
        try:
            async with budget.hold(c.length + c.size):
                await packs.chunk(c)
            report.bytes_read += c.length
        except (RepoError, StoreError) as exc:
            if not bytes_lost(exc):
                raise
            state.bad[_chunk_digest(c)] = c.key
            problem(where, f"corrupt object {c.key} ({where}): {_why(exc)}")

    async def check() -> None:
        while (item := await queue.get()) is not None:
            still_reading(lock)
            if isinstance(item, list):
                await blobs(item)
            elif isinstance(item, tuple):
                await chunk(*item)
            else:
                await whole(item)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            for _ in range(jobs):
                tg.create_task(check())
            tg.create_task(_verify_dump(store, repo, snap, state.fraction > 0, report))
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
