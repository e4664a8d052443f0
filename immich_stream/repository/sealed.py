"""The repository's bucket: a `SealedStore` wraps the S3 layer's Store (which only moves
bytes) and seals before the store sees bytes. In an encrypted repository the objects under
the sealing's prefixes (data/ and snapshots/) are age files: put and the writers seal them,
get, iter_object and download open them (authenticated plaintext only, DecryptError when
damaged). It also gives each object written its storage class, by the repository's policy
(`storage_class_for`, from Repo: only the repository knows which keys are file data).

Everything else (listing, HEAD, delete, the watchdogs' view) is the Store's, passed through.
`sealing` is set by Repo once config.json was read (and switched by `key rotate`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from immich_stream.repository.age import DecryptError, Sealing
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.checksums import MIB, sealed_hashes
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import HeadInfo, ObjectInfo, Store
from immich_stream.s3.writers import MultipartUpload, StreamWriter


class SealedStore:
    """A Store with the repository's encryption and storage classes around it."""

    def __init__(
        self,
        store: Store,
        storage_class_for: Callable[[str], str | None] = lambda key: None,
        sealing: Sealing | None = None,
    ) -> None:
        self.raw = store  # the bytes as stored (encrypted or not)
        self.storage_class_for = storage_class_for
        # an encrypted repository's: which keys are age files (see age.py); None: plain
        self.sealing = sealing

    # -- the repository's own: sealing and storage classes -------------------------------

    def sealing_for(self, key: str) -> Sealing | None:
        """How the object at key is encrypted, or None when it is stored as it is."""
        s = self.sealing
        return s if s is not None and s.applies(key) else None

    def stored_size(self, key: str, size: int) -> int | None:
        """The bytes in the bucket of an object of `size` plain bytes written now; None when
        the object is stored as it is (its size is the plain size)."""
        s = self.sealing_for(key)
        return s.size(size) if s is not None else None

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str | None = None,
        check: str | None = None,
        sha256: str | None = None,
        progress: bool = False,
        sealed: bool = False,
        storage_class: str | None = None,
    ) -> None:
        """Store.put, sealed first where the key is an age file (check and sha256 then
        describe the plaintext and are not used), unless `sealed` says the caller did (check
        and sha256 are then the ciphertext's). `storage_class`: where the key does not tell
        (a pack: the class of its root's files)."""
        sealing = None if sealed else self.sealing_for(key)
        if sealing is not None:
            plain, checksum = data, self.raw.checksum

            def seal_and_hash() -> tuple[bytes, str, str]:
                out = sealing.seal(plain)
                return out, *sealed_hashes(checksum, out)

            data, check, sha256 = seal_and_hash() if len(plain) <= 65536 else await asyncio.to_thread(seal_and_hash)
            del plain
        await self.raw.put(
            key, data, content_type, check, sha256, progress, storage_class or self.storage_class_for(key)
        )

    def multipart(
        self, key: str, budget: ByteBudget, max_inflight: int = 4, storage_class: str | None = None
    ) -> MultipartUpload:
        """A MultipartUpload of key: its parts sealed where the key is an age file (then the
        add()'s check/sha256, the plaintext's, are not used; `final` marks the last part)."""
        sealing = self.sealing_for(key)
        sealer = sealing.encryptor() if sealing is not None else None
        return MultipartUpload(
            self.raw, key, budget, max_inflight, sealer, storage_class or self.storage_class_for(key)
        )

    def stream(self, key: str, budget: ByteBudget, part_size: int, max_inflight: int = 3) -> StreamWriter:
        """A StreamWriter of key, sealed where the key is an age file (`stored` then says the
        bytes in the bucket)."""
        sealing = self.sealing_for(key)
        sealer = sealing.encryptor if sealing is not None else None
        return StreamWriter(self.raw, key, budget, part_size, max_inflight, sealer, self.storage_class_for(key))

    async def download(self, key: str, sink: Callable[[memoryview], None], size_hint: int, small: bool = False) -> None:
        """Store.download; `size_hint` is the plaintext's. An encrypted object is decrypted
        on the way: sink gets only authenticated plaintext, and a damaged object raises
        DecryptError."""
        sealing = self.sealing_for(key)
        if sealing is None:
            await self.raw.download(key, sink, size_hint, small)
            return
        dec = sealing.decryptor()

        def opened(view: memoryview) -> None:
            plain = dec.feed_view(view)  # one write (and hash update) per piece received
            if plain:
                sink(plain)
            plain.release()

        def last() -> None:
            for piece in dec.finish():
                sink(memoryview(piece))

        try:
            await self.raw.download(key, opened, sealing.size(size_hint), small)
            await asyncio.to_thread(last)
        except DecryptError as exc:
            raise DecryptError(f"{key}: {exc.detail}", exc.detail) from None

    async def get(self, key: str) -> bytes:
        """Store.get (an answer, not progress), opened where sealed."""
        chunks = [c async for c in self.iter_object(key, progress=False)]
        return b"".join(chunks)

    async def iter_object(
        self, key: str, chunk_size: int = MIB, small: bool = False, progress: bool = True
    ) -> AsyncIterator[bytes]:
        """Store.iter_object; an encrypted object's plaintext, authenticated chunk by chunk
        (DecryptError when it is damaged)."""
        sealing = self.sealing_for(key)
        if sealing is None:
            async for chunk in self.raw.iter_object(key, chunk_size, small, progress):
                yield chunk
            return
        dec = sealing.decryptor()
        try:
            async for chunk in self.raw.iter_object(key, chunk_size, small, progress):
                for piece in dec.feed(chunk) if len(chunk) <= 65536 else await asyncio.to_thread(dec.feed, chunk):
                    yield piece
            for piece in dec.finish():
                yield piece
        except DecryptError as exc:
            raise DecryptError(f"{key}: {exc.detail}", exc.detail) from None

    def iter_raw(
        self, key: str, chunk_size: int, small: bool = False, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """The object's bytes as stored (encrypted or not); `start`, `end`: only [start, end)."""
        return self.raw.iter_object(key, chunk_size, small, start=start, end=end)

    # -- the Store's, passed through --------------------------------------------------------

    @property
    def bucket(self) -> str:
        return self.raw.bucket

    @property
    def checksum(self) -> str:
        return self.raw.checksum

    @property
    def options(self) -> StoreOptions:
        return self.raw.options

    @property
    def last_activity(self) -> float:
        return self.raw.last_activity

    def touch(self) -> None:
        self.raw.touch()

    def check_moving(self) -> None:
        self.raw.check_moving()

    def oldest_request(self) -> tuple[str, float] | None:
        return self.raw.oldest_request()

    def hung(self, stall: float) -> str | None:
        return self.raw.hung(stall)

    async def head(self, key: str) -> int | None:
        return await self.raw.head(key)

    async def head_info(self, key: str) -> HeadInfo | None:
        return await self.raw.head_info(key)

    async def restore_object(self, key: str, days: int, tier: str) -> str:
        return await self.raw.restore_object(key, days, tier)

    def list_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        return self.raw.list_objects(prefix)

    async def delete(self, keys: list[str]) -> None:
        await self.raw.delete(keys)

    async def discard(self, keys: list[str]) -> bool:
        return await self.raw.discard(keys)

    async def can_delete(self, key: str) -> bool:
        return await self.raw.can_delete(key)

    @property
    def append_only(self) -> bool:
        return self.raw.append_only

    async def list_multipart(self, prefix: str) -> list[tuple[str, str, Any]]:
        return await self.raw.list_multipart(prefix)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self.raw.abort_multipart(key, upload_id)
