"""Repacking: prune's second half, for packs the kept snapshots use only partly.

A pack (packs.py) holds the blobs and chunks of many files; once the snapshots that named
some of them are removed, the rest of the pack is still needed and the pack cannot go.
restic's prune is the model: the packs with the largest share no kept snapshot needs are
chosen until what stays unneeded is at most `--max-unused` of the pack bytes; the bytes
still needed are read (by range), checked against the sha256 their lines record, and
written into new packs; the manifests that name them are written again to name the new
places; only then are the old packs deleted. Each step lands whole or not at all, so a
prune stopped anywhere loses nothing:

- stopped while writing new packs: nothing names them; they are garbage once stale;
- stopped while manifests are written again: each manifest names the old packs or the new
  ones, and both are in the bucket; the next prune finds the old packs still partly used
  (or unused, and deletes them);
- the old packs are deleted last, when no manifest names them.

Manifests are the index (format.md): a snapshot's content (paths, sizes, sha256) never
changes, only where its bytes are. Prune holds the exclusive lock: no backup, restore,
verify or drill reads a manifest while it changes (they hold the shared one).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from immich_stream.errors import RepoError, StoreError, bytes_lost
from immich_stream.repository.age import DecryptError
from immich_stream.repository.locks import RepoLock
from immich_stream.repository.manifest import Chunk, ManifestLine
from immich_stream.repository.packs import BATCH_GAP, BATCH_SPAN, PACK_MAX_BLOBS, PackReader, open_chunk
from immich_stream.repository.repo import Repo
from immich_stream.s3.budget import ByteBudget

log = logging.getLogger(__name__)

# A GET of these waits hours for a restore from the archive: their packs are never repacked.
ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
# Blobs and chunks one prune moves at most: each costs ~600 bytes of memory while it runs
# (where it was, where it goes, what it must hash to); a larger repack goes on next prune.
REPACK_MAX_PIECES = 100_000


@dataclass
class PackUse:
    """A pack kept because kept snapshots need some of its bytes."""

    key: str  # relative to the prefix
    size: int  # bytes in the bucket
    used: int  # of them, what kept snapshots need (as stored)
    storage_class: str | None
    pieces: int = 0  # blobs and chunks of it the kept snapshots name

    @property
    def unused(self) -> int:
        return self.size - self.used


@dataclass
class RepackReport:
    packs_repacked: int = 0  # old packs whose needed bytes were moved, then deleted
    packs_written: int = 0
    bytes_copied: int = 0  # plaintext bytes moved into new packs
    bytes_stored: int = 0  # bytes in the bucket of the new packs
    bytes_freed: int = 0  # bytes in the bucket of the old packs deleted, less bytes_stored
    manifests_rewritten: int = 0
    damaged: list[str] = field(default_factory=list)  # packs left alone: needed bytes do not match their sha256
    unreadable: list[str] = field(default_factory=list)  # packs left alone: a read failed (after retries)


def choose(
    packs: list[PackUse], max_unused: float, pack_bytes: int, max_pieces: int = REPACK_MAX_PIECES
) -> list[PackUse]:
    """restic's --max-unused: of the partly used `packs`, those with the largest share
    unneeded first, until the unneeded bytes left are at most max_unused of `pack_bytes`
    (every kept pack's bytes) after the repack (0: every partly used pack; 1: none). Packs
    in an archive class are never chosen (what they hold unneeded counts as needed: no
    repack can reclaim it); at most `max_pieces` blobs and chunks are moved by one prune
    (each is held in memory while it runs: the next prune goes on)."""
    if max_unused >= 1:
        return []
    readable = [p for p in packs if (p.storage_class or "STANDARD") not in ARCHIVE_CLASSES and p.unused > 0]
    left = sum(p.unused for p in readable)
    allowed = max_unused / (1 - max_unused) * (pack_bytes - left)
    chosen: list[PackUse] = []
    pieces = 0
    for p in sorted(readable, key=lambda p: (-p.unused / max(p.size, 1), p.key)):
        if left <= allowed or (chosen and pieces + p.pieces > max_pieces):
            break
        chosen.append(p)
        pieces += p.pieces
        left -= p.unused
    return chosen


@dataclass(frozen=True)
class _Need:
    """A piece of an old pack a kept snapshot names: how long, and how to check it."""

    length: int
    sha256: str | None  # of the blob (a packed file's line), or None for a chunk
    chunk: Chunk | None


def _pieces(line: ManifestLine) -> list[tuple[str, int, _Need]]:
    if line.chunks is not None:
        return [(c.key, c.offset, _Need(c.length, None, c)) for c in line.chunks]
    if line.key is not None and line.offset is not None:
        return [(line.key, line.offset, _Need(line.size, line.sha256, None))]
    return []


def _check(need: _Need, data: bytes) -> bool:
    if need.chunk is not None:
        try:
            open_chunk(need.chunk, data)
        except RepoError:
            return False
        return True
    return need.sha256 is None or hashlib.sha256(data).hexdigest() == need.sha256


class _Out:
    """The new pack being filled; uploaded at `target` bytes or PACK_MAX_BLOBS pieces."""

    def __init__(self, repo: Repo, run_id: str, target: int, report: RepackReport) -> None:
        self.repo = repo
        self.run_id = run_id
        self.target = target
        self.report = report
        self.buf = bytearray()
        self.pieces = 0
        self.key = repo.pack_key(run_id)
        self.storage_class: str | None = None

    async def add(self, data: bytes, storage_class: str | None) -> tuple[str, int]:
        if self.pieces and (
            len(self.buf) + len(data) > self.target
            or self.pieces >= PACK_MAX_BLOBS
            or storage_class != self.storage_class
        ):
            await self.flush()
        self.storage_class = storage_class
        where = (self.key, len(self.buf))
        self.buf += data
        self.pieces += 1
        return where

    async def flush(self) -> None:
        if not self.pieces:  # a pack of empty pieces only is still written: lines name it
            return
        cls = self.storage_class if self.storage_class != "STANDARD" else None
        key = self.repo.object_key(self.key)
        await self.repo.store.put(key, bytes(self.buf), storage_class=cls)
        self.report.packs_written += 1
        self.report.bytes_copied += len(self.buf)
        self.report.bytes_stored += self.repo.store.stored_size(key, len(self.buf)) or len(self.buf)
        self.buf = bytearray()
        self.pieces = 0
        self.key = self.repo.pack_key(self.run_id)


async def repack(
    repo: Repo, lock: RepoLock, kept: list[str], packs: list[PackUse], run_id: str, target: int, part_size: int
) -> RepackReport:
    """Move what the kept snapshots need of `packs` into new packs of run `run_id` (a new
    snapshot-style id: garbage by the usual rule if this stops before a manifest names
    them), write the manifests that name them again, then delete the old packs. Before
    each manifest and before the deletion the exclusive lock is proven held: a prune that
    lost it (suspended, `unlock --force`) stops, since a backup may since have named the
    old places."""
    report = RepackReport()
    chosen = {p.key: p for p in packs}
    # 1. What of each chosen pack is needed (a piece is a place and a length: an empty
    # file's blob shares its offset with the next blob), and which snapshots name which.
    needs: dict[str, dict[tuple[int, int], _Need]] = {k: {} for k in chosen}
    names: dict[str, set[str]] = {}
    for sid in kept:
        async for line in repo.read_manifest(sid):
            for key, offset, need in _pieces(line):
                if key in chosen:
                    needs[key].setdefault((offset, need.length), need)
                    names.setdefault(sid, set()).add(key)

    # 2. The needed pieces copied, pack by pack, into new packs of the same storage class.
    reader = PackReader(repo.store, repo)
    out = _Out(repo, run_id, target, report)
    moves: dict[tuple[str, int, int], tuple[str, int]] = {}
    moved: list[PackUse] = []
    for p in sorted(chosen.values(), key=lambda p: (p.storage_class or "", p.key)):
        pieces = sorted(needs.pop(p.key).items())
        try:
            got = await _read_pieces(reader, p.key, pieces)
        except (StoreError, RepoError, DecryptError) as exc:
            if isinstance(exc, DecryptError) or bytes_lost(exc):  # gone, short or damaged
                log.warning("pack %s is damaged (%s): left as it is", p.key, str(exc).splitlines()[0])
                report.damaged.append(p.key)
            else:  # a server that did not answer (retried already): the next prune tries again
                log.warning("left pack %s as it is: it could not be read: %s", p.key, str(exc).splitlines()[0])
                report.unreadable.append(p.key)
            continue
        if got is None:
            log.warning("pack %s is damaged (bytes a snapshot needs do not match their sha256): left as it is", p.key)
            report.damaged.append(p.key)
            continue
        for ((offset, length), _), data in zip(pieces, got, strict=True):
            moves[(p.key, offset, length)] = await out.add(data, p.storage_class)
        moved.append(p)
    await out.flush()
    if not moved:
        return report

    # 3. The manifests name the new places; 4. then the old packs go.
    def fix(line: ManifestLine) -> ManifestLine:
        if line.chunks is not None:
            line.chunks = [
                c._replace(key=to[0], offset=to[1]) if (to := moves.get((c.key, c.offset, c.length))) else c
                for c in line.chunks
            ]
        elif line.key is not None and line.offset is not None and (to := moves.get((line.key, line.offset, line.size))):
            line.key, line.offset = to
        return line

    gone = {p.key for p in moved}
    budget = ByteBudget(64 << 20)
    for sid in kept:
        if names.get(sid, set()) & gone:
            await lock.ensure_held()
            if await repo.rewrite_manifest(sid, budget, part_size, fix):
                report.manifests_rewritten += 1
    await lock.ensure_held()
    await repo.store.delete([repo.object_key(k) for k in sorted(gone)])
    report.packs_repacked = len(moved)
    report.bytes_freed = sum(p.size for p in moved) - report.bytes_stored
    return report


async def _read_pieces(reader: PackReader, key: str, pieces: list[tuple[tuple[int, int], _Need]]) -> list[bytes] | None:
    """The pieces' bytes (pieces sorted by place), read by spans of neighbours (BATCH_GAP,
    BATCH_SPAN); None when one does not match what its line records."""
    got: list[bytes] = []
    i = 0
    while i < len(pieces):
        start, length = pieces[i][0]
        j = i + 1
        end = start + length
        while j < len(pieces) and pieces[j][0][0] - end <= BATCH_GAP and sum(pieces[j][0]) - start <= BATCH_SPAN:
            end = max(end, sum(pieces[j][0]))
            j += 1
        data = await reader.read(key, start, end)
        for (offset, length), need in pieces[i:j]:
            piece = data[offset - start : offset - start + length]
            if not _check(need, piece):
                return None
            got.append(piece)
        i = j
    return got
