"""`copy`: snapshots of one repository copied into another (restic's copy, kopia's sync-to),
the second copy of 3-2-1.

Objects are copied as they are stored, byte for byte, when both repositories have the same
config.json (a destination without a repository gets the source's, verbatim): an encrypted
repository stays encrypted to the same recipients, with the same authentication key, and the
MACs of manifests and snapshot.json (which bind the snapshot id, not the bucket) hold at the
destination. A destination with keys of its own (its identity_file named) gets each object
re-sealed: opened with the source's identity, sealed for its recipients on the way, its
manifests and snapshot.json written again with its MACs. A destination encrypted to other
keys that are not named is refused (no MAC can be made for it), as is a plain source to an
encrypted destination or the reverse.

Per snapshot, in this order: the data objects its manifest names that the destination does
not hold (same key and size, from one listing of the destination's data/), the dump, the
manifest, then snapshot.json last: a copy cut anywhere is never a snapshot at the
destination, and what it left there is garbage to the destination's prune (a snapshot
directory without snapshot.json, data objects no manifest names). Run again, it copies only
what is missing.

An object is copied server-side (CopyObject) when both repositories are on one endpoint with
one set of credentials; otherwise streamed through memory (the byte budget; multipart
uploads of part_size parts for larger objects, aborted on any error), never staged on disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from immich_stream.config import Settings
from immich_stream.errors import ConfigError, ImmichStreamError, RepoError
from immich_stream.repository.layout import is_pack_key, new_snapshot_id
from immich_stream.repository.locks import RepoLock
from immich_stream.repository.manifest import ManifestWriter
from immich_stream.repository.repo import Repo
from immich_stream.repository.sealed import SealedStore
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.store import Store
from immich_stream.s3.writers import MultipartUpload

log = logging.getLogger(__name__)

COPY_OBJECT_MAX = 5 << 30  # S3's largest CopyObject; larger ones are streamed


@dataclass
class CopyStats:
    """What a copy did (the --json summary and the metrics)."""

    destination: str
    copied: list[str] = field(default_factory=list)  # snapshots committed at the destination by this run
    present: list[str] = field(default_factory=list)  # snapshots the destination had already
    objects: int = 0  # objects copied
    bytes: int = 0  # their bytes (as stored)
    server_side: int = 0  # of them, copied by CopyObject
    held: int = 0  # objects the destination held already (same key and size)
    created: bool = False  # the destination's repository was created by this run
    resealed: bool = False  # objects opened and sealed again for the destination's recipients

    @property
    def last(self) -> str | None:
        done = self.copied + self.present
        return max(done) if done else None


def _encryption(cfg: dict[str, Any]) -> tuple[frozenset[str], str | None] | None:
    enc = cfg.get("encryption")
    if not isinstance(enc, dict):
        return None
    auth = cfg.get("auth")
    key_id = auth.get("key_id") if isinstance(auth, dict) else None
    return frozenset(str(r) for r in enc.get("recipients") or []), key_id


# what prepare_destination decided
CREATED = "created"  # the source's config.json written there: objects copied as they are
SAME = "same"  # an existing repository with the source's keys: objects copied as they are
NEW = "new"  # no repository there, its own keys named: created with them, objects re-sealed
RESEAL = "reseal"  # an existing repository with other keys (named): objects re-sealed


async def prepare_destination(src: Repo, dst: Repo, own_keys: bool) -> str:
    """How the source's objects go to the destination (CREATED, SAME, NEW, RESEAL), after
    giving a destination without a repository the source's config.json byte for byte
    (unless `own_keys`: the destination's own identity file is named); a ConfigError in one
    line where no copy can be right."""
    raw = await src.store.raw.get(src.config_key())
    mine = json.loads(raw)  # checked (and its MAC) when the source was opened
    a = _encryption(mine)
    if own_keys and a is None:
        raise ConfigError(
            f"the source {src.where()} is plain and the destination has keys of its own (identity_file): a copy "
            "never encrypts a plain repository's objects; drop identity_file from the destination"
        )
    if await dst.store.raw.head(dst.config_key()) is None:
        if own_keys:
            return NEW
        await dst.store.raw.put(dst.config_key(), raw, "application/json")
        return CREATED
    try:
        theirs = json.loads(await dst.store.raw.get(dst.config_key()))
    except ValueError:
        raise RepoError(f"{dst.config_key()} is not JSON: the destination holds something else there") from None
    if not isinstance(theirs, dict):
        raise RepoError(f"{dst.config_key()} is not an immich-stream repository: choose another prefix")
    b = _encryption(theirs)
    if a is None and b is None:
        return SAME
    if a is None or b is None:
        which = "is plain and the destination encrypted" if a is None else "is encrypted and the destination plain"
        raise ConfigError(
            f"the source {src.where()} {which} ({dst.where()}): a copy never mixes plain and encrypted objects; "
            "give the destination a new prefix (copy creates it like the source)"
        )
    if a == b and not own_keys:
        return SAME
    if not own_keys:
        what = "other age recipients" if a[0] != b[0] else "another authentication key"
        raise ConfigError(
            f"the destination {dst.where()} is encrypted to {what} than the source: set identity_file in its "
            "[repositories.NAME] to its own identity file (with its `# immich-stream-auth:` line) to re-seal for "
            "it, or give the destination a new prefix (copy creates it with this repository's keys)"
        )
    return RESEAL


class Copier:
    """Copies committed snapshots of `src` into `dst` (see the module docstring). `dst_lock`
    is proved held before each snapshot.json is written (as a backup does before its commit)."""

    def __init__(
        self,
        src: Repo,
        dst: Repo,
        dst_lock: RepoLock,
        *,
        server_side: bool,
        reseal: bool = False,
        jobs: int,
        budget: ByteBudget,
        part_size: int,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        self.src, self.dst, self.dst_lock = src, dst, dst_lock
        self.server_side = server_side and not reseal
        # re-sealed: each object opened with the source's identity and sealed for the
        # destination's recipients; manifests and snapshot.json with its MACs
        self.reseal = reseal
        self.jobs = jobs
        self.budget = budget
        self.part_size = part_size
        self.check = check  # raises when a lock was lost
        self.stats = CopyStats(dst.where())
        self._src_sizes: dict[str, int] = {}
        self._dst_sizes: dict[str, int] = {}
        self._slots = asyncio.Semaphore(jobs)
        self._copied: set[str] = set()  # keys this run copied or found held

    async def _listing(self, repo: Repo, prefix: str) -> dict[str, int]:
        return {repo.relative_key(o.key): o.size async for o in repo.store.list_objects(prefix)}

    async def run(self, ids: list[str]) -> CopyStats:
        """Copy these committed snapshots of the source, oldest first."""
        committed = await self.dst.snapshot_ids()
        todo = [s for s in sorted(ids) if s not in committed]
        self.stats.present = [s for s in sorted(ids) if s in committed]
        if not todo:
            return self.stats
        # one listing of each side's data/ (and snapshots/): same key and size = held
        self._src_sizes = await self._listing(self.src, self.src.data_prefix())
        self._src_sizes.update(await self._listing(self.src, self.src.snapshots_prefix()))
        self._dst_sizes = await self._listing(self.dst, self.dst.data_prefix())
        self._dst_sizes.update(await self._listing(self.dst, self.dst.snapshots_prefix()))
        for sid in todo:
            await self._snapshot(sid)
        return self.stats

    async def _snapshot(self, sid: str) -> None:
        src = self.src
        snap = await src.load_snapshot(sid)  # its MAC checked before anything of it is believed
        needed: dict[str, int | None] = {}  # key -> plaintext size of a whole object (None: a pack)
        async for line in src.read_manifest(sid):  # every block's MAC checked
            if line.stored_whole:
                assert line.key is not None
                needed[line.key] = line.size
            else:
                for rel, _ in line.object_refs():
                    needed.setdefault(rel, None)
        missing = [rel for rel in needed if rel not in self._src_sizes]
        if missing:
            raise RepoError(
                f"snapshot {sid}: {len(missing)} objects it needs are missing from the source, first {missing[0]}: "
                "it is not copied (run `verify` on the source)"
            )
        await self._objects(list(needed.items()))
        # the dump, the manifest, then snapshot.json last: the commit at the destination
        dump = src.relative_key(src.dump_key(sid))
        if dump in self._src_sizes:
            await self._objects([(dump, snap.summary.database.compressed_size)])
        if self.reseal:
            await self._manifest(sid)
        else:
            manifest = src.relative_key(src.manifest_key(sid))
            await self._objects([(manifest, None)] if manifest in self._src_sizes else [])
        self.check()
        await self.dst_lock.ensure_held()
        if self.reseal:
            summary = snap.summary
            db = summary.database
            if db.stored_size is not None and db.compressed_size is not None:
                db.stored_size = self.dst.store.stored_size(self.dst.dump_key(sid), db.compressed_size)
            await self.dst.commit(summary)  # with the destination's MAC
        else:
            rel = src.relative_key(src.summary_key(sid))
            self._dst_sizes.pop(rel, None)  # always written: it is the commit
            await self._objects([(rel, None)])
        self.stats.copied.append(sid)
        log.info("snapshot %s copied to %s", sid, self.dst.where())

    async def _manifest(self, sid: str) -> None:
        """The manifest written again for the destination: each whole object's `stored`
        (its size in the bucket) for the destination's recipients, and the destination's
        MAC chain (streamed both ways)."""
        dst = self.dst
        async with ManifestWriter(
            dst.store, dst.manifest_key(sid), self.budget, self.part_size, dst.manifest_mac(sid)
        ) as out:
            async for line in self.src.read_manifest(sid):
                if line.stored_whole and line.stored is not None and line.key is not None and line.size is not None:
                    line.stored = dst.store.stored_size(dst.object_key(line.key), line.size)
                await out.add(line)
            await out.finish()

    def _wanted(self, rel: str, plain: int | None) -> int | None:
        """The size the destination's object must have to count as held; None: by its key
        alone (a re-sealed pack, whose size is not recorded: listed means whole)."""
        if not self.reseal:
            return self._src_sizes[rel]
        if plain is None:
            return None
        return self.dst.store.stored_size(self.dst.object_key(rel), plain) or plain

    async def _objects(self, items: list[tuple[str, int | None]]) -> None:
        """Copy each object the destination does not hold, at most `jobs` at once (the
        first error stops the others: its own, not a group's, is raised). `items`: key and
        plaintext size (None: unknown)."""
        try:
            async with asyncio.TaskGroup() as tg:
                for rel, plain in items:
                    if rel in self._copied:  # this run copied it, or found it held, for an earlier snapshot
                        continue
                    want = self._wanted(rel, plain)
                    there = self._dst_sizes.get(rel)
                    if there is not None and (want is None or there == want):
                        self._copied.add(rel)
                        self.stats.held += 1
                        continue
                    self.check()
                    await self._slots.acquire()
                    tg.create_task(self._released(self._one(rel, self._src_sizes[rel])))
        except BaseExceptionGroup as group:
            leaves = group.exceptions
            while leaves and isinstance(leaves[0], BaseExceptionGroup):
                leaves = leaves[0].exceptions
            first = next((e for e in leaves if isinstance(e, ImmichStreamError)), leaves[0] if leaves else group)
            raise first from None

    async def _released(self, work: Awaitable[None]) -> None:
        try:
            await work
        finally:
            self._slots.release()

    def _storage_class(self, key: str) -> str | None:
        own = self.dst.storage_class_for(key)
        if own is None and is_pack_key(self.dst.relative_key(key)):
            return self.dst.store.options.storage_class
        return own

    async def _one(self, rel: str, size: int) -> None:
        """One object of `size` bytes at the source: server-side, or streamed as stored,
        or (re-sealed) opened and sealed again on the way."""
        src_key, dst_key = self.src.object_key(rel), self.dst.object_key(rel)
        sc = self._storage_class(dst_key)
        # the bytes as stored, or (re-sealed) the plaintext: authenticated as it is read
        src: Store | SealedStore = self.src.store if self.reseal else self.src.store.raw
        dst: Store | SealedStore = self.dst.store if self.reseal else self.dst.store.raw
        expect = None if self.reseal else size
        if self.server_side and size <= COPY_OBJECT_MAX:
            await self.dst.store.raw.copy_object(self.src.store.bucket, src_key, dst_key, sc)
            self.stats.server_side += 1
        elif size <= self.part_size:
            async with self.budget.hold(size):
                data = b"".join([c async for c in src.iter_object(src_key, small=size <= 1 << 20)])
                self._check_size(src_key, expect, len(data))
                await dst.put(dst_key, data, None, progress=True, storage_class=sc)
                del data
        else:
            mp = (
                self.dst.store.multipart(dst_key, self.budget, 2, sc)
                if self.reseal
                else MultipartUpload(self.dst.store.raw, dst_key, self.budget, 2, None, sc)
            )
            await self._multipart(src.iter_object(src_key, min(self.part_size, 1 << 20)), mp, src_key, expect)
        self._copied.add(rel)
        self.stats.objects += 1
        self.stats.bytes += size

    @staticmethod
    def _check_size(key: str, want: int | None, got: int) -> None:
        if want is not None and got != want:
            raise RepoError(f"{key}: read {got} bytes, the listing said {want}: the source changed under the copy")

    async def _multipart(
        self, chunks: AsyncIterator[bytes], upload: MultipartUpload, src_key: str, expect: int | None
    ) -> None:
        """Streamed: each part held in the budget while it fills (part_size reserved), handed
        to the upload, released once sent; the upload is aborted on any error
        (MultipartUpload), so nothing is left behind."""
        async with upload as mp:
            buf = bytearray()
            got = held = 0
            try:
                async for chunk in chunks:
                    if not held:
                        await self.budget.acquire(self.part_size)
                        held = self.part_size
                    buf += chunk
                    got += len(chunk)
                    if len(buf) >= self.part_size:
                        part = bytes(buf[: self.part_size])
                        del buf[: self.part_size]
                        held = 0
                        await mp.add(part)  # the budget is handed over: released once sent
                self._check_size(src_key, expect, got)
                if buf:
                    if held:
                        await self.budget.release(held - len(buf))
                    else:
                        await self.budget.acquire(len(buf))
                    held = 0
                    await mp.add(bytes(buf))
            finally:
                if held:
                    await asyncio.shield(self.budget.release(held))
            await mp.complete()


def same_place(a: Settings, b: Settings) -> bool:
    """Both repositories on one endpoint with one set of credentials: CopyObject can copy
    from one to the other (SSE-C objects are streamed: the destination has no such key)."""
    return (
        a.endpoint_url == b.endpoint_url
        and (a.region or "") == (b.region or "")
        and a.credentials == b.credentials
        and a.sse_c_key_file is None
    )


async def copy_snapshots(
    settings: Settings, name: str, which: list[str], *, environ: Mapping[str, str] | None = None
) -> CopyStats:
    """Copy the snapshots `which` names (ids or unique prefixes, "latest"; empty: all) of
    the repository `settings` point at into the named repository."""
    from immich_stream.config.repositories import pointed_at
    from immich_stream.repository.session import LockSpec, open_locked, open_repo, reader

    dst_settings = pointed_at(settings, name, os.environ if environ is None else environ, "copy --to")
    # --lock-days is the main repository's: a copy writes its destination without Object Lock
    # (a server-side CopyObject would not carry it either)
    dst_settings = dataclasses.replace(dst_settings, lock_days=0)
    if (dst_settings.bucket, dst_settings.prefix, dst_settings.endpoint_url) == (
        settings.bucket,
        settings.prefix,
        settings.endpoint_url,
    ):
        raise ConfigError(f"repository {name} is this repository ({settings.bucket}/{settings.prefix}): choose another")
    own_keys = dst_settings.age_identity != settings.age_identity  # its identity_file
    async with open_locked(settings, reader(settings, "copy")) as (src, src_lock):
        async with open_repo(dst_settings, check=False, new=True) as probe:
            how = await prepare_destination(src, probe, own_keys)
        ids = await src.snapshot_ids()
        if which:
            ids = sorted({(await src.resolve(w)).id for w in which})
        if not ids:
            raise RepoError(f"no snapshots in {src.where()} to copy: run `backup` first")
        lock = LockSpec("copy", exclusive=False, wait=settings.lock_wait)
        create = new_snapshot_id() if how == NEW else None  # created with its own keys
        async with open_locked(dst_settings, lock, create_for=create, new=True) as (dst, dst_lock):
            reseal = how in (NEW, RESEAL)
            if reseal and not dst.auth_required:
                raise ConfigError(
                    f"{dst_settings.age_identity} holds no ready authentication key of {dst.where()}: copy cannot "
                    "write manifests it accepts; run `backup --repo NAME` once there, or add its "
                    "`# immich-stream-auth:` line"
                )

            def check() -> None:
                for held in (src_lock, dst_lock):
                    if (error := held.lost()) is not None:
                        raise error

            copier = Copier(
                src,
                dst,
                dst_lock,
                server_side=same_place(settings, dst_settings),
                reseal=reseal,
                jobs=settings.jobs,
                budget=ByteBudget(settings.max_memory),
                part_size=settings.part_size,
                check=check,
            )
            copier.stats.created = how in (CREATED, NEW)
            copier.stats.resealed = reseal
            return await copier.run(ids)
