"""Packs (format 3, docs/format.md): many small files and chunks in one object.

A library of 100,000 photos is 300,000 files, most of them thumbnails of a few KB: an object
per file costs a request per file both ways, and storage classes with a per-object minimum
bill each one as 128 KiB. Small files and the chunks of the database's files are gathered
into packs of about a part's size instead (restic's packs, pgBackRest's bundles). A pack is
the blobs one after the other, nothing else: a plain pack is their bytes, an encrypted one
one age file of them, so `age -d` opens any pack. Where each blob is, is the manifest's
business (ManifestLine.offset, Chunk); a file is read back by a ranged GET of its bytes,
and of an encrypted pack by a ranged GET of the age chunks that hold them (age.OpenedHeader).

Packs are written under data/<run id>/%pack/ with a random name, never rewritten; a line
of a snapshot names the pack its bytes are in only once that pack was uploaded (the
manifest waits for it, as it waits for any upload).
"""

from __future__ import annotations

import asyncio
import hashlib
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from immich_stream.errors import RepoError
from immich_stream.repository.age import CHUNK as AGE_CHUNK
from immich_stream.repository.age import DecryptError, OpenedHeader
from immich_stream.repository.layout import Layout
from immich_stream.repository.manifest import Chunk, ManifestLine
from immich_stream.repository.sealed import SealedStore
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.checksums import MIB, SMALL_OBJECT

# A library file this small goes into a pack (thumbnails, previews, sidecars, most of a
# data directory); a larger one (photos, videos) stays an object of its own.
PACK_FILE_MAX = 512 * 1024
# The database's files are stored as chunks of this size, each once (by sha256) and
# compressed when that saves an eighth: a night's few changed rows cost a few chunks, not
# the 1 GiB segments and 16 MiB WAL files they are in. A multiple of Postgres's 8 KiB page.
# Rows changed at random touch a page here and there (heap, index): with 1 MiB chunks 50
# rows stored ~18 MiB a night of a 503 MiB data directory (bench/scale.py); a quarter of
# that is a quarter of the bytes, for 4,096 chunk entries per GiB in each manifest.
CHUNK_SIZE = 256 * 1024
PACK_TARGET = 16 * MIB  # a pack is uploaded once it holds this much (or PACK_MAX_BLOBS blobs)
PACK_MAX_BLOBS = 4096  # below roots.ORDER_WINDOW: lines wait for their pack in that window
HEADER_PROBE = 4096  # the first ranged read of an encrypted pack: its header (a few recipients)
# Files in one pack are read together when they lie this close (restic reads a pack's blobs
# for a restore the same way): a ranged read of their span, at most BATCH_SPAN bytes.
BATCH_GAP = 256 * 1024
BATCH_SPAN = 8 * 1024 * 1024
BATCH_FILES = 2048


def pack_target(part_size: int, max_memory: int) -> int:
    """The size a pack is uploaded at: one PUT (a part's size at most), and small beside the
    memory budget (a pack being filled, and up to four being sent, are held in memory)."""
    return max(64 * 1024, min(PACK_TARGET, part_size, max_memory // 8))


@dataclass
class _Pack:
    key: str
    blobs: list[bytes] = field(default_factory=list)
    size: int = 0
    held: int = 0  # budget bytes its blobs hold
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class PackWriter:
    """Blobs gathered into packs of about `target` bytes: one pack is filled at a time, a
    full one is uploaded in the background (up to `inflight` at once) while the next fills.
    add() returns where the blob is and a future that resolves once its pack is in the
    bucket (or fails with the upload's error). The blob's memory is the caller's budget,
    acquired before it read the blob and released here once the pack was sent."""

    def __init__(
        self,
        store: SealedStore,
        layout: Layout,
        run_id: str,
        budget: ByteBudget,
        target: int,
        inflight: int = 4,
        max_blobs: int = PACK_MAX_BLOBS,
        storage_class: str | None = None,
    ) -> None:
        self.store = store
        self.storage_class = storage_class  # of the root's files (a pack's key does not name its root)
        self.layout = layout
        self.run_id = run_id
        self.budget = budget
        self.target = target
        self.max_blobs = max_blobs
        self._open: _Pack | None = None
        self._slots = asyncio.Semaphore(inflight)
        self._uploads: set[asyncio.Task[None]] = set()
        self._failed: BaseException | None = None
        self._aborted = False
        self._sending = 0  # packs being uploaded whose budget is not released yet
        budget.on_wait.append(self._if_starved)
        self.packs = 0  # uploaded
        self.bytes = 0

    async def add(self, data: bytes, held: int) -> tuple[str, int, asyncio.Future[None]]:
        """Put data in the open pack: (its key, the blob's offset, the pack's future).
        `held`: bytes of the budget the caller acquired for data, released with the pack."""
        if self._failed is not None:
            raise self._failed
        if self._open is None:
            self._open = _Pack(self.layout.pack_key(self.run_id))
        pack = self._open
        offset = pack.size
        pack.blobs.append(data)
        pack.size += len(data)
        pack.held += held
        if pack.size >= self.target or len(pack.blobs) >= self.max_blobs:
            await self._send()
        else:
            self._if_starved()
        return pack.key, offset, pack.done

    def _if_starved(self) -> None:
        """Send the open pack when an acquire of the budget waits and no pack upload is
        under way to free some: its blobs hold budget only its upload frees, so a pack
        waiting to be filled would wait forever (a budget little larger than a pack, or one
        held by large files' parts). Checked when an acquire starts waiting (the budget's
        on_wait), when a blob is added, and when the last upload under way ends; with
        uploads under way, their ends free budget (and slow uploads keep packs full)."""
        if (
            self.budget.waiting
            and self._sending == 0
            and not self._aborted
            and self._failed is None
            and self._open is not None
            and self._open.blobs
        ):
            self._start_upload()

    async def flush(self) -> None:
        """Send the open pack (the end of a root, or memory wanted elsewhere)."""
        if self._open is not None and self._open.blobs:
            await self._send()

    async def _send(self) -> None:
        await self._slots.acquire()  # at most `inflight` packs in flight or waiting for a slot
        self._slots.release()
        if self._open is not None and self._open.blobs:  # not sent meanwhile (_if_starved)
            self._start_upload()

    def _start_upload(self) -> None:
        pack, self._open = self._open, None
        assert pack is not None
        self._sending += 1  # its blobs' budget is on its way to be freed from now on
        task = asyncio.create_task(self._upload(pack))
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)

    async def _upload(self, pack: _Pack) -> None:
        try:
            async with self._slots:
                data = b"".join(pack.blobs)
                pack.blobs.clear()
                await self.store.put(
                    self.layout.object_key(pack.key), data, progress=True, storage_class=self.storage_class
                )
                self.packs += 1
                self.bytes += len(data)
                pack.done.set_result(None)
        except BaseException as exc:
            self._failed = self._failed or exc
            if pack.done.done():
                pass
            elif isinstance(exc, asyncio.CancelledError):  # the run stopped: so do its lines
                pack.done.cancel()
            else:
                pack.done.set_exception(exc)
                pack.done.exception()  # retrieved: the lines waiting for it raise it
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            await asyncio.shield(self.budget.release(pack.held))
            self._sending -= 1
            self._if_starved()

    async def close(self) -> None:
        """Send the open pack and wait for every upload; raises the first upload's error."""
        await self.flush()
        while self._uploads:
            await asyncio.gather(*list(self._uploads), return_exceptions=True)
        self._unhook()
        if self._failed is not None:
            raise self._failed

    def _unhook(self) -> None:
        if self._if_starved in self.budget.on_wait:
            self.budget.on_wait.remove(self._if_starved)

    async def abort(self) -> None:
        """Stop the uploads under way (the run failed): nothing is named by a manifest."""
        self._aborted = True
        self._unhook()
        for task in list(self._uploads):
            task.cancel()
        if self._uploads:
            await asyncio.gather(*list(self._uploads), return_exceptions=True)


class Packing:
    """What the files of one root are packed with: the writer, and the chunks known by
    their sha256 (the parent snapshot's, when their pack is listed, and this run's own as
    they are added, with the future of their pack)."""

    def __init__(
        self,
        writer: PackWriter,
        parent: dict[str, Chunk],
        listed: Callable[[str], bool],
        own: dict[str, tuple[Chunk, asyncio.Future[None] | None]] | None = None,
    ) -> None:
        self.writer = writer
        self._parent = parent
        self._listed = listed
        # this run's chunks, shared by its passes: what the live pass stored while Postgres
        # ran is not stored again by the pass with it stopped
        self._own = own if own is not None else {}

    def known(self, digest: str) -> tuple[Chunk, asyncio.Future[None] | None] | None:
        own = self._own.get(digest)
        if own is not None:
            return own
        chunk = self._parent.get(digest)
        if chunk is not None and self._listed(chunk.key):
            return chunk, None
        return None

    def remember(self, chunk: Chunk, done: asyncio.Future[None]) -> None:
        self._own[chunk.sha256] = (chunk, done)


def blob_runs(lines: list[ManifestLine]) -> list[list[ManifestLine]]:
    """Blobs of one pack (lines with `offset`), in the order of their offsets, cut into runs
    that one ranged read each takes: close together (BATCH_GAP), a span of at most
    BATCH_SPAN bytes and BATCH_FILES files (a single larger blob is a run of its own)."""
    runs: list[list[ManifestLine]] = []
    run: list[ManifestLine] = []
    start = end = 0
    for line in sorted(lines, key=lambda ln: (ln.offset or 0, ln.size)):
        offset = line.offset or 0
        if run and (offset > end + BATCH_GAP or offset + line.size - start > BATCH_SPAN or len(run) >= BATCH_FILES):
            runs.append(run)
            run = []
        if not run:
            start = end = offset
        run.append(line)
        end = max(end, offset + line.size)
    if run:
        runs.append(run)
    return runs


def compress(block: bytes) -> bytes:
    """A chunk as stored: zlib (level 1: a data directory is gigabytes, in the downtime)
    when that saves an eighth, else the bytes as they are (Chunk.compressed tells)."""
    packed = zlib.compress(block, 1)
    return packed if len(packed) <= len(block) - len(block) // 8 else block


def open_chunk(chunk: Chunk, stored: bytes) -> bytes:
    """A chunk's bytes from what its pack holds, checked against its size and sha256."""
    if len(stored) != chunk.length:
        raise RepoError(f"pack {chunk.key} ends early ({len(stored)} of {chunk.length} bytes of a chunk)")
    try:
        data = zlib.decompress(stored) if chunk.compressed else stored
    except zlib.error as exc:
        raise RepoError(f"a chunk in pack {chunk.key} is damaged ({exc}): run `verify --read-data`") from None
    if len(data) != chunk.size or hashlib.sha256(data).hexdigest() != chunk.sha256:
        raise RepoError(f"a chunk in pack {chunk.key} does not match its manifest line: run `verify --read-data`")
    return data


class PackReader:
    """Ranged reads of packs: a file's bytes, a chunk's, or a run of blobs at once (a
    restore takes the files of a pack together). An encrypted pack's header is read and
    opened once per pack (kept for the last `cache` packs)."""

    def __init__(self, store: SealedStore, layout: Layout, cache: int = 256) -> None:
        self.store = store
        self.layout = layout
        self._headers: OrderedDict[str, OpenedHeader] = OrderedDict()
        self._cache = cache

    async def _raw(self, key: str, start: int, end: int) -> bytes:
        small = end - start <= SMALL_OBJECT
        return b"".join([c async for c in self.store.iter_raw(key, MIB, small, start, end)])

    async def _header(self, key: str) -> OpenedHeader:
        head = self._headers.get(key)
        if head is not None:
            self._headers.move_to_end(key)
            return head
        sealing = self.store.sealing_for(key)
        assert sealing is not None
        want = HEADER_PROBE
        while True:
            raw = await self._raw(key, 0, want)
            try:
                head = await asyncio.to_thread(OpenedHeader.parse, raw, list(sealing.identities))
            except DecryptError as exc:
                raise DecryptError(f"{key}: {exc.detail}", exc.detail) from None
            if head is not None:
                break
            if len(raw) < want or want >= 128 * 1024:
                raise DecryptError(f"{key}: the age file ends inside its header: truncated", "truncated")
            want *= 4
        self._headers[key] = head
        if len(self._headers) > self._cache:
            self._headers.popitem(last=False)
        return head

    async def read(self, relkey: str, start: int, end: int) -> bytes:
        """The plaintext bytes [start, end) of the pack relkey (exactly that many, or an error)."""
        key = self.layout.object_key(relkey)
        if end <= start:
            return b""
        if self.store.sealing_for(key) is None:
            data = await self._raw(key, start, end)
        else:
            for again in (False, True):
                head = await self._header(key)
                first, s0, s1 = head.span(start, end)
                raw = await self._raw(key, s0, s1)
                try:
                    plain = (
                        head.open_chunks(first, raw)
                        if len(raw) <= 65536
                        else await asyncio.to_thread(head.open_chunks, first, raw)
                    )
                    break
                except DecryptError as exc:
                    # the pack may have been sealed anew since its header was read (key
                    # reencrypt): read the header again once before calling it damaged
                    if again or self._headers.pop(key, None) is None:
                        raise DecryptError(f"{key}: {exc.detail}", exc.detail) from None
            skip = start - first * AGE_CHUNK
            data = plain[skip : skip + end - start]
        if len(data) != end - start:
            raise RepoError(f"pack {relkey} ends early: {len(data)} of {end - start} bytes at {start}")
        return data

    async def chunk(self, chunk: Chunk) -> bytes:
        """A chunk's bytes, opened and checked (open_chunk)."""
        stored = await self.read(chunk.key, chunk.offset, chunk.offset + chunk.length)
        if chunk.length <= 65536:
            return open_chunk(chunk, stored)
        return await asyncio.to_thread(open_chunk, chunk, stored)

    async def file(self, line: ManifestLine) -> AsyncIterator[bytes]:
        """A file's bytes, whatever the form of its line (an object of its own, a blob in a
        pack, chunks), in pieces: the whole-object and chunked forms are streamed."""
        if line.chunks is not None:
            for chunk in line.chunks:
                yield await self.chunk(chunk)
        elif line.key is not None and line.offset is not None:
            yield await self.read(line.key, line.offset, line.offset + line.size)
        elif line.key is not None:
            async for piece in self.store.iter_object(self.layout.object_key(line.key), MIB, line.size <= SMALL_OBJECT):
                yield piece
        else:
            raise RepoError(f"manifest line {line.root}/{line.path} has no object key: the manifest is damaged")
