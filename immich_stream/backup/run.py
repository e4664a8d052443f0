"""`backup`: preflight, stop, stream files and pg_dump into S3, start, commit.

run_backup builds one RunContext (what the run is given: settings, reporter, stack,
repository, roots, snapshot id) and passes it down. The files stages of a pass are in
roots.py (FilesPass: walk and classify, upload, lines in order). run_phases orders the
stack's stops and starts around them per --stop mode; BackupRun holds one run's state and
is what run_phases drives.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from immich_stream import __version__, cleanup
from immich_stream.backup.changes import ParentInfo, Source, WalkedLibrary, scan_parent
from immich_stream.backup.externals import check_externals, find_roots
from immich_stream.backup.library import (
    check_database,
    check_database_at_end,
    check_library,
    check_shrink_at_end,
    library_walk,
)
from immich_stream.backup.roots import FilesPass, OrderedManifest, Sources
from immich_stream.backup.upload import FileUploader
from immich_stream.browse.catalog import CatalogBuilder
from immich_stream.browse.catalog_store import store_catalog
from immich_stream.config import Settings, format_size
from immich_stream.errors import AfterCommitError, ImmichStreamError, StackError, StallError, StoreError
from immich_stream.host import metadata
from immich_stream.host.hoststate import stack_lock, state_dir
from immich_stream.host.postgres import DumpResult, dump_database
from immich_stream.host.stack import Stack, StackGuard, connect, find_containers, postgres_volume_dir, recover
from immich_stream.progress import Phase, Reporter
from immich_stream.repository.layout import STOPPED_DIR, is_external, new_snapshot_id, snapshot_time
from immich_stream.repository.locks import RepoLock
from immich_stream.repository.manifest import Chunk, ManifestWriter
from immich_stream.repository.repo import JournalWriter, ObjectIndex, Repo, Snapshot
from immich_stream.repository.retention import secure_snapshot
from immich_stream.repository.session import LockSpec, open_locked
from immich_stream.repository.summary import DatabaseInfo, ImmichInfo, ManifestInfo, RootMeta, RunStats, SnapshotSummary
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.watchdog import with_watchdog

log = logging.getLogger(__name__)


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


class Steps(Protocol):
    """What run_phases orders: BackupRun in a backup, a recorder in the unit tests."""

    async def live_pass(self) -> None: ...
    async def stop_apps(self) -> None: ...
    async def stop_db(self) -> None: ...
    async def files(self, root: str) -> None: ...
    async def check_cold(self) -> None: ...
    async def start_db(self) -> None: ...
    async def dump(self) -> None: ...
    async def dump_snapshot(self) -> None: ...
    async def start_all(self) -> None: ...


async def run_phases(mode: str, steps: Steps, live: bool = True, externals: Sequence[str] = ()) -> None:
    """The order of a run per --stop mode (DESIGN.md, docs/architecture.md).

    `all` and `app` first upload what changed while Immich runs (the live pass), then stop
    it for a pass that re-reads only what changed since. `all` copies the data directory
    cold and walks the library with everything stopped, then starts the database and
    pg_dump, and starts the app again once pg_dump holds its snapshot (its first bytes)
    while the dump streams on. `app` keeps the database up and dumps while the library is
    walked. `none` stops nothing; the walk starts once pg_dump holds its snapshot
    (Immich's order: the database's state before the files'). The external libraries'
    roots (`externals`) follow the library wherever it is walked."""
    if mode in ("all", "app") and live:
        await steps.live_pass()
    if mode == "all":
        await steps.stop_apps()
        await steps.stop_db()
        await steps.files("postgres")
        await steps.check_cold()
        await steps.files("library")
        for root in externals:
            await steps.files(root)
        await steps.start_db()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(steps.dump())
            await steps.dump_snapshot()
            await steps.start_all()
    elif mode == "app":
        await steps.stop_apps()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(steps.dump())
            await steps.files("library")
            for root in externals:
                await steps.files(root)
            await steps.dump_snapshot()
            await steps.start_all()
    else:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(steps.dump())
            await steps.dump_snapshot()
            await steps.files("library")
            for root in externals:
                await steps.files(root)
        await steps.start_all()


def stream_budget_share(max_memory: int, part_size: int) -> int:
    """The streams' part of --max-memory: a quarter, and at least a part for each of the two."""
    return max(2 * part_size, max_memory // 4)


@dataclass
class Earlier:
    """What a run may reuse, opened afresh for each pass (a cursor is read once): the parent
    snapshot's manifest and the journals interrupted runs left."""

    parent_id: str | None
    parent: ParentInfo | None
    resumable: dict[str, dict[str, list[str]]]  # run id -> pass -> journal keys
    objects: ObjectIndex


@dataclass
class RunContext:
    """What one backup run is given, built once by run_backup and passed down. The Docker
    client is the stack's (`stack.docker`), handed only to host/ functions."""

    settings: Settings
    reporter: Reporter
    stack: Stack
    repo: Repo
    roots: dict[str, Path]  # in manifest order (backup_roots)
    snap_id: str
    started: float  # time.monotonic() when the command started
    allow_shrink: bool = False


class BackupRun:
    """One run's state: the stages' shared parts, the stack guard, what the summary needs."""

    def __init__(self, ctx: RunContext, running: list[str], earlier: Earlier) -> None:
        self.ctx = ctx
        settings, reporter, stack, repo, snap_id = ctx.settings, ctx.reporter, ctx.stack, ctx.repo, ctx.snap_id
        self.settings, self.reporter, self.stack, self.repo = settings, reporter, stack, repo
        self.roots, self.snap_id = ctx.roots, snap_id
        self.running = running
        self.earlier = earlier
        self.started = time.monotonic()  # the timeline's zero: the transfer's start
        self.stats = RunStats()
        self.live_stats: RunStats | None = None
        self.chunks: dict[str, tuple[Chunk, asyncio.Future[None] | None]] = {}  # stored by this run (packs.Packing)
        # Two budgets: a stream (the dump, the manifest) holds a part reserved while it fills,
        # and the manifest fills only as files finish. Sharing one budget, a large file
        # could wait for memory the manifest holds while the manifest waits for that file.
        stream_share = stream_budget_share(settings.max_memory, settings.part_size)
        self.stream_budget = ByteBudget(stream_share)
        self.budget = ByteBudget(max(settings.max_memory - stream_share, settings.part_size))
        self.uploader = FileUploader(repo.store, repo, self.budget, settings, self.stats)
        self.manifest = ManifestWriter(
            repo.store, repo.manifest_key(snap_id), self.stream_budget, settings.part_size, repo.manifest_mac(snap_id)
        )
        self.journal = JournalWriter(repo, snap_id, "main")
        self.live_journal: JournalWriter | None = None
        # After a live pass the stopped pass uploads under <root>/%stopped/: it never
        # overwrites an object the live pass wrote (a journal line vouches for those bytes).
        self.key_dir = ""
        self.guard = StackGuard(stack)
        self.dump_result: DumpResult | None = None
        # the Immich catalog, read as the dump streams: its rows kept until it is written, at
        # most --max-memory of them (memory stays a multiple of the budget whatever the library:
        # past it no catalog is stored, and `find` builds one from the dump when asked)
        self.catalog = CatalogBuilder(ctx.settings.db_name, max_kept=ctx.settings.max_memory)
        self.phase_seconds: dict[str, float] = {}
        self.timeline: dict[str, float] = {}
        self._main_pass: FilesPass | None = None
        self._dump_snapshot = asyncio.Event()
        self._db_state: Any = None
        self.dump_estimate: int | None = None
        reporter.downtime = lambda: self.guard.downtime if self.guard.down else None

    def mark(self, name: str) -> None:
        self.timeline.setdefault(name, round(time.monotonic() - self.started, 3))

    def sources(self, own_live: bool) -> Sources:
        """Fresh cursors over everything this pass may reuse, best first."""
        e, repo = self.earlier, self.repo
        primary = Source.of_run(repo.read_manifest(e.parent_id), e.parent_id) if e.parent_id else None
        others = []
        if own_live and self.live_journal is not None and self.live_journal.chunks:
            keys = [repo.journal_key(self.snap_id, "live", n) for n in range(self.live_journal.chunks)]
            lines = repo.read_journal(keys, f"this run's live journal ({self.snap_id})")
            others.append(Source.of_run(lines, self.snap_id, checked=False))
        for run_id, passes in e.resumable.items():
            for name, keys in passes.items():
                lines = repo.read_journal(keys, f"the {name} journal of the interrupted run {run_id}")
                others.append(Source.of_run(lines, run_id, kind="resumed"))
        return Sources(primary, others, e.parent, e.objects, set(e.resumable))

    def _files_pass(self, uploader: FileUploader, sources: Sources, stats: RunStats) -> FilesPass:
        return FilesPass(self.snap_id, uploader, sources, stats, self.settings.jobs, self.settings.exclude, self.chunks)

    async def _root(self, files: FilesPass, root: str, name: str, ordered: OrderedManifest) -> None:
        """One root of a pass under its own progress bar."""
        phase = self._phase(name, root)
        try:
            await files.root(root, self.roots[root], ordered, phase)
        finally:
            self.phase_seconds[phase.name] = round(phase.seconds, 3)
            phase.close()

    def _phase(self, name: str, root: str) -> Phase:
        """A progress bar with a total: the parent's, or a stat-only walk that counts ahead."""
        p = self.earlier.parent
        known = p is not None and root in p.files
        return self.reporter.phase(
            name,
            p.bytes.get(root) if p else None,
            p.files.get(root) if p else None,
            None if known else self.roots[root],
            self.settings.exclude if root == "library" else (),
        )

    # -- the steps run_phases orders -------------------------------------------------------

    async def live_pass(self) -> None:
        """Upload what changed while Immich runs: the stopped pass then re-reads only what
        changed after this pass read it. Nothing of it is in the snapshot but through the
        stopped pass; its reads and problems are its own."""
        self.mark("live_pass_started")
        stats = RunStats()
        self.live_stats = stats
        journal = JournalWriter(self.repo, self.snap_id, "live")
        self.live_journal = journal
        uploader = FileUploader(self.repo.store, self.repo, self.budget, self.settings, stats)
        files = self._files_pass(uploader, self.sources(own_live=False), stats)
        try:
            for root in self.roots:
                await self._root(files, root, f"{root} files (live)", OrderedManifest(None, journal))
        except BaseException:
            # What was uploaded is kept for the next run.
            await cleanup.best_effort("writing the live pass's journal", journal.flush())
            raise
        await journal.flush()  # the stopped pass reads it back
        self.mark("live_pass_done")
        log.info(
            "live pass: %d of %d files read, %s uploaded while Immich ran; stopping it for the rest",
            stats.files - stats.unchanged,
            stats.files,
            format_size(stats.bytes_uploaded),
        )

    async def stop_apps(self) -> None:
        self.mark("stop_started")
        await self.guard.stop([n for n in self.running if n != self.settings.db_container])
        self.mark("apps_stopped")

    async def stop_db(self) -> None:
        db = self.settings.db_container
        await self.guard.stop([db])
        self._db_state = await self.stack.run_state(db)
        if self._db_state[0]:
            raise StackError(
                f"{db} is running again right after it was stopped (a restart policy, or someone "
                "started it): no cold copy can be taken; nothing was committed; use --stop app"
            )
        self.mark("db_stopped")

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
        self.mark("db_starting")
        await self.guard.start([self.settings.db_container])
        await self.stack.wait_db_ready(self.settings.db_user)

    async def files(self, root: str) -> None:
        """The pass whose lines make the snapshot (with the stack stopped, but in `none`)."""
        if self._main_pass is None:
            sources = self.sources(own_live=True)
            if self.live_journal is not None:
                sources.key_dir = STOPPED_DIR
            self._main_pass = self._files_pass(self.uploader, sources, self.stats)
        self.mark(f"{root}_files_started")
        await self._root(self._main_pass, root, f"{root} files", OrderedManifest(self.manifest, self.journal))
        self.mark(f"{root}_files_done")

    async def dump(self) -> None:
        s, store = self.settings, self.repo.store
        phase = self.reporter.phase("database dump", self.dump_estimate)  # bytes of SQL, as last time

        def received(n: int) -> None:
            store.touch()  # dump bytes received are progress, as are bytes acknowledged
            if n and not self._dump_snapshot.is_set():
                # pg_dump writes nothing before it has taken its snapshot and its locks
                self.mark("dump_snapshot")
                self._dump_snapshot.set()
            phase.update(n)

        self.mark("dump_started")
        try:
            async with store.stream(self.repo.dump_key(self.snap_id), self.stream_budget, s.part_size) as out:
                result = await dump_database(
                    self.stack.docker,
                    s.db_container,
                    s.db_user,
                    s.db_name,
                    out.write,
                    received,
                    self.catalog.feed_safely,
                )
                await out.finish()
            result.parts, result.stored = out.parts, out.stored
            self.dump_result = result
        finally:
            self.phase_seconds[phase.name] = round(phase.seconds, 3)
            phase.close()
        self.mark("dump_done")
        self._dump_snapshot.set()

    async def dump_snapshot(self) -> None:
        """Until pg_dump holds its snapshot: the database's state is then fixed."""
        await self._dump_snapshot.wait()

    async def start_all(self) -> None:
        await self.guard.restore()
        if self.guard.started_at is not None:  # the start call, not the stay-up check after it
            self.timeline.setdefault("stack_started", round(self.guard.started_at - self.started, 3))
        self.mark("stack_started")

    # -- the whole transfer ---------------------------------------------------------------

    async def transfer(self) -> None:
        """The phases with the stack guarded (always started again), then the manifest's end.
        On a failure the journal's last lines are written: the next run resumes from there."""
        try:
            async with self.manifest:
                async with self.guard:
                    await run_phases(
                        self.settings.stop, self, self.settings.live_pass, [r for r in self.roots if is_external(r)]
                    )
                await self.manifest.finish()
        except BaseException:
            await cleanup.best_effort("writing the run's journal", self.journal.flush())
            raise

    def downtime_limit(self) -> StallError | None:
        limit = self.settings.max_downtime
        if limit and self.guard.down and self.guard.downtime > limit:
            return StallError(
                f"Immich was down for {self.guard.downtime:.0f} s, past --max-downtime "
                f"{limit:g} s: the stack was started again and nothing was committed; what was "
                "uploaded is kept, and the next run goes on from there"
            )
        return None

    def downtime(self) -> dict[str, float]:
        """Where the downtime went, from the timeline: stop, data directory, stopped pass,
        database start (until pg_dump held its snapshot), start."""
        t = self.timeline
        if "stop_started" not in t:
            return {}
        stopped = t.get("db_stopped", t.get("apps_stopped", t["stop_started"]))
        pg_done = t.get("postgres_files_done", stopped)
        lib_done = t.get("library_files_done", pg_done)
        ready = max(t.get("dump_snapshot", lib_done), lib_done)
        end = t.get("stack_started", ready)
        return {
            "stop": round(stopped - t["stop_started"], 3),
            "data_directory": round(pg_done - stopped, 3),
            "stopped_pass": round(lib_done - pg_done, 3),
            "database_start": round(ready - lib_done, 3),
            "start": round(end - ready, 3),
        }

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
                stored_size=d.stored,
                parts=d.parts,
                seconds=round(d.seconds, 3),
            ),
            seconds=round(seconds, 3),
            phase_seconds=self.phase_seconds,
            downtime_seconds=round(self.guard.downtime, 3),
            downtime=self.downtime(),
            live_files=self.live_stats.counts() if self.live_stats is not None else None,
            timeline=self.timeline,
            unstable_containers=self.guard.unstable,
            excluded=list(self.settings.exclude),
        )


def record_source(summary: SnapshotSummary, source: metadata.SourceInfo, dump: DumpResult | None) -> None:
    """Put what a restore needs into the summary (before it is committed): where the
    snapshot came from (host/metadata.py's collect) and the dump's facts."""
    db = summary.database
    db.image, db.image_id = source.database.image, source.database.image_id
    if dump is not None:
        db.tables = dict(dump.tables)
        db.server_version, db.server_version_num = dump.server.version, dump.server.version_num
        db.extensions = dict(dump.server.extensions)
    im = source.immich
    summary.immich = ImmichInfo(
        version=im.version,
        image=im.image,
        image_id=im.image_id,
        env_version=im.env_version,
        container=im.container,
        dump_job=source.dump_job,
    )
    summary.config_files = source.config_files
    summary.config_secrets = source.config_secrets


def _root_meta(path: Path) -> RootMeta:
    st = os.stat(path)
    return RootMeta(mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns)


MAX_RESUMED_RUNS = 3


async def resumable_runs(repo: Repo, snap_id: str, stale_after: float) -> dict[str, dict[str, list[str]]]:
    """The journals of the newest runs that never committed (killed, failed, stalled, past
    --max-downtime) and are not yet stale: their uploads are reused when the file is
    unchanged, so a first backup interrupted at 80% does not start again from zero."""
    threshold = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=stale_after)
    runs: dict[str, dict[str, list[str]]] = {}
    dirs = await repo.snapshot_dirs()
    for sid in sorted((s for s, done in dirs.items() if not done and s != snap_id), reverse=True):
        if len(runs) >= MAX_RESUMED_RUNS:
            break
        # stale by its newest chunk, as prune judges it: a first backup running for longer
        # than --stale-after before it was killed is still resumed
        passes, newest = await repo.journal_info(sid)
        if passes and (newest is None or newest >= threshold or snapshot_time(sid) >= threshold):
            runs[sid] = passes
    return runs


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
    if settings.stop == "all" and settings.postgres_dir is None and settings.postgres_volume is not None:
        async with connect(settings.tuning.docker_deadline) as docker:  # DB_DATA_LOCATION is a named volume
            await postgres_volume_dir(docker, settings)
    roots = backup_roots(settings)
    snap_id = new_snapshot_id()
    # Two backups of one stack on one host never overlap (the kernel drops the flock of a
    # killed run); runs elsewhere and prune are kept apart by the repository lock.
    with stack_lock(settings.project):
        async with connect(settings.tuning.docker_deadline) as docker:
            await find_containers(docker, settings)
            stack = Stack(docker, settings.project, settings.db_container)
            # A run killed with the stack down is repaired first, whatever else happens.
            if await recover(stack):
                log.info("the Immich stack left stopped by the earlier run is running again")
            lock = LockSpec("backup", exclusive=False, wait=settings.lock_wait, run=snap_id)
            result: BackupResult | None = None
            try:
                async with open_locked(settings, lock, create_for=snap_id) as (repo, held):
                    ctx = RunContext(settings, reporter, stack, repo, roots, snap_id, started, allow_shrink)
                    result = await _backup_locked(ctx, held)
            except asyncio.CancelledError:
                if result is None:
                    raise
                # A signal while the lock was being released: the snapshot stands.
                raise _interrupted_after_commit(snap_id) from None
            return result


async def _check_library(ctx: RunContext, prev: Snapshot | None) -> tuple[bool, ParentInfo | None]:
    """Before anything is stopped: an unmounted or emptied library must not become the
    newest snapshot. One walk of the library, merged with the parent's manifest, says
    which of the parent's files may have vanished (only those are looked up on disk) and
    counts it for the shrink check. (shrunk but allowed, the parent's facts)"""
    settings, roots = ctx.settings, ctx.roots
    if prev is None:
        return await check_library(
            roots["library"], None, settings.max_shrink, ctx.allow_shrink, settings.exclude
        ), None
    # Every file lstat'ed (a walk of names only is 1.6 CPU s less at 300,000 files): a library
    # whose files were cut short in place must be refused before Immich is stopped, not after.
    library = WalkedLibrary(library_walk(roots["library"], settings.exclude))
    counting: asyncio.Task[tuple[int, int]] | None = None
    try:
        parent = await scan_parent(ctx.repo, prev.id, roots, settings.exclude, library)
        counting = asyncio.create_task(library.count())
        shrunk = await check_library(
            roots["library"], parent, settings.max_shrink, ctx.allow_shrink, settings.exclude, counting
        )
        return shrunk, parent
    finally:
        if counting is not None:  # not needed (no parent files), or the scan failed
            await _settle([counting])
        await library.aclose()


async def _settle(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel what is still running of tasks whose answers are no longer needed (a check
    before them failed), wait for them, and retrieve their errors (raised already, or moot)."""
    for t in tasks:
        t.cancel()
    await asyncio.wait(tasks)  # an outer cancel still propagates
    for t in tasks:
        if not t.cancelled():
            t.exception()


def _interrupted_after_commit(snap_id: str) -> AfterCommitError:
    return AfterCommitError(
        f"snapshot {snap_id} committed, then interrupted by {cleanup.signal_name() or 'a signal'} while finishing"
    )


async def _committed(repo: Repo, snap_id: str) -> bool:
    """Is snapshot.json in the bucket? (Bounded; False when S3 cannot say.)"""
    try:
        async with asyncio.timeout(cleanup.STEP):
            return await repo.store.head(repo.summary_key(snap_id)) is not None
    except (TimeoutError, StoreError):
        return False


async def _backup_locked(ctx: RunContext, lock: RepoLock) -> BackupResult:
    settings, stack, repo, snap_id, allow_shrink = ctx.settings, ctx.stack, ctx.repo, ctx.snap_id, ctx.allow_shrink
    docker, roots = stack.docker, ctx.roots
    containers = await stack.preflight()
    if settings.stop != "none":
        await stack.check_recovery_record(state_dir())  # before the live pass: nothing stopped or uploaded
    prev = await repo.latest()
    # Immich's external libraries: read from the live database, before anything is stopped
    roots.update(await find_roots(docker, settings, roots, list(prev.summary.roots) if prev else []))
    parent_tables = prev.summary.database.tables if prev else None

    async def database_shrunk() -> bool:
        # The same for the database: an emptied or re-initialised one (a fresh Immich) must
        # not become the newest snapshot either.
        if prev is None:
            return False
        return await check_database(
            docker,
            settings.db_container,
            settings.db_user,
            settings.db_name,
            parent_tables,
            prev.id,
            settings.max_shrink,
            allow_shrink,
            settings.stall_timeout,
        )

    # Docker's and S3's answers are awaited beside the parent's scan (the CPU's work, 1-3 s
    # at 300,000 files), not one after the other; the verdicts come in the order they had.
    collecting = asyncio.create_task(metadata.collect(docker, settings))  # images, versions, config files
    checking_db = asyncio.create_task(database_shrunk())
    # Reused objects are checked against one listing: a lifecycle rule or a manual cleanup
    # must not leave every later snapshot pointing at nothing.
    listing = asyncio.create_task(ObjectIndex.load(repo))
    resuming = asyncio.create_task(resumable_runs(repo, snap_id, settings.stale_after))
    try:
        shrunk, parent = await _check_library(ctx, prev)
        shrunk |= await check_externals(roots, parent, settings.max_shrink, allow_shrink)
        shrunk |= await checking_db
        objects, resumable, source = await listing, await resuming, await collecting
    finally:
        await _settle([collecting, checking_db, listing, resuming])
    log.info(
        "backup %s of %s to s3://%s/%s (stop: %s, previous snapshot: %s%s)",
        snap_id,
        ", ".join(f"{r} {p}" for r, p in roots.items()),
        repo.store.bucket,
        settings.prefix,
        settings.stop,
        prev.id if prev else "none",
        f"; resuming the uploads of {', '.join(resumable)}" if resumable else "",
    )
    if settings.exclude:
        log.info("leaving out the library's %s (--exclude): markers only", ", ".join(settings.exclude))
    run = BackupRun(
        ctx,
        running=[c.name for c in containers if c.running],
        earlier=Earlier(prev.id if prev else None, parent, resumable, objects),
    )
    run.dump_estimate = prev.summary.database.size if prev else None

    def limits() -> ImmichStreamError | None:
        # a lost lock stops the run at once: it could not commit, and the stack may be down
        return lock.lost() or run.downtime_limit()

    await with_watchdog(repo.store, settings.stall_timeout, run.transfer(), limits)
    # the stack runs again: no downtime
    catalog = await store_catalog(repo, snap_id, run.catalog, source.config_files)

    check_shrink_at_end(run.stats.roots, parent, settings.max_shrink, allow_shrink)
    if prev is not None and run.dump_result is not None:
        shrunk |= check_database_at_end(
            run.dump_result.tables, parent_tables, prev.id, settings.max_shrink, allow_shrink
        )
    seconds = time.monotonic() - ctx.started
    summary = run.summary(seconds, shrunk, prev.id if prev else None)
    record_source(summary, source, run.dump_result)
    if catalog is not None:
        summary.extra["catalog"] = catalog  # docs/format.md, "The Immich catalog"
    assert run.dump_result is not None
    if repo.lock is not None:  # --lock-days: what the snapshot reuses is retained long enough too
        summary.lock = await secure_snapshot(repo, snap_id, prev, settings.jobs)
    await lock.ensure_held()  # prune may have collected this run's uploads if we lost the lock
    try:
        await repo.commit(summary)  # the commit point
    except asyncio.CancelledError:
        # A signal while snapshot.json was on its way: what the bucket holds decides.
        if await _committed(repo, snap_id):
            raise _interrupted_after_commit(snap_id) from None
        raise
    log.info("snapshot %s committed", snap_id)
    try:
        # The journals served their purpose: the manifest holds it all now (prune removes
        # them if this fails).
        await cleanup.best_effort("removing the run's journal", repo.delete_journals(snap_id))
    except asyncio.CancelledError:
        raise _interrupted_after_commit(snap_id) from None
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
