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
import functools
import logging
import os
import socket
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from immich_stream import __version__, cleanup, metadata
from immich_stream.budget import ByteBudget
from immich_stream.changes import ParentInfo, Source, decide, followed, scan_parent, walk_filter
from immich_stream.config import Settings, format_size
from immich_stream.errors import AfterCommitError, ImmichStreamError, StackError, StallError, StoreError
from immich_stream.hoststate import stack_lock, state_dir
from immich_stream.library import check_database, check_database_at_end, check_library, check_shrink_at_end
from immich_stream.postgres import DumpResult, dump_database
from immich_stream.progress import Phase, Reporter
from immich_stream.repo import (
    STOPPED_DIR,
    JournalWriter,
    ManifestLine,
    ManifestWriter,
    ObjectIndex,
    Repo,
    new_snapshot_id,
    snapshot_time,
)
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
    finished; a line whose file could not be read is dropped. Lines of files read in this
    pass also go to the journal (what an interrupted run leaves for the next one)."""

    def __init__(self, sink: LineSink | None, journal: LineSink | None = None, window: int = ORDER_WINDOW) -> None:
        self.sink = sink
        self.journal = journal
        self._queue: asyncio.Queue[tuple[ManifestLine, asyncio.Future[bool] | None] | None] = asyncio.Queue(window)

    async def put(self, line: ManifestLine, upload: asyncio.Future[bool] | None = None) -> None:
        await self._queue.put((line, upload))

    async def close(self) -> None:
        await self._queue.put(None)

    async def run(self) -> None:
        while (item := await self._queue.get()) is not None:
            line, upload = item
            if upload is not None and not await upload:
                continue
            if self.sink is not None:
                await self.sink.add(line)
            if upload is not None and self.journal is not None:
                await self.journal.add(line)


@dataclass
class Sources:
    """Where one pass may take objects from instead of reading files: the parent snapshot,
    this run's live pass and interrupted runs (each read alongside the walk), the parent's
    vanished files (moves), and the bucket's listing."""

    primary: Source | None
    others: list[Source]
    parent: ParentInfo | None
    objects: ObjectIndex
    resumed: set[str] = field(default_factory=set)  # ids of the interrupted runs among others
    key_dir: str = ""  # where this pass's uploads go under <root>/ (STOPPED_DIR after a live pass)

    def moved(self, root: str, line: ManifestLine) -> ManifestLine | None:
        return self.parent.moved_from(root, line) if self.parent is not None else None


async def walk_root(
    root: str,
    root_path: Path,
    snap_id: str,
    repo: Repo,
    sources: Sources,
    workers: UploadWorkers,
    ordered: OrderedManifest,
    stats: RunStats,
    phase: Phase,
    exclude: Collection[str] = (),
) -> None:
    """The walker and the change classifier: every entry becomes a manifest line (in walk
    order); a file whose object cannot simply be reused goes to the upload workers.
    `exclude`: the library's folders left out (--exclude), their markers kept."""
    root_b = os.fsencode(root_path)
    own = f"data/{snap_id}/"

    def on_problem(p: WalkProblem) -> None:
        if p.skipped:
            stats.skipped += 1  # the walk already warned
        else:
            stats.failed += 1
            stats.problem(f"{root}/{p.relpath.decode(errors='backslashreplace')}: {p.message}")

    async for e in walk(root_b, on_problem, *walk_filter(root, exclude), followed(root)):
        repo.store.touch()  # walking unchanged files is progress too
        line = ManifestLine.from_entry(root, e)
        upload: asyncio.Future[bool] | None = None
        if e.type == "file":
            stats.count_file(root, e.size)
            decision = await decide(
                line,
                sources.primary,
                sources.others,
                functools.partial(sources.moved, root),
                sources.objects.has,
                own,
                sources.resumed,
            )
            if decision.action == "reuse":
                assert decision.source is not None
                line.key, line.sha256, line.stored = decision.source.key, decision.source.sha256, decision.source.stored
                if line.stored is not None and line.key:  # re-sealed by an interrupted `key reencrypt`?
                    line.stored = sources.objects.size_of(line.key, line.stored) or line.stored
                setattr(stats, decision.kind, getattr(stats, decision.kind) + 1)
                if decision.kind == "resumed":
                    # in this run's journal too: a run that resumed another and is itself
                    # interrupted must not lose what it took over
                    upload = asyncio.get_running_loop().create_future()
                    upload.set_result(True)
                phase.update(e.size, files=1)  # done without reading: progress toward the total
            else:
                if decision.gone is not None and stats.reuploaded < MAX_REUPLOAD_WARNINGS:
                    log.warning(
                        "%s/%s: its object %s is missing from the bucket: uploading it again",
                        root,
                        line.path,
                        decision.gone.key,
                    )
                key = repo.data_key(snap_id, root, line.path, sources.key_dir)
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
    sources: Sources,
    ordered: OrderedManifest,
    stats: RunStats,
    phase: Phase,
    jobs: int,
    exclude: Collection[str] = (),
) -> None:
    """One root through the stages: walk and classify, upload, write lines in order."""
    workers = UploadWorkers(uploader, stats, phase, jobs)

    async def produce() -> None:
        await walk_root(root, root_path, snap_id, uploader.repo, sources, workers, ordered, stats, phase, exclude)
        await workers.close()
        await ordered.close()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce())
        tg.create_task(ordered.run())
        tg.create_task(workers.run())


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


async def run_phases(mode: str, steps: Steps, live: bool = True) -> None:
    """The order of a run per --stop mode (DESIGN.md, docs/architecture.md).

    `all` and `app` first upload what changed while Immich runs (the live pass), then stop
    it for a pass that re-reads only what changed since. `all` copies the data directory
    cold and walks the library with everything stopped, then starts the database and
    pg_dump, and starts the app again once pg_dump holds its snapshot (its first bytes)
    while the dump streams on. `app` keeps the database up and dumps while the library is
    walked. `none` stops nothing; the walk starts once pg_dump holds its snapshot
    (Immich's order: the database's state before the files')."""
    if mode in ("all", "app") and live:
        await steps.live_pass()
    if mode == "all":
        await steps.stop_apps()
        await steps.stop_db()
        await steps.files("postgres")
        await steps.check_cold()
        await steps.files("library")
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
            await steps.dump_snapshot()
            await steps.start_all()
    else:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(steps.dump())
            await steps.dump_snapshot()
            await steps.files("library")
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
        earlier: Earlier,
    ) -> None:
        self.settings = settings
        self.reporter = reporter
        self.docker = docker
        self.stack = stack
        self.repo = repo
        self.roots = roots
        self.snap_id = snap_id
        self.running = running
        self.earlier = earlier
        self.started = time.monotonic()
        self.stats = RunStats()
        self.live_stats: RunStats | None = None
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
        self.phase_seconds: dict[str, float] = {}
        self.timeline: dict[str, float] = {}
        self._main_sources: Sources | None = None
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
        sources = self.sources(own_live=False)
        try:
            for root, path in self.roots.items():
                phase = self._phase(f"{root} files (live)", root)
                try:
                    await backup_root(
                        root,
                        path,
                        self.snap_id,
                        uploader,
                        sources,
                        OrderedManifest(None, journal),
                        stats,
                        phase,
                        self.settings.jobs,
                        self.settings.exclude,
                    )
                finally:
                    self.phase_seconds[phase.name] = round(phase.seconds, 3)
                    phase.close()
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
        if self._main_sources is None:
            self._main_sources = self.sources(own_live=True)
            if self.live_journal is not None:
                self._main_sources.key_dir = STOPPED_DIR
        self.mark(f"{root}_files_started")
        phase = self._phase(f"{root} files", root)
        try:
            await backup_root(
                root,
                self.roots[root],
                self.snap_id,
                self.uploader,
                self._main_sources,
                OrderedManifest(self.manifest, self.journal),
                self.stats,
                phase,
                self.settings.jobs,
                self.settings.exclude,
            )
        finally:
            self.phase_seconds[phase.name] = round(phase.seconds, 3)
            phase.close()
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
            async with StreamWriter(store, self.repo.dump_key(self.snap_id), self.stream_budget, s.part_size) as out:
                result = await dump_database(self.docker, s.db_container, s.db_user, s.db_name, out.write, received)
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
                    await run_phases(self.settings.stop, self, self.settings.live_pass)
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
                raise _interrupted_after_commit(snap_id) from None
            return result


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
    if settings.stop != "none":
        await stack.check_recovery_record(state_dir())  # before the live pass: nothing stopped or uploaded
    source = await metadata.collect(docker, settings)  # images, versions, config files: for drill and rebuild
    prev = await repo.latest()
    parent = await scan_parent(repo, prev.id, roots, settings.exclude) if prev else None
    # Before anything is stopped: an unmounted or emptied library must not become the
    # newest snapshot.
    shrunk = await check_library(roots["library"], parent, settings.max_shrink, allow_shrink, settings.exclude)
    # The same for the database: an emptied or re-initialised one (a fresh Immich) must
    # not become the newest snapshot either.
    parent_tables = prev.summary.database.tables if prev else None
    if prev is not None:
        shrunk |= await check_database(
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
    # Reused objects are checked against one listing: a lifecycle rule or a manual cleanup
    # must not leave every later snapshot pointing at nothing.
    objects = await ObjectIndex.load(repo)
    resumable = await resumable_runs(repo, snap_id, settings.stale_after)
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
        settings,
        reporter,
        docker,
        stack,
        repo,
        roots,
        snap_id,
        running=[c.name for c in containers if c.running],
        earlier=Earlier(prev.id if prev else None, parent, resumable, objects),
    )
    run.dump_estimate = prev.summary.database.size if prev else None
    lock = repo.lock

    def limits() -> ImmichStreamError | None:
        # a lost lock stops the run at once: it could not commit, and the stack may be down
        return (lock.lost() if lock is not None else None) or run.downtime_limit()

    await with_watchdog(repo.store, settings.stall_timeout, run.transfer(), limits)

    check_shrink_at_end(run.stats.roots, parent, settings.max_shrink, allow_shrink)
    if prev is not None and run.dump_result is not None:
        shrunk |= check_database_at_end(
            run.dump_result.tables, parent_tables, prev.id, settings.max_shrink, allow_shrink
        )
    seconds = time.monotonic() - started
    summary = run.summary(seconds, shrunk, prev.id if prev else None)
    metadata.record(summary, source, run.dump_result)
    assert repo.lock is not None and run.dump_result is not None
    await repo.lock.ensure_held()  # prune may have collected this run's uploads if we lost the lock
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
