"""The files stages of one pass (restic's archiver, in asyncio), each its own unit:

    FilesPass.walk (walk + classify)  --files to read-->  UploadWorkers (upload.py)
         |                                                      |
         +--every line, in walk order--> OrderedManifest <------+ (a line waits for its upload)
                                               |
                                         ManifestWriter (repository)

Memory is bounded by the queues (entries) and the ByteBudget (buffers), whatever the
library size. run.py drives one FilesPass per pass (live, stopped) over the roots.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from immich_stream.backup.changes import Decision, NeedMore, ParentInfo, Source, decide_now, followed, walk_filter
from immich_stream.backup.upload import FileUploader, UploadWorkers
from immich_stream.backup.walk import Entry, WalkProblem, walk_batches
from immich_stream.progress import Phase
from immich_stream.repository.manifest import Chunk, ManifestLine
from immich_stream.repository.packs import PACK_MAX_BLOBS, Packing, PackWriter, pack_target
from immich_stream.repository.repo import ObjectIndex
from immich_stream.repository.summary import RunStats

log = logging.getLogger(__name__)

ORDER_WINDOW = 4 * PACK_MAX_BLOBS  # manifest lines waiting for their upload, at most
MAX_REUPLOAD_WARNINGS = 20
FULL_RETRY = 0.1  # seconds a full order window waits before handing gathered files on again


class LineSink(Protocol):
    async def add(self, line: ManifestLine) -> None: ...


class OrderedManifest:
    """Manifest lines in walk order: each waits (in a bounded window) until its upload has
    finished; a line whose file could not be read is dropped. Lines of files read in this
    pass also go to the journal (what an interrupted run leaves for the next one)."""

    def __init__(self, sink: LineSink | None, journal: LineSink | None = None, window: int = ORDER_WINDOW) -> None:
        self.sink = sink
        self.journal = journal
        # called when the window is full (PackWriter.flush): lines may be waiting for a pack
        # that only more lines would fill
        self.on_full: Callable[[], Awaitable[None]] | None = None
        self._queue: asyncio.Queue[tuple[ManifestLine, asyncio.Future[bool] | None] | None] = asyncio.Queue(window)

    async def put(self, line: ManifestLine, upload: asyncio.Future[bool] | None = None) -> None:
        item = (line, upload)
        while self._queue.full() and self.on_full is not None:
            # The line at the head may wait for a small file still gathered or being read,
            # then for the pack it went into, which only more files would fill: hand them
            # on again until the window moves (once was not enough: a night of a few new
            # thumbnails among unchanged files hung here).
            await self.on_full()
            try:
                await asyncio.wait_for(self._queue.put(item), FULL_RETRY)
                return
            except TimeoutError:
                continue
        await self._queue.put(item)

    def put_nowait(self, line: ManifestLine, upload: asyncio.Future[bool] | None = None) -> bool:
        """put() when the window has room (the usual case: no await per line); False when
        it is full and put() must wait."""
        if self._queue.full():
            return False
        self._queue.put_nowait((line, upload))
        return True

    async def close(self) -> None:
        await self._queue.put(None)

    async def run(self) -> None:
        queue = self._queue
        # the lines already waiting are taken without an await each
        while (item := queue.get_nowait() if not queue.empty() else await queue.get()) is not None:
            line, upload = item
            if upload is not None and not (upload.result() if upload.done() else await upload):
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


@dataclass
class FilesPass:
    """One pass over the roots (the live pass, or the pass whose lines make the snapshot):
    what the walk of every root in it shares. `exclude`: the library's folders left out
    (--exclude), their markers kept."""

    snap_id: str
    uploader: FileUploader
    sources: Sources
    stats: RunStats
    jobs: int
    exclude: Collection[str] = ()
    # the chunks this run stored so far, by sha256 (Packing): shared by the run's passes
    chunks: dict[str, tuple[Chunk, asyncio.Future[None] | None]] = field(default_factory=dict)

    async def root(self, root: str, root_path: Path, ordered: OrderedManifest, phase: Phase) -> None:
        """One root through the stages: walk and classify, upload (small files and the
        database's chunks into packs), write lines in order."""
        up = self.uploader
        writer = PackWriter(
            up.store,
            up.repo,
            self.snap_id,
            up.budget,
            pack_target(up.part_size, up.budget.limit),
            # as many packs in flight as --jobs (the budget bounds their memory): with four, one
            # connection's window each, 80 ms of round trip left a fifth of the link idle
            inflight=max(4, self.jobs),
            storage_class=up.store.options.storage_class_of(root),  # bundles billed in the root's class
        )
        parent_chunks = self.sources.parent.chunks if self.sources.parent is not None else {}
        packs = Packing(writer, parent_chunks, lambda key: self.sources.objects.has(key, None), self.chunks)
        workers = UploadWorkers(up, self.stats, phase, self.jobs, packs)
        ordered.on_full = workers.flush

        async def produce() -> None:
            await self.walk(root, root_path, workers, ordered, phase)
            await workers.close()

        async def upload() -> None:
            await workers.run()
            await writer.close()  # the last pack: the lines still waiting name it
            await ordered.close()

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(produce())
                tg.create_task(ordered.run())
                tg.create_task(upload())
        except BaseException:
            await asyncio.shield(writer.abort())
            raise
        self.stats.packs += writer.packs

    async def walk(
        self, root: str, root_path: Path, workers: UploadWorkers, ordered: OrderedManifest, phase: Phase
    ) -> None:
        """The walker and the change classifier: every entry becomes a manifest line (in walk
        order); a file whose object cannot simply be reused goes to the upload workers."""
        stats = self.stats
        root_b = os.fsencode(root_path)

        def on_problem(p: WalkProblem) -> None:
            if p.skipped:
                stats.skipped += 1  # the walk already warned
            else:
                stats.failed += 1
                stats.problem(f"{root}/{p.relpath.decode(errors='backslashreplace')}: {p.message}")

        entries = walk_batches(root_b, on_problem, *walk_filter(root, self.exclude), followed(root))
        async with contextlib.aclosing(entries):
            await self._classify(root, root_b, entries, workers, ordered, phase)

    async def _classify(
        self,
        root: str,
        root_b: bytes,
        entries: AsyncIterator[list[Entry]],
        workers: UploadWorkers,
        ordered: OrderedManifest,
        phase: Phase,
    ) -> None:
        """A batch of the walk at a time, each entry decided by a plain call: an await per
        file (cursor, queue, upload hand-over) cost more than deciding it."""
        snap_id, repo, sources, stats = self.snap_id, self.uploader.repo, self.sources, self.stats
        own = repo.run_data_dir(snap_id)
        primary, others, resumed, exists = sources.primary, sources.others, sources.resumed, sources.objects.has_all
        moved = functools.partial(sources.moved, root)
        from_entry, count_file = ManifestLine.from_entry, stats.count_file
        async for batch in entries:
            repo.store.touch()  # walking unchanged files is progress too
            reused = reused_bytes = 0  # the progress is told once a batch (~3 µs a call)
            for e in batch:
                line = from_entry(root, e)
                upload: asyncio.Future[bool] | None = None
                if e.type == "file":
                    count_file(root, e.size)
                    while True:
                        try:
                            decision = decide_now(line, primary, others, moved, exists, own, resumed)
                            break
                        except NeedMore as more:
                            await more.cursor.refill()
                    if decision.action == "reuse":
                        upload = self._reuse(line, decision)
                        reused += 1  # done without reading: progress toward the total
                        reused_bytes += e.size
                    else:
                        if decision.gone is not None and stats.reuploaded < MAX_REUPLOAD_WARNINGS:
                            log.warning(
                                "%s/%s: its object %s is missing from the bucket: uploading it again",
                                root,
                                line.path,
                                decision.gone.key,
                            )
                        path = os.path.join(root_b, e.relpath)
                        upload = workers.submit_nowait(path, e, line, decision)
                        if upload is None:
                            key = repo.data_key(snap_id, root, line.path, sources.key_dir)
                            upload = await workers.submit(path, e, line, key, decision)
                elif e.type == "dir":
                    stats.dirs += 1
                else:
                    stats.symlinks += 1
                if not ordered.put_nowait(line, upload):
                    await ordered.put(line, upload)
            if reused:
                phase.update(reused_bytes, files=reused)

    def _reuse(self, line: ManifestLine, decision: Decision) -> asyncio.Future[bool] | None:
        """Point line at the object decided on; a future for the journal when resumed."""
        assert decision.source is not None
        stats, objects = self.stats, self.sources.objects
        line.take_object(decision.source)
        if line.stored is not None and line.key and line.stored_whole:  # re-sealed by an interrupted `key reencrypt`?
            line.stored = objects.size_of(line.key, line.stored) or line.stored
        setattr(stats, decision.kind, getattr(stats, decision.kind) + 1)
        if decision.kind != "resumed":
            return None
        # in this run's journal too: a run that resumed another and is itself
        # interrupted must not lose what it took over
        upload = asyncio.get_running_loop().create_future()
        upload.set_result(True)
        return upload


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
    """One root in a pass of its own, in one call (the unit tests and bench/files_stage.py)."""
    await FilesPass(snap_id, uploader, sources, stats, jobs, exclude).root(root, root_path, ordered, phase)
