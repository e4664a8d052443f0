"""`diff`: what changed between two snapshots, from their manifests alone.

Both manifests are in the same order (root order, then path_order: docs/format.md), so
they are merge-joined as two streams: one line of each in memory. A file removed at one
path whose bytes (sha256) reappear at an added path is a move, not a deletion and an
addition; finding those needs two passes over both manifests:

1. counts per digest of the removed and of the added files (16 bytes of the sha256 each:
   about 100 bytes of memory per removed or added file, nothing for unchanged ones);
2. the same merge again, each change handed on as it is read; a move waits for its other
   half (the line seen first is held: at most one line per move not yet paired).

Empty files are never moves (every empty file has the same sha256).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from immich_stream.browse.listing import closed
from immich_stream.repository.manifest import DamagedLine, ManifestLine

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
    """Pass 1: digest -> how many removed files pair with added ones of the same bytes."""
    removed: Counter[bytes] = Counter()
    added: Counter[bytes] = Counter()
    scratch = DiffTotals()
    async for a, b in merge(_sound(old(), scratch, roots), _sound(new(), scratch, roots)):
        if b is None and a is not None and (d := _digest(a)) is not None:
            removed[d] += 1
        elif a is None and b is not None and (d := _digest(b)) is not None:
            added[d] += 1
    return {d: min(n, added[d]) for d, n in removed.items() if d in added}


async def diff(old: Lines, new: Lines, totals: DiffTotals, roots: set[str] | None = None) -> AsyncIterator[Change]:
    """The changes from `old` to `new`, as they are read (moves once both halves were)."""
    moves = await _moves(old, new, roots)
    out_old: dict[bytes, int] = dict(moves)  # removed lines still to be taken as moves
    out_new: dict[bytes, int] = dict(moves)
    held_old: dict[bytes, deque[ManifestLine]] = {}  # a move's removed half, waiting
    held_new: dict[bytes, deque[ManifestLine]] = {}

    def pair(
        d: bytes,
        line: ManifestLine,
        left: dict[bytes, int],
        mine: dict[bytes, deque[ManifestLine]],
        other: dict[bytes, deque[ManifestLine]],
    ) -> ManifestLine | None:
        """The other half of the move `line` is one half of, once read; else hold it."""
        left[d] -= 1
        if not left[d]:
            del left[d]
        waiting = other.get(d)
        if waiting:
            match = waiting.popleft()
            if not waiting:
                del other[d]
            return match
        # held without its object's key or chunks: a move's report needs neither
        slim = ManifestLine(
            line.root,
            line.path,
            line.type,
            line.size,
            line.mtime_ns,
            line.mode,
            line.uid,
            line.gid,
            line.inode,
            line.sha256,
        )
        mine.setdefault(d, deque()).append(slim)
        return None

    async for a, b in merge(_sound(old(), totals, roots), _sound(new(), totals, roots)):
        change: Change | None = None
        if a is not None and b is not None:
            if _differs(a, b):
                change = Change("changed", b, a)
        elif a is not None:
            d = _digest(a)
            if d is not None and d in out_old:
                if (to := pair(d, a, out_old, held_old, held_new)) is not None:
                    change = Change("moved", to, a)
            else:
                change = Change("removed", a)
        elif b is not None:
            d = _digest(b)
            if d is not None and d in out_new:
                if (src := pair(d, b, out_new, held_new, held_old)) is not None:
                    change = Change("moved", b, src)
            else:
                change = Change("added", b)
        if change is not None:
            totals.count(change)
            yield change
    # only if the manifests changed between the passes (they do not: snapshots are never
    # rewritten under a reader's lock): what is held is then what it looked like alone
    for kind, held in (("removed", held_old), ("added", held_new)):
        for waiting in held.values():
            for line in waiting:
                change = Change(kind, line)
                totals.count(change)
                yield change
