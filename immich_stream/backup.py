"""`backup`: preflight, stop, stream files and pg_dump into S3, start, commit.

The stages (restic's archiver, in asyncio), each its own unit:

    walk_root (walk + classify)  --files to read-->  UploadWorkers (upload.py)
         |                                                 |
         +--every line, in walk order--> OrderedManifest <-+ (a line waits for its upload)
                                               |
                                         ManifestWriter (repo.py)

run_phases orders the stack's stops and starts around them per --stop mode; BackupRun
holds one run's state and is what run_phases drives. Memory is bounded by the queues
(entries) and the ByteBudget (buffers), whatever the library size.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from immich_stream import __version__, cleanup
from immich_stream.budget import ByteBudget
from immich_stream.changes import ParentInfo, PrevCursor, classify, scan_parent
from immich_stream.config import Settings
from immich_stream.errors import AfterCommitError, StackError, StallError
from immich_stream.hoststate import stack_lock
from immich_stream.library import check_library, check_shrink_at_end
from immich_stream.postgres import DumpResult, dump_database
from immich_stream.progress import Phase, Reporter
from immich_stream.repo import ManifestLine, ManifestWriter, ObjectIndex, Repo, new_snapshot_id
from immich_stream.session import LockSpec, open_repo
from immich_stream.stack import Stack, StackGuard, connect, recover
from immich_stream.store import StreamWriter
from immich_stream.summary import DatabaseInfo, ManifestInfo, RootMeta, RunStats, SnapshotSummary
from immich_stream.upload import FileUploader, UploadWorkers
from immich_stream.walk import WalkProblem, walk
from immich_stream.watchdog import with_watchdog

log = logging.getLogger(__name__)

ORDER_WINDOW = 4096  # manifest lines waiting for their upload, at most
MAX_REUPLOAD_WARNINGS = 20


@dataclass
class BackupResult:
    snapshot_id: str
    stats: RunStats
    dump: DumpResult
    seconds: float
    downtime: float
    mode: str
    summary: SnapshotSummary
    shrunk: bool = False  # the library looked shrunk and --allow-shrink let it through
    unstable: list[str] = field(default_factory=list)  # containers that did not stay up after the restart


class LineSink(Protocol):
    async def add(self, line: ManifestLine) -> None: ...


class OrderedManifest:
    """Manifest lines in walk order: each waits (in a bounded window) until its upload has
    finished; a line whose file could not be read is dropped."""

    def __init__(self, sink: LineSink, window: int = ORDER_WINDOW) -> None:
        self.sink = sink
        self._queue: asyncio.Queue[tuple[ManifestLine, asyncio.Future[bool] | None] | None] = asyncio.Queue(window)

    async def put(self, line: ManifestLine, upload: asyncio.Future[bool] | None = None) -> None:
        await self._queue.put((line, upload))

    async def close(self) -> None:
        await self._queue.put(None)

    async def run(self) -> None:
        while (item := await self._queue.get()) is not None:
            line, upload = item
            if upload is None or await upload:
                await self.sink.add(line)


async def walk_root(
    root: str,
    root_path: Path,
    snap_id: str,
    repo: Repo,
    prev: PrevCursor,
    parent: ParentInfo | None,
    objects: ObjectIndex,
    workers: UploadWorkers,
    ordered: OrderedManifest,
    stats: RunStats,
    phase: Phase,
) -> None:
    """The walker and the change classifier: every entry becomes a manifest line (in walk
    order); a file whose object cannot simply be reused goes to the upload workers."""
    root_b = os.fsencode(root_path)

    def on_problem(p: WalkProblem) -> None:
        if p.skipped:
            stats.skipped += 1  # the walk already warned
        else:
            stats.failed += 1
            stats.problem(f"{root}/{p.relpath.decode(errors='backslashreplace')}: {p.message}")

    async for e in walk(root_b, on_problem):
        repo.store.touch()  # walking unchanged files is progress too
        line = ManifestLine.from_entry(root, e)
        upload: asyncio.Future[bool] | None = None
        if e.type == "file":
            stats.count_file(root, e.size)
            old = await prev.find(line)
            moved = parent.moved_from(root, line) if parent is not None and old is None else None
            decision = classify(line, old, moved, objects.has)
            if decision.action == "reuse":
                assert decision.source is not None
                line.key, line.sha256 = decision.source.key, decision.source.sha256
                stats.unchanged += 1
                phase.update(e.size, files=1)  # done without reading: progress toward the total
            else:
                if decision.kind == "reuploaded" and old is not None and stats.reuploaded < MAX_REUPLOAD_WARNINGS:
                    log.warning(
                        "%s/%s: its object %s is missing from the bucket: uploading it again", root, line.path, old.key
                    )
                key = repo.data_key(snap_id, root, line.path)
                upload = await workers.submit(os.path.join(root_b, e.relpath), e, line, key, decision)
        elif e.type == "dir":
            stats.dirs += 1
        else:
            stats.symlinks += 1
        await ordered.put(line, upload)


async def backup_root(
    root: str,
    root_path: Path,
    snap_id: str,
    uploader: FileUploader,
    prev: PrevCursor,
    parent: ParentInfo | None,
    objects: ObjectIndex,
    manifest: LineSink,
    stats: RunStats,
    phase: Phase,
    jobs: int,
) -> None:
    """One root through the stages: walk and classify, upload, write lines in order."""
    workers = UploadWorkers(uploader, stats, phase, jobs)
    ordered = OrderedManifest(manifest)

    async def produce() -> None:
        await walk_root(root, root_path, snap_id, uploader.repo, prev, parent, objects, workers, ordered, stats, phase)
        await workers.close()
        await ordered.close()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce())
        tg.create_task(ordered.run())
        tg.create_task(workers.run())


class Steps(Protocol):
    """What run_phases orders: BackupRun in a backup, a recorder in the unit tests."""

    async def stop_apps(self) -> None: ...
    async def stop_db(self) -> None: ...
    async def files(self, root: str) -> None: ...
    async def check_cold(self) -> None: ...
    async def start_db(self) -> None: ...
    async def dump(self) -> None: ...
    async def start_all(self) -> None: ...


async def run_phases(mode: str, steps: Steps) -> None:
    """The order of a run per --stop mode (DESIGN.md): `all` copies the data directory
    cold, then dumps and walks the library with only the database up; `app` keeps the
    database up throughout; `none` stops nothing and dumps first (Immich's advice)."""
    if mode == "all":
        await steps.stop_apps()
        await steps.stop_db()
        await steps.files("postgres")
        await steps.check_cold()
        await steps.start_db()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(steps.dump())
            tg.create_task(steps.files("library"))
    elif mode == "app":
        await steps.stop_apps()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(steps.dump())
            tg.create_task(steps.files("library"))
    else:
        await steps.dump()
        await steps.files("library")
    await steps.start_all()


def stream_budget_share(max_memory: int, part_size: int) -> int:
    """The streams' part of --max-memory: a quarter, and at least a part for each of the two."""
    return max(2 * part_size, max_memory // 4)


class BackupRun:
    """One run's state: the stages' shared parts, the stack guard, what the summary needs."""

    def __init__(
        self,
        settings: Settings,
        reporter: Reporter,
        docker: Any,
        stack: Stack,
        repo: Repo,
        roots: dict[str, Path],
        snap_id: str,
        running: list[str],
        prev: PrevCursor,
        parent: ParentInfo | None,
        objects: ObjectIndex,
    ) -> None:
        self.settings = settings
        self.reporter = reporter
        self.docker = docker
        self.stack = stack
        self.repo = repo
        self.roots = roots
        self.snap_id = snap_id
        self.running = running
        self.prev = prev
        self.parent = parent
        self.objects = objects
        self.stats = RunStats()
        # Two budgets: a stream (the dump, the manifest) holds a part reserved while it fills,
        # and the manifest fills only as files finish. Sharing one budget, a large file
        # could wait for memory the manifest holds while the manifest waits for that file.
        stream_share = stream_budget_share(settings.max_memory, settings.part_size)
        self.stream_budget = ByteBudget(stream_share)
        self.budget = ByteBudget(max(settings.max_memory - stream_share, settings.part_size))
        self.uploader = FileUploader(repo.store, repo, self.budget, settings, self.stats)
        self.manifest = ManifestWriter(repo.store, repo.manifest_key(snap_id), self.stream_budget, settings.part_size)
        self.guard = StackGuard(stack)
        self.dump_result: DumpResult | None = None
        self.phase_seconds: dict[str, float] = {}
        self._db_state: Any = None
        self.dump_estimate: int | None = None
        reporter.downtime = lambda: self.guard.downtime if self.guard.down else None

    # -- the steps run_phases orders -------------------------------------------------------

    async def stop_apps(self) -> None:
        await self.guard.stop([n for n in self.running if n != self.settings.db_container])

    async def stop_db(self) -> None:
        db = self.settings.db_container
        await self.guard.stop([db])
        self._db_state = await self.stack.run_state(db)
        if self._db_state[0]:
            raise StackError(
                f"{db} is running again right after it was stopped (a restart policy, or someone "
                "started it): no cold copy can be taken; nothing was committed; use --stop app"
            )

    async def check_cold(self) -> None:
        # A copy of a data directory the database wrote into is no backup: see that
        # nothing (dockerd's restart policy, a user) started it meanwhile.
        db = self.settings.db_container
        if await self.stack.run_state(db) != self._db_state:
            raise StackError(
                f"{db} was started while its data directory was being copied (a restart "
                "policy, or someone ran it): the cold copy is not cold, nothing was "
                "committed; run again, or use --stop app"
            )

    async def start_db(self) -> None:
        await self.guard.start([self.settings.db_container])
        await self.stack.wait_db_ready(self.settings.db_user)

    async def files(self, root: str) -> None:
        p = self.parent  # its totals are the estimate; without one, a stat-only walk counts ahead
        known = p is not None and root in p.files
        phase = self.reporter.phase(
            f"{root} files",
            p.bytes.get(root) if p else None,
            p.files.get(root) if p else None,
            None if known else self.roots[root],
        )
        try:
            await backup_root(
                root,
                self.roots[root],
                self.snap_id,
                self.uploader,
                self.prev,
                self.parent,
                self.objects,
                self.manifest,
                self.stats,
                phase,
                self.settings.jobs,
            )
        finally:
            self.phase_seconds[phase.name] = round(phase.seconds, 3)
            phase.close()

    async def dump(self) -> None:
        s, store = self.settings, self.repo.store
        phase = self.reporter.phase("database dump", self.dump_estimate)  # bytes of SQL, as last time

        def received(n: int) -> None:
            store.touch()  # dump bytes received are progress, as are bytes acknowledged
            phase.update(n)

        try:
            async with StreamWriter(store, self.repo.dump_key(self.snap_id), self.stream_budget, s.part_size) as out:
                result = await dump_database(self.docker, s.db_container, s.db_user, s.db_name, out.write, received)
                await out.finish()
            result.parts = out.parts
            self.dump_result = result
        finally:
            self.phase_seconds[phase.name] = round(phase.seconds, 3)
            phase.close()

    async def start_all(self) -> None:
        await self.guard.restore()

    # -- the whole transfer ---------------------------------------------------------------

    async def transfer(self) -> None:
        """The phases with the stack guarded (always started again), then the manifest's end."""
        async with self.manifest:
            async with self.guard:
                await run_phases(self.settings.stop, self)
            await self.manifest.finish()

    def downtime_limit(self) -> StallError | None:
        limit = self.settings.max_downtime
        if limit and self.guard.down and self.guard.downtime > limit:
            return StallError(
                f"Immich was down for {self.guard.downtime:.0f} s, past --max-downtime "
                f"{limit:g} s: the stack was started again and nothing was committed"
            )
        return None

    def summary(self, seconds: float, shrunk: bool, prev_id: str | None) -> SnapshotSummary:
        d = self.dump_result
        assert d is not None
        rel = self.repo.relative_key
        return SnapshotSummary(
            id=self.snap_id,
            time=dt.datetime.now(dt.UTC).isoformat(),
            host=socket.gethostname(),
            version=__version__,
            mode=self.settings.stop,
            parent=prev_id,
            roots={r: str(p) for r, p in self.roots.items()},
            root_meta={r: _root_meta(p) for r, p in self.roots.items()},
            complete=self.stats.failed == 0,
            files=self.stats.counts(),
            root_totals=self.stats.roots,
            shrink_allowed=shrunk,
            problems=self.stats.problems.kept,
            manifest=ManifestInfo(rel(self.repo.manifest_key(self.snap_id)), self.manifest.lines),
            database=DatabaseInfo(
                key=rel(self.repo.dump_key(self.snap_id)),
                name=self.settings.db_name,
                size=d.raw_bytes,
                compressed_size=d.gz_bytes,
                sha256=d.raw_sha256,
                compressed_sha256=d.gz_sha256,
                parts=d.parts,
                seconds=round(d.seconds, 3),
            ),
            seconds=round(seconds, 3),
            phase_seconds=self.phase_seconds,
            downtime_seconds=round(self.guard.downtime, 3),
            unstable_containers=self.guard.unstable,
        )


def _root_meta(path: Path) -> RootMeta:
    st = os.stat(path)
    return RootMeta(mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns)


def backup_roots(settings: Settings) -> dict[str, Path]:
    """The roots of this mode, in manifest order: the cold copy of the data directory first."""
    library = settings.require_dir("library_dir")
    if settings.stop != "all":
        return {"library": library}
    postgres = settings.require_dir("postgres_dir")
    if postgres in library.parents or library in postgres.parents or postgres == library:
        log.warning("library_dir and postgres_dir overlap: files under both are stored twice")
    return {"postgres": postgres, "library": library}


async def run_backup(settings: Settings, reporter: Reporter, allow_shrink: bool = False) -> BackupResult:
    started = time.monotonic()
    settings.require("bucket")
    roots = backup_roots(settings)
    snap_id = new_snapshot_id()
    # Two backups of one stack on one host never overlap (the kernel drops the flock of a
    # killed run); runs elsewhere and prune are kept apart by the repository lock.
    with stack_lock(settings.project):
        async with connect() as docker:
            stack = Stack(docker, settings.project, settings.db_container)
            # A run killed with the stack down is repaired first, whatever else happens.
            if await recover(stack):
                log.info("the Immich stack left stopped by the earlier run is running again")
            lock = LockSpec("backup", exclusive=False, wait=settings.lock_wait, run=snap_id)
            result: BackupResult | None = None
            try:
                async with open_repo(settings, create_for=snap_id, lock=lock) as repo:
                    result = await _backup_locked(
                        settings, reporter, docker, stack, repo, roots, snap_id, started, allow_shrink
                    )
            except asyncio.CancelledError:
                if result is None:
                    raise
                # A signal while the lock was being released: the snapshot stands.
                raise AfterCommitError(
                    f"snapshot {snap_id} committed, then interrupted by "
                    f"{cleanup.signal_name() or 'a signal'} while finishing"
                ) from None
            return result


async def _backup_locked(
    settings: Settings,
    reporter: Reporter,
    docker: Any,
    stack: Stack,
    repo: Repo,
    roots: dict[str, Path],
    snap_id: str,
    started: float,
    allow_shrink: bool,
) -> BackupResult:
    containers = await stack.preflight()
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
        repo.store.bucket,
        settings.prefix,
        settings.stop,
        prev.id if prev else "none",
    )
    run = BackupRun(
        settings,
        reporter,
        docker,
        stack,
        repo,
        roots,
        snap_id,
        running=[c.name for c in containers if c.running],
        prev=PrevCursor(repo.read_manifest(prev.id) if prev else None),
        parent=parent,
        objects=objects,
    )
    run.dump_estimate = prev.summary.database.size if prev else None
    await with_watchdog(repo.store, settings.stall_timeout, run.transfer(), run.downtime_limit)

    check_shrink_at_end(run.stats.roots, parent, settings.max_shrink, allow_shrink)
    seconds = time.monotonic() - started
    summary = run.summary(seconds, shrunk, prev.id if prev else None)
    assert repo.lock is not None and run.dump_result is not None
    await repo.lock.ensure_held()  # prune may have collected this run's uploads if we lost the lock
    await repo.commit(summary)  # the commit point
    log.info("snapshot %s committed", snap_id)
    return BackupResult(
        snap_id,
        run.stats,
        run.dump_result,
        seconds,
        run.guard.downtime,
        settings.stop,
        summary,
        shrunk,
        run.guard.unstable,
    )
