"""The repository (docs/format.md): config.json (format, encryption, authentication),
snapshots and their manifests, the journals of uncommitted runs, the index of data objects.

Commands talk to the bucket through Repo; its keys come from Layout (layout.py), the only
place they are built; manifest lines and their streams are manifest.py's.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import hashlib
import json
import logging
import time
import zlib
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from immich_stream.errors import ConfigError, NoRepository, ObjectNotFound, RepoError, StoreError
from immich_stream.repository.age import Keys, Recipient, Sealing, plain_size
from immich_stream.repository.auth import (
    TRUST_ENV,
    ManifestMac,
    RepoAuth,
    add_to_identity_file,
    canonical,
    forged,
)
from immich_stream.repository.layout import SUMMARY, Layout, is_pack_key, is_root, is_snapshot_id, snapshot_time
from immich_stream.repository.manifest import ManifestLine, ManifestWriter, read_lines, read_lines_as
from immich_stream.repository.retention import LockPolicy, locked_key
from immich_stream.repository.sealed import SealedStore
from immich_stream.repository.summary import SnapshotSummary
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT = "immich-stream"
VERSION = 2  # the newest this program reads; a plain repository is written as version 1
PLAIN_VERSION = 1
ENCRYPTED_VERSION = 2  # objects under data/ and snapshots/ are age files (age.py)
AGE_SCHEME = "age-encryption.org/v1"

# A journal chunk is written at least this often while its run reads files, and once this
# many bytes were read or its compressed lines pass JOURNAL_MAX_PENDING.
JOURNAL_SECONDS = 15.0  # a small PUT; a kill loses at most this long of uploads (plus the order window)
JOURNAL_BYTES = 256 << 20
JOURNAL_MAX_PENDING = 1 << 20
JOURNAL_MAX_OBJECT = 4 * JOURNAL_MAX_PENDING  # a chunk is read whole; a bigger one is not ours


@dataclass(slots=True)
class DamagedLine(ManifestLine):
    """A manifest line of the wrong shape (ManifestLine.parse): its root and path where
    readable ("?" otherwise), type "damaged", and what is wrong with it."""

    damage: str = ""


@dataclass
class Snapshot:
    id: str
    summary: SnapshotSummary

    @property
    def time(self) -> dt.datetime:
        return snapshot_time(self.id)


class JournalWriter:
    """What one pass of a run has read (and uploaded), in walk order, as a series of small
    gzip objects written as the pass goes: a run that is killed or fails leaves behind
    what it uploaded, and the next run takes those objects instead of reading and sending
    the files again. Lines come only after their upload finished (OrderedManifest)."""

    def __init__(self, repo: Repo, snap_id: str, pass_name: str) -> None:
        self.repo = repo
        self.snap_id = snap_id
        self.pass_name = pass_name
        self.chunks = 0
        self.lines = 0
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pending_lines = 0
        self._bytes = 0
        self._since = time.monotonic()
        self.interval = JOURNAL_SECONDS if repo.journal_interval is None else repo.journal_interval

    async def add(self, line: ManifestLine) -> None:
        self._pending.append(self._z.compress(line.to_json().encode() + b"\n"))
        self._pending_size += len(self._pending[-1])
        self._pending_lines += 1
        self._bytes += line.size
        if (
            self._bytes >= JOURNAL_BYTES
            or self._pending_size >= JOURNAL_MAX_PENDING
            or time.monotonic() - self._since >= self.interval
        ):
            await self.flush()

    async def flush(self) -> None:
        """Write the lines added since the last chunk as the next chunk (nothing if none)."""
        if not self._pending_lines:
            return
        body = b"".join([*self._pending, self._z.flush()])
        lines = self._pending_lines
        # A new gzip member for the next chunk before the PUT: if it fails, these lines are
        # lost from the journal (the run fails anyway), the next chunk is still readable.
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
        self._pending, self._pending_size, self._pending_lines, self._bytes = [], 0, 0, 0
        self._since = time.monotonic()
        key = self.repo.journal_key(self.snap_id, self.pass_name, self.chunks)
        await self.repo.store.put(key, body, "application/gzip")
        self.chunks += 1
        self.lines += lines


# the recipients an object may have been sealed for when its manifest was written
MAX_RECIPIENTS_GUESS = 32


class ObjectIndex:
    """Which data objects exist, and with which size: built from one listing of data/,
    8 bytes per object (a sorted array of digests of key and size), so a backup can check
    every object it reuses without a request per file.

    In an encrypted repository an object's size depends on its number of recipients: a
    `key reencrypt` that was interrupted after rewriting objects, before their manifests,
    leaves objects sealed for the current recipients under manifests that record the old
    size. Such an object is the same file (age authenticates it, the manifest's sha256
    binds it): it counts as present when it has the size the current recipients give to
    the plaintext the recorded size implies."""

    def __init__(self, sealing: Sealing | None = None) -> None:
        self._digests = array("Q")
        self._packs: set[str] = set()  # packs are few (one per thousands of files): by key alone
        self.sealing = sealing

    @staticmethod
    def _digest(key: str, size: int) -> int:
        h = hashlib.blake2b(f"{size}\0{key}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little")

    @classmethod
    async def load(cls, repo: Repo) -> ObjectIndex:
        index = cls(repo.store.sealing)
        async for obj in repo.store.list_objects(repo.data_prefix()):
            rel = repo.relative_key(obj.key)
            if is_pack_key(rel):
                index._packs.add(rel)
            else:
                index._digests.append(cls._digest(rel, obj.size))
        index._digests = array("Q", sorted(index._digests))
        return index

    def _has(self, key: str, size: int) -> bool:
        d = self._digest(key, size)
        i = bisect.bisect_left(self._digests, d)
        return i < len(self._digests) and self._digests[i] == d

    def has(self, key: str, size: int | None) -> bool:
        """The object is listed (with that size; a pack, size None: by its key)."""
        if size is None:
            return key in self._packs
        return self.size_of(key, size) is not None

    def has_all(self, line: ManifestLine) -> bool:
        """Every object the line's bytes are in is listed."""
        if line.offset is not None and line.key is not None and line.chunks is None:
            return line.key in self._packs  # a file in a pack (most files): by its key alone
        refs = line.object_refs()
        if not refs:
            return line.chunks is not None  # an empty file: no chunk at all
        return all(self.has(k, n) for k, n in refs)

    def size_of(self, key: str, size: int) -> int | None:
        """The size of the object at key in the listing, given the size a manifest
        recorded for it (see the class docstring); None when it is not there."""
        if self._has(key, size):
            return size
        if self.sealing is not None:
            for n in range(1, MAX_RECIPIENTS_GUESS + 1):
                plain = plain_size(size, n)
                if plain is not None and self._has(key, now := self.sealing.size(plain)):
                    return now
        return None


class Repo(Layout):
    """The repository under `prefix` in the store's bucket. journal_interval: how often a
    run's journal is written (None: JOURNAL_SECONDS); trust_bucket: the user's
    IMMICH_STREAM_TRUST_BUCKET=1 (read an encrypted repository without its authentication
    key; set authentication up on trust)."""

    def __init__(
        self,
        store: Store | SealedStore,
        prefix: str,
        *,
        journal_interval: float | None = None,
        trust_bucket: bool = False,
    ) -> None:
        super().__init__(prefix)
        # the bucket as the repository sees it: sealed where encrypted (_encryption sets how),
        # file data with its storage class
        self.store = store if isinstance(store, SealedStore) else SealedStore(store, self.storage_class_for)
        self.journal_interval = journal_interval
        self.trust_bucket = trust_bucket
        # the repository authentication key (auth.py), once check_config accepted it; with
        # auth_required every snapshot.json and manifest must carry a valid MAC
        self.auth: RepoAuth | None = None
        self.auth_required = False
        # --lock-days: the retention this run's snapshot objects get (retention.py); None: off
        self.lock: LockPolicy | None = None

    def retention_for(self, key: str) -> tuple[str, dt.datetime] | None:
        """The Object Lock (mode, retain-until) an object written at key gets: a snapshot's
        objects and config.json with --lock-days, nothing else (retention.locked_key)."""
        if self.lock is None or not key.startswith(self._k("")):
            return None
        return (self.lock.mode, self.lock.until) if locked_key(self, self.relative_key(key)) else None

    def storage_class_for(self, key: str) -> str | None:
        """The configured storage class of an object to be written: file data
        (data/<id>/<root>/...) only; everything else (manifests, snapshot.json, journals, the
        dump, config.json, locks) stays STANDARD so listing, verify and restore never wait."""
        parts = self.relative_key(key).split("/", 3) if key.startswith(self._k("")) else []
        if len(parts) == 4 and parts[0] == "data" and is_root(parts[2]):
            return self.store.options.storage_class_of(parts[2])
        return None

    async def journals(self, snap_id: str) -> dict[str, list[str]]:
        """An uncommitted run's journal chunks: pass name -> keys, in the order written."""
        return (await self.journal_info(snap_id))[0]

    async def journal_info(self, snap_id: str) -> tuple[dict[str, list[str]], dt.datetime | None]:
        """journals(), and when the newest chunk was written (the server's clock)."""
        passes: dict[str, list[str]] = {}
        newest: dt.datetime | None = None
        base = self.journal_prefix(snap_id)
        async for obj in self.store.list_objects(base):
            if isinstance(obj.last_modified, dt.datetime) and (newest is None or obj.last_modified > newest):
                newest = obj.last_modified
            name, sep, rest = obj.key[len(base) :].rpartition("-")
            if sep and rest.endswith(".jsonl.gz") and rest[: -len(".jsonl.gz")].isdigit():
                if obj.size > JOURNAL_MAX_OBJECT:  # not one we wrote: never read whole into memory
                    log.warning("ignoring %s: %d bytes is more than a journal chunk holds", obj.key, obj.size)
                    continue
                passes.setdefault(name, []).append(obj.key)
        return {name: sorted(keys) for name, keys in sorted(passes.items())}, newest

    async def delete_journals(self, snap_id: str) -> None:
        """A committed run's journals, which nothing reads any more (only uncommitted runs'
        are resumed from): deleted, or left for prune by a key that cannot delete."""
        keys = [obj.key async for obj in self.store.list_objects(self.journal_prefix(snap_id))]
        await self.store.discard(keys)

    # config.json
    async def ensure_config(self, keys: Keys | None = None) -> None:
        """Create config.json in a new repository (encrypted when there are keys); refuse an
        unknown format, and keys that do not fit the repository (see check_config)."""
        key = self.config_key()
        if await self.store.head(key) is None:
            body: dict[str, Any] = {
                "format": FORMAT,
                "version": PLAIN_VERSION if keys is None else ENCRYPTED_VERSION,
                "created": dt.datetime.now(dt.UTC).isoformat(),
            }
            if keys is not None:
                body["encryption"] = {"scheme": AGE_SCHEME, "recipients": [str(r) for r in keys.recipients]}
                self.auth = keys.auth  # a new repository is authenticated from its first byte when it can be
            await self.write_config(body)
        await self.check_config(keys, writing=True, defer=True)

    async def write_config(self, cfg: dict[str, Any]) -> None:
        """config.json, with its MAC in an authenticated repository."""
        body = {k: v for k, v in cfg.items() if k != "auth"}
        if self.auth is not None and isinstance(body.get("encryption"), dict):
            body["auth"] = {
                "scheme": "hmac-sha256",
                "key_id": self.auth.key_id,
                "mac": self.auth.mac("config.json", canonical(body)),
            }
        await self.store.put(self.config_key(), json.dumps(body, indent=2).encode() + b"\n", "application/json")

    def where(self) -> str:
        return f"s3://{self.store.bucket}/{self.prefix}"

    def _encryption(self, cfg: dict[str, Any], keys: Keys | None, writing: bool) -> None:
        """Set up the store's sealing from config.json's encryption block and the keys."""
        enc = cfg.get("encryption")
        if enc is None:
            if keys is not None:
                raise ConfigError(
                    f"the repository at {self.where()} is not encrypted, and one never mixes encrypted and "
                    "plain objects: unset the age identity, or choose a new S3_PREFIX for an encrypted repository"
                )
            self.store.sealing = None
            return
        if not isinstance(enc, dict) or enc.get("scheme") != AGE_SCHEME or not isinstance(enc.get("recipients"), list):
            raise RepoError(f"{self.config_key()}: unknown encryption {enc!r}: upgrade immich-stream")
        if keys is None:
            raise ConfigError(
                f"the repository at {self.where()} is encrypted with age: set IMMICH_STREAM_AGE_IDENTITY (or "
                "[encryption] identity_file) to its identity file, or to the offline recovery key's"
            )
        current = [Recipient.parse(r) for r in enc["recipients"]]
        known = set(current) | {Recipient.parse(r) for r in enc.get("retired", [])}
        mine = [i.recipient for i in keys.identities]
        if not known.intersection(mine):
            raise ConfigError(
                f"no identity in {keys.path} belongs to the repository at {self.where()} (it encrypts to "
                f"{', '.join(str(r)[:16] + '...' for r in current)}): give the identity file it was created with"
            )
        if writing and set(keys.recipients) != set(current):
            theirs = ", ".join(str(r) for r in current)
            raise ConfigError(
                f"the age recipients ({keys.path} and IMMICH_STREAM_AGE_RECIPIENTS) differ from the repository's "
                f"({theirs}): set them as they were, or change them with `key rotate`"
            )
        self.store.sealing = Sealing(tuple(current), keys.identities, (self.data_prefix(), self.snapshots_prefix()))

    async def read_config(self, keys: Keys | None = None) -> dict[str, Any]:
        """config.json; when `keys` hold the repository's ready authentication key, forged
        unless its MAC matches, before any of it (format, version, encryption) is believed."""
        key = self.config_key()
        raw = await self.store.get(key)
        auth = keys.auth if keys is not None and keys.auth is not None and keys.auth.ready else None
        if keys is not None and auth is not None and not self.trust_bucket:
            try:
                signed = json.loads(raw)
            except ValueError:
                signed = None
            claim = signed.get("auth") if isinstance(signed, dict) else None
            body = {k: v for k, v in signed.items() if k != "auth"} if isinstance(signed, dict) else {}
            if not isinstance(claim, dict) or not auth.check("config.json", claim.get("mac"), canonical(body)):
                what = "no MAC" if not isinstance(claim, dict) else "no valid MAC"
                raise forged(
                    f"{key} carries {what}, yet {keys.path} holds the repository's authentication key: someone "
                    "who can write the bucket replaced it, or S3_PREFIX names another repository (check it; if "
                    f"this repository was written by an older immich-stream, set {TRUST_ENV}=1 for one backup "
                    "to authenticate it as it is)"
                )
        try:
            cfg = json.loads(raw)
        except ValueError:
            raise RepoError(f"{key} is not JSON: this prefix holds something else; choose another S3_PREFIX") from None
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("version"), int):
            raise RepoError(f"{key} is not an immich-stream repository: choose another S3_PREFIX")
        return cfg

    async def check_config(
        self,
        keys: Keys | None = None,
        writing: bool = False,
        upgrade: bool = False,
        defer: bool = False,
        alone: bool = True,
    ) -> None:
        """Check the repository's format and set up its encryption: an encrypted one needs
        an identity it was encrypted to; a writer (backup) also the same recipients.
        config.json's MAC is checked before any of it is believed (auth.py); `upgrade` (a
        writer holding its lock) may set authentication up on a repository without it;
        `defer`: such a writer's first look, before its lock (the check under it decides);
        not `alone` (another run holds a lock too): the set-up is left to a later run."""
        try:  # one round trip, not a HEAD before the GET: every command pays it twice (before and under its lock)
            cfg = await self.read_config(keys)
        except ObjectNotFound:
            raise NoRepository(self.where()) from None
        if cfg["version"] > VERSION:
            raise RepoError(
                f"repository format {cfg['version']} is newer than this immich-stream knows "
                f"({VERSION}): upgrade immich-stream"
            )
        if keys is not None and keys.auth is not None:  # believe nothing in it (its recipients) before its MAC
            setup = self._authenticate(cfg, keys, upgrade, defer)
            self._encryption(cfg, keys, writing)
        else:  # nothing to check it with: a wrong identity file is the likelier mistake, say that first
            self._encryption(cfg, keys, writing)
            setup = self._authenticate(cfg, keys, upgrade, defer)
        if setup is not None and keys is not None:
            if alone:
                await self._set_up_auth(cfg, keys, setup)
            else:  # two backups at once would each create a key
                log.warning("another run holds %s: setting up its authentication is left to a later run", self.where())

    def _authenticate(self, cfg: dict[str, Any], keys: Keys | None, upgrade: bool, defer: bool) -> RepoAuth | None:
        """Check config.json's MAC with the identity file's key; the key to set up
        authentication with (on trust, the repository as it is) when that is due."""
        self.auth, self.auth_required = None, False
        if keys is None or cfg.get("encryption") is None:
            return None  # a plain repository has no authenticity (docs/threat-model.md)
        mine, claim = keys.auth, cfg.get("auth")
        if mine is None:
            if upgrade and claim is None:
                return RepoAuth.generate()  # trust on first use: this run has the identity and the lock
            if not upgrade and self.trust_bucket:
                log.warning("%s=1: reading %s without checking its authenticity", TRUST_ENV, self.where())
                return None
            if claim is None and defer:
                return None  # a writer's first look, before its lock: set up once it holds the lock
            if claim is None:
                raise ConfigError(
                    f"{keys.path} holds no repository authentication key: run `backup` once on the backup host "
                    f"(it adds the `# immich-stream-auth:` line and authenticates the repository as it is), or set "
                    f"{TRUST_ENV}=1 to read it unchecked"
                )
            raise ConfigError(
                f"the repository at {self.where()} is authenticated and {keys.path} lacks its key: add the "
                f"`# immich-stream-auth:` line that `key show` prints on the backup host (keep it with your "
                f"recovery key){'' if upgrade else f', or set {TRUST_ENV}=1 to read it unchecked'}"
            )
        if claim is None:
            if mine.ready and not self.trust_bucket:
                raise forged(
                    f"{self.config_key()} carries no MAC, yet {keys.path} holds the repository's authentication key "
                    f"(if this repository was written by an older immich-stream, set {TRUST_ENV}=1 for one backup "
                    "to authenticate it as it is)"
                )
            if upgrade:
                return RepoAuth(mine.key, ready=False)
            if defer:
                return None
            self.auth = mine  # the set-up on trust is under way: what has a MAC must match
            return None
        body = {k: v for k, v in cfg.items() if k != "auth"}
        if not isinstance(claim, dict) or not mine.check("config.json", claim.get("mac"), canonical(body)):
            raise forged(f"{self.config_key()}: its MAC does not match (its recipients cannot be believed)")
        self.auth, self.auth_required = mine, mine.ready
        return None if mine.ready or not upgrade else mine  # an interrupted set-up: finish it

    async def _set_up_auth(self, cfg: dict[str, Any], keys: Keys, auth: RepoAuth) -> None:
        """Trust on first use: the key into the identity file (marked pending), a MAC on
        every committed snapshot as it is, config.json's MAC, then the key marked ready."""
        pending = RepoAuth(auth.key, ready=False)
        try:
            await asyncio.to_thread(add_to_identity_file, keys.path, pending)
        except OSError as exc:
            raise ConfigError(
                f"cannot add the repository authentication key to {keys.path} ({exc.strerror or exc}): make the "
                "file writable for one backup (a read-only secret mount: mount it writable once); nothing was changed"
            ) from None
        self.auth, self.auth_required = pending, False
        ids = await self.snapshot_ids()
        for sid in ids:
            await self._authenticate_snapshot(sid)
        await self.write_config(cfg)
        ready = RepoAuth(auth.key, ready=True)
        await asyncio.to_thread(add_to_identity_file, keys.path, ready)
        self.auth, self.auth_required = ready, True
        (log.warning if ids else log.info)(
            "repository authentication set up: %d existing snapshots were authenticated as they are (trust on "
            "first use); %s gained a `# immich-stream-auth:` line: copy it to your recovery key (`key show`)",
            len(ids),
            keys.path,
        )

    async def _authenticate_snapshot(self, sid: str) -> None:
        """A MAC on a snapshot written before authentication: its manifest copied out and
        back with MAC lines (streamed), then snapshot.json with its MAC, last."""
        assert self.auth is not None
        try:
            raw = json.loads(await self.store.get(self.summary_key(sid)))
        except ValueError:
            raise RepoError(f"snapshot {sid}: snapshot.json is damaged: `prune` cannot judge it; delete it") from None
        if isinstance(raw, dict) and self._summary_mac_ok(sid, raw):
            return  # done by an earlier, interrupted set-up
        await self.rewrite_manifest(sid, ByteBudget(64 << 20), self.store.options.part_size)
        await self.commit((await self.load_snapshot(sid)).summary)

    async def rewrite_manifest(
        self, sid: str, budget: ByteBudget, part_size: int, fix: Callable[[ManifestLine], ManifestLine] | None = None
    ) -> bool:
        """The snapshot's manifest written again, each line through `fix`, with this
        repository's MAC chain: copied out to rewrite_key, then back (streamed both ways: a
        manifest can be larger than memory; each copy lands whole or not at all, so a crash
        leaves the old manifest or the new one), then the copy deleted. False: no manifest."""
        manifest, tmp = self.manifest_key(sid), self.rewrite_key(sid)
        if await self.store.head(manifest) is None:
            return False
        for src, dst, each in ((manifest, tmp, fix), (tmp, manifest, None)):
            async with ManifestWriter(self.store, dst, budget, part_size, self.manifest_mac(sid)) as out:
                async for line in self.read_lines_at(src):
                    await out.add(each(line) if each is not None else line)
                await out.finish()
        await self.store.discard([tmp])  # left by a key that cannot delete: prune removes it
        return True

    def manifest_mac(self, snap_id: str) -> ManifestMac | None:
        """The MAC chain a manifest of this snapshot is written (and read) with."""
        return ManifestMac(self.auth, snap_id) if self.auth is not None else None

    def _summary_mac_ok(self, snap_id: str, raw: dict[str, Any]) -> bool:
        assert self.auth is not None
        body = {k: v for k, v in raw.items() if k != "auth"}
        return self.auth.check("snapshot.json", raw.get("auth"), snap_id.encode(), canonical(body))

    def summary_bytes(self, summary: SnapshotSummary) -> bytes:
        """snapshot.json as stored: with its MAC in an authenticated repository."""
        body = summary.to_json()
        if self.auth is None:
            return body
        d = json.loads(body)
        d.pop("auth", None)
        d["auth"] = self.auth.mac("snapshot.json", summary.id.encode(), canonical(d))
        return json.dumps(d, indent=2, sort_keys=True).encode() + b"\n"

    # snapshots
    async def snapshot_dirs(self) -> dict[str, bool]:
        """Every snapshot directory, sorted by id -> committed (has snapshot.json); one listing.
        Keys that are not <id>/<name> with a valid id (folder markers, stray files) are skipped."""
        ids: dict[str, bool] = {}
        base = self.snapshots_prefix()
        async for obj in self.store.list_objects(base):
            sid, _, name = obj.key[len(base) :].partition("/")
            if not sid and not name:
                continue  # the folder marker snapshots/ that consoles and sync tools create
            if not is_snapshot_id(sid):
                log.warning(
                    "ignoring %s: not part of a snapshot (snapshot ids look like 2024-01-31T020000Z-1a2b)", obj.key
                )
                continue
            if not name:
                continue  # a folder marker snapshots/<id>/: not a file of the snapshot
            ids[sid] = ids.get(sid, False) or name == SUMMARY
        return dict(sorted(ids.items()))

    async def snapshot_ids(self) -> list[str]:
        """Ids of the committed snapshots, sorted."""
        return [s for s, committed in (await self.snapshot_dirs()).items() if committed]

    async def load_snapshot(self, snap_id: str) -> Snapshot:
        try:
            raw = json.loads(await self.store.get(self.summary_key(snap_id)))
            if not isinstance(raw, dict):
                raise ValueError("not an object")
            checked = self.auth is not None and ("auth" in raw or self.auth_required)
            if checked and not self._summary_mac_ok(snap_id, raw):
                raise forged(f"snapshot {snap_id}: snapshot.json carries no valid MAC")
            raw.pop("auth", None)
            summary = SnapshotSummary.from_json(json.dumps(raw))
        except ValueError:
            raise RepoError(f"snapshot {snap_id}: snapshot.json is damaged") from None
        return Snapshot(snap_id, summary)

    async def snapshots(self) -> list[Snapshot]:
        return [await self.load_snapshot(s) for s in await self.snapshot_ids()]

    async def resolve(self, which: str) -> Snapshot:
        """'latest' or an id (or a unique prefix of one) -> a committed snapshot."""
        ids = await self.snapshot_ids()
        if not ids:
            raise RepoError(f"no snapshots in s3://{self.store.bucket}/{self.prefix}: run `backup` first")
        if which == "latest":
            return await self.load_snapshot(ids[-1])
        matches = [s for s in ids if s.startswith(which)]
        if len(matches) != 1:
            what = "no" if not matches else "more than one"
            raise RepoError(f"{what} snapshot matches {which!r}: list them with `snapshots`")
        return await self.load_snapshot(matches[0])

    async def latest(self) -> Snapshot | None:
        ids = await self.snapshot_ids()
        return await self.load_snapshot(ids[-1]) if ids else None

    async def commit(self, summary: SnapshotSummary) -> None:
        """Write snapshot.json: from now on the snapshot exists."""
        await self.store.put(self.summary_key(summary.id), self.summary_bytes(summary), "application/json")

    def read_manifest(self, snap_id: str, damaged: bool = False) -> AsyncIterator[ManifestLine]:
        """The snapshot's manifest lines; with `damaged`, a line of the wrong shape comes as
        a DamagedLine (the reader names it and goes on) instead of failing the read.
        (read_lines' own generator, not one re-yielding it: each level cost a step per line,
        and a no-change run reads a manifest of 300,000 lines twice. Nothing is read before
        the first line is asked for.)"""
        return self.read_lines_at(self.manifest_key(snap_id), damaged)

    def read_manifest_as(self, snap_id: str, parse: Callable[[bytes], T]) -> AsyncIterator[T]:
        """read_manifest, each line's bytes (checked as read_manifest checks them) given to
        `parse` instead of parsed whole (manifest.read_lines_as)."""
        key = self.manifest_key(snap_id)
        mac = self.manifest_mac(snap_id)
        hold = mac is not None and self.auth_required
        return read_lines_as(self.store.iter_object(key), parse, mac, hold, key)

    def read_lines_at(self, key: str, damaged: bool = False) -> AsyncIterator[ManifestLine]:
        """The lines of a manifest-like object, streamed; in an authenticated repository a
        block of lines only once its MAC matched (auth.py)."""
        parts = self.relative_key(key).split("/")
        mac = None
        if len(parts) == 3 and parts[0] == "snapshots" and is_snapshot_id(parts[1]):
            mac = self.manifest_mac(parts[1])
        return self._read_lines(self.store.iter_object(key), mac, key, damaged)

    async def read_journal(self, keys: list[str], what: str) -> AsyncIterator[ManifestLine]:
        """read_lines for a journal another run (or a later version) wrote: a chunk that
        cannot be read or parsed ends it with a warning instead of failing the reader
        (a journal only saves work; without it files are read and uploaded again)."""
        try:
            async for line in self.read_lines(keys):
                if is_root(line.root) and line.type == "file" and line.has_object:
                    yield line
        except (RepoError, StoreError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s cannot be read (%s): its uploads are not reused", what, str(exc).splitlines()[0][:200])

    async def read_lines(self, keys: list[str]) -> AsyncIterator[ManifestLine]:
        """The lines of a journal pass: small gzipped JSON-lines objects, each fetched whole
        (no connection is held while the walk reads them slowly: a run reads several
        journals beside the manifest, more than the connection pool has to spare)."""
        for key in keys:
            body = await self.store.get(key)

            async def slices(body: bytes = body) -> AsyncIterator[bytes]:
                for i in range(0, len(body), 64 << 10):
                    yield body[i : i + (64 << 10)]

            async for line in self._read_lines(slices()):
                yield line

    def _read_lines(
        self, chunks: AsyncIterator[bytes], mac: ManifestMac | None = None, where: str = "", damaged: bool = False
    ) -> AsyncIterator[ManifestLine]:
        # without auth_required (a set-up under way) lines pass at once
        return read_lines(chunks, mac, hold=mac is not None and self.auth_required, where=where, damaged=damaged)
