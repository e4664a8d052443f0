"""browse/: the listing's early stop and the diff's move pairing on in-memory manifests
(the CLI against a real S3 server: tests/test_browse.py)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest

from immich_stream.browse.diff import Change, DiffTotals, diff
from immich_stream.browse.listing import Counts, NotInSnapshot, list_path, matcher, parse
from immich_stream.repository.manifest import ManifestLine, path_order


def _line(path: str, body: bytes | None = None, root: str = "library") -> ManifestLine:
    if body is None:
        return ManifestLine(root, path, "dir", 0, 10**18, 0o755, 0, 0, 1)
    return ManifestLine(root, path, "file", len(body), 10**18, 0o644, 0, 0, 1, hashlib.sha256(body).hexdigest())


def _manifest(entries: dict[str, bytes | None]) -> list[ManifestLine]:
    return sorted((_line(p, b) for p, b in entries.items()), key=lambda ln: path_order(ln.relpath))


async def _stream(lines: list[ManifestLine], read: list[int] | None = None) -> AsyncIterator[ManifestLine]:
    for line in lines:
        if read is not None:
            read.append(1)
        yield line


async def test_ls_stops_reading_at_the_end_of_its_directory() -> None:
    lines = _manifest({"a": None, "a/x.jpg": b"x", "a/sub": None, "a/sub/y.jpg": b"y", "a!": None, "b": None})
    read: list[int] = []
    got = [ln.path async for ln in list_path(_stream(lines, read), "s", "library", b"a", Counts())]
    assert got == ["a/sub", "a/x.jpg"]
    assert len(read) == 5, "the line after the directory ends the read"
    with pytest.raises(NotInSnapshot, match=r"^a/zz is not in snapshot s"):
        [ln async for ln in list_path(_stream(lines), "s", "library", b"a/zz", Counts())]


async def test_diff_pairs_moves_of_identical_files_and_leaves_the_rest() -> None:
    same = b"the same bytes"
    old = _manifest({"d": None, "d/1.jpg": same, "d/2.jpg": same, "d/3.jpg": same, "e.jpg": b"", "k.jpg": b"k"})
    new = _manifest({"n": None, "n/1.jpg": same, "n/2.jpg": same, "f.jpg": b"", "k.jpg": b"K"})
    totals = DiffTotals()
    changes: list[Change] = [c async for c in diff(lambda: _stream(old), lambda: _stream(new), totals)]
    kinds = sorted((c.kind, c.line.path) for c in changes)
    assert kinds == [
        ("added", "f.jpg"),  # empty files are never moves
        ("added", "n"),
        ("changed", "k.jpg"),
        ("moved", "n/1.jpg"),
        ("moved", "n/2.jpg"),
        ("removed", "d"),
        ("removed", "d/3.jpg"),  # three copies removed, two added: the third stays a removal
        ("removed", "e.jpg"),
    ]
    assert (totals.moved.files, totals.moved.bytes) == (2, 2 * len(same))
    moved = [c for c in changes if c.kind == "moved"]
    assert all(c.old is not None and c.old.path.startswith("d/") and c.old.sha256 == c.line.sha256 for c in moved)


def test_find_matches_the_whole_path_or_the_base_name() -> None:
    match = matcher("IMG_44*")
    assert match(_line("library/u/2023/IMG_4411.HEIC", b"x"))
    assert not match(_line("library/u/2023/IMG_5411.HEIC", b"x"))
    assert matcher("library/*/2023")(_line("library/u/2023"))
    assert matcher("*line.jpg")(_line("odd/new%0Aline.jpg", b"x"))  # matched on the name itself


def test_a_line_of_the_wrong_types_is_damaged_not_a_crash() -> None:
    ok = _line("a.jpg", b"a")
    assert parse(ok.to_json().encode()) == ok
    bad = ok.to_json().replace('"mtime_ns":1000000000000000000', '"mtime_ns":"yesterday"').encode()
    assert parse(bad).type == "damaged"
