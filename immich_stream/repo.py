"""The repository format (docs/format.md): keys, manifests, snapshots.

Commands talk to the bucket through this module; only here are keys built.

    <prefix>/config.json                        format version; written once
    <prefix>/data/<id>/<root>/<escaped path>    file contents, uploaded by the run <id> that first saw them
    <prefix>/snapshots/<id>/manifest.jsonl.gz   one JSON line per entry, in walk order
    <prefix>/snapshots/<id>/database.sql.gz     the pg_dump stream
    <prefix>/snapshots/<id>/snapshot.json       the summary; written last = the commit marker
    <prefix>/snapshots/<id>/journal/<pass>-<n>.jsonl.gz  what an uncommitted run has read and
                                                uploaded so far (deleted once it commits)
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import hashlib
import json
import logging
import re
import secrets
import socket
import time
import urllib.parse
import zlib
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from immich_stream.age import Keys, Recipient, Sealing, plain_size
from immich_stream.auth import (
    MAX_BLOCK,
    TRUST_ENV,
    ManifestMac,
    RepoAuth,
    add_to_identity_file,
    canonical,
    forged,
    is_auth_line,
    trust_bucket,
)
from immich_stream.budget import ByteBudget
from immich_stream.config import env_duration, storage_class_for
from immich_stream.errors import ConfigError, RepoError, StoreError
from immich_stream.store import Store, StreamWriter
from immich_stream.summary import SnapshotSummary
from immich_stream.walk import Entry, sort_key

if TYPE_CHECKING:
    from immich_stream.locks import RepoLock

log = logging.getLogger(__name__)

FORMAT = "immich-stream"
VERSION = 2  # the newest this program reads; a plain repository is written as version 1
PLAIN_VERSION = 1
ENCRYPTED_VERSION = 2  # objects under data/ and snapshots/ are age files (age.py)
AGE_SCHEME = "age-encryption.org/v1"
ROOTS = ("postgres", "library")  # manifest order: the cold copy is taken first
MAX_KEY_BYTES = 1024  # S3's limit for a whole key
MAX_KEY_PART_BYTES = 255  # what filesystem-backed servers (rclone, SeaweedFS) take per "/"-part
# Keys of paths too long for S3 live here, named by the path's sha256. "%l" cannot begin an
# escaped path (a '%' in a name is always escaped as %25), so these never collide with one.
LONG_KEY_DIR = "%long"
STOPPED_DIR = "%stopped"  # like %long, cannot start an escaped path (a bare % is escaped)
# the files of a snapshot directory snapshots/<id>/
MANIFEST = "manifest.jsonl.gz"
DUMP = "database.sql.gz"
SUMMARY = "snapshot.json"  # written last: the commit marker
MANIFEST_REWRITE = "manifest.rewrite.jsonl.gz"  # a manifest on its way back (key reencrypt, auth set-up)
JOURNAL_DIR = "journal/"
# A journal chunk is written at least this often while its run reads files, and once this
# many bytes were read or its compressed lines pass JOURNAL_MAX_PENDING.
JOURNAL_SECONDS = 15.0  # a small PUT; a kill loses at most this long of uploads (plus the order window)
JOURNAL_BYTES = 256 << 20
JOURNAL_MAX_PENDING = 1 << 20
JOURNAL_MAX_OBJECT = 4 * JOURNAL_MAX_PENDING  # a chunk is read whole; a bigger one is not ours

_PLAIN = re.compile(rb"[^\x20-\x24\x26-\x7e]")  # anything but printable ASCII without '%'


def escape_path(raw: bytes) -> str:
    """bytes -> a valid-UTF-8 string, injectively: '%', control characters and bytes that
    are not valid UTF-8 become %XX. Used for manifest paths and object keys alike."""
    if not _PLAIN.search(raw):
        return raw.decode("ascii")
    out = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            out.append(f"%{o - 0xDC00:02X}")
        elif ch == "%" or o < 0x20 or o == 0x7F:
            out.append(f"%{o:02X}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_path(text: str) -> bytes:
    return urllib.parse.unquote_to_bytes(text)


def key_path(path: str) -> str:
    """An escaped path (escape_path) -> its form in an object key (docs/format.md,
    "Escaped paths"): also a backslash (SeaweedFS stores a raw one as "/", a folder) and a
    whole "." or ".." part (no name the walk reads is one, but rclone and SeaweedFS refuse
    them) become %XX. unescape_path reverses this too."""
    path = path.replace("\\", "%5C")
    wrapped = f"/{path}/"
    if "/./" in wrapped or "/../" in wrapped:
        path = "/".join(part.replace(".", "%2E") if part in (".", "..") else part for part in path.split("/"))
    return path


def new_snapshot_id(now: dt.datetime | None = None) -> str:
    """Sortable by time; the random tail only breaks ties within one second."""
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def snapshot_time(snap_id: str) -> dt.datetime:
    return dt.datetime.strptime(snap_id[:18], "%Y-%m-%dT%H%M%SZ").replace(tzinfo=dt.UTC)


_SNAPSHOT_ID = re.compile(r"\d{4}-\d\d-\d\dT\d{6}Z-[0-9a-f]{4}")


def is_snapshot_id(text: str) -> bool:
    """The shape new_snapshot_id makes, with a real date and time."""
    if _SNAPSHOT_ID.fullmatch(text) is None:
        return False
    try:
        snapshot_time(text)
    except ValueError:
        return False
    return True


def run_of(rel: str) -> str | None:
    """The run id of a key data/<id>/... or snapshots/<id>/... (relative to the prefix);
    None for anything else (a folder marker, a stray file): not ours to delete."""
    top, _, tail = rel.partition("/")
    run, sep, _ = tail.partition("/")
    if top not in ("data", "snapshots") or not sep or not is_snapshot_id(run):
        return None
    return run


@dataclass(slots=True)
class ManifestLine:
    root: str
    path: str  # escaped
    type: str
    size: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    inode: int
    sha256: str | None = None
    key: str | None = None  # relative to the prefix
    target: str | None = None  # escaped symlink target
    # None in manifests written before they were recorded: such lines are compared by
    # size, mtime and inode alone, once; the next manifest has them.
    ctime_ns: int | None = None
    dev: int | None = None
    # bytes of the object in the bucket when that differs from size (encrypted: an age file)
    stored: int | None = None

    def to_json(self) -> str:
        d: dict[str, Any] = {
            "root": self.root,
            "path": self.path,
            "type": self.type,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "inode": self.inode,
        }
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        if self.key is not None:
            d["key"] = self.key
        if self.target is not None:
            d["target"] = self.target
        if self.ctime_ns is not None:
            d["ctime_ns"] = self.ctime_ns
        if self.dev is not None:
            d["dev"] = self.dev
        if self.stored is not None:
            d["stored"] = self.stored
        return json.dumps(d, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ManifestLine:
        d = json.loads(text)
        return cls(
            d["root"],
            d["path"],
            d["type"],
            d.get("size", 0),
            d["mtime_ns"],
            d["mode"],
            d.get("uid", 0),
            d.get("gid", 0),
            d.get("inode", 0),
            d.get("sha256"),
            d.get("key"),
            d.get("target"),
            d.get("ctime_ns"),
            d.get("dev"),
            d.get("stored"),
        )

    @classmethod
    def parse(cls, raw: bytes, damaged: bool) -> ManifestLine:
        """from_json; with `damaged`, a line of the wrong shape is a DamagedLine instead of
        an exception (a reader that can go on without that entry: restore, verify)."""
        if not damaged:
            return cls.from_json(raw)
        try:
            d = json.loads(raw)
        except ValueError:
            return DamagedLine("?", "?", "damaged", 0, 0, 0, 0, 0, 0, damage="not JSON")
        if not isinstance(d, dict):
            return DamagedLine("?", "?", "damaged", 0, 0, 0, 0, 0, 0, damage="not a JSON object")
        wrong = [n for n in ("root", "path", "type") if not isinstance(d.get(n), str)]
        wrong += [n for n in ("mtime_ns", "mode") if type(d.get(n)) is not int]
        # optional fields may be absent or null (as older versions may have written them)
        wrong += [
            n
            for n in ("size", "uid", "gid", "inode", "ctime_ns", "dev", "stored")
            if d.get(n) is not None and type(d[n]) is not int
        ]
        wrong += [n for n in ("sha256", "key", "target") if d.get(n) is not None and not isinstance(d[n], str)]
        if not wrong:
            return cls.from_json(raw)
        root, path = (v if isinstance(v := d.get(n), str) else "?" for n in ("root", "path"))
        what = ", ".join(f"{n} {d[n]!r}" if n in d else f"no {n}" for n in wrong)
        return DamagedLine(root, path, "damaged", 0, 0, 0, 0, 0, 0, damage=what[:200])

    @classmethod
    def from_entry(cls, root: str, e: Entry) -> ManifestLine:
        return cls(
            root,
            escape_path(e.relpath),
            e.type,
            e.size,
            e.mtime_ns,
            e.mode,
            e.uid,
            e.gid,
            e.inode,
            target=escape_path(e.target) if e.target is not None else None,
            ctime_ns=e.ctime_ns,
            dev=e.dev,
        )

    @property
    def object_size(self) -> int:
        """The size of the object in the bucket (a listing shows it)."""
        return self.size if self.stored is None else self.stored

    @property
    def relpath(self) -> bytes:
        return unescape_path(self.path)

    def order(self) -> tuple[int, tuple[bytes, ...]]:
        return (ROOTS.index(self.root), sort_key(self.relpath))


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


class ManifestWriter:
    """Gzipped JSON lines streamed to S3 as they come (no whole manifest in memory); in an
    authenticated repository each flushed block is followed by its MAC line (auth.py)."""

    def __init__(
        self, store: Store, key: str, budget: ByteBudget, part_size: int, mac: ManifestMac | None = None
    ) -> None:
        self._out = StreamWriter(store, key, budget, part_size)
        self._mac = mac
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.lines = 0

    async def __aenter__(self) -> ManifestWriter:
        return self

    async def add(self, line: ManifestLine) -> None:
        raw = line.to_json().encode() + b"\n"
        self.lines += 1
        if self._mac is not None:
            self._mac.add(raw)
        self._pending.append(raw)
        self._pending_size += len(raw)
        if self._pending_size >= 1 << 20:
            await self._flush()

    async def _flush(self, end: bool = False) -> None:
        if self._mac is not None and (self._pending or end):
            self._pending.append(self._mac.seal_line(end))
        data = self._z.compress(b"".join(self._pending))
        self._pending, self._pending_size = [], 0
        await self._out.write(data)

    async def finish(self) -> None:
        await self._flush(end=True)
        await self._out.write(self._z.flush())
        await self._out.finish()

    async def __aexit__(self, *exc: Any) -> None:
        await self._out.__aexit__(*exc)


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
        self.interval = env_duration(
            "IMMICH_STREAM_JOURNAL_INTERVAL", JOURNAL_SECONDS, 10, 3600, "how often a run's journal is written"
        )

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


async def gunzip_stream(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Decompress a (possibly multi-member) gzip stream chunk by chunk; raise if truncated."""
    z = zlib.decompressobj(31)
    fed = False  # has the current member received any input?
    async for chunk in chunks:
        while chunk:
            fed = True
            try:
                out = z.decompress(chunk)
            except zlib.error as exc:
                raise RepoError(f"a gzip stream is corrupt ({exc}): run `verify --read-data`") from None
            if out:
                yield out
            if z.eof:
                chunk = z.unused_data
                z = zlib.decompressobj(31)
                fed = False
            else:
                chunk = b""
    if fed and not z.eof:
        raise RepoError("a gzip stream ends early: the object is truncated; run `verify --read-data`")


def key_digest(key: str) -> bytes:
    """A compact stand-in for an object key in sets of a whole repository's keys
    (10 bytes: collisions are out of reach for any library)."""
    return hashlib.blake2b(key.encode(), digest_size=10).digest()


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
        self.sealing = sealing

    @staticmethod
    def _digest(key: str, size: int) -> int:
        h = hashlib.blake2b(f"{size}\0{key}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little")

    @classmethod
    async def load(cls, repo: Repo) -> ObjectIndex:
        index = cls(repo.store.sealing)
        async for obj in repo.store.list_objects(repo.data_prefix()):
            index._digests.append(cls._digest(repo.relative_key(obj.key), obj.size))
        index._digests = array("Q", sorted(index._digests))
        return index

    def _has(self, key: str, size: int) -> bool:
        d = self._digest(key, size)
        i = bisect.bisect_left(self._digests, d)
        return i < len(self._digests) and self._digests[i] == d

    def has(self, key: str, size: int) -> bool:
        return self.size_of(key, size) is not None

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


class Repo:
    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        self.lock: RepoLock | None = None  # set by session.open_repo while it holds one
        # the repository authentication key (auth.py), once check_config accepted it; with
        # auth_required every snapshot.json and manifest must carry a valid MAC
        self.auth: RepoAuth | None = None
        self.auth_required = False
        if isinstance(store, Store):  # (unit tests build keys without one)
            store.storage_class_for = self.storage_class_for

    def storage_class_for(self, key: str) -> str | None:
        """The configured storage class of an object to be written: file data
        (data/<id>/<root>/...) only; everything else (manifests, snapshot.json, journals, the
        dump, config.json, locks) stays STANDARD so listing, verify and restore never wait."""
        parts = self.relative_key(key).split("/", 3) if key.startswith(self._k("")) else []
        if len(parts) == 4 and parts[0] == "data" and parts[2] in ROOTS:
            return storage_class_for(self.store.settings, parts[2])
        return None

    def _k(self, rest: str) -> str:
        return f"{self.prefix}/{rest}" if self.prefix else rest

    # keys (relative to the bucket)
    def config_key(self) -> str:
        return self._k("config.json")

    def data_key(self, snap_id: str, root: str, path: str, key_dir: str = "") -> str:
        """The object key (relative to the prefix) for a file first uploaded by run snap_id:
        the file's own path, so the bucket stays browsable, or for a path S3 cannot hold
        (a key over 1,024 bytes, a part over 255) a stable key named by the path's sha256.
        The manifest keeps the full path either way. `key_dir` (STOPPED_DIR) keeps a second
        upload of a path by the same run apart from the first: no object is overwritten."""
        base = f"data/{snap_id}/{root}/{key_dir + '/' if key_dir else ''}"
        escaped = key_path(path)
        key = base + escaped
        if len(self._k(key).encode()) > MAX_KEY_BYTES or any(
            len(part.encode()) > MAX_KEY_PART_BYTES for part in escaped.split("/")
        ):
            digest = hashlib.sha256(path.encode()).hexdigest()
            key = f"{base}{LONG_KEY_DIR}/{digest}"
        return key

    def object_key(self, relkey: str) -> str:
        return self._k(relkey)

    def data_prefix(self) -> str:
        return self._k("data/")

    def snapshot_prefix(self, snap_id: str) -> str:
        """Every object of one snapshot directory starts with this."""
        return self._k(f"snapshots/{snap_id}/")

    def summary_key(self, snap_id: str) -> str:
        return self.snapshot_prefix(snap_id) + SUMMARY

    def manifest_key(self, snap_id: str) -> str:
        return self.snapshot_prefix(snap_id) + MANIFEST

    def dump_key(self, snap_id: str) -> str:
        return self.snapshot_prefix(snap_id) + DUMP

    def journal_prefix(self, snap_id: str) -> str:
        return self.snapshot_prefix(snap_id) + JOURNAL_DIR

    def journal_key(self, snap_id: str, pass_name: str, seq: int) -> str:
        return f"{self.journal_prefix(snap_id)}{pass_name}-{seq:06d}.jsonl.gz"

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
        keys = [obj.key async for obj in self.store.list_objects(self.journal_prefix(snap_id))]
        if keys:
            await self.store.delete(keys)

    def locks_prefix(self) -> str:
        return self._k("locks/")

    def lock_key(self, name: str) -> str:
        return self.locks_prefix() + name

    def preflight_key(self, run_id: str) -> str:
        return self._k(f"preflight/{socket.gethostname()}-{run_id}")

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
        self.store.sealing = Sealing(tuple(current), keys.identities, (self.data_prefix(), self._k("snapshots/")))

    async def read_config(self, keys: Keys | None = None) -> dict[str, Any]:
        """config.json; when `keys` hold the repository's ready authentication key, forged
        unless its MAC matches, before any of it (format, version, encryption) is believed."""
        key = self.config_key()
        raw = await self.store.get(key)
        auth = keys.auth if keys is not None and keys.auth is not None and keys.auth.ready else None
        if keys is not None and auth is not None and not trust_bucket():
            try:
                signed = json.loads(raw)
            except ValueError:
                signed = None
            claim = signed.get("auth") if isinstance(signed, dict) else None
            body = {k: v for k, v in signed.items() if k != "auth"} if isinstance(signed, dict) else {}
            if not isinstance(claim, dict) or not auth.check("config.json", claim.get("mac"), canonical(body)):
                raise forged(
                    f"{key} carries no valid MAC, yet {keys.path} holds the repository's authentication key "
                    f"(if this repository was written by an older immich-stream, set {TRUST_ENV}=1 for one backup "
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
        key = self.config_key()
        if await self.store.head(key) is None:
            raise RepoError(
                f"no immich-stream repository at s3://{self.store.bucket}/{key.rsplit('/', 1)[0] if '/' in key else ''}"
                ": check S3_BUCKET and S3_PREFIX, or run `backup` first"
            )
        cfg = await self.read_config(keys)
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
            if not upgrade and trust_bucket():
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
            if mine.ready and not trust_bucket():
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
        manifest, tmp = self.manifest_key(sid), self.snapshot_prefix(sid) + MANIFEST_REWRITE
        if await self.store.head(manifest) is not None:
            budget = ByteBudget(64 << 20)
            part = self.store.settings.part_size
            for src, dst in ((manifest, tmp), (tmp, manifest)):
                async with ManifestWriter(self.store, dst, budget, part, self.manifest_mac(sid)) as out:
                    async for line in self.read_lines_at(src):
                        await out.add(line)
                    await out.finish()
            await self.store.delete([tmp])
        await self.commit((await self.load_snapshot(sid)).summary)

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

    def relative_key(self, key: str) -> str:
        """A bucket key -> the key relative to the prefix (as manifests hold it)."""
        base = f"{self.prefix}/" if self.prefix else ""
        if not key.startswith(base):  # nothing outside our prefix is ours to read or delete
            raise RepoError(f"{key} is outside the repository prefix {self.prefix!r}")
        return key[len(base) :]

    # snapshots
    async def snapshot_dirs(self) -> dict[str, bool]:
        """Every snapshot directory, sorted by id -> committed (has snapshot.json); one listing.
        Keys that are not <id>/<name> with a valid id (folder markers, stray files) are skipped."""
        ids: dict[str, bool] = {}
        base = self._k("snapshots/")
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

    async def read_manifest(self, snap_id: str, damaged: bool = False) -> AsyncIterator[ManifestLine]:
        """The snapshot's manifest lines; with `damaged`, a line of the wrong shape comes as
        a DamagedLine (the reader names it and goes on) instead of failing the read."""
        async for line in self.read_lines_at(self.manifest_key(snap_id), damaged):
            yield line

    async def read_lines_at(self, key: str, damaged: bool = False) -> AsyncIterator[ManifestLine]:
        """The lines of a manifest-like object, streamed; in an authenticated repository a
        block of lines only once its MAC matched (auth.py)."""
        parts = self.relative_key(key).split("/")
        mac = None
        if len(parts) == 3 and parts[0] == "snapshots" and is_snapshot_id(parts[1]):
            mac = self.manifest_mac(parts[1])
        async for line in self._read_lines(self.store.iter_object(key), mac, key, damaged):
            yield line

    async def read_journal(self, keys: list[str], what: str) -> AsyncIterator[ManifestLine]:
        """read_lines for a journal another run (or a later version) wrote: a chunk that
        cannot be read or parsed ends it with a warning instead of failing the reader
        (a journal only saves work; without it files are read and uploaded again)."""
        try:
            async for line in self.read_lines(keys):
                if line.root in ROOTS and line.type == "file" and line.key:
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

    async def _read_lines(
        self, chunks: AsyncIterator[bytes], mac: ManifestMac | None = None, where: str = "", damaged: bool = False
    ) -> AsyncIterator[ManifestLine]:
        rest = b""
        block: list[bytes] = []  # parsed once their MAC matched: a forged line is forged, whatever its shape
        hold = mac is not None and self.auth_required  # otherwise (a set-up under way) lines pass at once
        async for data in gunzip_stream(chunks):
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            for raw in lines:
                if not raw:
                    continue
                if mac is None:
                    if not is_auth_line(raw):  # read unchecked (no key, TRUST_BUCKET): a MAC is no entry
                        yield ManifestLine.parse(raw, damaged)
                elif is_auth_line(raw):
                    mac.check_line(raw, where)
                    for held in block:
                        yield ManifestLine.parse(held, damaged)
                    block.clear()
                else:
                    if mac.ended:
                        raise forged(f"{where}: lines after its last authenticated block")
                    mac.add(raw + b"\n")
                    if not hold:
                        yield ManifestLine.parse(raw, damaged)
                        continue
                    if mac.block_bytes > MAX_BLOCK:
                        raise forged(f"{where}: {mac.block_bytes} bytes of lines without a MAC")
                    block.append(raw)
        if rest:
            if mac is not None:
                raise forged(f"{where}: its last line has no end")
            if not is_auth_line(rest):
                yield ManifestLine.parse(rest, damaged)
        if mac is not None and not mac.ended and (hold or mac.seq):
            raise forged(f"{where}: it ends without its last authenticated block (truncated or forged)")
