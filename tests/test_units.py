"""Unit tests of the stages and the format, without Docker (`pytest -m "not docker"`).

Pure functions need nothing; the upload stage runs against the rclone S3 server over HTTP
with files in a temporary directory, and the bytes are read back from the bucket.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from immich_stream.backup.changes import RACY_WINDOW_NS, ParentInfo, PrevCursor, Source, classify, decide
from immich_stream.backup.run import OrderedManifest, Sources, backup_root, run_phases
from immich_stream.backup.upload import FileUploader, UploadWorkers
from immich_stream.backup.walk import walk
from immich_stream.config import Settings
from immich_stream.errors import EXIT_INCOMPLETE, EXIT_OK, EXIT_UNSTABLE, LockError, RepoError, backup_exit_code
from immich_stream.host.hoststate import claim_run, local_lock, local_run_gone, release_run
from immich_stream.host.postgres import SEARCH_PATH_DUMP, SEARCH_PATH_FIXED, SearchPathFix
from immich_stream.problems import Problems
from immich_stream.progress import Reporter
from immich_stream.repository.layout import (
    LONG_KEY_DIR,
    STOPPED_DIR,
    escape_path,
    is_snapshot_id,
    new_snapshot_id,
    run_of,
    unescape_path,
)
from immich_stream.repository.manifest import ManifestLine, gunzip_stream
from immich_stream.repository.repo import JOURNAL_MAX_OBJECT, JournalWriter, ObjectIndex, Repo
from immich_stream.repository.summary import DatabaseInfo, FileCounts, RunStats, SnapshotSummary
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.store import MAX_PARTS, MIB, Store, part_size_for, stream_part_size
from tests.conftest import KEY, SECRET, S3Server

SHA = "a" * 64


def line(path: str, size: int = 10, mtime: int = 100, inode: int = 7, ctime: int | None = 5, dev: int | None = 1,
         sha: str | None = SHA, key: str | None = "auto", root: str = "library") -> ManifestLine:  # fmt: skip
    if key == "auto":
        key = f"data/x/{root}/{path}"
    return ManifestLine(root, path, "file", size, mtime, 0o644, 0, 0, inode, sha, key, ctime_ns=ctime, dev=dev)


def exists(_key: str, _size: int) -> bool:
    return True


def missing(_key: str, _size: int) -> bool:
    return False


# -- the change classifier ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new", "old", "moved", "objects", "want"),
    [
        (line("a"), None, None, exists, ("upload", "new")),
        (line("a"), line("a"), None, exists, ("reuse", "unchanged")),
        (line("a"), line("a"), None, missing, ("upload", "reuploaded")),
        (line("a", mtime=200), line("a"), None, exists, ("check", "touched")),
        (line("a", ctime=6), line("a"), None, exists, ("check", "touched")),
        (line("a", size=11), line("a"), None, exists, ("upload", "changed")),
        (line("a"), line("a", sha=None), None, exists, ("upload", "changed")),
        (line("b", ctime=9), None, line("a"), exists, ("check", "moved")),
        (line("b", size=11), None, line("a"), exists, ("upload", "new")),
        (line("b"), None, line("a"), missing, ("upload", "new")),
    ],
    ids=[
        "new file",
        "unchanged",
        "unchanged but object gone",
        "touched",
        "ctime changed",
        "size changed",
        "old line without sha",
        "moved",
        "moved but other size",
        "moved but object gone",
    ],
)
def test_classify_rules(new: ManifestLine, old: ManifestLine | None, moved: ManifestLine | None, objects: Any,
                        want: tuple[str, str]) -> None:  # fmt: skip
    d = classify(new, old, moved, objects)
    assert (d.action, d.kind) == want
    if d.action == "reuse":
        assert d.source is old, "the reused object is the previous snapshot's"


async def _lines(*items: ManifestLine) -> AsyncIterator[ManifestLine]:
    for it in items:
        yield it


async def test_prev_cursor_merges_the_previous_manifest_in_walk_order() -> None:
    prev = [line("a"), line("b/x"), line("c")]
    cursor = PrevCursor(_lines(*prev))
    assert await cursor.find(line("a")) is prev[0]
    assert await cursor.find(line("b")) is None, "a path only in the new walk"
    assert await cursor.find(line("b/x")) is prev[1]
    assert await cursor.find(line("d")) is None, "c was deleted; d is new"
    assert await cursor.find(line("e")) is None, "past the end"
    assert await PrevCursor(None).find(line("a")) is None, "no previous snapshot"


async def test_prev_cursor_orders_postgres_before_library() -> None:
    pg = line("base/1", root="postgres")
    lib = line("a")
    cursor = PrevCursor(_lines(pg, lib))
    assert await cursor.find(line("base/1", root="postgres")) is pg
    assert await cursor.find(line("a")) is lib


RUN = "2026-01-01T000000Z-aaaa"  # a run that started at 1767225600 s
STARTED = 1_767_225_600 * 10**9


def _source(*items: ManifestLine, **kw: Any) -> Source:
    return Source.of_run(_lines(*items), RUN, **kw)


def _no_move(_line: ManifestLine) -> None:
    return None


async def test_a_line_read_in_the_same_moments_as_its_last_change_is_not_trusted_by_stat() -> None:
    old_enough = STARTED - RACY_WINDOW_NS - 1
    calm = line("a", ctime=old_enough)
    racy = line("b", ctime=STARTED - RACY_WINDOW_NS + 1)
    future = line("c", mtime=STARTED * 2, ctime=old_enough)  # a camera's clock: mtime proves nothing
    src = _source(calm, racy, future)
    d = [await decide(ln, src, [], _no_move, exists, "data/new/") for ln in (line("a", ctime=old_enough),
         line("b", ctime=racy.ctime_ns), line("c", mtime=STARTED * 2, ctime=old_enough))]  # fmt: skip
    assert [(x.action, x.kind) for x in d] == [("reuse", "unchanged"), ("check", "rechecked"), ("reuse", "unchanged")]
    assert d[1].source is racy, "read and hashed: the object is kept when the bytes match"


async def test_the_live_pass_and_interrupted_runs_are_sources_counted_as_what_they_are() -> None:
    t = STARTED - RACY_WINDOW_NS - 1
    parent = _source(line("changed", ctime=t - 5), line("same", ctime=t))
    live = _source(
        line("changed", ctime=t, key="data/now/library/changed"),
        line("new", ctime=t, key="data/now/library/new"),
        checked=False,
    )
    resumed = _source(line("resumed", ctime=t, key=f"data/{RUN}/library/resumed"), kind="resumed")
    sources = [live, resumed]
    want = {
        "same": ("reuse", "unchanged"),
        "changed": ("reuse", "changed"),
        "new": ("reuse", "new"),
        "resumed": ("reuse", "resumed"),
        "zz-unknown": ("upload", "new"),
    }
    got = {}
    for path in sorted(want):
        d = await decide(line(path, ctime=t), parent, sources, _no_move, missing_but_own, "data/now/", {RUN})
        got[path] = (d.action, d.kind)
    assert got == want


def missing_but_own(key: str, _size: int) -> bool:
    """The bucket's listing, taken before this run uploaded anything."""
    return not key.startswith("data/now/")


def test_vanished_file_is_a_move_candidate_once() -> None:
    parent = ParentInfo("x")
    gone = line("upload/a.jpg", inode=42)
    parent.vanished[("library", 1, 42)] = gone
    assert parent.moved_from("library", line("library/a.jpg", inode=42)) is gone
    assert parent.moved_from("library", line("library/b.jpg", inode=42)) is None, "one object moves to one path"


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


async def test_phases_a_warm_copy_stops_before_the_database_starts() -> None:
    r = Recorder(fail="check_cold")
    with pytest.raises(RuntimeError):
        await run_phases("all", r)
    assert "start_db" not in r.calls and "dump" not in r.calls and "files library" not in r.calls


# -- snapshot.json -----------------------------------------------------------------------------


def test_summary_round_trips() -> None:
    s = SnapshotSummary(
        id="2024-01-31T020000Z-1a2b",
        mode="all",
        roots={"library": "/lib"},
        files=FileCounts(new=3, bytes_total=99),
        database=DatabaseInfo(key="snapshots/x/database.sql.gz", size=5, sha256="b" * 64),
        phase_seconds={"library files": 1.5},
    )
    back = SnapshotSummary.from_json(s.to_json())
    assert back == s
    d = json.loads(s.to_json())
    assert d["files"]["new"] == 3 and d["database"]["size"] == 5 and "extra" not in d and "extra" not in d["files"]


def test_summary_of_an_older_version_gets_defaults() -> None:
    old = SnapshotSummary.from_json(b'{"id": "2024-01-31T020000Z-1a2b", "database": {"sha256": "abc"}}')
    assert old.complete is True and old.files.files == 0 and old.root_meta == {} and old.database.size is None
    assert old.database.sha256 == "abc" and old.problems == [] and old.mode is None


def test_summary_keeps_fields_of_a_newer_version() -> None:
    newer = {"id": "2024-01-31T020000Z-1a2b", "encryption": {"kind": "age"}, "files": {"new": 1, "sparse": 2}}
    s = SnapshotSummary.from_json(json.dumps(newer))
    assert s.extra == {"encryption": {"kind": "age"}} and s.files.new == 1
    again = json.loads(s.to_json())
    assert again["encryption"] == {"kind": "age"} and again["files"]["sparse"] == 2


@pytest.mark.parametrize("text", [b"[]", b"{}", b'{"id": "x", "files": 3}', b"not json"])
def test_summary_refuses_what_is_not_one(text: bytes) -> None:
    with pytest.raises(ValueError):
        SnapshotSummary.from_json(text)


def test_run_stats_become_the_file_counts() -> None:
    stats = RunStats()
    stats.count_file("library", 10)
    stats.count_file("library", 5)
    stats.new += 2
    assert stats.counts() == FileCounts(new=2, files=2, bytes_total=15)
    assert stats.roots == {"library": {"files": 2, "bytes": 15}}


# -- keys and the repository format ------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "immich-backup", "/a/b/"])
def test_every_key_of_a_snapshot_is_built_in_repo(prefix: str) -> None:
    repo = Repo(None, prefix)  # type: ignore[arg-type]  # key building needs no bucket
    base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    sid = "2024-01-31T020000Z-1a2b"
    assert repo.manifest_key(sid) == f"{base}snapshots/{sid}/manifest.jsonl.gz"
    assert repo.dump_key(sid) == f"{base}snapshots/{sid}/database.sql.gz"
    assert repo.summary_key(sid) == f"{base}snapshots/{sid}/snapshot.json"
    assert repo.lock_key("x.json") == f"{base}locks/x.json"
    assert repo.data_prefix() == f"{base}data/"
    assert repo.relative_key(repo.dump_key(sid)) == f"snapshots/{sid}/database.sql.gz"
    if base:
        with pytest.raises(RepoError, match="outside the repository prefix"):
            repo.relative_key("elsewhere/x")


def test_data_keys_of_paths_too_long_for_s3_are_stable_digests() -> None:
    repo = Repo(None, "p")  # type: ignore[arg-type]
    assert repo.data_key("run", "library", "a/b.jpg") == "data/run/library/a/b.jpg"
    long_part = "x" * 300
    key = repo.data_key("run", "library", f"a/{long_part}")
    assert key == f"data/run/library/{LONG_KEY_DIR}/{hashlib.sha256(f'a/{long_part}'.encode()).hexdigest()}"
    assert key == repo.data_key("run", "library", f"a/{long_part}")


def test_run_ids_are_parsed_out_of_keys_only_when_ours() -> None:
    sid = new_snapshot_id(dt.datetime(2024, 1, 31, 2, 0, tzinfo=dt.UTC))
    assert is_snapshot_id(sid) and not is_snapshot_id("2024-13-31T020000Z-1a2b") and not is_snapshot_id("x")
    assert run_of(f"data/{sid}/library/a.jpg") == sid
    assert run_of(f"snapshots/{sid}/snapshot.json") == sid
    assert run_of("data/") is None and run_of(f"data/{sid}") is None and run_of("data/other/x") is None
    assert run_of(f"locks/{sid}/x") is None


@pytest.mark.parametrize(
    "raw", [b"plain/name.jpg", b"100%/x", b"new\nline", b"\xff\xfe invalid utf-8", "ünïcode/名前".encode(), b"tab\tq"]
)
def test_escaped_paths_round_trip(raw: bytes) -> None:
    text = escape_path(raw)
    text.encode("utf-8")  # always valid UTF-8
    assert "\n" not in text and unescape_path(text) == raw


def test_manifest_line_json_round_trip_and_old_lines() -> None:
    ln = line("a b/%c", ctime=None, dev=None)
    assert ManifestLine.from_json(ln.to_json()) == ln
    old = ManifestLine.from_json('{"root":"library","path":"x","type":"dir","mtime_ns":1,"mode":493}')
    assert old.size == 0 and old.ctime_ns is None and old.dev is None and old.key is None


async def test_gunzip_stream_reads_members_and_refuses_truncation() -> None:
    data = gzip.compress(b"hello ") + gzip.compress(b"world")

    async def chunks(b: bytes, n: int = 7) -> AsyncIterator[bytes]:
        for i in range(0, len(b), n):
            yield b[i : i + n]

    assert b"".join([c async for c in gunzip_stream(chunks(data))]) == b"hello world"
    with pytest.raises(RepoError, match="ends early"):
        _ = [c async for c in gunzip_stream(chunks(data[:-5]))]
    with pytest.raises(RepoError, match="corrupt"):
        _ = [c async for c in gunzip_stream(chunks(b"\x1f\x8b\x08\x00garbage-garbage-garbage"))]


def test_search_path_fix_across_every_chunk_boundary() -> None:
    sql = b"SET x = 1;\n" + SEARCH_PATH_DUMP + b"\nCREATE TABLE t ();\n"
    for cut in range(len(sql) + 1):
        fix = SearchPathFix()
        out = fix.feed(sql[:cut]) + fix.feed(sql[cut:]) + fix.flush()
        assert out == sql.replace(SEARCH_PATH_DUMP, SEARCH_PATH_FIXED), cut
        assert fix.replaced == 1


# -- bounds ------------------------------------------------------------------------------------


async def test_byte_budget_bounds_what_is_held() -> None:
    budget = ByteBudget(100)
    await budget.acquire(60)
    waiter = asyncio.create_task(budget.acquire(60))
    await asyncio.sleep(0.01)
    assert not waiter.done() and budget.used == 60
    await budget.release(60)
    await asyncio.wait_for(waiter, 1)
    await budget.release(60)
    async with budget.hold(500):  # larger than the budget: runs alone
        assert budget.used == 500
    assert budget.used == 0 and budget.peak == 500


def test_part_sizes_fit_s3s_part_count() -> None:
    assert part_size_for(100 * MIB, 8 * MIB) == 8 * MIB
    big = 200 * 1024 * 1024 * MIB  # 200 TiB would need more than 10,000 8 MiB parts
    size = part_size_for(big, 8 * MIB)
    assert -(-big // size) <= MAX_PARTS and size % MIB == 0
    assert [stream_part_size(n, 8 * MIB, 32 * MIB) // MIB for n in (1, 1000, 1001, 2001, 9999)] == [8, 8, 16, 32, 32]


def test_problems_are_counted_all_and_kept_to_a_limit(caplog: pytest.LogCaptureFixture) -> None:
    p = Problems(limit=2)
    for i in range(5):
        p.add(f"p{i}")
    assert len(p) == 5 and list(p) == ["p0", "p1"] and bool(p)
    assert [r.message for r in caplog.records] == [f"p{i}" for i in range(5)]
    everything = Problems(logging.ERROR, limit=None)
    for i in range(300):
        everything.add(str(i))
    assert len(everything.kept) == 300 and not Problems()


def test_backup_exit_codes() -> None:
    assert backup_exit_code(complete=True, unstable=False) == EXIT_OK
    assert backup_exit_code(complete=False, unstable=False) == EXIT_INCOMPLETE
    assert backup_exit_code(complete=False, unstable=True) == EXIT_UNSTABLE


# -- this host's state -------------------------------------------------------------------------


def test_local_lock_keeps_a_second_run_out(tmp_path: Path) -> None:
    with local_lock("backup-immich", tmp_path), pytest.raises(LockError, match=f"pid {os.getpid()}"):  # noqa: SIM117
        with local_lock("backup-immich", tmp_path):
            pass
    with local_lock("backup-immich", tmp_path):  # released with the block
        pass


def test_a_live_run_is_never_judged_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMMICH_STREAM_STATE_DIR", str(tmp_path))
    token = "ab" * 16
    fd = claim_run(token)
    assert not local_run_gone(token), "its flock is held"
    release_run(token, fd)
    assert not local_run_gone(token), "no run file: not provably gone"
    assert not local_run_gone("../../etc/passwd"), "only real tokens name a file"


async def test_walk_marks_special_files_as_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo")
    problems = []
    entries = [e.relpath async for e in walk(os.fsencode(tmp_path), problems.append)]
    assert entries == [b"a.jpg"]
    assert [(p.relpath, p.skipped) for p in problems] == [(b"fifo", True)]


# -- the upload stage against a real S3 server (rclone) -----------------------------------------


@pytest.fixture
def s3_settings(rclone_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    return Settings(
        bucket=rclone_s3.new_bucket(), endpoint_url=rclone_s3.endpoint, path_style=True, jobs=4, retries=2,
        part_size=5 * MIB, max_memory=64 * MIB,
    )  # fmt: skip


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
    async with Store(s3_settings) as store:
        repo = Repo(store, "")
        uploader = FileUploader(store, repo, ByteBudget(s3_settings.max_memory), s3_settings, stats)
        phase = Reporter().phase("library files")
        sources = Sources(None, [], None, ObjectIndex())
        await backup_root("library", root, "run1", uploader, sources, OrderedManifest(sink), stats, phase, jobs=3)
        got = {ln.path: await store.get(ln.key) for ln in sink.lines if ln.type == "file" and ln.key}
    paths = [ln.path for ln in sink.lines]
    assert paths == sorted(paths, key=lambda p: tuple(p.split("/"))), "manifest lines are in walk order"
    for rel, data in files.items():
        assert got[rel] == data
        assert next(ln for ln in sink.lines if ln.path == rel).sha256 == hashlib.sha256(data).hexdigest()
    assert stats.new == len(files) and stats.bytes_uploaded == sum(map(len, files.values())) and stats.failed == 0


async def test_upload_workers_reuse_matching_bytes_and_leave_out_what_cannot_be_read(
    s3_settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "same.jpg"
    path.write_bytes(b"the same bytes")
    (tmp_path / "z.jpg").write_bytes(b"replaced by a FIFO after the walk")
    sha = hashlib.sha256(b"the same bytes").hexdigest()
    stats = RunStats()
    async with Store(s3_settings) as store:
        repo = Repo(store, "")
        uploader = FileUploader(store, repo, ByteBudget(MIB), s3_settings, stats)
        workers = UploadWorkers(uploader, stats, Reporter().phase("x"), jobs=2)
        entries = [e async for e in walk(os.fsencode(tmp_path), lambda p: None)]
        new = ManifestLine.from_entry("library", entries[0])
        old = line("same.jpg", size=14, mtime=new.mtime_ns, sha=sha, key="data/old/library/same.jpg")
        decision = classify(new, None, old, exists)
        assert (decision.action, decision.kind) == ("check", "moved")
        runner = asyncio.create_task(workers.run())
        done = await workers.submit(os.fsencode(path), entries[0], new, "data/run2/library/same.jpg", decision)
        (tmp_path / "z.jpg").unlink()
        os.mkfifo(tmp_path / "z.jpg")
        fifo = ManifestLine.from_entry("library", entries[1])
        upload = classify(fifo, None, None, exists)
        left_out = await workers.submit(
            os.fsencode(tmp_path / "z.jpg"), entries[1], fifo, "data/run2/library/z.jpg", upload
        )
        await workers.close()
        await asyncio.wait_for(runner, 30)
        assert await done is True and await left_out is False
        keys = [o.key async for o in store.list_objects("")]
    assert new.key == "data/old/library/same.jpg" and keys == [], "nothing uploaded: the moved file's object is reused"
    assert stats.moved == 1 and stats.bytes_read == 14 and stats.bytes_uploaded == 0
    assert stats.failed == 1 and list(stats.problems) == [
        "library/z.jpg: cannot be read (no longer a regular file); left out of this snapshot"
    ]


async def test_journal_is_written_in_chunks_as_the_run_goes_and_read_back_in_order(s3_settings: Settings) -> None:
    run = "2026-01-01T000000Z-bbbb"
    async with Store(s3_settings) as store:
        repo = Repo(store, "p", journal_interval=1.0)  # the test hook (IMMICH_STREAM_JOURNAL_INTERVAL=1s)
        journal = JournalWriter(repo, run, "live")
        lines = [line(f"d/{i:04d}.jpg") for i in range(300)]
        for i, ln in enumerate(lines):
            await journal.add(ln)
            if i == 99:
                assert journal.chunks == 0, "nothing is written before a second has passed"
                await asyncio.sleep(1.1)  # the next line is written with everything before it
        assert journal.chunks == 1, "one chunk after the interval"
        await journal.flush()
        await journal.flush()  # nothing new: no empty chunk
        assert journal.chunks == 2 and journal.lines == 300
        # a key that is not a chunk this program wrote, and an oversized one, are not read
        await store.put(f"p/snapshots/{run}/journal/live-notanumber.jsonl.gz", b"x")
        await store.put(repo.journal_key(run, "live", 7), b"\0" * (JOURNAL_MAX_OBJECT + 1))
        passes = await repo.journals(run)
        assert list(passes) == ["live"] and len(passes["live"]) == 2
        back = [ln async for ln in repo.read_lines(passes["live"])]
        assert [ln.path for ln in back] == [ln.path for ln in lines]
        await repo.delete_journals(run)
        assert await repo.journals(run) == {}


async def test_a_damaged_or_foreign_journal_is_skipped_not_fatal(s3_settings: Settings) -> None:
    run = "2026-01-01T000000Z-cccc"
    async with Store(s3_settings) as store:
        repo = Repo(store, "p")
        journal = JournalWriter(repo, run, "live")
        await journal.add(line("a.jpg"))
        await journal.add(line("b.jpg", root="a-root-of-a-later-version"))
        await journal.flush()
        await store.put(repo.journal_key(run, "live", 1), b"not gzip at all")
        keys = (await repo.journals(run))["live"]
        got = [ln.path async for ln in repo.read_journal(keys, "a test journal")]
        assert got == ["a.jpg"], "the unknown root is skipped, the damaged chunk ends the journal"


def test_a_second_upload_by_the_same_run_has_a_key_of_its_own() -> None:
    repo = Repo(None, "p")  # type: ignore[arg-type]
    first = repo.data_key("run", "library", "a/b.jpg")
    again = repo.data_key("run", "library", "a/b.jpg", STOPPED_DIR)
    assert first == "data/run/library/a/b.jpg" and again == "data/run/library/%stopped/a/b.jpg"
    long_path = "x" * 300
    assert repo.data_key("run", "library", long_path, STOPPED_DIR).startswith("data/run/library/%stopped/%long/")
    assert escape_path(b"%stopped") != "%stopped", "no file name can become the reserved folder"


def test_the_count_ahead_leaves_out_excluded_folders_but_their_markers(tmp_path: Path) -> None:
    """A first backup with --exclude thumbs reaches 100%: the stat-only count counts what
    the backup reads, the excluded folder's .immich marker and nothing else of it."""
    from immich_stream.progress import _Counter

    (tmp_path / "thumbs" / "u").mkdir(parents=True)
    (tmp_path / "thumbs" / ".immich").write_bytes(b"")
    (tmp_path / "thumbs" / "u" / "a.webp").write_bytes(b"x" * 100)
    (tmp_path / "upload").mkdir()
    (tmp_path / "upload" / "p.jpg").write_bytes(b"y" * 10)
    counts = {}
    for skip in ((), ("thumbs",)):
        c = _Counter(tmp_path, skip)
        c._thread.join(10)
        counts[skip] = (c.files, c.bytes, c.done)
    assert counts[()] == (3, 110, True)
    assert counts[("thumbs",)] == (2, 10, True)
