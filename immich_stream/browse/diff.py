"""`diff`: what changed between two snapshots, from their manifests alone.

Both manifests are in the same order (root order, then path_order: docs/format.md), so
they are merge-joined as two streams: one line of each in memory. A file removed at one
path whose bytes (sha256) reappear at an added path is a move, not a deletion and an
addition; finding those needs two passes over both manifests:

1. counts per digest of the removed and of the added files (16 bytes of the sha256 and
   one int in one dict: about 130 bytes per distinct removed or added content, nothing for
   unchanged files);
2. the same merge again, each change handed on as it is read; a move waits for its other
   half (the half read first is held, slimmed: about 500 bytes per move not yet paired).

So memory grows with what was added, removed or moved, never with the library: a whole
library of 200,000 files moved peaks at ~240 MiB, 10% of it at ~120 MiB, nothing moved at
the ~100 MiB of any reader (docs/performance.md).

Empty files are never moves (every empty file has the same sha256).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from immich_stream.browse.listing import closed
from immich_stream.repository.manifest import DamagedLine, ManifestLine

SIDE = 1 << 32  # the added side's count in a packed pair of counts (_moves)
DIGEST_BYTES = 16  # of a sha256: collisions are out of reach for any library

Lines = Callable[[], AsyncIterator[ManifestLine]]  # a manifest's lines, read anew on each call


@dataclass(slots=True)
class Change:
    """One difference: `kind` added, removed, changed or moved; `line` the entry in the
    second snapshot (the first's for removed), `old` the first's for changed and moved."""

    kind: str
    line: ManifestLine
    old: ManifestLine | None = None


@dataclass
class Tally:
    entries: int = 0
    files: int = 0
    bytes: int = 0  # of files (changed: their new sizes)


@dataclass
class DiffTotals:
    added: Tally = field(default_factory=Tally)
    removed: Tally = field(default_factory=Tally)
    changed: Tally = field(default_factory=Tally)
    moved: Tally = field(default_factory=Tally)
    changed_old_bytes: int = 0  # the changed files' sizes in the first snapshot
    damaged: int = 0  # manifest lines of the wrong shape, skipped

    def count(self, change: Change) -> None:
        tally: Tally = getattr(self, change.kind)
        tally.entries += 1
        if change.line.type == "file":
            tally.files += 1
            tally.bytes += change.line.size
        if change.old is not None and change.kind == "changed" and change.old.type == "file":
            self.changed_old_bytes += change.old.size


def _digest(line: ManifestLine) -> bytes | None:
    """The compact key a move is found by (None: a directory, symlink or empty file)."""
    if line.type != "file" or not line.size or line.sha256 is None or len(line.sha256) != 64:
        return None
    try:
        return bytes.fromhex(line.sha256[: DIGEST_BYTES * 2])
    except ValueError:
        return None


def _differs(old: ManifestLine, new: ManifestLine) -> bool:
    if old.type != new.type:
        return True
    if new.type == "file":
        return old.sha256 != new.sha256 or old.size != new.size
    return new.type == "symlink" and old.target != new.target


async def _sound(
    lines: AsyncIterator[ManifestLine], totals: DiffTotals, roots: set[str] | None
) -> AsyncIterator[ManifestLine]:
    async with closed(lines):
        async for line in lines:
            if isinstance(line, DamagedLine):
                totals.damaged += 1
            elif roots is None or line.root in roots:
                yield line


async def merge(
    first: AsyncIterator[ManifestLine], second: AsyncIterator[ManifestLine]
) -> AsyncIterator[tuple[ManifestLine | None, ManifestLine | None]]:
    """Both manifests side by side in their common order: (old, new), either None where
    the other snapshot lacks the path; unchanged pairs too."""
    a = await anext(first, None)
    b = await anext(second, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a.order() < b.order()):
            yield a, None
            a = await anext(first, None)
        elif a is None or b.order() < a.order():
            yield None, b
            b = await anext(second, None)
        else:
            yield a, b
            a = await anext(first, None)
            b = await anext(second, None)


async def _moves(old: Lines, new: Lines, roots: set[str] | None) -> dict[bytes, int]:
    """Pass 1: digest -> the moves of those bytes, twice packed in one int (one dict, no
    second copy): how many of the removed files with it are moves (value % SIDE) and how
    many of the added ones (value // SIDE): the same number, min(removed, added)."""
    counts: dict[bytes, int] = {}
    scratch = DiffTotals()
    async for a, b in merge(_sound(old(), scratch, roots), _sound(new(), scratch, roots)):
        if b is None and a is not None and (d := _digest(a)) is not None:
            counts[d] = counts.get(d, 0) + 1
        elif a is None and b is not None and (d := _digest(b)) is not None:
            counts[d] = counts.get(d, 0) + SIDE
    for d, v in counts.items():  # values only: the dict's size does not change
        pairs = min(v % SIDE, v // SIDE)
        counts[d] = pairs + pairs * SIDE
    return counts


Held = dict[bytes, "ManifestLine | list[ManifestLine]"]


def _slim(line: ManifestLine) -> ManifestLine:
    """A move's first-read half as held: without its object (key, chunks) or sha256 (the
    other half's is the same), root and type shared."""
    return ManifestLine(
        sys.intern(line.root),
        line.path,
        sys.intern(line.type),
        line.size,
        line.mtime_ns,
        line.mode,
        line.uid,
        line.gid,
        line.inode,
    )


def _pair(
    d: bytes, line: ManifestLine, unit: int, left: dict[bytes, int], mine: Held, other: Held
) -> tuple[bool, ManifestLine | None]:
    """Whether `line` is half of a move, and its other half when that was read already (else
    `line` is held until it is). `unit`: 1 for a removed line, SIDE for an added one."""
    v = left.get(d, 0)
    if not v // unit % SIDE:
        return False, None
    left[d] = v - unit
    waiting = other.get(d)
    if waiting is not None:
        if not isinstance(waiting, list):
            del other[d]
            match = waiting
        else:
            match = waiting.pop()
            if len(waiting) == 1:
                other[d] = waiting[0]
        match.sha256 = line.sha256
        return True, match
    held = mine.get(d)
    if held is None:
        mine[d] = _slim(line)
    elif isinstance(held, list):
        held.append(_slim(line))
    else:
        mine[d] = [held, _slim(line)]
    return True, None


async def diff(old: Lines, new: Lines, totals: DiffTotals, roots: set[str] | None = None) -> AsyncIterator[Change]:
    """The changes from `old` to `new`, as they are read (moves once both halves were)."""
    left = await _moves(old, new, roots)
    held_old: Held = {}  # a move's removed half, waiting for its added half
    held_new: Held = {}
    async for a, b in merge(_sound(old(), totals, roots), _sound(new(), totals, roots)):
        change: Change | None = None
        if a is not None and b is not None:
            if _differs(a, b):
                change = Change("changed", b, a)
        elif a is not None:
            d = _digest(a)
            moving, to = _pair(d, a, 1, left, held_old, held_new) if d is not None else (False, None)
            if to is not None:
                change = Change("moved", to, a)
            elif not moving:
                change = Change("removed", a)
        elif b is not None:
            d = _digest(b)
            moving, src = _pair(d, b, SIDE, left, held_new, held_old) if d is not None else (False, None)
            if src is not None:
                change = Change("moved", b, src)
            elif not moving:
                change = Change("added", b)
        if change is not None:
            totals.count(change)
            yield change
    # only if the manifests changed between the passes (they do not: snapshots are never
    # rewritten under a reader's lock): what is held is then what it looked like alone
    for kind, held in (("removed", held_old), ("added", held_new)):
        for waiting in held.values():
            for line in waiting if isinstance(waiting, list) else [waiting]:
                change = Change(kind, line)
                totals.count(change)
                yield change
