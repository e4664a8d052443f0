"""`backup`: preflight, stop, stream files and pg_dump into S3, start, commit.

Pipeline per root (restic's archiver, in asyncio): walk -> bounded queues -> N upload
workers; a writer puts manifest lines in walk order as their uploads finish. Memory is
bounded by the queues (entries) and the ByteBudget (buffers), whatever the library size.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import hashlib
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from immich_stream import __version__
from immich_stream.budget import ByteBudget
from immich_stream.config import Settings, format_size
from immich_stream.dump import DumpResult, dump_database
from immich_stream.errors import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_UNSTABLE,
    ImmichStreamError,
    StackError,
    StallError,
    SuspiciousLibrary,
)
from immich_stream.locks import RepoLock, local_lock
from immich_stream.progress import Phase, Reporter
from immich_stream.repo import ManifestLine, ManifestWriter, ObjectIndex, Repo, new_snapshot_id
from immich_stream.stack import Stack, StackGuard, connect, recover, state_dir
from immich_stream.store import MultipartUpload, Store, StreamWriter, md5_b64, part_size_for
from immich_stream.walk import Entry, WalkProblem, walk

log = logging.getLogger(__name__)

ORDER_WINDOW = 4096  # manifest lines waiting for their upload, at most
HASH_CHUNK = 1 << 20  # read size when a file is hashed to decide whether to upload it
MAX_PROBLEMS_KEPT = 200


@dataclass
class Stats:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    touched: int = 0  # metadata changed, bytes the same (read and hashed, object reused)
    reuploaded: int = 0  # unchanged, but the object it had was gone from the bucket
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
    # files and bytes per root, for the next run's shrink check
    roots: dict[str, dict[str, int]] = field(default_factory=dict)

    def count_file(self, root: str, size: int) -> None:
        self.files += 1
        self.bytes_total += size
        totals = self.roots.setdefault(root, {"files": 0, "bytes": 0})
        totals["files"] += 1
        totals["bytes"] += size

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
    shrunk: bool = False  # the library looked shrunk and --allow-shrink let it through
    unstable: list[str] = field(default_factory=list)  # containers that did not stay up after the restart


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


# Immich keeps an empty `.immich` file in each of these folders of UPLOAD_LOCATION and
# refuses to start when one is missing: their absence means an unmounted or wrong library.
MARKER_DIRS = ("library", "upload", "thumbs", "encoded-video", "profile", "backups")
MARKER = ".immich"


@dataclass
class ParentInfo:
    """What a run needs to know of the previous snapshot besides its sorted manifest."""

    snap_id: str
    # files of the previous snapshot whose path is gone now, by (root, device, inode): move
    # candidates (Immich's storage-template migration renames files). Memory grows with
    # the number of deleted/moved files, not with the library.
    vanished: dict[tuple[str, int | None, int], ManifestLine] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # per root
    bytes: dict[str, int] = field(default_factory=dict)
    markers: set[str] = field(default_factory=set)  # MARKER_DIRS whose marker it had

    def moved_from(self, root: str, line: ManifestLine) -> ManifestLine | None:
        """The vanished line this new path may have been moved from (same device and inode)."""
        found = self.vanished.pop((root, line.dev, line.inode), None)
        if found is None:  # a manifest from before devices were recorded
            found = self.vanished.pop((root, None, line.inode), None)
        return found


async def scan_parent(repo: Repo, snap_id: str, roots: dict[str, Path]) -> ParentInfo:
    info = ParentInfo(snap_id)
    batch: list[ManifestLine] = []
    markers = {f"{d}/{MARKER}": d for d in MARKER_DIRS}

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
            info.vanished[(ln.root, ln.dev, ln.inode)] = ln
        batch.clear()

    async for line in repo.read_manifest(snap_id):
        if line.type != "file":
            continue
        info.files[line.root] = info.files.get(line.root, 0) + 1
        info.bytes[line.root] = info.bytes.get(line.root, 0) + line.size
        if line.root == "library" and line.path in markers:
            info.markers.add(markers[line.path])
        if line.key and line.root in roots:
            batch.append(line)
            if len(batch) >= 2000:
                await flush()
    await flush()
    return info


async def count_files(root: Path) -> tuple[int, int]:
    """(files, bytes) under root: a stat-only walk, run before anything is stopped."""
    files = size = 0
    async for e in walk(os.fsencode(root), lambda p: None):
        if e.type == "file":
            files += 1
            size += e.size
    return files, size


async def check_library(library: Path, parent: ParentInfo | None, max_shrink: float, allow: bool) -> bool:
    """Refuse a library that looks unmounted, empty or shrunk before anything is stopped
    (retention would otherwise age the good snapshots out). True when it looks shrunk
    but `allow` lets it through."""
    fs = format_size
    missing = await asyncio.to_thread(lambda: [d for d in MARKER_DIRS if not os.path.isfile(library / d / MARKER)])
    suspicious: list[str] = []
    if missing:
        had = [d for d in missing if parent is None or d in parent.markers]
        if had:
            suspicious.append(
                f"library_dir {library} lacks Immich's marker files ({', '.join(f'{d}/{MARKER}' for d in had)}"
                "): is the disk mounted, and is this Immich's UPLOAD_LOCATION?"
            )
        else:
            log.warning(
                "library_dir %s has no %s marker in %s (nor had the last snapshot: an old Immich?)",
                library,
                MARKER,
                ", ".join(missing),
            )
    if parent is not None and parent.files.get("library"):
        files, size = await count_files(library)
        old_files, old_bytes = parent.files["library"], parent.bytes.get("library", 0)
        if files < old_files * (1 - max_shrink) or size < old_bytes * (1 - max_shrink):
            suspicious.append(
                f"the library holds {files} files ({fs(size)}) where snapshot {parent.snap_id} had "
                f"{old_files} ({fs(old_bytes)}): it lost more than {max_shrink * 100:g}%"
            )
    if not suspicious:
        return False
    if allow:
        for text in suspicious:
            log.warning("%s; backing up anyway (--allow-shrink)", text)
        return True
    raise SuspiciousLibrary(
        f"{'; '.join(suspicious)}; nothing was stopped or committed: check the mount, or for a "
        "deliberate deletion run again with --allow-shrink"
    )


def check_shrink_at_end(stats: Stats, parent: ParentInfo | None, max_shrink: float, allow: bool) -> None:
    """The same rule on what the (stopped) walk really found, before committing."""
    if allow or parent is None or not parent.files.get("library"):
        return
    now = stats.roots.get("library", {"files": 0, "bytes": 0})
    old_files, old_bytes = parent.files["library"], parent.bytes.get("library", 0)
    if now["files"] < old_files * (1 - max_shrink) or now["bytes"] < old_bytes * (1 - max_shrink):
        raise SuspiciousLibrary(
            f"the library walked {now['files']} files ({format_size(now['bytes'])}) where snapshot {parent.snap_id} "
            f"had {old_files} ({format_size(old_bytes)}): it lost more than {max_shrink * 100:g}% during the run; "
            "nothing was committed: check the mount, or run again with --allow-shrink"
        )


@dataclass(frozen=True)
class Decision:
    """What to do with one file: reuse an object, read and hash first (reuse when the
    bytes match), or upload."""

    action: str  # "reuse", "check" or "upload"
    kind: str  # the Stats counter it ends in: unchanged, moved, touched, reuploaded, changed, new
    source: ManifestLine | None = None  # the line whose object may be reused


def same_file(line: ManifestLine, old: ManifestLine) -> bool:
    """Unchanged without reading: size, mtime, ctime, inode and device all equal. ctime
    cannot be set back, so `cp -p`, `rsync -a` or exiftool -P rewriting a file with the
    same size and mtime is noticed. A line from before ctime was recorded is compared by
    size, mtime and inode (once: this run records ctime)."""
    if (line.size, line.mtime_ns, line.inode) != (old.size, old.mtime_ns, old.inode):
        return False
    if old.ctime_ns is None:
        return True
    return line.ctime_ns == old.ctime_ns and line.dev == old.dev


def classify(
    line: ManifestLine, old: ManifestLine | None, moved: ManifestLine | None, exists: Callable[[str, int], bool]
) -> Decision:
    """The rules of an incremental run, in one place. `old` is the previous snapshot's line
    for this path, `moved` a vanished line with this file's device and inode, `exists` says
    whether an object with this key and size is in the bucket."""
    if old is not None and old.type == "file" and old.key and old.sha256:
        if not exists(old.key, old.size):
            return Decision("upload", "reuploaded")
        if same_file(line, old):
            return Decision("reuse", "unchanged", old)
        if old.size == line.size:
            return Decision("check", "touched", old)  # a chown, a touch, or the same size rewritten
        return Decision("upload", "changed")
    if (
        moved is not None
        and moved.key
        and moved.sha256
        and moved.size == line.size
        and moved.mtime_ns == line.mtime_ns
        and exists(moved.key, moved.size)
    ):
        return Decision("check", "moved", moved)  # a rename changes ctime: the bytes decide
    return Decision("upload", "changed" if old is not None else "new")


class FileUploader:
    """Reads a file once (sha256 and per-request MD5 while reading) and uploads it."""

    def __init__(self, store: Store, repo: Repo, budget: ByteBudget, settings: Settings, stats: Stats) -> None:
        self.store = store
        self.repo = repo
        self.budget = budget
        self.part_size = settings.part_size
        self.stats = stats

    async def upload(
        self, path: bytes, entry: Entry, line: ManifestLine, key: str, phase: Phase, source: ManifestLine | None = None
    ) -> bool:
        """Upload under `key`; fills line.key/sha256/size. With a `source` line, the file is
        read and hashed first and source's object reused when the bytes are the same (no
        upload). True when reused. Raises OSError for a file that cannot be read."""
        fd = await asyncio.to_thread(_open_regular, path)
        try:
            if entry.size <= self.part_size:
                reused = await self._single(fd, entry, line, key, phase, source)
            else:
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
        if sha != source.sha256 or size != source.size or source.key is None:
            return False
        line.key, line.sha256, line.size = source.key, sha, size
        return True

    async def _single(
        self, fd: int, entry: Entry, line: ManifestLine, key: str, phase: Phase, source: ManifestLine | None
    ) -> bool:
        async with self.budget.hold(entry.size):
            data, sha, md5 = await asyncio.to_thread(_read_exactly, fd, entry.size, None)
            self.stats.bytes_read += len(data)
            if source is not None and self._reuse(line, source, sha, len(data)):
                phase.update(len(data))
                return True
            await self.store.put(self.repo.object_key(key), data, md5=md5, sha256=sha)
        line.key, line.size, line.sha256 = key, len(data), sha
        self.stats.bytes_uploaded += len(data)
        phase.update(len(data))
        return False

    async def _same_bytes(self, fd: int, line: ManifestLine, source: ManifestLine, phase: Phase) -> bool:
        """Hash a large file without uploading it; reuse source's object when it matches."""
        async with self.budget.hold(HASH_CHUNK):
            sha, size = await asyncio.to_thread(_hash_fd, fd)
        self.stats.bytes_read += size
        phase.update(size)
        return self._reuse(line, source, sha, size)

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
        line.key, line.size, line.sha256 = key, total, sha.hexdigest()
        self.stats.bytes_uploaded += total


def _open_regular(path: bytes) -> int:
    """Open a file the walk saw as regular; refuse what replaced it since (a FIFO would
    block the open forever, a symlink could point anywhere)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "no longer a regular file")
    return fd


def _hash_fd(fd: int) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, HASH_CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


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
    parent: ParentInfo | None,
    objects: ObjectIndex,
    manifest: ManifestWriter,
    stats: Stats,
    phase: Phase,
    jobs: int,
) -> None:
    """Walk root, upload what is new or changed, write its manifest lines in walk order."""
    root_b = os.fsencode(root_path)
    loop = asyncio.get_running_loop()
    order_q: asyncio.Queue[tuple[ManifestLine, asyncio.Future[bool] | None] | None] = asyncio.Queue(ORDER_WINDOW)
    work_q: asyncio.Queue[tuple[Entry, ManifestLine, asyncio.Future[bool], Decision] | None] = asyncio.Queue(jobs * 2)

    def on_problem(p: WalkProblem) -> None:
        if p.message.startswith("skipped"):
            stats.skipped += 1  # the walk already warned
        else:
            stats.failed += 1
            stats.problem(f"{root}/{p.relpath.decode(errors='backslashreplace')}: {p.message}")

    async def produce() -> None:
        async for e in walk(root_b, on_problem):
            uploader.store.touch()  # walking unchanged files is progress too
            line = ManifestLine.from_entry(root, e)
            fut: asyncio.Future[bool] | None = None
            if e.type == "file":
                stats.count_file(root, e.size)
                old = await prev.find(line)
                moved = parent.moved_from(root, line) if parent is not None and old is None else None
                decision = classify(line, old, moved, objects.has)
                if decision.action == "reuse":
                    assert decision.source is not None
                    line.key, line.sha256 = decision.source.key, decision.source.sha256
                    stats.unchanged += 1
                    phase.update(0, files=1)  # the bar counts bytes read
                else:
                    if decision.kind == "reuploaded":
                        assert old is not None
                        if stats.reuploaded < 20:
                            log.warning(
                                "%s/%s: its object %s is missing from the bucket: uploading it again",
                                root,
                                line.path,
                                old.key,
                            )
                    fut = loop.create_future()
                    await work_q.put((e, line, fut, decision))
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
            e, line, fut, decision = item
            try:
                key = repo.data_key(snap_id, root, line.path)
                reused = await uploader.upload(os.path.join(root_b, e.relpath), e, line, key, phase, decision.source)
            except OSError as exc:
                stats.failed += 1
                stats.problem(f"{root}/{line.path}: cannot be read ({exc.strerror or exc}); left out of this snapshot")
                fut.set_result(False)
                phase.update(0, files=1)
                continue
            kind = decision.kind
            if decision.action == "check" and not reused:
                kind = "new" if kind == "moved" else "changed"
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


async def with_watchdog(
    store: Store, stall: float, work: Awaitable[None], limit: Callable[[], ImmichStreamError | None] | None = None
) -> None:
    """Run work; fail it when nothing has moved for `stall` seconds (no byte acknowledged by
    S3, no dump output, no file walked: errors, timeouts and retries do not count), or when
    `limit` returns an error (--max-downtime). A hung connection must not keep Immich down:
    the failure unwinds through StackGuard, which starts the stack again."""

    async def watch() -> None:
        while True:
            await asyncio.sleep(min(1.0, stall / 10))
            if limit is not None and (error := limit()) is not None:
                raise error
            idle = time.monotonic() - store.last_activity
            if idle > stall:
                raise StallError(_what_hung(store, idle))

    store.touch()
    async with asyncio.TaskGroup() as tg:
        dog = tg.create_task(watch())
        try:
            await work
        finally:
            dog.cancel()


def _what_hung(store: Store, idle: float) -> str:
    oldest = store.oldest_request()
    if oldest is not None:
        what, waited = oldest
        hung = f"S3 at {store.settings.endpoint_url or 'AWS'} did not answer ({what}, waiting {waited:.0f} s)"
    else:
        hung = "no S3 request, file or dump output moved (a hung disk, network filesystem or Docker?)"
    return (
        f"no progress for {idle:.0f} s: {hung}; the stack was started again and nothing was committed; "
        "check it and run again (IMMICH_STREAM_STALL_TIMEOUT sets the limit)"
    )


def _root_meta(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"mode": st.st_mode & 0o7777, "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}


async def preflight_store(store: Store, repo: Repo, run_id: str) -> None:
    """S3 reachable and the bucket writable: write and delete a small object, check the format."""
    key = repo.preflight_key(run_id)
    await store.put(key, b"immich-stream preflight\n")
    await store.delete([key])
    await repo.ensure_config()


async def run_backup(settings: Settings, reporter: Reporter, allow_shrink: bool = False) -> BackupResult:
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
                return await _backup_locked(
                    settings, reporter, docker, stack, store, repo, roots, snap_id, started, lock, allow_shrink
                )


async def _backup_locked(
    settings: Settings,
    reporter: Reporter,
    docker: Any,
    stack: Stack,
    store: Store,
    repo: Repo,
    roots: dict[str, Path],
    snap_id: str,
    started: float,
    lock: RepoLock,
    allow_shrink: bool,
) -> BackupResult:
    mode = settings.stop
    stats = Stats()
    budget = ByteBudget(settings.max_memory)
    containers = await stack.preflight()
    running = [c.name for c in containers if c.running]
    prev = await repo.latest()
    parent = await scan_parent(repo, prev.id, roots) if prev else None
    # Before anything is stopped: an unmounted or emptied library must not become the
    # newest snapshot.
    shrunk = await check_library(roots["library"], parent, settings.max_shrink, allow_shrink)
    # Reused objects are checked against one listing: a lifecycle rule or a manual cleanup
    # must not leave every later snapshot pointing at nothing.
    objects = await ObjectIndex.load(repo)
    log.info(
        "backup %s of %s to s3://%s/%s (stop: %s, previous snapshot: %s)",
        snap_id,
        ", ".join(f"{r} {p}" for r, p in roots.items()),
        store.bucket,
        settings.prefix,
        mode,
        prev.id if prev else "none",
    )

    uploader = FileUploader(store, repo, budget, settings, stats)
    cursor = PrevCursor(repo.read_manifest(prev.id) if prev else None)
    dump_result: DumpResult | None = None
    dump_key = repo.snapshot_key(snap_id, "database.sql.gz")

    phase_seconds: dict[str, float] = {}

    async def files(root: str) -> None:
        phase = reporter.phase(f"{root} files")
        try:
            await backup_root(
                root,
                roots[root],
                snap_id,
                uploader,
                repo,
                cursor,
                parent,
                objects,
                manifest,
                stats,
                phase,
                settings.jobs,
            )
        finally:
            phase_seconds[phase.name] = round(phase.seconds, 3)
            phase.close()

    async def dump() -> None:
        nonlocal dump_result
        phase = reporter.phase("database dump")
        try:
            async with StreamWriter(store, dump_key, budget, settings.part_size) as out:

                def received(n: int) -> None:
                    store.touch()  # dump bytes received are progress, as are bytes acknowledged
                    phase.update(n)

                dump_result = await dump_database(
                    docker, settings.db_container, settings.db_user, settings.db_name, out.write, received
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
                    before = await stack.run_state(db)
                    await files("postgres")
                    # A copy of a data directory the database wrote into is no backup: see
                    # that nothing (dockerd's restart policy, a user) started it meanwhile.
                    if await stack.run_state(db) != before:
                        raise StackError(
                            f"{db} was started while its data directory was being copied (a restart "
                            "policy, or someone ran it): the cold copy is not cold, nothing was "
                            "committed; run again, or use --stop app"
                        )
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

    max_downtime = settings.max_downtime

    def downtime_limit() -> StallError | None:
        if max_downtime and guard.down and guard.downtime > max_downtime:
            return StallError(
                f"Immich was down for {guard.downtime:.0f} s, past --max-downtime "
                f"{max_downtime:g} s: the stack was started again and nothing was committed"
            )
        return None

    await with_watchdog(store, settings.stall_timeout, work(), downtime_limit)
    downtime = guard.downtime

    assert dump_result is not None
    check_shrink_at_end(stats, parent, settings.max_shrink, allow_shrink)
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
        "files": {k: v for k, v in asdict(stats).items() if k not in ("problems", "roots")},
        "root_totals": stats.roots,
        "shrink_allowed": shrunk,
        "problems": stats.problems,
        "manifest": {"key": f"snapshots/{snap_id}/manifest.jsonl.gz", "lines": manifest.lines},
        "database": {
            "key": f"snapshots/{snap_id}/database.sql.gz",
            "name": settings.db_name,
            "size": dump_result.raw_bytes,
            "compressed_size": dump_result.gz_bytes,
            "sha256": dump_result.raw_sha256,
            "compressed_sha256": dump_result.gz_sha256,
            "parts": dump_result.parts,
            "seconds": round(dump_result.seconds, 3),
        },
        "seconds": round(seconds, 3),
        "phase_seconds": phase_seconds,
        "downtime_seconds": round(downtime, 3),
        "unstable_containers": guard.unstable,
    }
    await lock.ensure_held()  # prune may have collected this run's uploads if we lost the lock
    await repo.commit(snap_id, summary)  # the commit point
    log.info("snapshot %s committed", snap_id)
    code = EXIT_OK if complete else EXIT_INCOMPLETE
    if guard.unstable:
        code = EXIT_UNSTABLE
    return BackupResult(snap_id, stats, dump_result, seconds, downtime, mode, code, summary, shrunk, guard.unstable)
