"""`key show`, `key rotate`, `key reencrypt`: the age keys of an encrypted repository.

Rotation writes the new identity first (into the identity file, above the old ones, which
keep opening older objects), then config.json's recipients: a crash between the two leaves a
file that still opens everything. `reencrypt` rewrites every object that the current identity
cannot open for the current recipients, one object at a time (each replaced whole by its PUT
or completed multipart upload: never half), then the manifests and snapshot.json files, which
record the objects' sizes. It can be run again after an interruption and continues. Packs
(packs.py) are age files like any other object and are sealed again the same way: their
plaintext, and so the offsets the manifests give into it, do not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from immich_stream.config import Settings
from immich_stream.errors import ConfigError
from immich_stream.progress import Reporter
from immich_stream.repository.age import (
    DecryptError,
    Decryptor,
    Identity,
    Keys,
    Recipient,
    Sealing,
    identity_file_text,
    load_keys,
)
from immich_stream.repository.auth import RepoAuth, write_private_file
from immich_stream.repository.layout import MANIFEST, MANIFEST_REWRITE, SUMMARY, is_pack_key, run_of
from immich_stream.repository.manifest import ManifestLine
from immich_stream.repository.repo import Repo
from immich_stream.repository.sealed import SealedStore
from immich_stream.repository.session import LockSpec, open_repo
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.watchdog import s3_hang, with_watchdog

log = logging.getLogger(__name__)


@dataclass
class KeyReport:
    recipients: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    new_recipient: str | None = None
    dropped: list[str] = field(default_factory=list)  # extra recipients the settings no longer name
    objects_checked: int = 0
    objects_reencrypted: int = 0
    bytes_reencrypted: int = 0
    manifests_rewritten: int = 0
    auth_line: str | None = None  # the repository authentication key's line (auth.py), for the recovery key
    skipped: list[str] = field(default_factory=list)  # objects that are not age files of this repository's
    seconds: float = 0.0


def _keys(settings: Settings) -> Keys:
    keys = load_keys(settings.age_identity, settings.age_recipients)
    if keys is None:
        raise ConfigError("key: set IMMICH_STREAM_AGE_IDENTITY (or [encryption] identity_file) to the identity file")
    return keys


async def _encryption(repo: Repo) -> dict[str, Any]:
    cfg = await repo.read_config()
    if not isinstance(cfg.get("encryption"), dict):
        raise ConfigError(f"the repository at {repo.where()} is not encrypted: there are no keys to manage")
    return cfg


async def show(settings: Settings) -> KeyReport:
    async with open_repo(settings) as repo:
        enc = (await _encryption(repo))["encryption"]
        auth = repo.auth.line() if repo.auth is not None else None
    report = KeyReport(list(enc["recipients"]), list(enc.get("retired", [])))
    report.auth_line = auth
    return report


def write_identity_file(path: Path, identities: list[Identity], auth: RepoAuth | None = None) -> None:
    """Replace the identity file atomically, mode 0600 from its first byte (with the
    repository authentication key's line, when there is one: auth.py)."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = identity_file_text(
        identities,
        [
            f"immich-stream identity, rotated {now}: the first key encrypts new backups,",
            "the ones below it still open older objects: keep them until `key reencrypt` has run",
        ],
        auth,
    )
    write_private_file(path, text)


async def rotate(
    settings: Settings,
    reporter: Reporter,
    reencrypt_after: bool,
    drop: tuple[str, ...] = (),
    drop_missing: bool = False,
) -> KeyReport:
    """A new identity for new backups; the old ones stay in the file for older objects.
    A recipient of the repository that the settings no longer name (an offline recovery
    key left out of IMMICH_STREAM_AGE_RECIPIENTS by mistake) is dropped only when `drop`
    names it or `drop_missing` says so; otherwise nothing changes."""
    to_drop = {Recipient.parse(r) for r in drop}
    started = time.monotonic()
    keys = _keys(settings)
    lock = LockSpec("key rotate", exclusive=True, wait=settings.lock_wait)
    async with open_repo(settings, lock=lock) as repo:
        cfg = await _encryption(repo)
        enc = cfg["encryption"]
        new = Identity.generate()
        recipients = [new.recipient, *(r for r in keys.extra if r != new.recipient)]
        before = [Recipient.parse(r) for r in [*enc["recipients"], *enc.get("retired", [])]]
        retired = [r for r in dict.fromkeys(before) if r not in recipients]
        own = {i.recipient for i in keys.identities}
        dropped = [r for r in (Recipient.parse(x) for x in enc["recipients"]) if r not in recipients and r not in own]
        # an offline recovery key left out by mistake must not be dropped (and every object
        # re-encrypted without it) on a warning: only on the user's word, before anything changes
        kept = [r for r in dropped if r not in to_drop and not drop_missing]
        if kept:
            raise ConfigError(
                f"key rotate: the repository's recipient {kept[0]} is not in IMMICH_STREAM_AGE_RECIPIENTS: add it "
                f"there to keep it, or pass --drop-recipient {kept[0]} to stop encrypting to it; nothing was changed"
            )
        for r in dropped:
            log.warning("%s is no longer a recipient (dropped as asked): new objects are not encrypted to it", r)
        # the file first: with it, every object (old and new) opens whatever happens next
        try:
            # repo.auth, not keys.auth: opening the repository may have just set the key up
            await asyncio.to_thread(write_identity_file, keys.path, [new, *keys.identities], repo.auth)
        except OSError as exc:
            raise ConfigError(
                f"key rotate: cannot write the new identity into {keys.path} ({exc.strerror or exc}): nothing was "
                "changed; make its directory writable (a read-only secret mount cannot be rotated in place)"
            ) from None
        cfg["encryption"] = dict(enc, recipients=[str(r) for r in recipients], retired=[str(r) for r in retired])
        cfg["rotated"] = dt.datetime.now(dt.UTC).isoformat()
        await repo.write_config(cfg)
        log.info("new recipient %s; %d retired", new.recipient, len(retired))
        report = KeyReport([str(r) for r in recipients], [str(r) for r in retired], str(new.recipient))
        report.dropped = [str(r) for r in dropped]
        if reencrypt_after:
            assert repo.store.sealing is not None
            repo.store.sealing = Sealing(tuple(recipients), (new, *keys.identities), repo.store.sealing.prefixes)
            await _guarded(repo, settings, _reencrypt(repo, settings, new, report, reporter))
    report.seconds = time.monotonic() - started
    return report


async def reencrypt(settings: Settings, reporter: Reporter) -> KeyReport:
    """Every object the current identity does not open, encrypted again for the current
    recipients; then the manifests, which record the objects' sizes."""
    started = time.monotonic()
    keys = _keys(settings)
    lock = LockSpec("key reencrypt", exclusive=True, wait=settings.lock_wait)
    async with open_repo(settings, lock=lock) as repo:
        enc = (await _encryption(repo))["encryption"]
        current = [Recipient.parse(r) for r in enc["recipients"]]
        if keys.identities[0].recipient not in current:
            raise ConfigError(
                f"the first identity in {keys.path} is not one the repository encrypts to: run `key rotate` "
                "with this file, or give the file `key rotate` wrote"
            )
        report = KeyReport([str(r) for r in current], list(enc.get("retired", [])))
        await _guarded(repo, settings, _reencrypt(repo, settings, keys.identities[0], report, reporter))
    report.seconds = time.monotonic() - started
    return report


async def _guarded(repo: Repo, settings: Settings, work: Any) -> None:
    hung = s3_hang(repo.store, settings.stall_timeout, "stopped; run `key reencrypt` to continue")
    await with_watchdog(repo.store, math.inf, work, hung)


async def _opens(store: SealedStore, key: str, identity: Identity) -> bool:
    """Whether the object is already encrypted for `identity` (its header decides: only
    the first bytes are read)."""
    probe = Decryptor([identity])
    async for chunk in store.iter_raw(key, 64 << 10, small=True):
        try:
            probe.feed(chunk)
        except DecryptError as exc:
            if "no identity" in str(exc):
                return False
            raise DecryptError(f"{key}: {exc.detail}", exc.detail) from None
        if probe.has_header:
            return True
    raise DecryptError(f"{key}: the age file ends inside its header: truncated")


async def _rewrite(
    store: SealedStore, key: str, size: int, budget: ByteBudget, part_size: int, storage_class: str | None = None
) -> int:
    """The object decrypted and encrypted again under the same key (the store's sealing is
    the current one), replaced whole by one PUT or a completed multipart upload; returns
    the plaintext bytes. `size`: the object's size in the bucket; `storage_class`: its
    class, kept (a pack's key does not tell it)."""
    if size <= part_size:
        async with budget.hold(2 * size):
            data = await store.get(key)
            await store.put(key, data, storage_class=storage_class)
            return len(data)
    total = 0
    async with store.multipart(key, budget, storage_class=storage_class) as mp:
        buf = bytearray()
        async for chunk in store.iter_object(key):
            buf += chunk
            total += len(chunk)
            while len(buf) >= part_size:
                await budget.acquire(part_size)
                await mp.add(bytes(buf[:part_size]))
                del buf[:part_size]
        await budget.acquire(len(buf))
        await mp.add(bytes(buf), final=True)
        await mp.complete()
    return total


async def _reencrypt(repo: Repo, settings: Settings, identity: Identity, report: KeyReport, reporter: Reporter) -> None:
    """Every object opened by the current identity was written for the current recipients
    (backups refuse other recipients, and a change of recipients is a rotation): the others
    are written again, then the manifests and summaries with the sizes that follows."""
    store = repo.store
    sealing = store.sealing
    assert sealing is not None
    budget = ByteBudget(settings.max_memory // 2)
    part = settings.part_size
    sem = asyncio.Semaphore(settings.jobs)
    # a large object's rewrite also holds a receive buffer of up to a part beside the budget
    large = asyncio.Semaphore(2)
    phase = reporter.phase("re-encrypt")

    def skip(key: str, why: str) -> None:
        # a folder marker, a stray file, an object no identity opens: not one this rotation
        # can rewrite; reported, and the rotation goes on (verify names the damaged ones)
        log.warning("skipped %s: %s", key, why)
        report.skipped.append(key)

    async def one(key: str, size: int, storage_class: str | None) -> None:
        async with sem:
            if key.endswith("/") or run_of(repo.relative_key(key)) is None:
                skip(key, "not an object of this repository (a folder marker or a stray file)")
                return
            report.objects_checked += 1
            try:
                if not await _opens(store, key, identity):
                    async with large if size > part else contextlib.nullcontext():
                        pack = is_pack_key(repo.relative_key(key)) and storage_class not in (None, "STANDARD")
                        kept = storage_class if pack else None
                        report.bytes_reencrypted += await _rewrite(store, key, size, budget, part, kept)
                    report.objects_reencrypted += 1
            except DecryptError as exc:
                skip(key, f"not an age file this repository's identities open ({exc.detail}); left as it is")
            phase.update(0, files=1)

    async def each(prefix: str, skip: tuple[str, ...] = ()) -> None:
        async with asyncio.TaskGroup() as tg:
            async for obj in store.list_objects(prefix):
                if not obj.key.endswith(skip):
                    await sem.acquire()  # bounded: one listing page ahead of the work at most
                    sem.release()
                    tg.create_task(one(obj.key, obj.size, obj.storage_class))

    try:
        await each(repo.data_prefix())  # the files first: manifests record their new sizes after
        await each(repo.snapshots_prefix(), skip=(MANIFEST, SUMMARY, MANIFEST_REWRITE))
        for sid, committed in (await repo.snapshot_dirs()).items():
            await _rewrite_snapshot(repo, sealing, sid, committed, budget, part)
            report.manifests_rewritten += 1
    finally:
        phase.close()


async def _rewrite_snapshot(
    repo: Repo, sealing: Sealing, sid: str, committed: bool, budget: ByteBudget, part_size: int
) -> None:
    """The manifest with every object's size for the current recipients, copied out and
    back (streamed both ways: a manifest can be larger than memory), then snapshot.json,
    the commit marker, last as at a backup."""

    def fix(line: ManifestLine) -> ManifestLine:
        if line.stored_whole:
            line.stored = sealing.size(line.size)
        else:  # a blob's or chunks' line records no size of a pack (never `stored`)
            line.stored = None
        return line

    if not await repo.rewrite_manifest(sid, budget, part_size, fix):
        return
    if committed:
        snap = await repo.load_snapshot(sid)
        db = snap.summary.database
        if db.compressed_size is not None:
            db.stored_size = sealing.size(db.compressed_size)
        await repo.commit(snap.summary)


def summary_lines(report: KeyReport) -> list[str]:
    lines = [f"recipients {', '.join(report.recipients)}"]
    if report.new_recipient:
        lines.insert(0, f"new identity {report.new_recipient} (first in the identity file; back the file up now)")
    if report.dropped:
        lines.append(f"dropped    {', '.join(report.dropped)}: no longer a recipient of new objects")
    if report.auth_line:
        lines.append(
            f"auth key   {report.auth_line}\n           (this line belongs in every copy of the identity file, "
            "the offline recovery key's too: without it a restore cannot check what the bucket says)"
        )
    if report.retired:
        lines.append(f"retired    {', '.join(report.retired)} (their identities stay in the file for older objects)")
    if report.skipped:
        shown = ", ".join(report.skipped[:5]) + (" ..." if len(report.skipped) > 5 else "")
        lines.append(f"skipped    {len(report.skipped)} objects that are not this repository's age files: {shown}")
    if report.objects_checked:
        lines.append(
            f"re-encrypt {report.objects_reencrypted} of {report.objects_checked} objects, "
            f"{report.bytes_reencrypted} bytes; {report.manifests_rewritten} snapshots' manifests rewritten"
        )
    return lines
