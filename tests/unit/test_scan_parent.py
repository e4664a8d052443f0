"""Unit tests of backup/changes.py's scan_parent: the parent's manifest merged with the library's walk
(the shrink check's totals, the markers, the files gone from their paths), whether a line is counted
from its start alone (parse_counted) or parsed whole."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from immich_stream.backup.changes import WalkedLibrary, parse_counted, scan_parent
from immich_stream.backup.library import library_walk
from immich_stream.repository.manifest import Chunk, ManifestLine, path_order
from tests.unit.lines import line

T = TypeVar("T")


class Manifest:
    """The part of Repo scan_parent reads: a parent's manifest, as the bytes of its lines."""

    def __init__(self, lines: list[ManifestLine]) -> None:
        self.raw = [ln.to_json().encode() for ln in lines]

    async def read_manifest_as(self, snap_id: str, parse: Callable[[bytes], T]) -> AsyncIterator[T]:
        for raw in self.raw:
            yield parse(raw)


def test_a_plain_library_file_line_is_counted_from_its_start_and_any_other_is_parsed() -> None:
    for path in ("library/u/2024/a.jpg", "thumbs/ä/ö é.webp"):
        got = parse_counted(line(path, size=1234).to_json().encode())
        assert isinstance(got, tuple) and got[:2] == (path_order(path.encode()), 1234)
    for other in (
        line('a/q"uote.jpg'),  # a JSON escape in the path
        line("a/100%25.jpg"),  # a %XX escape: the path's bytes differ from the line's
        line("library/.immich"),  # a marker: scan_parent records it
        line("x", root="postgres"),
        ManifestLine("library", "a", "dir", 0, 1, 0o755, 0, 0, 3),
    ):
        assert parse_counted(other.to_json().encode()) == other
    chunked = line("pg/1", root="postgres")
    chunked.chunks = [Chunk("data/c", 0, 10, 10, "b" * 64)]
    assert parse_counted(chunked.to_json().encode()) == chunked


async def test_scan_parent_counts_the_library_and_names_exactly_the_files_gone(tmp_path: Path) -> None:
    lib = tmp_path / "library"
    present = ["a/x.jpg", 'a/q"uote.jpg', "a/100%25.jpg", "library/.immich", "thumbs/t.webp", "ü/y.jpg"]
    for p in [*present, "new/n.jpg"]:
        f = lib / p.replace("%25", "%")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * (33 if p.startswith("new/") else 10))
    (lib / "a" / "sub").mkdir()
    gone = line("a/z.jpg", size=7, inode=42)
    lines = sorted(
        [line(p, size=10) for p in present] + [gone, line("b/gone-too.jpg", size=5, inode=43, sha=None)],
        key=lambda ln: ln.order(),
    )
    lines.append(ManifestLine("library", "a", "dir", 0, 1, 0o755, 0, 0, 3))
    pg = line("base/1", root="postgres", size=20)
    pg.chunks = [Chunk("data/c", 0, 20, 20, "c" * 64)]
    lines.insert(0, pg)
    library = WalkedLibrary(library_walk(lib, ("thumbs",)))
    try:
        repo: Any = Manifest(lines)
        info = await scan_parent(repo, "parent", {"library": lib}, ("thumbs",), library)
        walked = await library.count()
    finally:
        await library.aclose()
    # thumbs/ is excluded this run: its file is left out of the parent's totals too
    assert info.files == {"postgres": 1, "library": 7} and info.bytes == {"postgres": 20, "library": 5 * 10 + 7 + 5}
    assert info.markers == {"library"}
    assert list(info.vanished) == [("library", 1, 42)], "only the file gone that had an object"
    assert info.vanished[("library", 1, 42)] == gone
    assert set(info.chunks) == {"c" * 64}
    # the walk's own sizes count (a file cut short in place is seen before the stop)
    assert walked == (6, 5 * 10 + 33), "the walk counted as the backup's walk sees the library"
    assert os.path.exists(lib / "a/100%.jpg")
