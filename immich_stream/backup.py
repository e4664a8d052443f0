"""`backup`: preflight, stop, stream files and pg_dump into S3, start, commit.

Pipeline per root (restic's archiver, in asyncio): walk -> bounded queues -> N upload
workers; a writer puts manifest lines in walk order as their uploads finish. Memory is
bounded by the queues (entries) and the ByteBudget (buffers), whatever the library size.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from immich_stream import __version__
from immich_stream.budget import ByteBudget
from immich_stream.config import Settings
from immich_stream.dump import DumpResult, dump_database
from immich_stream.errors import EXIT_INCOMPLETE, EXIT_OK, RepoError, StoreError
from immich_stream.progress import Phase, Reporter
from immich_stream.repo import ManifestLine, ManifestWriter, Repo, new_snapshot_id
from immich_stream.locks import RepoLock, local_lock
from immich_stream.stack import Stack, StackGuard, connect, recover, state_dir
from immich_stream.store import MultipartUpload, Store, StreamWriter, md5_b64, part_size_for
from immich_stream.walk import Entry, WalkProblem, walk

log = logging.getLogger(__name__)

ORDER_WINDOW = 4096  # manifest lines waiting for their upload, at most
MAX_PROBLEMS_KEPT = 200


@dataclass
class Stats:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    skipped: int = 0
    failed: int = 0
    changed_while_read: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes_total: int = 0
    bytes_read: int = 0
    bytes_uploaded: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        log.warning("%s", text)
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(text)


@dataclass
class BackupResult:
    snapshot_id: str
    stats: Stats
    dump: DumpResult | None
    seconds: float
    downtime: float
    mode: str
    exit_code: int
    summary: dict[str, Any]


class PrevCursor:
    """Walks the previous manifest alongside the file walk (both in the same order)."""

    def __init__(self, lines: AsyncIterator[ManifestLine] | None) -> None:
        self._it = lines
        self._cur: ManifestLine | None = None
        self._started = False

    async def _advance(self) -> None:
        assert self._it is not None
        try:
            self._cur = await anext(self._it)
        except StopAsyncIteration:
            self._cur, self._it = None, None

    async def find(self, line: ManifestLine) -> ManifestLine | None:
        if self._it is None and not self._started:
            return None
        if not self._started:
            self._started = True
            await self._advance()
        want = line.order()
        while self._cur is not None and self._cur.order() < want:
            await self._advance()
        if self._cur is not None and self._cur.order() == want:
            return self._cur
        return None


async def vanished_files(repo: Repo, snap_id: str, roots: dict[str, Path]) -> dict[tuple[str, int], ManifestLine]:
    """Files of the previous snapshot whose path is gone now, by (root, inode): candidates
    for a move (Immich's storage-template migration renames files). Memory grows with the
    number of deleted/moved files, not with the library."""
    out: dict[tuple[str, int], ManifestLine] = {}
    batch: list[ManifestLine] = []

    def check(lines: list[ManifestLine]) -> list[ManifestLine]:
        gone = []
        for ln in lines:
            try:
                os.lstat(os.path.join(os.fsencode(roots[ln.root]), ln.relpath))
            except FileNotFoundError:
                gone.append(ln)
            except OSError:
                pass
        return gone

    async def flush() -> None:
        for ln in await asyncio.to_thread(check, batch):
            out[(ln.root, ln.inode)] = ln
        batch.clear()

    async for line in repo.read_manifest(snap_id):
        if line.type == "file" and line.key and line.root in roots:
            batch.append(line)
            if len(batch) >= 2000:
                await flush()
    await flush()
    return out


class FileUploader:
    """Reads a file once (sha256 and per-request MD5 while reading) and uploads it."""

    def __init__(self, store: Store, repo: Repo, budget: ByteBudget, settings: Settings, stats: Stats) -> None:
        self.store = store
        self.repo = repo
        self.budget = budget
        self.part_size = settings.part_size
        self.stats = stats

    async def upload(self, path: bytes, entry: Entry, line: ManifestLine, key: str, phase: Phase) -> None:
        """Upload; fills line.sha256/size. Raises OSError for a file that cannot be read."""
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if entry.size <= self.part_size:
                await self._single(fd, entry, line, key, phase)
            else:
                await self._multipart(fd, entry, line, key, phase)
            after = await asyncio.to_thread(os.fstat, fd)
        finally:
            os.close(fd)
        if after.st_mtime_ns != entry.mtime_ns or after.st_size != line.size:
            self.stats.changed_while_read += 1
            self.stats.problem(f"{line.root}/{line.path}: changed while being read; the snapshot holds the bytes read")

    async def _single(self, fd: int, entry: Entry, line: ManifestLine, key: str, phase: Phase) -> None:
        async with self.budget.hold(entry.size):
            data, sha, md5 = await asyncio.to_thread(_read_exactly, fd, entry.size, None)
            self.stats.bytes_read += len(data)
            await self.store.put(self.repo.object_key(key), data, md5=md5, sha256=sha)
        line.size, line.sha256 = len(data), sha
        self.stats.bytes_uploaded += len(data)
        phase.update(len(data))

    async def _multipart(self, fd: int, entry: Entry, line: ManifestLine, key: str, phase: Phase) -> None:
        psize = part_size_for(entry.size, self.part_size)
        sha = hashlib.sha256()
        total = 0
        async with MultipartUpload(self.store, self.repo.object_key(key), self.budget) as mp:
            while total < entry.size or mp.parts == 0:
                want = min(psize, entry.size - total)
                await self.budget.acquire(want)
                try:
                    data, part_sha, md5 = await asyncio.to_thread(_read_exactly, fd, want, sha)
                except BaseException:
                    await asyncio.shield(self.budget.release(want))
                    raise
                await self.budget.release(want - len(data))
                if not data and mp.parts > 0:
                    break
                n = len(data)
                total += n
                self.stats.bytes_read += n
                await mp.add(data, md5, part_sha)  # the part's bytes are released once it is sent
                del data  # the upload task owns the part now: no second reference while it waits
                phase.update(n)
                if n < want:
                    break  # the file shrank while being read: noticed by the caller's fstat
            await mp.complete()
        line.size, line.sha256 = total, sha.hexdigest()
        self.stats.bytes_uploaded += total


def _read_exactly(fd: int, size: int, sha: Any) -> tuple[bytes, str, str]:
    """Read up to `size` bytes; return them with their own sha256 and MD5 (for the request
    and its signature), updating `sha` (the whole file's, read in parts) if given. Bytes, not a bytearray: botocore and aiohttp copy a
    bytearray body several times over, a bytes body not at all; and os.read of a regular
    file returns the requested size in one buffer."""
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
    return data, hashlib.sha256(data).hexdigest(), md5_b64(data)


async def backup_root(
    root: str,
    root_path: Path,
    snap_id: str,
    uploader: FileUploader,
    repo: Repo,
    prev: PrevCursor,
    vanished: dict[tuple[str, int], ManifestLine],
    manifest: ManifestWriter,
    stats: Stats,
    phase: Phase,
    jobs: int,
) -> None:
    """Walk root, upload what is new or changed, write its manifest lines in walk order."""
    root_b = os.fsencode(root_path)
    loop = asyncio.get_running_loop()
    order_q: asyncio.Queue[tuple[ManifestLine, asyncio.Future[bool] | None] | None] = asyncio.Queue(ORDER_WINDOW)
    work_q: asyncio.Queue[tuple[Entry, ManifestLine, asyncio.Future[bool], str] | None] = asyncio.Queue(jobs * 2)

    def reuse(line: ManifestLine, old: ManifestLine) -> None:
        line.sha256, line.key = old.sha256, old.key

    def on_problem(p: WalkProblem) -> None:
        if p.message.startswith("skipped"):
            stats.skipped += 1  # the walk already warned
        else:
            stats.failed += 1
            stats.problem(f"{root}/{p.relpath.decode(errors='backslashreplace')}: {p.message}")

    async def produce() -> None:
        async for e in walk(root_b, on_problem):
            uploader.store.last_activity = time.monotonic()  # walking unchanged files is progress too
            line = ManifestLine.from_entry(root, e)
            fut: asyncio.Future[bool] | None = None
            if e.type == "file":
                stats.files += 1
                stats.bytes_total += e.size
                old = await prev.find(line)
                if old is not None and old.type == "file" and old.key and old.size == e.size \
                        and old.mtime_ns == e.mtime_ns:
                    reuse(line, old)
                    stats.unchanged += 1
                    phase.update(0, files=1)  # the bar counts bytes read
                else:
                    moved = vanished.pop((root, e.inode), None) if old is None else None
                    if moved is not None and moved.size == e.size and moved.mtime_ns == e.mtime_ns:
                        reuse(line, moved)
                        stats.moved += 1
                        phase.update(0, files=1)  # the bar counts bytes read
                    else:
                        fut = loop.create_future()
                        await work_q.put((e, line, fut, "changed" if old is not None else "new"))
            elif e.type == "dir":
                stats.dirs += 1
            else:
                stats.symlinks += 1
            await order_q.put((line, fut))
        for _ in range(jobs):
            await work_q.put(None)
        await order_q.put(None)

    async def work() -> None:
        while (item := await work_q.get()) is not None:
            e, line, fut, kind = item
            try:
                key = repo.data_key(snap_id, root, line.path)
                line.key = key
                await uploader.upload(os.path.join(root_b, e.relpath), e, line, key, phase)
            except (OSError, RepoError) as exc:
                stats.failed += 1
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                stats.problem(f"{root}/{line.path}: cannot be read ({why}); left out of this snapshot")
                fut.set_result(False)
                phase.update(0, files=1)
                continue
            setattr(stats, kind, getattr(stats, kind) + 1)
            phase.update(0, files=1)
            fut.set_result(True)

    async def write() -> None:
        while (item := await order_q.get()) is not None:
            line, fut = item
            if fut is None or await fut:
                await manifest.add(line)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce())
        tg.create_task(write())
        for _ in range(jobs):
            tg.create_task(work())


async def with_watchdog(store: Store, stall: float, work: Awaitable[None]) -> None:
    """Run work; fail it when nothing has moved for `stall` seconds (no S3 answer, no dump
    output, no file walked). A hung connection must not keep Immich down forever: the
    failure unwinds through StackGuard, which starts the stack again."""

    async def watch() -> None:
        while True:
            await asyncio.sleep(min(5.0, stall / 4))
            idle = time.monotonic() - store.last_activity
            if idle > stall:
                raise StoreError(f"no progress for {idle:.0f} s (S3, the network or Docker stopped answering): "
                                 "stopped; check them and run again (IMMICH_STREAM_STALL_TIMEOUT sets the limit)")

    store.last_activity = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        dog = tg.create_task(watch())
        try:
            await work
        finally:
            dog.cancel()


def _root_meta(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"mode": st.st_mode & 0o7777, "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}


async def preflight_store(store: Store, repo: Repo, run_id: str) -> None:
    """S3 reachable and the bucket writable: write and delete a small object, check the format."""
    key = repo.preflight_key(run_id)
    await store.put(key, b"immich-stream preflight\n")
    await store.delete([key])
    await repo.ensure_config()


async def run_backup(settings: Settings, reporter: Reporter) -> BackupResult:
    started = time.monotonic()
    settings.require("bucket")
    library = settings.require_dir("library_dir")
    postgres = settings.require_dir("postgres_dir") if settings.stop == "all" else None
    roots: dict[str, Path] = {"library": library}
    if postgres is not None:
        roots = {"postgres": postgres, "library": library}
    if postgres is not None and (postgres in library.parents or library in postgres.parents or postgres == library):
        log.warning("library_dir and postgres_dir overlap: files under both are stored twice")

    snap_id = new_snapshot_id()
    # Two backups of one stack on one host never overlap (the kernel drops the flock of a
    # killed run); runs elsewhere and prune are kept apart by the repository lock.
    with local_lock(f"backup-{settings.project}", state_dir()):
        async with connect() as docker, Store(settings) as store:
            stack = Stack(docker, settings.project, settings.db_container)
            # A run killed with the stack down is repaired first, whatever else happens.
            if await recover(stack):
                log.info("the Immich stack left stopped by the earlier run is running again")
            repo = Repo(store, settings.prefix)
            await preflight_store(store, repo, snap_id)
            async with RepoLock(repo, "backup", exclusive=False, wait=settings.lock_wait, run=snap_id) as lock:
                return await _backup_locked(settings, reporter, docker, stack, store, repo, roots, snap_id, started,
                                            lock)


async def _backup_locked(settings: Settings, reporter: Reporter, docker: Any, stack: Stack, store: Store, repo: Repo,
                         roots: dict[str, Path], snap_id: str, started: float, lock: RepoLock) -> BackupResult:
    mode = settings.stop
    stats = Stats()
    budget = ByteBudget(settings.max_memory)
    containers = await stack.preflight()
    running = [c.name for c in containers if c.running]
    prev = await repo.latest()
    vanished = await vanished_files(repo, prev.id, roots) if prev else {}
    log.info("backup %s of %s to s3://%s/%s (stop: %s, previous snapshot: %s)", snap_id,
             ", ".join(f"{r} {p}" for r, p in roots.items()), store.bucket, settings.prefix, mode,
             prev.id if prev else "none")

    uploader = FileUploader(store, repo, budget, settings, stats)
    cursor = PrevCursor(repo.read_manifest(prev.id) if prev else None)
    dump_result: DumpResult | None = None
    dump_key = repo.snapshot_key(snap_id, "database.sql.gz")

    phase_seconds: dict[str, float] = {}

    async def files(root: str) -> None:
        phase = reporter.phase(f"{root} files")
        try:
            await backup_root(root, roots[root], snap_id, uploader, repo, cursor, vanished, manifest, stats,
                              phase, settings.jobs)
        finally:
            phase_seconds[phase.name] = round(phase.seconds, 3)
            phase.close()

    async def dump() -> None:
        nonlocal dump_result
        phase = reporter.phase("database dump")
        try:
            async with StreamWriter(store, dump_key, budget, settings.part_size) as out:
                dump_result = await dump_database(
                    docker, settings.db_container, settings.db_user, settings.db_name, out.write,
                    lambda n: phase.update(n),
                )
                await out.finish()
            dump_result.parts = out.parts
        finally:
            phase_seconds[phase.name] = round(phase.seconds, 3)
            phase.close()

    manifest = ManifestWriter(store, repo.snapshot_key(snap_id, "manifest.jsonl.gz"), budget, settings.part_size)
    guard = StackGuard(stack)

    async def work() -> None:
        async with manifest:
            async with guard:
                db = settings.db_container
                if mode == "all":
                    await guard.stop([n for n in running if n != db])
                    await guard.stop([db])
                    await files("postgres")
                    await guard.start([db])
                    await stack.wait_db_ready(settings.db_user)
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(dump())
                        tg.create_task(files("library"))
                elif mode == "app":
                    await guard.stop([n for n in running if n != db])
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(dump())
                        tg.create_task(files("library"))
                else:  # none: dump first, then files (Immich's advice for live backups)
                    await dump()
                    await files("library")
                await guard.restore()
            await manifest.finish()

    await with_watchdog(store, settings.stall_timeout, work())
    downtime = guard.downtime

    assert dump_result is not None
    complete = stats.failed == 0
    seconds = time.monotonic() - started
    summary = {
        "id": snap_id,
        "time": dt.datetime.now(dt.UTC).isoformat(),
        "host": socket.gethostname(),
        "version": __version__,
        "mode": mode,
        "parent": prev.id if prev else None,
        "roots": {r: str(p) for r, p in roots.items()},
        # The roots themselves are not in the manifest; Postgres refuses a data
        # directory with the wrong owner or mode, so restore needs these.
        "root_meta": {r: _root_meta(p) for r, p in roots.items()},
        "complete": complete,
        "files": {k: v for k, v in asdict(stats).items() if k != "problems"},
        "problems": stats.problems,
        "manifest": {"key": f"snapshots/{snap_id}/manifest.jsonl.gz", "lines": manifest.lines},
        "database": {
            "key": f"snapshots/{snap_id}/database.sql.gz", "name": settings.db_name,
            "size": dump_result.raw_bytes, "compressed_size": dump_result.gz_bytes,
            "sha256": dump_result.raw_sha256, "compressed_sha256": dump_result.gz_sha256,
            "parts": dump_result.parts, "seconds": round(dump_result.seconds, 3),
        },
        "seconds": round(seconds, 3),
        "phase_seconds": phase_seconds,
        "downtime_seconds": round(downtime, 3),
    }
    await lock.ensure_held()  # prune may have collected this run's uploads if we lost the lock
    await repo.commit(snap_id, summary)  # the commit point
    log.info("snapshot %s committed", snap_id)
    return BackupResult(snap_id, stats, dump_result, seconds, downtime, mode,
                        EXIT_OK if complete else EXIT_INCOMPLETE, summary)
