"""Unit tests of immich_stream/backup/run.py: the ordered manifest writer, the phases per --stop mode, the upload
stage (backup_root) against the rclone S3 server."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from immich_stream.backup.changes import Decision
from immich_stream.backup.roots import OrderedManifest, Sources, backup_root
from immich_stream.backup.run import run_phases
from immich_stream.backup.upload import FileUploader, UploadWorkers
from immich_stream.backup.walk import Entry
from immich_stream.config import Settings
from immich_stream.progress import Reporter
from immich_stream.repository.manifest import ManifestLine
from immich_stream.repository.packs import Packing, PackReader, PackWriter
from immich_stream.repository.repo import ObjectIndex, Repo
from immich_stream.repository.summary import RunStats
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.checksums import MIB
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store
from tests.unit.lines import line

# -- the ordered manifest writer ---------------------------------------------------------------


class ListSink:
    def __init__(self) -> None:
        self.lines: list[ManifestLine] = []

    async def add(self, line: ManifestLine) -> None:
        self.lines.append(line)


async def test_ordered_manifest_keeps_walk_order_when_uploads_finish_out_of_order() -> None:
    sink = ListSink()
    ordered = OrderedManifest(sink, window=8)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(4)]
    lines = [line(f"f{i}") for i in range(4)]
    writer = asyncio.create_task(ordered.run())
    await ordered.put(line("dir"), None)
    for ln, fut in zip(lines, futures, strict=True):
        await ordered.put(ln, fut)
    await ordered.close()
    for i in (3, 1, 2, 0):  # finish in reverse-ish order; f2 could not be read
        futures[i].set_result(i != 2)
        await asyncio.sleep(0)
    await asyncio.wait_for(writer, 5)
    assert [ln.path for ln in sink.lines] == ["dir", "f0", "f1", "f3"]


async def test_ordered_manifest_window_bounds_lines_waiting() -> None:
    ordered = OrderedManifest(ListSink(), window=2)
    blocked = asyncio.get_running_loop().create_future()
    await ordered.put(line("a"), blocked)
    await ordered.put(line("b"), None)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ordered.put(line("c"), None), 0.1)


# -- the phases per --stop mode ----------------------------------------------------------------


class Recorder:
    def __init__(self, fail: str | None = None, release_on: str = "start_all") -> None:
        self.calls: list[str] = []
        self.fail = fail
        self.release_on = release_on  # the step after which the dump may end
        self.snapshot = asyncio.Event()
        self.released = asyncio.Event()

    async def _step(self, name: str) -> None:
        self.calls.append(name)
        await asyncio.sleep(0)
        if name == self.fail:
            raise RuntimeError(name)
        if name == self.release_on:
            self.released.set()

    async def live_pass(self) -> None:
        await self._step("live_pass")

    async def stop_apps(self) -> None:
        await self._step("stop_apps")

    async def stop_db(self) -> None:
        await self._step("stop_db")

    async def files(self, root: str) -> None:
        await self._step(f"files {root}")

    async def check_cold(self) -> None:
        await self._step("check_cold")

    async def start_db(self) -> None:
        await self._step("start_db")

    async def dump(self) -> None:
        self.calls.append("dump")
        await self.snapshot.wait()  # pg_dump's first bytes: its snapshot is held
        self.calls.append("dump streams on")
        await self.released.wait()
        self.calls.append("dump done")

    async def dump_snapshot(self) -> None:
        await asyncio.sleep(0)
        self.snapshot.set()
        await asyncio.sleep(0)
        self.calls.append("dump_snapshot")

    async def start_all(self) -> None:
        await self._step("start_all")


async def test_phases_all_live_pass_then_cold_copy_and_library_then_start_once_the_dump_holds_its_snapshot() -> None:
    r = Recorder()
    await run_phases("all", r)
    assert r.calls[:7] == [
        "live_pass", "stop_apps", "stop_db", "files postgres", "check_cold", "files library", "start_db"
    ]  # fmt: skip
    # the stack starts while the dump still streams, after pg_dump holds its snapshot
    assert r.calls[7:] == ["dump", "dump streams on", "dump_snapshot", "start_all", "dump done"]


async def test_phases_without_the_live_pass_are_the_stopped_ones() -> None:
    r = Recorder()
    await run_phases("all", r, live=False)
    assert "live_pass" not in r.calls and r.calls[0] == "stop_apps"


async def test_phases_app_keep_the_database_up() -> None:
    r = Recorder()
    await run_phases("app", r)
    assert r.calls[:2] == ["live_pass", "stop_apps"] and sorted(r.calls[2:4]) == ["dump", "files library"]
    assert r.calls.index("files library") < r.calls.index("start_all") < r.calls.index("dump done")
    assert "stop_db" not in r.calls and "files postgres" not in r.calls


async def test_phases_none_walk_files_once_the_dump_holds_its_snapshot() -> None:
    r = Recorder(release_on="files library")
    await asyncio.wait_for(run_phases("none", r), 5)
    assert r.calls == ["dump", "dump streams on", "dump_snapshot", "files library", "dump done", "start_all"]
    assert "live_pass" not in r.calls


async def test_phases_walk_external_libraries_right_after_the_library_in_every_mode() -> None:
    ext = ["external:a", "external:b"]
    for mode, release in (("all", None), ("app", None), ("none", "files library")):
        r = Recorder(release_on=release) if release else Recorder()
        await asyncio.wait_for(run_phases(mode, r, externals=ext), 5)
        walks = [c for c in r.calls if c.startswith("files ") and c != "files postgres"]
        assert walks == ["files library", "files external:a", "files external:b"], (mode, r.calls)
        assert r.calls.index("files external:b") < r.calls.index("start_all")
        if mode == "all":  # read with the whole stack down, before the database starts
            assert r.calls.index("files external:b") < r.calls.index("start_db")


async def test_phases_a_warm_copy_stops_before_the_database_starts() -> None:
    r = Recorder(fail="check_cold")
    with pytest.raises(RuntimeError):
        await run_phases("all", r)
    assert "start_db" not in r.calls and "dump" not in r.calls and "files library" not in r.calls


async def test_upload_stage_puts_every_file_in_walk_order_and_reports_unreadable_ones(
    s3_settings: Settings, tmp_path: Path
) -> None:
    root = tmp_path / "lib"
    (root / "sub").mkdir(parents=True)
    files = {"a.jpg": os.urandom(1000), "sub/b.mp4": os.urandom(6 * MIB + 17), "sub/c.jpg": b"", "z.jpg": b"z"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    stats = RunStats()
    sink = ListSink()
    async with Store(StoreOptions.from_settings(s3_settings)) as store:
        repo = Repo(store, "")
        uploader = FileUploader(repo.store, repo, ByteBudget(s3_settings.max_memory), s3_settings, stats)
        phase = Reporter().phase("library files")
        sources = Sources(None, [], None, ObjectIndex())
        await backup_root("library", root, "run1", uploader, sources, OrderedManifest(sink), stats, phase, jobs=3)
        reader = PackReader(repo.store, repo)
        got = {ln.path: b"".join([b async for b in reader.file(ln)]) for ln in sink.lines if ln.type == "file"}
        packed = [ln for ln in sink.lines if ln.offset is not None]
        assert {ln.path for ln in packed} == {"a.jpg", "sub/c.jpg", "z.jpg"}, "small files go into a pack"
        assert len({ln.key for ln in packed}) == 1 and stats.packs == 1
    paths = [ln.path for ln in sink.lines]
    assert paths == sorted(paths, key=lambda p: tuple(p.split("/"))), "manifest lines are in walk order"
    for rel, data in files.items():
        assert got[rel] == data
        assert next(ln for ln in sink.lines if ln.path == rel).sha256 == hashlib.sha256(data).hexdigest()
    assert stats.new == len(files) and stats.bytes_uploaded == sum(map(len, files.values())) and stats.failed == 0


async def test_a_new_small_file_among_unchanged_ones_does_not_hold_the_order_window(
    s3_settings: Settings, tmp_path: Path
) -> None:
    """A night of a few new thumbnails among unchanged files: the new file's line waits for
    its pack while more unchanged lines than the order window holds follow it. The window
    must hand the gathered file on and send its pack (once was not enough: it hung)."""
    new = tmp_path / "new.jpg"
    new.write_bytes(os.urandom(1000))
    st = new.stat()
    stats = RunStats()
    sink = ListSink()
    async with Store(StoreOptions.from_settings(s3_settings)) as store:
        repo = Repo(store, "")
        budget = ByteBudget(64 * MIB)
        writer = PackWriter(repo.store, repo, "2026-12-04T000000Z-abcd", budget, target=MIB)
        uploader = FileUploader(repo.store, repo, budget, s3_settings, stats)
        workers = UploadWorkers(uploader, stats, Reporter().phase("x"), 2, Packing(writer, {}, lambda _k: True))
        ordered = OrderedManifest(sink, window=8)
        ordered.on_full = workers.flush

        async def produce() -> None:
            entry = Entry(b"new.jpg", "file", st.st_size, st.st_mtime_ns, 0o644, 0, 0, st.st_ino)
            first = ManifestLine.from_entry("library", entry)
            await ordered.put(
                first, await workers.submit(os.fsencode(new), entry, first, "k", Decision("upload", "new"))
            )
            for i in range(100):  # unchanged: reused, no upload to wait for
                await ordered.put(line(f"old{i:03d}"), None)
            await workers.close()

        async def upload() -> None:
            await workers.run()
            await writer.close()
            await ordered.close()

        await asyncio.wait_for(asyncio.gather(produce(), ordered.run(), upload()), 30)
        got = sink.lines[0]
        assert got.path == "new.jpg" and got.offset is not None and len(sink.lines) == 101
        assert b"".join([b async for b in PackReader(repo.store, repo).file(got)]) == new.read_bytes()
