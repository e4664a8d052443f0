"""The upload stage: N workers fed by a bounded queue; each reads a file once (sha256 and
the request's checksum while reading) and uploads it, or reuses the parent's object when the
bytes turn out the same. Memory is bounded by the queue and the ByteBudget."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from immich_stream.backup.changes import Decision
from immich_stream.backup.walk import Entry
from immich_stream.config import Settings
from immich_stream.progress import Phase
from immich_stream.repository.age import Sealing
from immich_stream.repository.manifest import Chunk, ManifestLine
from immich_stream.repository.packs import CHUNK_SIZE, PACK_FILE_MAX, Packing, compress
from immich_stream.repository.repo import Repo
from immich_stream.repository.sealed import SealedStore
from immich_stream.repository.summary import RunStats
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.checksums import SMALL_FACTOR, SMALL_OBJECT, check_value, part_size_for, sealed_hashes

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20  # read size when a file is hashed to decide whether to upload it
SMALL_BATCH_FILES = 64  # small files read in one trip to a worker thread, at most
SMALL_BATCH_BYTES = 2 << 20


class FileUploader:
    """Reads a file once (sha256 and the request's checksum while reading) and uploads it."""

    def __init__(self, store: SealedStore, repo: Repo, budget: ByteBudget, settings: Settings, stats: RunStats) -> None:
        self.store = store
        self.repo = repo
        self.budget = budget
        self.part_size = settings.part_size
        self.checksum = settings.checksum
        self.stats = stats

    async def upload(
        self,
        path: bytes,
        entry: Entry,
        line: ManifestLine,
        key: str,
        phase: Phase,
        source: ManifestLine | None = None,
        packs: Packing | None = None,
        waits: list[asyncio.Future[None]] | None = None,
    ) -> bool:
        """Upload under `key`; fills line.key/sha256/size. With a `source` line, the file is
        read and hashed first and source's object reused when the bytes are the same (no
        upload). True when reused. Raises OSError for a file that cannot be read.
        `packs`: the postgres root's files go in chunks and small files into packs; the
        futures of the packs the line then names are appended to `waits`."""
        if packs is not None and (line.root == "postgres" or entry.size <= PACK_FILE_MAX):
            assert waits is not None
            if line.root == "postgres":
                reused, after = await self._chunked(path, entry, line, phase, source, packs, waits)
            else:
                reused, after = await self._packed(path, entry, line, phase, source, packs, waits)
        elif entry.size <= self.part_size:
            reused, after = await self._single(path, entry, line, key, phase, source)
        else:
            fd = await asyncio.to_thread(_open_regular, path)
            try:
                reused = source is not None and await self._same_bytes(fd, line, source, phase)
                if not reused:
                    await asyncio.to_thread(os.lseek, fd, 0, os.SEEK_SET)
                    await self._multipart(fd, entry, line, key, phase)
                after = await asyncio.to_thread(os.fstat, fd)
            finally:
                os.close(fd)
        if after.st_mtime_ns != entry.mtime_ns or after.st_size != line.size:
            self.stats.changed_while_read += 1
            self.stats.problem(f"{line.root}/{line.path}: changed while being read; the snapshot holds the bytes read")
        return reused

    def _reuse(self, line: ManifestLine, source: ManifestLine, sha: str, size: int) -> bool:
        if sha != source.sha256 or size != source.size or not source.has_object:
            return False
        line.take_object(source)
        line.size = size
        return True

    async def _packed(
        self,
        path: bytes,
        entry: Entry,
        line: ManifestLine,
        phase: Phase,
        source: ManifestLine | None,
        packs: Packing,
        waits: list[asyncio.Future[None]],
    ) -> tuple[bool, os.stat_result]:
        """A small file into the open pack (one trip to a worker thread to read and hash
        it). Its budget goes with it and is released once the pack was sent."""
        n = max(entry.size, 1)
        await self.budget.acquire(n)
        try:
            data, size, sha, _, _, after = await asyncio.to_thread(_read_file, path, entry.size, "", None)
        except BaseException:
            await asyncio.shield(self.budget.release(n))
            raise
        self.stats.bytes_read += size
        if source is not None and self._reuse(line, source, sha, size):
            await self.budget.release(n)
            phase.update(size)
            return True, after
        pack_key, offset, done = await packs.writer.add(data, n)  # read no more than the walk's size
        line.key, line.offset, line.size, line.sha256, line.stored = pack_key, offset, size, sha, None
        waits.append(done)
        self.stats.bytes_uploaded += size
        phase.update(size)
        return False, after

    async def _chunked(
        self,
        path: bytes,
        entry: Entry,
        line: ManifestLine,
        phase: Phase,
        source: ManifestLine | None,
        packs: Packing,
        waits: list[asyncio.Future[None]],
    ) -> tuple[bool, os.stat_result]:
        """A database file as chunks of CHUNK_SIZE: each is hashed, and stored (compressed)
        only when no chunk of the parent snapshot or of this run has its sha256."""
        fd = await asyncio.to_thread(_open_regular, path)
        try:
            whole = hashlib.sha256()
            chunks: list[Chunk] = []
            total = 0
            while True:
                await self.budget.acquire(CHUNK_SIZE)
                try:
                    block, stored, digest = await asyncio.to_thread(_read_chunk, fd, whole)
                except BaseException:
                    await asyncio.shield(self.budget.release(CHUNK_SIZE))
                    raise
                if not block:
                    await self.budget.release(CHUNK_SIZE)
                    break
                size = len(block)
                del block
                total += size
                self.stats.bytes_read += size
                known = packs.known(digest)
                if known is not None:
                    await self.budget.release(CHUNK_SIZE)
                    chunk, done = known
                else:
                    await self.budget.release(CHUNK_SIZE - len(stored))
                    key, offset, done = await packs.writer.add(stored, len(stored))
                    chunk = Chunk(key, offset, len(stored), size, digest)
                    packs.remember(chunk, done)
                    self.stats.bytes_uploaded += len(stored)
                if done is not None and not done.done():
                    waits.append(done)
                chunks.append(chunk)
                phase.update(size)
                self.store.touch()
            sha = whole.hexdigest()
            after = await asyncio.to_thread(os.fstat, fd)
        finally:
            os.close(fd)
        # a check against an earlier line: the same bytes are the same chunks (stored once)
        reused = source is not None and sha == source.sha256 and total == source.size
        line.key, line.offset, line.stored, line.chunks = None, None, None, chunks
        line.size, line.sha256 = total, sha
        return reused, after

    async def _single(
        self, path: bytes, entry: Entry, line: ManifestLine, key: str, phase: Phase, source: ManifestLine | None
    ) -> tuple[bool, os.stat_result]:
        """A file of one PUT: opened, read, hashed and checked again in one trip to a worker
        thread (most files of a data directory or a thumbnail folder are this small, and each
        trip costs the event loop more than the hashing)."""
        full_key = self.repo.object_key(key)
        sealing = self.store.sealing_for(full_key)
        # encrypted: the plaintext and its sealed copy are both held while it is sealed
        async with self.budget.hold(entry.size * (2 if sealing else 1)):
            # with source, the plaintext's sha256 decides first: nothing is sealed for a reuse
            data, size, sha, check, wire_sha, after = await asyncio.to_thread(
                _read_file, path, entry.size, self.checksum, sealing if source is None else None
            )
            self.stats.bytes_read += size
            if source is not None and self._reuse(line, source, sha, size):
                phase.update(size)
                return True, after
            if sealing is not None and source is not None:
                data, check, wire_sha = await asyncio.to_thread(_seal, sealing, data, self.checksum)
            await self.store.put(
                full_key, data, check=check, sha256=wire_sha, progress=True, sealed=sealing is not None
            )
        line.key, line.size, line.sha256 = key, size, sha
        line.stored = len(data) if sealing is not None else None
        self.stats.bytes_uploaded += size
        phase.update(size)
        return False, after

    async def _same_bytes(self, fd: int, line: ManifestLine, source: ManifestLine, phase: Phase) -> bool:
        """Hash a large file without uploading it; reuse source's object when it matches."""
        async with self.budget.hold(HASH_CHUNK):
            sha, size = await asyncio.to_thread(_hash_fd, fd, self.store.touch)
        self.stats.bytes_read += size
        phase.update(size)
        return self._reuse(line, source, sha, size)

    async def _multipart(self, fd: int, entry: Entry, line: ManifestLine, key: str, phase: Phase) -> None:
        psize = part_size_for(entry.size, self.part_size)
        sha = hashlib.sha256()
        total = 0
        async with self.store.multipart(self.repo.object_key(key), self.budget) as mp:
            # an encrypted part's checksums are of its ciphertext: MultipartUpload computes them
            checksum = None if mp.sealed else self.checksum
            while total < entry.size or mp.parts == 0:
                want = min(psize, entry.size - total)
                await self.budget.acquire(want)
                try:
                    # sealed: the part's own sha256 (of plaintext) would go unused, so it is not computed
                    data, part_sha, check = await asyncio.to_thread(
                        _read_exactly, fd, want, sha, checksum, not mp.sealed
                    )
                except BaseException:
                    await asyncio.shield(self.budget.release(want))
                    raise
                await self.budget.release(want - len(data))
                if not data and mp.parts > 0:
                    break
                n = len(data)
                total += n
                self.stats.bytes_read += n
                # final: the last part a file of this size has (or a short read, after which the loop ends)
                await mp.add(data, check, part_sha, final=n < want or total >= entry.size)
                del data  # the upload task owns the part now: no second reference while it waits
                phase.update(n)
                if n < want:
                    break  # the file shrank while being read: noticed by the caller's fstat
            await mp.complete()
        line.key, line.size, line.sha256 = key, total, sha.hexdigest()
        line.stored = mp.size if mp.sealed else None
        self.stats.bytes_uploaded += total


def _open_regular(path: bytes) -> int:
    """Open a file the walk saw as regular; refuse what replaced it since (a FIFO would
    block the open forever, a symlink could point anywhere)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "no longer a regular file")
    return fd


def _read_file(
    path: bytes, size: int, checksum: str, sealing: Sealing | None
) -> tuple[bytes, int, str, str, str, os.stat_result]:
    """_read_exactly of a whole file by path: (the bytes to send, the file's size and
    sha256, the checksum header's value and the sha256 of the bytes to send, its fstat
    after the read).
    With `sealing`, the bytes to send are the sealed file, and the checksums theirs."""
    fd = _open_regular(path)
    try:
        data, sha, check = _read_exactly(fd, size, None, None if sealing else checksum)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if sealing is None:
        return data, len(data), sha, check, sha, after
    sealed, check, wire_sha = _seal(sealing, data, checksum)
    return sealed, len(data), sha, check, wire_sha, after


def _seal(sealing: Sealing, data: bytes, checksum: str) -> tuple[bytes, str, str]:
    """(data sealed, its checksum header value, the payload hash to sign)"""
    out = sealing.seal(data)
    return out, *sealed_hashes(checksum, out)


def _read_chunk(fd: int, whole: Any) -> tuple[bytes, bytes, str]:
    """The next CHUNK_SIZE bytes of a database file (fewer at its end, b"" after it): (them,
    what a pack stores of them, their sha256); `whole` (the file's sha256) is updated."""
    block, _, _ = _read_exactly(fd, CHUNK_SIZE, whole, None, own=False)
    if not block:
        return b"", b"", ""
    return block, compress(block), hashlib.sha256(block).hexdigest()


def _hash_fd(fd: int, progress: Callable[[], None]) -> tuple[str, int]:
    """sha256 and size of a file; bytes read are progress (hashing a 50 GB video is not a stall)."""
    h = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, HASH_CHUNK):
        h.update(chunk)
        size += len(chunk)
        progress()
    return h.hexdigest(), size


def _read_exactly(fd: int, size: int, sha: Any, checksum: str | None, own: bool = True) -> tuple[bytes, str, str]:
    """Read up to `size` bytes; return them with their own sha256 (for the signature, and
    the manifest when the file is one part; "" unless `own`) and the `checksum` header's value, updating
    `sha` (the whole file's, read in parts) if given. Bytes, not a bytearray: botocore and
    aiohttp copy a bytearray body several times over, a bytes body not at all; and os.read
    of a regular file returns the requested size in one buffer."""
    data = os.read(fd, size)
    if 0 < len(data) < size:  # short read: a file that shrank, or a pipe-like oddity
        chunks = [data]
        got = len(data)
        while got < size and (more := os.read(fd, size - got)):
            chunks.append(more)
            got += len(more)
        data = b"".join(chunks)
    if sha is not None:
        sha.update(data)
    digest = hashlib.sha256(data).hexdigest() if own else ""
    return data, digest, check_value(checksum, data, digest or None) if checksum else ""


@dataclass
class _Job:
    path: bytes
    entry: Entry
    line: ManifestLine
    key: str  # "" for a small file bound for a pack (a blob has no key of its own)
    decision: Decision
    done: asyncio.Future[bool]


class UploadWorkers:
    """`jobs` workers and their bounded queue. submit() hands a file over and returns a
    future that says, once the file is done, whether its line belongs in the manifest
    (False: it could not be read; it is a problem and left out of this snapshot)."""

    def __init__(
        self, uploader: FileUploader, stats: RunStats, phase: Phase, jobs: int, packs: Packing | None = None
    ) -> None:
        self.uploader = uploader
        self.packs = packs
        self.stats = stats
        self.phase = phase
        # Small files are round trips more than bytes: up to SMALL_FACTOR x jobs of them at once
        # (Store allows as many small PUTs in flight); larger ones hold one of `jobs` slots.
        self.jobs = jobs * SMALL_FACTOR
        self._large = asyncio.Semaphore(jobs)
        self._queue: asyncio.Queue[_Job | list[_Job] | None] = asyncio.Queue(self.jobs * 2)
        # small files to pack, read together in one trip to a worker thread (a trip per
        # file cost more than reading it: 100,000 thumbnails)
        self._small: list[_Job] = []
        self._small_bytes = 0

    def submit_nowait(
        self, path: bytes, entry: Entry, line: ManifestLine, decision: Decision
    ) -> asyncio.Future[bool] | None:
        """submit() of a new small file bound for a pack while the gathered batch has room
        (no await, and no object key: a pack's blob needs none); None: use submit()."""
        if (
            self.packs is None
            or decision.source is not None
            or line.root == "postgres"
            or entry.size > PACK_FILE_MAX
            or len(self._small) + 1 >= SMALL_BATCH_FILES
            or self._small_bytes + entry.size >= SMALL_BATCH_BYTES
        ):
            return None
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._small.append(_Job(path, entry, line, "", decision, done))
        self._small_bytes += entry.size
        return done

    async def submit(
        self, path: bytes, entry: Entry, line: ManifestLine, key: str, decision: Decision
    ) -> asyncio.Future[bool]:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        job = _Job(path, entry, line, key, decision, done)
        if (
            self.packs is not None
            and decision.source is None
            and line.root != "postgres"
            and entry.size <= PACK_FILE_MAX
        ):
            self._small.append(job)
            self._small_bytes += entry.size
            if len(self._small) >= SMALL_BATCH_FILES or self._small_bytes >= SMALL_BATCH_BYTES:
                await self._flush_small()
            return done
        await self._queue.put(job)
        return done

    async def _flush_small(self) -> None:
        if self._small:
            batch, self._small, self._small_bytes = self._small, [], 0
            await self._queue.put(batch)

    async def flush(self) -> None:
        """Hand on the small files gathered so far and send the open pack (the manifest's
        window is full: its lines may be waiting for them)."""
        await self._flush_small()
        if self.packs is not None:
            await self.packs.writer.flush()

    async def close(self) -> None:
        """No more files: each worker ends once the queue is empty."""
        await self._flush_small()
        for _ in range(self.jobs):
            await self._queue.put(None)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for _ in range(self.jobs):
                tg.create_task(self._work())

    async def _work(self) -> None:
        stats = self.stats
        while (job := await self._queue.get()) is not None:
            if isinstance(job, list):
                await self._small_files(job)
                continue
            line, decision = job.line, job.decision
            waits: list[asyncio.Future[None]] = []
            try:
                if job.entry.size <= SMALL_OBJECT or (self.packs is not None and line.root == "postgres"):
                    reused = await self.uploader.upload(
                        job.path, job.entry, line, job.key, self.phase, decision.source, self.packs, waits
                    )
                else:
                    async with self._large:
                        reused = await self.uploader.upload(
                            job.path, job.entry, line, job.key, self.phase, decision.source, self.packs, waits
                        )
            except OSError as exc:
                stats.failed += 1
                stats.problem(
                    f"{line.root}/{line.path}: cannot be read ({exc.strerror or exc}); left out of this snapshot"
                )
                job.done.set_result(False)
                self.phase.update(0, files=1)
                continue
            kind = decision.kind
            if decision.action == "check" and not reused:
                kind = "new" if kind in ("moved", "new", "resumed") else "changed"
            setattr(stats, kind, getattr(stats, kind) + 1)
            self.phase.update(0, files=1)
            if waits:
                settle_after(waits, job.done)  # its line waits for its packs, not this worker
            else:
                job.done.set_result(True)

    async def _small_files(self, jobs: list[_Job]) -> None:
        """New or changed small files into the open pack: read and hashed together in one
        trip to a worker thread, then added in walk order (a restore then reads them so)."""
        assert self.packs is not None
        stats, budget, writer = self.stats, self.uploader.budget, self.packs.writer
        holds = [max(j.entry.size, 1) for j in jobs]
        await budget.acquire(sum(holds))
        try:
            read = await asyncio.to_thread(_read_files, [(j.path, j.entry.size) for j in jobs])
        except BaseException:
            await asyncio.shield(budget.release(sum(holds)))
            raise
        # the files of one pack are settled by one callback (one per file cost 0.7 s of a
        # first backup of 100,000 files)
        waiting: asyncio.Future[None] | None = None
        settled: list[asyncio.Future[bool]] = []
        for i, (job, held, got) in enumerate(zip(jobs, holds, read, strict=True)):
            line = job.line
            if isinstance(got, OSError):
                await budget.release(held)
                stats.failed += 1
                stats.problem(
                    f"{line.root}/{line.path}: cannot be read ({got.strerror or got}); left out of this snapshot"
                )
                job.done.set_result(False)
                self.phase.update(0, files=1)
                continue
            data, sha, after = got
            try:
                key, offset, done = await writer.add(data, held)
            except BaseException:
                if settled:  # what went into packs before is theirs to settle
                    settle_all(waiting, settled)
                await asyncio.shield(budget.release(sum(holds[i:])))
                raise
            line.key, line.offset, line.size, line.sha256, line.stored = key, offset, len(data), sha, None
            stats.bytes_read += len(data)
            stats.bytes_uploaded += len(data)
            if after.st_mtime_ns != job.entry.mtime_ns or after.st_size != len(data):
                stats.changed_while_read += 1
                stats.problem(f"{line.root}/{line.path}: changed while being read; the snapshot holds the bytes read")
            setattr(stats, job.decision.kind, getattr(stats, job.decision.kind) + 1)
            self.phase.update(len(data), files=1)
            if done is not waiting:
                if settled:
                    settle_all(waiting, settled)
                waiting, settled = done, []
            settled.append(job.done)
        if settled:
            settle_all(waiting, settled)


def _read_files(files: list[tuple[bytes, int]]) -> list[tuple[bytes, str, os.stat_result] | OSError]:
    """(bytes, sha256, fstat after the read) of each small file, or why it could not be read."""
    out: list[tuple[bytes, str, os.stat_result] | OSError] = []
    for path, size in files:
        try:
            fd = _open_regular(path)
            try:
                data, sha, _ = _read_exactly(fd, size, None, None)
                out.append((data, sha, os.fstat(fd)))
            finally:
                os.close(fd)
        except OSError as exc:
            out.append(exc)
    return out


def settle_all(pack: asyncio.Future[None] | None, dones: list[asyncio.Future[bool]]) -> None:
    """settle_after([pack], done) for each of dones, by one callback."""
    assert pack is not None

    def settle(f: asyncio.Future[None]) -> None:
        for done in dones:
            _settle(f, done)

    pack.add_done_callback(settle)


def _settle(f: asyncio.Future[Any], done: asyncio.Future[bool]) -> None:
    """done as f ended: True, its error, or cancelled."""
    if f.cancelled():
        exc: BaseException | None = asyncio.CancelledError()
    else:
        exc = f.exception()  # retrieved here whatever becomes of done
    if done.done():
        return
    if isinstance(exc, asyncio.CancelledError):  # a pack's upload was cancelled: the run stops
        done.cancel()
    elif exc is not None:
        done.set_exception(exc)
        done.exception()  # retrieved: awaited, it still raises; left (a run stopped), no noise
    else:
        done.set_result(True)


def settle_after(waits: list[asyncio.Future[None]], done: asyncio.Future[bool]) -> None:
    """Resolve done (True) once every future in waits has, or with the first one's error."""
    # One future (a small file's pack, the usual case) is waited for as it is: a gather per
    # file cost 2 of the 21 seconds of a first backup of 100,000 small files.
    both: asyncio.Future[Any] = waits[0] if len(waits) == 1 else asyncio.gather(*waits)
    both.add_done_callback(lambda f: _settle(f, done))
