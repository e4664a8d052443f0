"""Packs (format 3): blobs gathered into pack objects and read back by range, plain and
age-encrypted, against the real S3 server; chunks compressed and checked."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import zlib

import pytest

from immich_stream.config import Settings
from immich_stream.errors import RepoError
from immich_stream.repository import age
from immich_stream.repository.manifest import Chunk
from immich_stream.repository.packs import PackReader, PackWriter, compress, open_chunk
from immich_stream.repository.repo import Repo
from immich_stream.repository.sealed import SealedStore
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store

MIB = 1024 * 1024


def test_any_range_of_an_age_file_opens_alone() -> None:
    """OpenedHeader: the header opened once, any run of STREAM chunks opens by its index,
    whatever the range (in one chunk, across chunks, the last chunk, the whole file)."""
    ident = age.Identity.generate()
    data = os.urandom(3 * age.CHUNK + 12345)
    sealed = age.seal(data, [ident.recipient])
    head = age.OpenedHeader.parse(sealed[:4096], [ident])
    assert head is not None
    rng = random.Random(3)
    cases = [(0, 1), (0, len(data)), (age.CHUNK - 5, age.CHUNK + 5), (len(data) - 1, len(data))]
    cases += [tuple(sorted(rng.sample(range(len(data) + 1), 2))) for _ in range(30)]
    for start, end in cases:
        first, s0, s1 = head.span(start, end)
        plain = head.open_chunks(first, sealed[s0:s1])
        skip = start - first * age.CHUNK
        assert plain[skip : skip + end - start] == data[start:end], (start, end)
    damaged = bytearray(sealed)
    damaged[head.payload + 10] ^= 1
    with pytest.raises(age.DecryptError, match="chunk 0 failed authentication"):
        head.open_chunks(0, bytes(damaged[head.payload : head.payload + age.SEALED_CHUNK]))
    assert age.OpenedHeader.parse(sealed[:40], [ident]) is None  # a header read only in part


def test_chunks_are_compressed_only_when_it_pays_and_checked_when_opened() -> None:
    zeros, noise = bytes(MIB), os.urandom(MIB)
    assert len(compress(zeros)) < 10_000 and compress(noise) == noise
    for block in (zeros, noise):
        stored = compress(block)
        chunk = Chunk("k", 0, len(stored), len(block), hashlib.sha256(block).hexdigest())
        assert open_chunk(chunk, stored) == block
    bad = Chunk("k", 0, 100, MIB, hashlib.sha256(zeros).hexdigest())
    with pytest.raises(RepoError, match="damaged"):
        open_chunk(bad, b"\x00" * 100)
    other = zlib.compress(noise[: MIB // 2] + bytes(MIB // 2), 1)
    forged = Chunk("k", 0, len(other), MIB, hashlib.sha256(zeros).hexdigest())
    with pytest.raises(RepoError, match="does not match"):
        open_chunk(forged, other)


@pytest.mark.parametrize("encrypted", [False, True])
async def test_blobs_go_into_packs_and_come_back_by_range(s3_settings: Settings, encrypted: bool) -> None:
    """Blobs of many sizes: a pack is sent when it holds its target, the last on close;
    every blob reads back exactly by a ranged GET; the budget is all released."""
    ident = age.Identity.generate()
    rng = random.Random(5)
    blobs = [rng.randbytes(rng.choice([0, 1, 200, 3000, 70_000, 300_000])) for _ in range(120)]
    budget = ByteBudget(64 * MIB)
    async with Store(StoreOptions.from_settings(s3_settings)) as raw:
        sealing = age.Sealing((ident.recipient,), (ident,), ("",)) if encrypted else None
        store = SealedStore(raw, sealing=sealing)
        repo = Repo(store, "")
        writer = PackWriter(store, repo, "2026-12-04T000000Z-abcd", budget, target=MIB)
        placed = []
        for blob in blobs:
            await budget.acquire(max(len(blob), 1))
            placed.append(await writer.add(blob, max(len(blob), 1)))
        await writer.close()
        assert budget.used == 0
        keys = {key for key, _, _ in placed}
        assert writer.packs == len(keys) and 3 <= len(keys) <= 8, "about a megabyte each"
        assert all(done.done() and done.exception() is None for _, _, done in placed)
        reader = PackReader(store, repo)
        got = await asyncio.gather(
            *(reader.read(k, off, off + len(b)) for (k, off, _), b in zip(placed, blobs, strict=True))
        )
        assert got == blobs
        if encrypted:  # each pack is one age file: `age -d` opens it; its blobs are in it in order
            for key in keys:
                whole = age.open_sealed(await raw.get(repo.object_key(key)), [ident])
                mine = [(off, b) for (k, off, _), b in zip(placed, blobs, strict=True) if k == key]
                assert whole == b"".join(b for _, b in sorted(mine, key=lambda t: t[0]))
        with pytest.raises(RepoError, match="ends early"):
            key, off, _ = placed[-1]
            await reader.read(key, off, off + len(blobs[-1]) + 10 * MIB)
