"""The upload writers: `MultipartUpload` (one multipart upload, parts sent concurrently,
aborted on any error) and `StreamWriter` (a stream of unknown length, pg_dump or a
manifest, in parts that grow, within the memory budget).

Encryption is not theirs: the repository hands a writer a `PartSealer` (its age encryptor)
that turns each part into the bytes to send, and the storage class of the object; the writer
only moves what the sealer returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from immich_stream import cleanup
from immich_stream.errors import StoreError
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.checksums import MAX_PARTS, MIB, sealed_hashes, stream_part_size
from immich_stream.s3.store import Store

log = logging.getLogger(__name__)


class PartSealer(Protocol):
    """Turns an object's bytes, part by part in order, into the bytes stored (age's
    Encryptor): push() returns what to send (the last chunk of a part may be held back
    until the next push, or the final one); `done` once the final part was pushed."""

    done: bool

    def push(self, data: bytes, final: bool = False) -> bytes: ...


class MultipartUpload:
    """One multipart upload with parts sent concurrently; aborted on any error.

    `async with MultipartUpload(store, key, budget) as mp: await mp.add(data); ...` then
    `await mp.complete()`. Each part's bytes are counted against `budget` (acquired by
    `add`) until the part is sent. Leaving the block without complete() aborts the upload,
    so no error path leaves parts behind in the bucket.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        budget: ByteBudget,
        max_inflight: int = 4,
        sealer: PartSealer | None = None,
        storage_class: str | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.budget = budget
        self.upload_id: str | None = None
        self._etags: dict[int, tuple[str, str]] = {}  # number -> (ETag, checksum value)
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_inflight)
        self._next = 1
        self._failure: BaseException | None = None
        self._completed = False
        self.size = 0  # bytes sent (after encryption, in an encrypted repository)
        self._enc = sealer  # each part is sealed before it is sent (None: sent as it is)
        self._storage_class = storage_class

    async def __aenter__(self) -> MultipartUpload:
        self.upload_id = await self.store.create_multipart(self.key, self._storage_class)
        return self

    async def add(self, data: bytes, check: str | None = None, sha256: str | None = None, final: bool = False) -> None:
        """Queue the next part (its bytes must already be held in the budget by the caller,
        who hands them over: they are released once the part is sent). With a sealer
        the part is sealed here, and check/sha256 (the plaintext's) are not
        used; `final`: nothing follows (else complete() seals the last chunk, held back)."""
        size = len(data)  # what the caller holds in the budget
        try:
            self._raise_failure()
            await self._slots.acquire()
        except BaseException:
            await asyncio.shield(self.budget.release(size))
            raise
        if self._enc is not None:
            enc, plain, checksum = self._enc, data, self.store.checksum

            def seal() -> tuple[bytes, str, str]:
                out = enc.push(plain, final)
                return out, *sealed_hashes(checksum, out)

            del data
            try:
                data, check, sha256 = await asyncio.to_thread(seal)
            except BaseException:
                self._slots.release()
                await asyncio.shield(self.budget.release(size))
                raise
            del plain
        number = self._next
        self._next += 1
        self.size += len(data)
        holder = [data]  # the task's only reference, dropped before the budget is given back
        del data

        async def send() -> None:
            try:
                assert self.upload_id is not None
                self._etags[number] = await self.store.upload_part(
                    self.key, self.upload_id, number, holder[0], check, sha256
                )
            except BaseException as exc:
                if self._failure is None:
                    self._failure = exc
                raise
            finally:
                holder.clear()
                self._slots.release()
                await asyncio.shield(self.budget.release(size))

        task = asyncio.create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # kept in self._failure; marks it retrieved

    @property
    def parts(self) -> int:
        return self._next - 1

    @property
    def sealed(self) -> bool:
        return self._enc is not None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._raise_failure()

    async def complete(self) -> None:
        if self._enc is not None and not self._enc.done:
            await self.add(b"", final=True)  # the held-back last chunk
        await self._drain()
        assert self.upload_id is not None
        try:
            await self.store.complete_multipart(
                self.key, self.upload_id, [self._etags[i] for i in range(1, self._next)]
            )
        except StoreError as exc:
            # The server may have completed it and its answer got lost: the retry then
            # finds no such upload. The key is this run's own, so an object there with
            # exactly the bytes sent is this upload.
            if exc.code != "NoSuchUpload" or await self.store.head(self.key) != self.size:
                raise
            log.info("the answer to completing %s was lost; the object is there with its %d bytes", self.key, self.size)
        self._completed = True

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._completed:
            return
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.upload_id is not None:
            # Bounded: S3 may be what failed. The original error matters more.
            await cleanup.best_effort(
                f"abort the unfinished upload of {self.key}", self.store.abort_multipart(self.key, self.upload_id)
            )


class StreamWriter:
    """Upload a stream of unknown length (pg_dump, manifests) to one key.

    Memory: the writer reserves a whole part in the budget before filling it, so it never
    waits for memory while holding unsent bytes (waiting then could wait for itself: the
    deadlock of parts grown past the budget). Parts grow with the part number (see
    stream_part_size) up to half the budget; a stream that ends within the first part is
    sent as one PUT. Abort on error via MultipartUpload.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        budget: ByteBudget,
        part_size: int,
        max_inflight: int = 3,
        sealer: Callable[[], PartSealer] | None = None,
        storage_class: str | None = None,
    ) -> None:
        """`sealer`: makes the sealer of the object's bytes (each stream is one age file)."""
        self.store = store
        self._sealer = sealer
        self._storage_class = storage_class
        self.key = key
        self.budget = budget
        self.part_size = part_size
        self.max_part = max(part_size, budget.limit // 2)
        self.max_inflight = max_inflight
        self.size = 0
        self.stored: int | None = None  # bytes in the bucket, once finished, when encrypted
        self.parts = 0  # how many requests the stream went up in (1 for a plain PUT)
        self._buf = bytearray()
        self._reserved = 0  # budget held for the part being filled
        self._mp: MultipartUpload | None = None

    async def __aenter__(self) -> StreamWriter:
        return self

    def _target(self) -> int:
        return stream_part_size((self._mp.parts if self._mp else 0) + 1, self.part_size, self.max_part)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self._reserved:
                target = self._target()
                await self.budget.acquire(target)
                self._reserved = target
            room = self._reserved - len(self._buf)
            self._buf += view[:room]
            self.size += min(room, len(view))
            view = view[room:]
            if len(self._buf) >= self._reserved:
                await self._send_part()

    async def _send_part(self) -> None:
        if self._mp is None:
            sealer = self._sealer() if self._sealer is not None else None
            self._mp = MultipartUpload(
                self.store, self.key, self.budget, self.max_inflight, sealer, self._storage_class
            )
            await self._mp.__aenter__()
        if self._mp.parts >= MAX_PARTS - 1:  # one is kept for the end of the stream
            raise StoreError(
                f"{self.key} would need more than {MAX_PARTS} parts (the stream passed "
                f"{self.size // MIB} MiB): raise --max-memory, parts grow to half of it"
            )
        # bytes, not bytearray: botocore and aiohttp copy a bytearray body several times.
        part, self._buf = bytes(self._buf), bytearray()
        self._reserved -= len(part)  # handed over: the part upload releases it once sent
        await self._mp.add(part)
        await self._release_reserved()

    async def finish(self) -> None:
        data, self._buf = bytes(self._buf), bytearray()
        if self._mp is None:
            if self._sealer is None:
                await self.store.put(self.key, data, progress=True, storage_class=self._storage_class)
            else:
                enc, checksum, plain = self._sealer(), self.store.checksum, data

                def seal_and_hash() -> tuple[bytes, str, str]:
                    out = enc.push(plain, final=True)
                    return out, *sealed_hashes(checksum, out)

                del data
                data, check, sha = seal_and_hash() if len(plain) <= 65536 else await asyncio.to_thread(seal_and_hash)
                del plain
                await self.store.put(
                    self.key, data, check=check, sha256=sha, progress=True, storage_class=self._storage_class
                )
                self.stored = len(data)
            self.parts = 1
        else:
            if data or self._mp.parts == 0:
                self._reserved -= len(data)
                await self._mp.add(data, final=True)
            await self._mp.complete()
            self.parts = self._mp.parts
            self.stored = self._mp.size if self._mp.sealed else None
            await self._mp.__aexit__(None, None, None)
            self._mp = None
        await self._release_reserved()

    async def _release_reserved(self) -> None:
        if self._reserved:
            held, self._reserved = self._reserved, 0
            await asyncio.shield(self.budget.release(held))

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._mp is not None:
            await self._mp.__aexit__(exc_type, exc, tb)
        await self._release_reserved()
