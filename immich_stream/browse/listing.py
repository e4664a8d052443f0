"""`ls` and `find` over a snapshot's manifest: the lines are streamed in walk order
(docs/format.md, "Manifest lines") and each entry is handed on as it is read, so memory
stays that of one line whatever the library size. A listing stops reading at the end of
the directory asked for (its entries are contiguous in walk order)."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from immich_stream.errors import ImmichStreamError
from immich_stream.repository.layout import root_order
from immich_stream.repository.manifest import DamagedLine, ManifestLine


class NotInSnapshot(ImmichStreamError):
    """ls: the root or the path asked for is not in the snapshot (exit 1)."""


@dataclass
class Counts:
    """What a listing or a search went through."""

    entries: int = 0  # listed or matched
    files: int = 0
    bytes: int = 0
    damaged: int = 0  # manifest lines of the wrong shape, skipped (verify names them)

    def add(self, line: ManifestLine) -> None:
        self.entries += 1
        if line.type == "file":
            self.files += 1
            self.bytes += line.size


@contextlib.asynccontextmanager
async def closed(lines: AsyncIterator[ManifestLine]) -> AsyncIterator[AsyncIterator[ManifestLine]]:
    """`lines` closed when the block ends, also early: the manifest's download stops then."""
    try:
        yield lines
    finally:
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            await aclose()


def parse(raw: bytes) -> ManifestLine:
    """A manifest line for reading only: the fast parse, and only a line it refuses or whose
    fields have the wrong types goes through the careful one (a DamagedLine: skipped and
    counted, as restore and verify go on past one)."""
    try:
        line = ManifestLine.from_json(raw)
    except (ValueError, KeyError, TypeError):
        return ManifestLine.parse(raw, damaged=True)
    fields = (line.size, line.mtime_ns, line.mode, line.uid, line.gid)
    if not all(type(v) is int for v in fields) or not all(type(v) is str for v in (line.root, line.path, line.type)):
        return ManifestLine.parse(raw, damaged=True)
    if (line.sha256 is not None and type(line.sha256) is not str) or (
        line.target is not None and type(line.target) is not str
    ):
        return ManifestLine.parse(raw, damaged=True)
    return line


def clean_path(text: str) -> bytes:
    """A PATH argument as the manifest's relative path: no leading, trailing or doubled
    "/", no "." parts; "" or "/" or "." is the root itself."""
    parts = [p for p in os.fsencode(text).split(b"/") if p and p != b"."]
    return b"/".join(parts)


async def list_path(
    lines: AsyncIterator[ManifestLine], snap_id: str, root: str, path: bytes, counts: Counts
) -> AsyncIterator[ManifestLine]:
    """The entries directly in directory `path` of `root` (b"" is the root itself), or
    the entry alone when `path` is a file or a symlink. NotInSnapshot when neither."""
    prefix = path + b"/" if path else b""
    wanted = root_order(root)
    in_root = found = False
    async with closed(lines):
        async for line in lines:
            if isinstance(line, DamagedLine):
                counts.damaged += 1
                continue
            if line.root != root:
                if in_root or root_order(line.root) > wanted:
                    break  # past the root: the rest of the manifest is other roots
                continue
            in_root = True
            rel = line.relpath
            if path and rel == path:
                found = True
                if line.type != "dir":
                    counts.add(line)
                    yield line
                    return
                continue
            if rel.startswith(prefix):
                found = True
                if b"/" not in rel[len(prefix) :]:
                    counts.add(line)
                    yield line
            elif found:
                break  # a directory's entries are contiguous in walk order: it has ended
    if not in_root:
        raise NotInSnapshot(
            f"snapshot {snap_id} holds nothing in root {root}: `snapshots --json` lists its roots "
            "(--root library, postgres or external:NAME)"
        )
    if not found and path:
        where = os.fsdecode(path)
        raise NotInSnapshot(
            f"{where} is not in snapshot {snap_id} (root {root}): list its parent directory, "
            f"or search with `find '*{os.path.basename(where)}*'`"
        )


def matcher(pattern: str) -> Callable[[ManifestLine], bool]:
    """A glob (fnmatch: * also matches /) tested against the whole path and its base name."""
    test = re.compile(fnmatch.translate(pattern), re.DOTALL).match

    def match(line: ManifestLine) -> bool:
        path = line.path if "%" not in line.path else line.relpath.decode("utf-8", "surrogateescape")
        if test(path):
            return True
        name = path.rpartition("/")[2]
        return name != path and test(name) is not None

    return match


async def find_in(
    lines: AsyncIterator[ManifestLine], match: Callable[[ManifestLine], bool], roots: set[str] | None, counts: Counts
) -> AsyncIterator[ManifestLine]:
    """The entries of one manifest that `match` takes, in walk order."""
    async with closed(lines):
        async for line in lines:
            if isinstance(line, DamagedLine):
                counts.damaged += 1
                continue
            if roots is not None and line.root not in roots:
                continue
            if match(line):
                counts.add(line)
                yield line
