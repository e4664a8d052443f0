"""What changed since the parent snapshot: the previous manifest read alongside the walk,
files that vanished from their path (move candidates), and the rules that decide, per
file, whether its object is reused, its bytes checked, or it is uploaded."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from immich_stream.backup.walk import Entry
from immich_stream.repository.layout import run_of, snapshot_time
from immich_stream.repository.manifest import Chunk, ManifestLine, path_order
from immich_stream.repository.repo import Repo

# Immich keeps an empty `.immich` file in each of these folders of UPLOAD_LOCATION and
# refuses to start when one is missing: their absence means an unmounted or wrong library.
MARKER_DIRS = ("library", "upload", "thumbs", "encoded-video", "profile", "backups")
MARKER = ".immich"

# A file whose mtime or ctime is this close to (or after) the moment a run read it may be
# rewritten in the same timestamp tick without its stat changing (git's "racily clean"
# entries): such a line is not trusted by stat alone. Local filesystems tick in
# milliseconds; FAT, SMB and some NFS servers in 1 or 2 seconds.
RACY_WINDOW_NS = 3 * 10**9


REFILL_LINES = 512  # lines a cursor takes from its manifest at once


class NeedMore(Exception):
    """decide_now could not answer from the lines its cursors hold: await `cursor.refill()`
    and ask again (raised about once per REFILL_LINES lines, never per file)."""

    def __init__(self, cursor: PrevCursor) -> None:
        super().__init__("a cursor needs more lines")
        self.cursor = cursor


class PrevCursor:
    """Walks the previous manifest alongside the file walk (both in the same order).

    Lines are taken from `lines` up to REFILL_LINES at a time (an item of it may also be a
    list of lines), so a look-up is a plain call that awaits nothing until the lines held
    are used up; memory is those lines."""

    def __init__(self, lines: AsyncIterator[ManifestLine | list[ManifestLine]] | None) -> None:
        self._it = lines
        self._buf: list[ManifestLine] = []
        self._i = 0

    def find_now(self, line: ManifestLine) -> ManifestLine | None:
        """The previous line at line's path, or None; raises NeedMore when the lines held
        end before line's place (the position is kept: asking again after refill() is safe)."""
        buf, i = self._buf, self._i
        n = len(buf)
        want = line.order()
        while i < n and buf[i].order() < want:
            i += 1
        self._i = i
        if i < n:
            cur = buf[i]
            return cur if cur.order() == want else None
        if self._it is None:
            return None
        raise NeedMore(self)

    async def refill(self) -> None:
        """Replace the lines held (all passed over: find_now raises only at their end) by
        the next ones."""
        assert self._it is not None
        got: list[ManifestLine] = []
        self._buf, self._i = got, 0
        try:
            while len(got) < REFILL_LINES:
                item = await anext(self._it)
                if isinstance(item, list):
                    got += item
                else:
                    got.append(item)
        except StopAsyncIteration:
            self._it = None

    async def find(self, line: ManifestLine) -> ManifestLine | None:
        while True:
            try:
                return self.find_now(line)
            except NeedMore:
                await self.refill()


@dataclass
class Source:
    """An earlier manifest whose objects a run may reuse, read alongside the walk.

    `read_after_ns`: every line in it was read at or after this moment (the start of the
    run that wrote it: snapshot ids are start times), so a line whose timestamps are older
    than that by RACY_WINDOW_NS cannot hide a rewrite in the same tick. `checked`: its
    objects must be in the bucket's listing (False for this run's own uploads, made after
    the listing). `kind`: the counter a reuse from it ends in."""

    cursor: PrevCursor
    read_after_ns: int
    checked: bool = True
    kind: str = "unchanged"

    @classmethod
    def of_run(cls, lines: AsyncIterator[ManifestLine | list[ManifestLine]], run_id: str, **kw: object) -> Source:
        started = int(snapshot_time(run_id).timestamp()) * 10**9
        return cls(PrevCursor(lines), started, **kw)  # type: ignore[arg-type]

    def racy(self, line: ManifestLine) -> bool:
        # ctime: every write sets it to the present and nothing can set it back, while
        # mtime is what Immich or a camera says (a photo "from 2030" is not racy forever)
        changed = line.ctime_ns if line.ctime_ns is not None else line.mtime_ns
        return changed >= self.read_after_ns - RACY_WINDOW_NS


@dataclass
class ParentInfo:
    """What a run needs to know of the previous snapshot besides its sorted manifest."""

    snap_id: str
    # files of the previous snapshot whose path is gone now, by (root, device, inode): move
    # candidates (Immich's storage-template migration renames files). Memory grows with
    # the number of deleted/moved files, not with the library.
    vanished: dict[tuple[str, int | None, int], ManifestLine] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # per root
    bytes: dict[str, int] = field(default_factory=dict)
    markers: set[str] = field(default_factory=set)  # MARKER_DIRS whose marker it had
    # the chunks of its postgres files by sha256: a changed file's unchanged chunks are
    # taken from here (format 3; a few thousand for a large database)
    chunks: dict[str, Chunk] = field(default_factory=dict)

    def moved_from(self, root: str, line: ManifestLine) -> ManifestLine | None:
        """The vanished line this new path may have been moved from (same device and inode)."""
        found = self.vanished.pop((root, line.dev, line.inode), None)
        if found is None:  # a manifest from before devices were recorded
            found = self.vanished.pop((root, None, line.inode), None)
        return found


def walk_filter(root: str, exclude: Collection[str]) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """walk()'s (prune, keep) for --exclude: the excluded folders of the library are walked
    for their marker only (Immich refuses to start without it)."""
    if root != "library" or not exclude:
        return frozenset(), frozenset()
    return frozenset(os.fsencode(d) for d in exclude), frozenset({os.fsencode(MARKER)})


def followed(root: str) -> frozenset[bytes]:
    """The top-level folders of a root whose symlinks are followed: Immich's own, which
    Immich itself follows (`library -> /mnt/photos`)."""
    return frozenset(os.fsencode(d) for d in MARKER_DIRS) if root == "library" else frozenset()


def is_excluded(root: str, path: str, exclude: Collection[str]) -> bool:
    """A file --exclude leaves out: under an excluded folder of the library, but not its marker."""
    if root != "library" or not exclude:
        return False
    top, sep, rest = path.partition("/")
    return bool(sep) and top in exclude and rest != MARKER


class WalkedLibrary:
    """The library as it is now (walk_batches with the backup's filter, in path order),
    merged with the parent's manifest by scan_parent: a parent file the walk lacks may have
    vanished (os.lstat then decides, as for every file before), and the walk's files and
    bytes are counted for the shrink check on the way: one walk before the backup's own
    for both, instead of a counting walk beside an lstat of every parent file. The walk's
    own sizes count: a file cut short in place is seen before anything is stopped."""

    def __init__(self, batches: AsyncGenerator[list[Entry], None]) -> None:
        self._it: AsyncGenerator[list[Entry], None] | None = batches
        self._gen = batches
        self._orders: list[bytes] = []  # of the batch held
        self._i = 0
        self.files = 0
        self.bytes = 0

    async def _next_batch(self) -> bool:
        assert self._it is not None
        try:
            batch = await anext(self._it)
        except StopAsyncIteration:
            self._it, self._orders, self._i = None, [], 0
            return False
        self._orders, self._i = [path_order(e.relpath) for e in batch], 0
        for e in batch:
            if e.type == "file":
                self.files += 1
                self.bytes += e.size
        return True

    def has_now(self, order: bytes) -> bool | None:
        """Is a path of this order in the walk (the orders asked for only grow)? None: the
        batch held ends before it (await has())."""
        orders, i = self._orders, self._i
        n = len(orders)
        while i < n and orders[i] < order:
            i += 1
        self._i = i
        if i < n:
            return orders[i] == order
        return False if self._it is None else None

    async def has(self, order: bytes) -> bool:
        while (found := self.has_now(order)) is None:
            await self._next_batch()
        return found

    async def count(self) -> tuple[int, int]:
        """(files, bytes) of the whole walk: count_files' answer."""
        while self._it is not None and await self._next_batch():
            pass
        return self.files, self.bytes

    async def aclose(self) -> None:
        """Stop the walk's thread (the walk read to its end or not)."""
        await self._gen.aclose()


async def scan_parent(
    repo: Repo,
    snap_id: str,
    roots: dict[str, Path],
    exclude: Collection[str] = (),
    library: WalkedLibrary | None = None,
) -> ParentInfo:
    """`exclude`: this run's --exclude; the parent's files there are left out of its
    totals, so the shrink check compares the same part of the library. `library`: the
    library's walk (with that exclude) to merge with: only the library's files it lacks
    are looked up on disk."""
    info = ParentInfo(snap_id)
    batch: list[ManifestLine] = []
    markers = {f"{d}/{MARKER}": d for d in MARKER_DIRS}

    def check(lines: list[ManifestLine]) -> list[ManifestLine]:
        gone = []
        for ln in lines:
            try:
                os.lstat(os.path.join(os.fsencode(roots[ln.root]), ln.relpath))
            except FileNotFoundError:
                gone.append(ln)
            except OSError:
                pass
        return gone

    async def flush() -> None:
        for ln in await asyncio.to_thread(check, batch):
            info.vanished[(ln.root, ln.dev, ln.inode)] = ln
        batch.clear()

    # A library file's line whose path the walk has is only counted: that is read from the
    # line's start (parse_counted) without parsing the line (3.4 µs each, a second parse of
    # the manifest beside the one the backup's walk makes). Every other line, and any line
    # that is not of that exact shape, is parsed and handled whole.
    walked = library if "library" in roots else None
    counted_files = counted_bytes = 0
    async for item in repo.read_manifest_as(snap_id, parse_counted):
        if isinstance(item, tuple):
            order, size, raw = item
            found = walked.has_now(order) if walked is not None else False
            if found or (found is None and walked is not None and await walked.has(order)):
                counted_files += 1
                counted_bytes += size
                continue
            item = ManifestLine.from_json(raw)
        line = item
        if line.type != "file" or is_excluded(line.root, line.path, exclude):
            continue
        info.files[line.root] = info.files.get(line.root, 0) + 1
        info.bytes[line.root] = info.bytes.get(line.root, 0) + line.size
        if line.root == "library" and line.path in markers:
            info.markers.add(markers[line.path])
        if line.chunks:
            for c in line.chunks:
                info.chunks.setdefault(c.sha256, c)
        if line.has_object and line.root in roots:
            if library is not None and line.root == "library":
                order = line.order()[1]
                found = library.has_now(order)
                if found or (found is None and await library.has(order)):
                    continue  # still there (the usual case): no lstat
            batch.append(line)
            if len(batch) >= 2000:
                await flush()
    await flush()
    if counted_files:
        info.files["library"] = info.files.get("library", 0) + counted_files
        info.bytes["library"] = info.bytes.get("library", 0) + counted_bytes
    return info


# The start of a library file's line as ManifestLine.to_json writes it, its path plain
# (no JSON escape, no %XX: its bytes are the file's relative path): the path, then the size.
_COUNTED = re.compile(rb'\{"root":"library","path":"([^"\\%\x00-\x1f]+)","type":"file","size":(\d+),')
_MARKERS = frozenset(f"{d}/{MARKER}".encode() for d in MARKER_DIRS)


def parse_counted(raw: bytes) -> tuple[bytes, int, bytes] | ManifestLine:
    """scan_parent's parse: (path order, size, the line) of a library file's line that is
    plain enough to be counted without parsing (the walk may still lack its path: then it
    is parsed after all); any other line parsed whole."""
    m = _COUNTED.match(raw)
    if m is None or m[1] in _MARKERS or b'"chunks":' in raw:
        return ManifestLine.from_json(raw)
    return path_order(m[1]), int(m[2]), raw


class Decision(NamedTuple):
    """What to do with one file: reuse an object, read and hash first (reuse when the
    bytes match), or upload. (A NamedTuple: a frozen dataclass cost 4 µs to make, and
    a first backup makes two per file.)"""

    action: str  # "reuse", "check" or "upload"
    kind: str  # the Stats counter it ends in: unchanged, moved, touched, reuploaded, changed, new
    source: ManifestLine | None = None  # the line whose object may be reused
    gone: ManifestLine | None = None  # reuploaded: the line whose object is missing


# the decisions without a line, made once (a first backup decides twice per file)
UPLOAD_NEW = Decision("upload", "new")
UPLOAD_CHANGED = Decision("upload", "changed")


def same_file(line: ManifestLine, old: ManifestLine) -> bool:
    """Unchanged without reading: size, mtime, ctime, inode and device all equal. ctime
    cannot be set back, so `cp -p`, `rsync -a` or exiftool -P rewriting a file with the
    same size and mtime is noticed. A line from before ctime was recorded is compared by
    size, mtime and inode (once: this run records ctime)."""
    if (line.size, line.mtime_ns, line.inode) != (old.size, old.mtime_ns, old.inode):
        return False
    if old.ctime_ns is None:
        return True
    return line.ctime_ns == old.ctime_ns and line.dev == old.dev


def classify(
    line: ManifestLine,
    old: ManifestLine | None,
    moved: ManifestLine | None,
    exists: Callable[[ManifestLine], bool],
    racy: bool = False,
) -> Decision:
    """The rules of an incremental run, in one place. `old` is the previous snapshot's line
    for this path, `moved` a vanished line with this file's device and inode, `exists` says
    whether the objects a line names are in the bucket, `racy` that old's stat is
    too close to the moment it was read to prove the bytes unchanged."""
    if old is not None and old.type == "file" and old.has_object:
        if not exists(old):
            return Decision("upload", "reuploaded", gone=old)
        if same_file(line, old):
            if racy:
                return Decision("check", "rechecked", old)
            return Decision("reuse", "unchanged", old)
        if old.size == line.size:
            return Decision("check", "touched", old)  # a chown, a touch, or the same size rewritten
        return UPLOAD_CHANGED
    if (
        moved is not None
        and moved.has_object
        and moved.size == line.size
        and moved.mtime_ns == line.mtime_ns
        and exists(moved)
    ):
        return Decision("check", "moved", moved)  # a rename changes ctime: the bytes decide
    return UPLOAD_CHANGED if old is not None else UPLOAD_NEW


def _usable(old: ManifestLine | None) -> bool:
    return old is not None and old.type == "file" and old.has_object


def decide_now(
    line: ManifestLine,
    primary: Source | None,
    others: list[Source],
    moved: Callable[[ManifestLine], ManifestLine | None],
    exists: Callable[[ManifestLine], bool],
    own_prefix: str | tuple[str, ...],
    resumed: Container[str] = (),
) -> Decision:
    """classify() against the parent snapshot (`primary`), then against `others`: this
    run's earlier (live) pass and interrupted runs, whose lines hold what they read and
    uploaded. A reuse from one of those is counted as what it is relative to the parent.

    A plain call (the walk's batches are classified without an await per file): raises
    NeedMore when a cursor must read on first (`decide` does that); nothing is changed
    before it raises (moved() pops the vanished line only once every cursor answered)."""
    old = primary.cursor.find_now(line) if primary is not None else None
    base = classify(line, old, None, exists, primary is not None and old is not None and primary.racy(old))
    if base.action == "reuse":
        return base

    def kind_of(cand: ManifestLine) -> str:
        if old is None:
            # an empty database file is no chunks, no object: new, as any file the parent lacked
            if not cand.object_refs() or (cand.first_key or "").startswith(own_prefix):
                return "new"
            return "resumed" if run_of(cand.first_key or "") in resumed else "moved"
        if cand.same_object(old):
            return base.kind if base.action == "check" else "touched"
        return "reuploaded" if base.kind == "reuploaded" else "changed"

    check: Decision | None = None
    for src in others:
        cand = src.cursor.find_now(line)
        if cand is None or not _usable(cand) or (src.checked and not exists(cand)):
            continue
        if same_file(line, cand) and not src.racy(cand):
            return Decision("reuse", kind_of(cand) if src.kind == "unchanged" else src.kind, cand)
        if check is None and cand.size == line.size:
            # the same size: read and hash it, and take this object if the bytes match
            check = Decision("check", kind_of(cand) if src.kind == "unchanged" else src.kind, cand)
    if check is not None:
        return check
    if base.action == "check" or old is not None:
        return base
    return classify(line, None, moved(line), exists)


async def decide(
    line: ManifestLine,
    primary: Source | None,
    others: list[Source],
    moved: Callable[[ManifestLine], ManifestLine | None],
    exists: Callable[[ManifestLine], bool],
    own_prefix: str | tuple[str, ...],
    resumed: Container[str] = (),
) -> Decision:
    """decide_now, reading on whichever cursor needs more lines."""
    while True:
        try:
            return decide_now(line, primary, others, moved, exists, own_prefix, resumed)
        except NeedMore as more:
            await more.cursor.refill()
