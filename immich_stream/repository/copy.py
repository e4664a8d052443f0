"""`copy`: snapshots of one repository copied into another (restic's copy, kopia's sync-to),
the second copy of 3-2-1.

Objects are copied as they are stored, byte for byte: both repositories have the same
config.json (a destination without a repository gets the source's, verbatim), so an encrypted
repository stays encrypted to the same recipients, with the same authentication key, and the
MACs of manifests and snapshot.json (which bind the snapshot id, not the bucket) hold at the
destination. A destination that exists with other recipients or another authentication key
is refused (re-sealing is not done: docs/how-it-works.md says why and what to do), as is a
plain source to an encrypted destination or the reverse.

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
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from immich_stream.config import Settings
from immich_stream.errors import ConfigError, ImmichStreamError, RepoError
from immich_stream.repository.layout import is_pack_key
from immich_stream.repository.locks import RepoLock
from immich_stream.repository.repo import Repo
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


async def prepare_destination(src: Repo, dst: Repo) -> bool:
    """Give a destination without a repository the source's config.json, byte for byte
    (True); check an existing one takes the source's objects as they are (False), else a
    ConfigError in one line."""
    raw = await src.store.raw.get(src.config_key())
    if await dst.store.raw.head(dst.config_key()) is None:
        await dst.store.raw.put(dst.config_key(), raw, "application/json")
        return True
    theirs_raw = await dst.store.raw.get(dst.config_key())
    try:
        mine, theirs = json.loads(raw), json.loads(theirs_raw)
    except ValueError:
        raise RepoError(f"{dst.config_key()} is not JSON: the destination holds something else there") from None
    if not isinstance(theirs, dict):
        raise RepoError(f"{dst.config_key()} is not an immich-stream repository: choose another prefix")
    a, b = _encryption(mine), _encryption(theirs)
    if a is None and b is None:
        return False
    if a is None or b is None:
        which = "is plain and the destination encrypted" if a is None else "is encrypted and the destination plain"
        raise ConfigError(
            f"the source {src.where()} {which} ({dst.where()}): a copy never mixes plain and encrypted objects; "
            "give the destination a new prefix (copy creates it like the source)"
        )
    if a != b:
        what = "other age recipients" if a[0] != b[0] else "another authentication key"
        raise ConfigError(
            f"the destination {dst.where()} is encrypted to {what} than the source: objects are copied as they "
            "are, not re-sealed; give the destination a new prefix (copy creates it with the source's keys)"
        )
    return False


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
        jobs: int,
        budget: ByteBudget,
        part_size: int,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        self.src, self.dst, self.dst_lock = src, dst, dst_lock
        self.server_side = server_side
        self.jobs = jobs
        self.budget = budget
        self.part_size = part_size
        self.check = check  # raises when a lock was lost
        self.stats = CopyStats(dst.where())
        self._src_sizes: dict[str, int] = {}
        self._dst_sizes: dict[str, int] = {}
        self._slots = asyncio.Semaphore(jobs)

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
        await src.load_snapshot(sid)  # its MAC checked before anything of it is believed
        needed: list[str] = []
        seen: set[str] = set()
        async for line in src.read_manifest(sid):  # every block's MAC checked
            for rel, _ in line.object_refs():
                if rel not in seen:
                    seen.add(rel)
                    needed.append(rel)
        missing = [rel for rel in needed if rel not in self._src_sizes]
        if missing:
            raise RepoError(
                f"snapshot {sid}: {len(missing)} objects it needs are missing from the source, first {missing[0]}: "
                "it is not copied (run `verify` on the source)"
            )
        await self._objects(needed)
        # the dump, the manifest, then snapshot.json last: the commit at the destination
        rels = [src.relative_key(k) for k in (src.dump_key(sid), src.manifest_key(sid))]
        await self._objects([r for r in rels if r in self._src_sizes])
        self.check()
        await self.dst_lock.ensure_held()
        summary = src.relative_key(src.summary_key(sid))
        self._dst_sizes.pop(summary, None)  # always written: it is the commit
        await self._objects([summary])
        self.stats.copied.append(sid)
        log.info("snapshot %s copied to %s", sid, self.dst.where())

    async def _objects(self, rels: list[str]) -> None:
        """Copy each object the destination does not hold, at most `jobs` at once (the
        first error stops the others: its own, not a group's, is raised)."""
        try:
            async with asyncio.TaskGroup() as tg:
                for rel in rels:
                    size = self._src_sizes[rel]
                    if self._dst_sizes.get(rel) == size:
                        self.stats.held += 1
                        continue
                    self.check()
                    await self._slots.acquire()
                    tg.create_task(self._released(self._one(rel, size)))
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
        src_key, dst_key = self.src.object_key(rel), self.dst.object_key(rel)
        raw_src, raw_dst = self.src.store.raw, self.dst.store.raw
        sc = self._storage_class(dst_key)
        if self.server_side and size <= COPY_OBJECT_MAX:
            await raw_dst.copy_object(raw_src.bucket, src_key, dst_key, sc)
            self.stats.server_side += 1
        elif size <= self.part_size:
            async with self.budget.hold(size):
                data = b"".join([c async for c in raw_src.iter_object(src_key, small=size <= 1 << 20)])
                self._check_size(src_key, size, len(data))
                await raw_dst.put(dst_key, data, None, progress=True, storage_class=sc)
                del data
        else:
            await self._multipart(raw_src, raw_dst, src_key, dst_key, size, sc)
        self._dst_sizes[rel] = size
        self.stats.objects += 1
        self.stats.bytes += size

    @staticmethod
    def _check_size(key: str, want: int, got: int) -> None:
        if got != want:
            raise RepoError(f"{key}: read {got} bytes, the listing said {want}: the source changed under the copy")

    async def _multipart(
        self, raw_src: Store, raw_dst: Store, src_key: str, dst_key: str, size: int, sc: str | None
    ) -> None:
        """Streamed: each part held in the budget while it fills (part_size reserved), handed
        to the upload, released once sent; the upload is aborted on any error
        (MultipartUpload), so nothing is left behind."""
        async with MultipartUpload(raw_dst, dst_key, self.budget, 2, None, sc) as mp:
            buf = bytearray()
            got = held = 0
            try:
                async for chunk in raw_src.iter_object(src_key, min(self.part_size, 1 << 20)):
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
                self._check_size(src_key, size, got)
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
    if (dst_settings.bucket, dst_settings.prefix, dst_settings.endpoint_url) == (
        settings.bucket,
        settings.prefix,
        settings.endpoint_url,
    ):
        raise ConfigError(f"repository {name} is this repository ({settings.bucket}/{settings.prefix}): choose another")
    async with open_locked(settings, reader(settings, "copy")) as (src, src_lock):
        async with open_repo(dst_settings, check=False) as probe:
            created = await prepare_destination(src, probe)
        ids = await src.snapshot_ids()
        if which:
            ids = sorted({(await src.resolve(w)).id for w in which})
        if not ids:
            raise RepoError(f"no snapshots in {src.where()} to copy: run `backup` first")
        lock = LockSpec("copy", exclusive=False, wait=settings.lock_wait)
        async with open_locked(dst_settings, lock) as (dst, dst_lock):

            def check() -> None:
                for held in (src_lock, dst_lock):
                    if (error := held.lost()) is not None:
                        raise error

            copier = Copier(
                src,
                dst,
                dst_lock,
                server_side=same_place(settings, dst_settings),
                jobs=settings.jobs,
                budget=ByteBudget(settings.max_memory),
                part_size=settings.part_size,
                check=check,
            )
            copier.stats.created = created
            return await copier.run(ids)
