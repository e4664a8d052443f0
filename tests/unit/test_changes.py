"""Unit tests of immich_stream/backup/changes.py: the change classifier, the previous-manifest cursor, move candidates."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest

from immich_stream.backup.changes import (
    RACY_WINDOW_NS,
    REFILL_LINES,
    NeedMore,
    ParentInfo,
    PrevCursor,
    Source,
    WalkedLibrary,
    classify,
    decide,
)
from immich_stream.backup.walk import Entry
from immich_stream.repository.manifest import ManifestLine, path_order
from tests.unit.lines import exists, line, missing

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


async def test_prev_cursor_answers_without_waiting_until_its_lines_run_out() -> None:
    prev = [line(f"d/{i:04d}") for i in range(REFILL_LINES + 3)]

    async def blocks() -> AsyncIterator[list[ManifestLine]]:  # as Repo.read_manifest_batches gives them
        yield prev[:2]
        yield prev[2:]

    cursor = PrevCursor(blocks())
    with pytest.raises(NeedMore):
        cursor.find_now(prev[0])  # nothing read yet
    await cursor.refill()
    assert cursor.find_now(prev[1]) is prev[1]
    assert cursor.find_now(line("d/0001x")) is None, "between two lines: new"
    assert cursor.find_now(prev[REFILL_LINES + 2]) is prev[REFILL_LINES + 2], "a block is taken whole"
    with pytest.raises(NeedMore):
        cursor.find_now(line("e"))  # past the lines held: is there more?
    await cursor.refill()
    assert cursor.find_now(line("e")) is None, "past the end"
    parent = Source(PrevCursor(_lines(*prev)), STARTED)
    d = [await decide(ln, parent, [], _no_move, exists, "data/new/") for ln in (prev[0], line("d/9999"))]
    assert [(x.action, x.kind) for x in d] == [("reuse", "unchanged"), ("upload", "new")]


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


def missing_but_own(line: ManifestLine) -> bool:
    """The bucket's listing, taken before this run uploaded anything."""
    return not (line.key or "").startswith("data/now/")


def test_vanished_file_is_a_move_candidate_once() -> None:
    parent = ParentInfo("x")
    gone = line("upload/a.jpg", inode=42)
    parent.vanished[("library", 1, 42)] = gone
    assert parent.moved_from("library", line("library/a.jpg", inode=42)) is gone
    assert parent.moved_from("library", line("library/b.jpg", inode=42)) is None, "one object moves to one path"


def test_move_detection_needs_the_same_device_and_the_same_bytes() -> None:
    """Pure rules: inode numbers repeat across filesystems, and a rename changes ctime."""
    from immich_stream.backup.changes import ParentInfo, classify
    from immich_stream.repository.manifest import ManifestLine

    def line(path: str, dev: int | None, inode: int, sha: str = "a" * 64, ctime: int | None = 5) -> ManifestLine:
        return ManifestLine(
            "library", path, "file", 10, 100, 0o644, 0, 0, inode, sha, f"data/x/library/{path}", ctime_ns=ctime, dev=dev
        )

    parent = ParentInfo("x")
    gone = line("upload/a.jpg", 1, 42)
    parent.vanished[("library", 1, 42)] = gone
    other_fs = line("library/b.jpg", 2, 42)
    assert parent.moved_from("library", other_fs) is None, "same inode on another device is another file"
    same_fs = line("library/c.jpg", 1, 42, ctime=9)
    found = parent.moved_from("library", same_fs)
    assert found is gone
    decision = classify(same_fs, None, found, lambda _ln: True)
    assert (decision.action, decision.kind) == ("check", "moved"), "a move is confirmed by its bytes"
    # unchanged needs ctime and device too; an old line without them is trusted once
    old = line("p.jpg", 1, 7, ctime=5)
    assert classify(line("p.jpg", 1, 7, ctime=5), old, None, lambda _ln: True).action == "reuse"
    assert classify(line("p.jpg", 1, 7, ctime=6), old, None, lambda _ln: True).action == "check"
    assert classify(line("p.jpg", 3, 7, ctime=5), old, None, lambda _ln: True).action == "check"
    legacy = line("p.jpg", None, 7, ctime=None)
    assert classify(line("p.jpg", 1, 7, ctime=6), legacy, None, lambda _ln: True).action == "reuse"
    assert classify(line("p.jpg", 1, 7), old, None, lambda _ln: False).kind == "reuploaded"


async def test_the_walked_library_says_which_paths_are_there_and_counts_it() -> None:
    def entry(rel: bytes, kind: str = "file", size: int = 3) -> Entry:
        return Entry(rel, kind, size, 1, 0o644, 0, 0, 1)

    async def batches() -> AsyncGenerator[list[Entry], None]:
        yield [entry(b"a", "dir", 0), entry(b"a/x"), entry(b"a/y", size=5)]
        yield []
        yield [entry(b"b"), entry(b"c/d")]

    walked = WalkedLibrary(batches())
    assert walked.has_now(b"a") is None, "nothing read yet"
    assert await walked.has(path_order(b"a/x"))
    assert walked.has_now(path_order(b"a/xx")) is False, "gone: between two walked paths"
    assert await walked.has(b"b") and not await walked.has(b"c") and await walked.has(path_order(b"c/d"))
    assert not await walked.has(b"z"), "past the walk's end"
    assert await walked.count() == (4, 14), "every file of the walk, whatever was asked"
    await walked.aclose()
