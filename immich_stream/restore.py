"""`restore`: files of a snapshot into a directory, or its database into the container.

Files: concurrent, bounded downloads, each written to a temporary name beside its target
and renamed into place only after its size and sha256 match the manifest. Files already
in place with the right size and sha256 are skipped, so an interrupted restore is simply
run again. Manifest paths are never trusted: nothing is written outside the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker

from immich_stream.budget import ByteBudget
from immich_stream.config import Settings
from immich_stream.docker_exec import pipe_into
from immich_stream.errors import ConfigError, DumpError, RepoError, StackError
from immich_stream.hoststate import stack_lock
from immich_stream.metadata import came_from as came_from_text
from immich_stream.postgres import (
    CLUSTER_DUMP,
    DumpScanner,
    SearchPathFix,
    check_target,
    ensure_database,
    psql_restore_command,
    read_head,
)
from immich_stream.problems import Problems
from immich_stream.progress import Phase, Reporter
from immich_stream.repo import ROOTS, ManifestLine, Repo, Snapshot, gunzip_stream, key_digest, unescape_path
from immich_stream.session import open_repo
from immich_stream.stack import Stack, StackGuard, connect, recover
from immich_stream.store import CHUNK_SHARED, SMALL_FACTOR, SMALL_OBJECT, Store
from immich_stream.thaw import archived_digests, thaw
from immich_stream.watchdog import s3_hang, with_watchdog

log = logging.getLogger(__name__)

MARKER = ".immich-stream-restore"  # in the target while a restore is unfinished
PARTIAL = ".immich-stream-partial"
CHUNK = 1 << 20


@dataclass
class RestoreStats:
    files: int = 0
    restored: int = 0
    skipped: int = 0  # already in place
    dirs: int = 0
    symlinks: int = 0
    bytes_downloaded: int = 0
    failed: int = 0
    problems: Problems = field(default_factory=Problems)
    seconds: float = 0.0


@dataclass
class DatabaseRestored:
    bytes: int  # of SQL sent to psql
    seconds: float
    downtime: float  # the app containers were stopped this long


class UnsafePath(RepoError):
    """A manifest path that would write outside the target: stops the whole restore."""


def safe_relpath(line: ManifestLine) -> bytes:
    """The line's path, refused if it could point outside the target."""
    raw = line.relpath
    if not raw or b"\x00" in raw or raw.startswith(b"/") or any(part in (b"", b".", b"..") for part in raw.split(b"/")):
        raise UnsafePath(
            f"refusing manifest path {line.path!r} in root {line.root}: absolute, '..', empty or NUL "
            "components; the manifest is damaged or forged"
        )
    if line.root not in ROOTS:
        raise UnsafePath(f"refusing manifest root {line.root!r}: not one of {', '.join(ROOTS)}")
    return raw


def _matches(line: ManifestLine, roots: set[str], includes: list[str]) -> bool:
    if line.root not in roots:
        return False
    if not includes:
        return True
    path = line.relpath.decode("utf-8", "surrogateescape")
    return any(fnmatch.fnmatchcase(path, g) for g in includes)


def _mark_target(target: Path, snap_id: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    (target / MARKER).write_text(json.dumps({"snapshot": snap_id}) + "\n")


def _check_target(target: Path, snap: Snapshot, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ConfigError(f"restore target {target} is not a directory: choose a directory")
    if not target.exists():
        return
    entries = [e for e in os.listdir(target) if e != MARKER]
    if not entries or overwrite:
        return
    marker = target / MARKER
    if marker.exists():
        try:
            previous = json.loads(marker.read_text()).get("snapshot")
        except (OSError, ValueError):
            previous = None
        if previous == snap.id:
            log.info("resuming the unfinished restore of %s into %s", snap.id, target)
            return
        raise ConfigError(
            f"{target} holds an unfinished restore of snapshot {previous}: restore that one, or add --overwrite"
        )
    raise ConfigError(f"restore target {target} is not empty: choose an empty directory or add --overwrite")


class FileRestorer:
    def __init__(
        self,
        store: Store,
        repo: Repo,
        target: Path,
        single_root: bool,
        stats: RestoreStats,
        phase: Phase,
        budget: ByteBudget,
    ) -> None:
        self.store = store
        self.repo = repo
        self.target = os.fsencode(target)
        self.single_root = single_root
        self.stats = stats
        self.phase = phase
        self.budget = budget
        self.as_root = os.geteuid() == 0
        self.real_target = os.path.realpath(self.target)

    def makedirs(self, path: bytes) -> None:
        """mkdir -p, refusing to go through a symlink out of the target (a forged
        manifest could put `a -> /etc` before `a/passwd`)."""
        existing = path
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        real = os.path.realpath(existing)  # checked before anything is created below it
        if real != self.real_target and not real.startswith(self.real_target + b"/"):
            raise UnsafePath(
                f"refusing to write under {os.fsdecode(path)}: it leads out of the restore target "
                "through a symlink; the manifest is damaged or forged"
            )
        os.makedirs(path, 0o755, exist_ok=True)

    def dest(self, line: ManifestLine) -> bytes:
        rel = safe_relpath(line)
        if self.single_root:
            return os.path.join(self.target, rel)
        return os.path.join(self.target, line.root.encode(), rel)

    def _meta_fd(self, fd: int, line: ManifestLine) -> None:
        # Through the open descriptor: never through a symlink put in the file's place.
        if self.as_root:
            with contextlib.suppress(OSError):
                os.fchown(fd, line.uid, line.gid)
        os.fchmod(fd, line.mode)  # after chown, which clears setuid bits
        os.utime(fd, ns=(line.mtime_ns, line.mtime_ns))

    def set_meta(self, path: bytes, line: ManifestLine) -> None:
        """Owner, mode and mtime of a directory in place; a symlink there is refused, not followed."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._meta_fd(fd, line)
        finally:
            os.close(fd)

    def in_place(self, path: bytes, line: ManifestLine) -> bool:
        """True when path already holds exactly this file (a regular file of that size and
        sha256); its owner, mode and mtime are then set. Blocking: run it in a thread."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: replaced by the file, never read through
                return False
            raise
        with open(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != line.size:
                return False
            h = hashlib.sha256()
            while chunk := fh.read(CHUNK):
                h.update(chunk)
            if h.hexdigest() != line.sha256:
                return False
            self._meta_fd(fd, line)
            return True

    @staticmethod
    def create_partial(path: bytes) -> tuple[int, bytes]:
        """A temporary file beside path, created exclusively and never through a symlink.
        Its name carries a digest of the whole name (two long names sharing a prefix do not
        collide) and is the same on every run, so a resumed restore reuses what a killed one
        left. Whatever holds that name (a leftover, or a manifest entry named like it) is
        unlinked first: never opened, never followed."""
        directory, name = os.path.split(path)
        tag = hashlib.sha256(name).hexdigest()[:16].encode()
        partial = os.path.join(directory, b"." + name[:150] + b"." + tag + PARTIAL.encode())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(partial, flags, 0o600), partial

    def open_target(self, path: bytes, line: ManifestLine) -> tuple[int, bytes] | None:
        """Everything before a download, in one trip to a worker thread: the directory, the
        check for the file already in place (None), the partial file with its final size
        allocated (a fragmented or half-full disk shows now, not at the end)."""
        self.makedirs(os.path.dirname(path))
        if self.in_place(path, line):
            return None
        if line.key is None or line.sha256 is None:
            raise RepoError(f"manifest line {line.root}/{line.path} has no object key: the manifest is damaged")
        fd, partial = self.create_partial(path)
        if line.size > 0:
            try:
                os.posix_fallocate(fd, 0, line.size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    os.close(fd)
                    os.unlink(partial)
                    raise
        return fd, partial

    @staticmethod
    def write_hashed(fd: int, data: memoryview, h: Any) -> None:
        """Hash and write a piece of a download (in the thread that received it: see
        Store.download; hashlib and os.write give the GIL up while they work)."""
        h.update(data)
        while data:
            data = data[os.write(fd, data) :]

    def finish_file(self, fd: int, partial: bytes, path: bytes, line: ManifestLine, h: Any, size: int) -> None:
        """The size and sha256 checked against the manifest, owner, mode and mtime set, the
        file renamed into place, in one trip to a worker thread. Closes fd, whatever happens."""
        assert line.sha256 is not None
        try:
            if size != line.size or h.hexdigest() != line.sha256:
                raise RepoError(
                    f"object {line.key} does not match its manifest line ({size} bytes, sha256 "
                    f"{h.hexdigest()[:12]}..., expected {line.size} and {line.sha256[:12]}...): "
                    "run `verify --read-data`"
                )
            self._meta_fd(fd, line)
        finally:
            os.close(fd)
        os.replace(partial, path)  # a symlink at path is replaced, not followed

    async def file(self, line: ManifestLine) -> None:
        path = self.dest(line)
        opened = await asyncio.to_thread(self.open_target, path, line)
        if opened is None:
            self.stats.skipped += 1
            self.phase.update(line.size, files=1)
            return
        assert line.key is not None and line.sha256 is not None
        fd, partial = opened
        h = hashlib.sha256()
        size = 0

        def sink(data: memoryview) -> None:
            nonlocal size
            self.write_hashed(fd, data, h)
            size += len(data)

        # the download's receive buffer (the data goes from it to the file)
        held = min(max(line.size, 1), CHUNK_SHARED)
        try:
            await self.budget.acquire(held)
            try:
                await self.store.download(
                    self.repo.object_key(line.key), sink, line.size, small=line.size <= SMALL_OBJECT
                )
            finally:
                await asyncio.shield(self.budget.release(held))
                self.stats.bytes_downloaded += size
                self.phase.update(size)
            owned, fd = fd, -1  # finish_file closes it
            await asyncio.to_thread(self.finish_file, owned, partial, path, line, h, size)
        except BaseException:
            if fd >= 0:
                os.close(fd)  # Store.download returned: nothing writes to it any more
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
        self.stats.restored += 1
        self.phase.update(0, files=1)

    async def symlink(self, line: ManifestLine) -> None:
        path = self.dest(line)
        raw_target = unescape_path(line.target or "")

        def make() -> None:
            self.makedirs(os.path.dirname(path))
            with contextlib.suppress(FileNotFoundError):
                if os.path.islink(path) or os.path.isfile(path):
                    os.unlink(path)
            os.symlink(raw_target, path)
            if self.as_root:
                with contextlib.suppress(OSError):
                    os.chown(path, line.uid, line.gid, follow_symlinks=False)
            os.utime(path, ns=(line.mtime_ns, line.mtime_ns), follow_symlinks=False)

        await asyncio.to_thread(make)
        self.stats.symlinks += 1


async def restore_files(
    settings: Settings,
    reporter: Reporter,
    which: str,
    target: Path,
    roots: list[str] | None,
    includes: list[str],
    overwrite: bool,
    wait: bool = True,
) -> tuple[Snapshot, RestoreStats]:
    started = time.monotonic()
    stats = RestoreStats()
    budget = ByteBudget(settings.max_memory)
    async with open_repo(settings) as repo:
        store = repo.store
        snap = await repo.resolve(which)
        _check_target(target, snap, overwrite)
        wanted = set(roots or ROOTS)
        # before the target is marked: a --no-wait run leaves nothing behind to resume
        await _thaw_needed(repo, snap, settings, reporter, wanted, includes, wait)
        await asyncio.to_thread(_mark_target, target, snap.id)
        everything = not includes and wanted >= set(snap.summary.roots)
        total = (snap.summary.files.bytes_total or None) if everything else None
        phase = reporter.phase("restore files", total)
        restorer = FileRestorer(store, repo, target, roots is not None and len(roots) == 1, stats, phase, budget)
        dirs: list[ManifestLine] = []
        # Small files are round trips more than bytes (two thumbnails per photo): SMALL_FACTOR
        # times as many of them at once; a larger file holds one of --jobs slots.
        workers = settings.jobs * SMALL_FACTOR
        large = asyncio.Semaphore(settings.jobs)
        queue: asyncio.Queue[ManifestLine | None] = asyncio.Queue(workers * 2)

        async def produce() -> None:
            async for line in repo.read_manifest(snap.id):
                if not _matches(line, wanted, includes):
                    continue
                restorer.dest(line)  # refuses unsafe paths before anything is written for them
                if line.type == "dir":
                    dirs.append(line)  # modes and mtimes once their contents are written
                    await asyncio.to_thread(restorer.makedirs, restorer.dest(line))
                    stats.dirs += 1
                elif line.type == "symlink":
                    await restorer.symlink(line)
                else:
                    stats.files += 1
                    await queue.put(line)
            for _ in range(workers):
                await queue.put(None)

        def problem(line: ManifestLine, exc: Exception) -> None:
            stats.failed += 1
            stats.problems.add(f"{line.root}/{line.path}: {exc}")

        async def work() -> None:
            while (line := await queue.get()) is not None:
                try:
                    if line.size <= SMALL_OBJECT:
                        await restorer.file(line)
                    else:
                        async with large:
                            await restorer.file(line)
                except UnsafePath:
                    raise
                except (RepoError, OSError) as exc:
                    problem(line, exc)

        async def transfer() -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(produce())
                for _ in range(workers):
                    tg.create_task(work())

        try:
            # A frozen S3 must not keep a restore alive for hours of timeouts and retries.
            await with_watchdog(
                repo.store,
                math.inf,
                transfer(),
                s3_hang(repo.store, settings.stall_timeout, "the restore stopped; the same command resumes it"),
            )
        finally:
            phase.close()
        for line in reversed(dirs):  # deepest first: setting a parent's mtime is the last touch
            try:
                await asyncio.to_thread(restorer.set_meta, restorer.dest(line), line)
            except OSError as exc:  # e.g. a symlink in the directory's place (refused, not followed)
                problem(line, exc)
        for root, meta in snap.summary.root_meta.items():
            if root in wanted and root in ROOTS:
                where = target if restorer.single_root else target / root
                if where.is_dir() and not where.is_symlink():
                    line = ManifestLine(root, "", "dir", 0, meta.mtime_ns, meta.mode, meta.uid, meta.gid, 0)
                    await asyncio.to_thread(restorer.set_meta, os.fsencode(where), line)
        if stats.failed == 0:
            (target / MARKER).unlink(missing_ok=True)
    stats.seconds = time.monotonic() - started
    return snap, stats


async def _thaw_needed(
    repo: Repo, snap: Snapshot, settings: Settings, reporter: Reporter, roots: set[str], includes: list[str], wait: bool
) -> None:
    """Thaw the archived objects (GLACIER, DEEP_ARCHIVE) this restore will download, before
    any download starts (see thaw.py); one listing of data/ when none is archived."""
    archived = await archived_digests(repo)
    if not archived:
        return
    needed: dict[bytes, str] = {}
    async for line in repo.read_manifest(snap.id):
        if line.type == "file" and line.key is not None and _matches(line, roots, includes):
            d = key_digest(line.key)
            if d in archived:
                needed.setdefault(d, repo.object_key(line.key))
    await thaw(repo.store, needed.values(), settings, reporter, wait)


async def snapshot_sql(store: Store, repo: Repo, snap: Snapshot) -> AsyncGenerator[bytes, None]:
    """The snapshot's dump as SQL; raises at its end unless the gzip ended properly and the
    SQL matched snapshot.json's size and sha256 (so a COMMIT after it is never sent)."""
    key = repo.dump_key(snap.id)
    db = snap.summary.database
    expected_sha, expected_size = db.sha256, db.size
    if not expected_sha:
        raise RepoError(
            f"snapshot {snap.id} records no sha256 of its database dump: snapshot.json is damaged; "
            "use --dump-to to inspect the dump"
        )
    h = hashlib.sha256()
    size = 0
    async for data in gunzip_stream(store.iter_object(key)):  # raises when the gzip is corrupt or ends early
        h.update(data)
        size += len(data)
        yield data
    if h.hexdigest() != expected_sha or (expected_size is not None and size != expected_size):
        raise RepoError(
            f"{key} does not match snapshot.json ({size} bytes of SQL, sha256 {h.hexdigest()[:12]}..., "
            f"expected {expected_size} and {expected_sha[:12]}...): the database was not changed; "
            "run `verify --read-data`"
        )


DUMP_COMPLETE = b"-- PostgreSQL database dump complete"
CLUSTER_COMPLETE = b"-- PostgreSQL database cluster dump complete"
TRAILER_SPAN = 4096  # pg_dump 17.6+ writes a \\unrestrict line after its closing comment


async def file_sql(path: str) -> AsyncGenerator[bytes, None]:
    """SQL from a file or stdin (`-`), gzip-compressed or plain (told by its first bytes)."""
    fh = os.fdopen(os.dup(0), "rb") if path == "-" else None
    try:
        if fh is None:
            try:
                fh = await asyncio.to_thread(open, path, "rb")
            except OSError as exc:
                raise ConfigError(f"--from-file {path}: {exc.strerror}: give a readable dump file") from None

        async def raw() -> AsyncGenerator[bytes, None]:
            assert fh is not None
            while chunk := await asyncio.to_thread(fh.read, CHUNK):
                yield chunk

        chunks = raw()
        first = await anext(chunks, b"")
        if not first:
            raise ConfigError(f"--from-file {path} is empty: give a pg_dump or pg_dumpall file")

        async def whole() -> AsyncGenerator[bytes, None]:
            yield first
            async for chunk in chunks:
                yield chunk

        stream = gunzip_stream(whole()) if first[:2] == b"\x1f\x8b" else whole()
        head = tail = b""
        async for data in stream:
            if len(head) < TRAILER_SPAN:
                head += data[: TRAILER_SPAN - len(head)]
            tail = (tail + data)[-TRAILER_SPAN:]
            yield data
        # A dump cut short (at a statement boundary, gzipped or not) is still valid SQL:
        # only pg_dump's own closing line tells it is whole. Raising here, before the
        # COMMIT, rolls the restore back.
        cluster = CLUSTER_DUMP in head
        closing = CLUSTER_COMPLETE if cluster else DUMP_COMPLETE
        if closing not in tail:
            # a pg_dumpall cannot be one transaction (CREATE DATABASE): what it ran stays
            outcome = (
                "what it held was restored up to the cut: restore the whole dump again"
                if cluster
                else "the database was not changed (rolled back): give the whole dump"
            )
            raise DumpError(
                f"--from-file {path} ends without {'pg_dumpall' if cluster else 'pg_dump'}'s closing line "
                f'"{closing.decode()}": it was cut short; {outcome}'
            )
    finally:
        if fh is not None:
            fh.close()


def _quote_ident(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


class ClusterFix(SearchPathFix):
    """A pg_dumpall stream as Immich's documentation restores it (psql into `postgres`),
    less the two statements that always fail on the server it goes into: dropping and
    creating the role psql is connected as. Every other error stops the restore."""

    def __init__(self, user: str) -> None:
        super().__init__()
        role = _quote_ident(user).encode()
        self._skip = (b"\nDROP ROLE IF EXISTS " + role + b";\n", b"\nCREATE ROLE " + role + b";\n")

    def _fix(self, data: bytes) -> bytes:
        data = b"\n" + super()._fix(data)
        for line in self._skip:
            data = data.replace(line, b"\n")
        return data[1:]


async def psql_stream(
    sql: AsyncIterator[bytes], scanner: DumpScanner, user: str, log_missing: bool = True
) -> AsyncGenerator[bytes, None]:
    """SQL for psql with the search_path correction applied. A pg_dump goes in as one
    transaction: BEGIN first, COMMIT only once the whole SQL arrived and checked out
    (whatever stops it earlier leaves the transaction without COMMIT, and the server rolls
    it back when psql exits). A pg_dumpall cannot be one transaction (CREATE DATABASE,
    \\connect): it goes in as Immich documents it."""
    fix: SearchPathFix | None = None
    async for data in sql:
        if fix is None:  # the scanner has seen the dump's header by now (read_head)
            fix = ClusterFix(user) if scanner.cluster else SearchPathFix()
            if not scanner.cluster:
                yield b"BEGIN;\n"
        out = fix.feed(data)
        if out:
            yield out
    if fix is None:
        raise DumpError("the dump is empty: nothing was changed")
    tail = fix.flush()
    if tail:
        yield tail
    if fix.replaced == 0 and log_missing:
        log.warning("the dump had no search_path line to correct; restoring it as it is")
    if not scanner.cluster:
        yield b"\nCOMMIT;\n"  # a newline first: the dump's last line may lack one


async def dump_chunks(store: Store, repo: Repo, snap: Snapshot) -> AsyncGenerator[bytes, None]:
    """The snapshot's dump as one transaction for psql (see psql_stream)."""
    scanner = DumpScanner(snap.summary.database.name)
    async for chunk in psql_stream(await read_head(snapshot_sql(store, repo, snap), scanner), scanner, ""):
        yield chunk


async def prepare_dump(
    docker: aiodocker.Docker,
    container: str,
    user: str,
    dbname: str,
    sql: AsyncIterator[bytes],
    came_from: str,
    from_file: bool = False,
) -> tuple[DumpScanner, AsyncIterator[bytes]]:
    """Read the dump's head and refuse, before anything is changed, a target server that
    cannot take it. Returns the scanner (it counts the rows as the rest streams) and the
    whole SQL to send."""
    scanner = DumpScanner(dbname)
    whole = await read_head(sql, scanner)
    if from_file and not scanner.source_version and not scanner.copy_seen and not scanner.extensions:
        raise DumpError(
            f"{came_from} is not a pg_dump or pg_dumpall SQL dump (no header, no COPY; a custom-format "
            "dump needs pg_restore): nothing was changed"
        )
    await check_target(docker, container, user, scanner, came_from)
    return scanner, whole


async def restore_database(
    settings: Settings, reporter: Reporter, which: str, from_file: str | None = None
) -> tuple[Snapshot | None, DatabaseRestored]:
    """Stop the app containers, pipe the dump into psql in the database container, start them."""
    started = time.monotonic()
    if from_file is None:
        settings.require("bucket")
    # The host lock of backups: a restore and a backup never stop and start one stack at once.
    with stack_lock(settings.project):
        return await _restore_database_locked(settings, reporter, which, started, from_file)


async def _restore_database_locked(
    settings: Settings, reporter: Reporter, which: str, started: float, from_file: str | None = None
) -> tuple[Snapshot | None, DatabaseRestored]:
    async with connect() as docker, contextlib.AsyncExitStack() as exits:
        store: Store | None = None
        snap: Snapshot | None = None
        if from_file is None:
            repo = await exits.enter_async_context(open_repo(settings))
            store = repo.store
            snap = await repo.resolve(which)
            sql = snapshot_sql(store, repo, snap)
            came_from = f"snapshot {snap.id}" + (f": {cf}" if (cf := came_from_text(snap.summary)) else "")
        else:
            sql = file_sql(from_file)
            came_from = f"file {from_file}"
        exits.push_async_callback(sql.aclose)
        stack = Stack(docker, settings.project, settings.db_container)
        await stack.ping()
        # A backup killed with the stack down left a note of what it stopped: act on it
        # (start them) before this run's own stop and start would overwrite it.
        if await recover(stack):
            log.info("the Immich stack left stopped by an earlier run is running again")
        containers = await stack.containers()
        db = [c for c in containers if c.name == settings.db_container]
        if not db or not db[0].running:
            raise StackError(f"database container {settings.db_container!r} is not running: start it (only it) first")
        app = [c.name for c in containers if c.running and c.name != settings.db_container]
        phase = reporter.phase("restore database", snap.summary.database.size if snap else None)
        sent = 0

        guard = StackGuard(stack)

        async def work() -> None:
            nonlocal sent
            # Before anything is stopped: the dump's version and extensions against the server.
            scanner, whole = await prepare_dump(
                docker, settings.db_container, settings.db_user, settings.db_name, sql, came_from, from_file is not None
            )

            async def counted() -> AsyncGenerator[bytes, None]:
                nonlocal sent
                async with contextlib.aclosing(psql_stream(whole, scanner, settings.db_user)) as chunks:
                    async for chunk in chunks:
                        sent += len(chunk)
                        phase.update(len(chunk))
                        yield chunk

            async with guard:
                await guard.stop(app)
                dbname = settings.db_name
                if scanner.cluster:
                    dbname = "postgres"  # pg_dumpall drops and creates the databases itself
                else:
                    created = await ensure_database(docker, settings.db_container, settings.db_user, dbname)
                    if created:
                        log.info("created database %s", dbname)
                await pipe_into(
                    docker,
                    settings.db_container,
                    psql_restore_command(settings.db_user, dbname),
                    counted(),
                    "psql",
                )
                await guard.restore()

        try:
            if store is None:
                await work()
            else:
                # psql may rightly be silent for long (an index on a large table): only S3 not
                # answering for the stall timeout fails the restore (rolled back, apps started).
                hung = s3_hang(store, settings.stall_timeout, "the restore was rolled back and the stack started again")
                await with_watchdog(store, math.inf, work(), hung)
        finally:
            phase.close()
    return snap, DatabaseRestored(sent, time.monotonic() - started, guard.downtime)


async def write_config_files(settings: Settings, which: str, target: Path) -> tuple[Snapshot, list[Path], list[str]]:
    """The snapshot's recorded docker-compose.yml and .env into target (never over an
    existing file); returns the files written and the secrets left as placeholders."""
    async with open_repo(settings) as repo:
        snap = await repo.resolve(which)
    files = snap.summary.config_files
    if not files:
        raise RepoError(
            f"snapshot {snap.id} records no config files (made by an older version, or IMMICH_DIR was not "
            "set): take them from Immich's release page"
        )
    for name in files:
        if "/" in name or name in ("", ".", ".."):
            raise RepoError(f"snapshot {snap.id} records a config file named {name!r}: snapshot.json is damaged")

    def write() -> list[Path]:
        target.mkdir(parents=True, exist_ok=True)
        existing = [name for name in files if os.path.lexists(target / name)]
        if existing:
            raise ConfigError(f"{target} already holds {', '.join(existing)}: choose an empty directory")
        written = []
        for name, text in files.items():
            path = target / name
            # .env will hold DB_PASSWORD again: only its owner may read it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600 if name == ".env" else 0o644)
            with open(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            written.append(path)
        return written

    written = await asyncio.to_thread(write)
    return snap, written, snap.summary.config_secrets


async def dump_to(settings: Settings, which: str, dest: str) -> tuple[Snapshot, int]:
    """Write the snapshot's database.sql.gz, as stored, to a file or stdout; check its sha256."""
    async with open_repo(settings) as repo:
        store = repo.store
        snap = await repo.resolve(which)
        key = repo.dump_key(snap.id)
        h = hashlib.sha256()
        size = 0
        partial = None if dest == "-" else Path(dest + PARTIAL)
        fh = os.fdopen(os.dup(1), "wb") if partial is None else await asyncio.to_thread(partial.open, "wb")
        try:
            with fh:
                async for chunk in store.iter_object(key):
                    h.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(fh.write, chunk)
            expected = snap.summary.database.compressed_sha256
            if expected and h.hexdigest() != expected:
                raise RepoError(f"{key} does not match snapshot.json's sha256: run `verify --read-data`")
            if partial is not None:
                os.replace(partial, dest)
        except BaseException:
            if partial is not None:
                partial.unlink(missing_ok=True)
            raise
    return snap, size
