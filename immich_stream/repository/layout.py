"""Where each object of a repository lives (docs/format.md): every S3 key is built here.

    <prefix>/config.json                        format version; written once
    <prefix>/data/<id>/<root>/<escaped path>    file contents, uploaded by the run <id> that first saw them
    <prefix>/snapshots/<id>/manifest.jsonl.gz   one JSON line per entry, in walk order
    <prefix>/snapshots/<id>/database.sql.gz     the pg_dump stream
    <prefix>/snapshots/<id>/catalog.jsonl.gz    the Immich catalog read from the dump (browse/catalog.py)
    <prefix>/snapshots/<id>/snapshot.json       the summary; written last = the commit marker
    <prefix>/snapshots/<id>/journal/<pass>-<n>.jsonl.gz  what an uncommitted run has read and
                                                uploaded so far (deleted once it commits)
    <prefix>/locks/<name>.json                  a run's lock (locks.py)
    <prefix>/preflight/<host>-<name>            a probe proving the bucket writable (or deletes allowed, or the
                                                server's clock); removed again, or by prune (append-only)
    <prefix>/doctor/<id>/...                    `doctor`'s probe objects, removed again

A run id is a snapshot id (new_snapshot_id). Layout knows names only; Repo (repo.py) is a
Layout with a bucket, and the other layers ask it for keys instead of building them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import socket
import urllib.parse

from immich_stream.errors import RepoError

ROOTS = ("postgres", "library")  # manifest order: the cold copy is taken first
# Immich's external libraries (folders outside UPLOAD_LOCATION): roots of their own,
# "external:<name>", after the library in the manifest (backup/externals.py names them)
EXTERNAL = "external:"
_EXTERNAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_KEY_BYTES = 1024  # S3's limit for a whole key
MAX_KEY_PART_BYTES = 255  # what filesystem-backed servers (rclone, SeaweedFS) take per "/"-part
# Keys of paths too long for S3 live here, named by the path's sha256. "%l" cannot begin an
# escaped path (a '%' in a name is always escaped as %25), so these never collide with one.
LONG_KEY_DIR = "%long"
PACK_DIR = "%pack"  # data/<id>/%pack/<random>: packs of small files and chunks (packs.py)
STOPPED_DIR = "%stopped"  # like %long, cannot start an escaped path (a bare % is escaped)
# the files of a snapshot directory snapshots/<id>/
MANIFEST = "manifest.jsonl.gz"
DUMP = "database.sql.gz"
CATALOG = "catalog.jsonl.gz"  # absent in snapshots of older versions: built from the dump then
SUMMARY = "snapshot.json"  # written last: the commit marker
MANIFEST_REWRITE = "manifest.rewrite.jsonl.gz"  # a manifest on its way back (key reencrypt, auth set-up)
JOURNAL_DIR = "journal/"

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
    if "%" not in text:  # most names: nothing was escaped
        return text.encode()
    return urllib.parse.unquote_to_bytes(text)


def is_external(root: str) -> bool:
    """An external library's root: external:<name>, the name a safe single path part."""
    return root.startswith(EXTERNAL) and _EXTERNAL_NAME.fullmatch(root[len(EXTERNAL) :]) is not None


def is_root(root: str) -> bool:
    """A root a manifest may name (anything else is damaged or forged)."""
    return root in ROOTS or is_external(root)


def root_dir(root: str) -> bytes:
    """Where a root goes under a restore's target: its name; external:<name> as external/<name>."""
    return b"external/" + root[len(EXTERNAL) :].encode() if is_external(root) else root.encode()


def root_order(root: str) -> tuple[int, str]:
    """Manifest order of roots: postgres, library, then the external libraries by name."""
    return (ROOTS.index(root), "") if root in ROOTS else (len(ROOTS), root)


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


def is_pack_key(rel: str) -> bool:
    """A pack's key (relative to the prefix): data/<id>/%pack/<name>."""
    return rel.startswith("data/") and f"/{PACK_DIR}/" in rel


def run_dirs(run: str) -> tuple[str, str]:
    """Relative to the prefix: where a run's uploads live (its data objects, its snapshot directory)."""
    return f"data/{run}/", f"snapshots/{run}/"


class Layout:
    """The keys of the repository under `prefix` (relative to the bucket, unless a method
    says "relative to the prefix", as manifests hold them)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.strip("/")

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
        base = f"{self.run_data_dir(snap_id)}{root}/{key_dir + '/' if key_dir else ''}"
        escaped = key_path(path)
        key = base + escaped
        if len(self._k(key).encode()) > MAX_KEY_BYTES or any(
            len(part.encode()) > MAX_KEY_PART_BYTES for part in escaped.split("/")
        ):
            digest = hashlib.sha256(path.encode()).hexdigest()
            key = f"{base}{LONG_KEY_DIR}/{digest}"
        return key

    def pack_key(self, snap_id: str) -> str:
        """A new pack's key (relative to the prefix) for run snap_id: random, never reused."""
        return f"{self.run_data_dir(snap_id)}{PACK_DIR}/{secrets.token_hex(8)}"

    def run_data_dir(self, snap_id: str) -> str:
        """Relative to the prefix: where the objects a run uploaded first live."""
        return run_dirs(snap_id)[0]

    def object_key(self, relkey: str) -> str:
        return self._k(relkey)

    def repository_prefix(self) -> str:
        """Every key of the repository starts with this."""
        return self._k("")

    def data_prefix(self) -> str:
        return self._k("data/")

    def snapshots_prefix(self) -> str:
        return self._k("snapshots/")

    def snapshot_prefix(self, snap_id: str) -> str:
        """Every object of one snapshot directory starts with this."""
        return f"{self.snapshots_prefix()}{snap_id}/"

    def summary_key(self, snap_id: str) -> str:
        return self.snapshot_prefix(snap_id) + SUMMARY

    def manifest_key(self, snap_id: str) -> str:
        return self.snapshot_prefix(snap_id) + MANIFEST

    def dump_key(self, snap_id: str) -> str:
        return self.snapshot_prefix(snap_id) + DUMP

    def catalog_key(self, snap_id: str) -> str:
        return self.snapshot_prefix(snap_id) + CATALOG

    def rewrite_key(self, snap_id: str) -> str:
        """Where a manifest goes on its way back (key reencrypt, the authentication set-up)."""
        return self.snapshot_prefix(snap_id) + MANIFEST_REWRITE

    def journal_prefix(self, snap_id: str) -> str:
        return self.snapshot_prefix(snap_id) + JOURNAL_DIR

    def journal_key(self, snap_id: str, pass_name: str, seq: int) -> str:
        return f"{self.journal_prefix(snap_id)}{pass_name}-{seq:06d}.jsonl.gz"

    def locks_prefix(self) -> str:
        return self._k("locks/")

    def lock_key(self, name: str) -> str:
        return self.locks_prefix() + name

    def preflight_prefix(self) -> str:
        return self._k("preflight/")

    def preflight_key(self, name: str) -> str:
        """A probe object of this host: "backup" (the bucket writable), "delete" (may this key
        delete?), "clock" or "clock-<random>" (the server's clock). Fixed names: what a key
        that cannot delete leaves of them stays one object per host (prune removes it)."""
        return self.preflight_prefix() + f"{socket.gethostname()}-{name}"

    def probes_prefix(self) -> str:
        """Where `doctor` puts its probe objects."""
        return self._k("doctor/")

    def probe_key(self, probe_id: str, *parts: str) -> str:
        """<prefix>/doctor/<probe_id>/<parts>: one doctor's probe objects ("" as the last
        part gives the folder, a listing prefix; no part the probe's own name)."""
        return self.probes_prefix() + "/".join((probe_id, *parts))

    def probe_file_key(self, probe_id: str, raw_name: bytes) -> str:
        """A probe named like the data object of a file called `raw_name` (its escaped key form)."""
        return self.probe_key(probe_id, "odd", key_path(escape_path(raw_name)))

    def relative_key(self, key: str) -> str:
        """A bucket key -> the key relative to the prefix (as manifests hold it)."""
        base = f"{self.prefix}/" if self.prefix else ""
        if not key.startswith(base):  # nothing outside our prefix is ours to read or delete
            raise RepoError(f"{key} is outside the repository prefix {self.prefix!r}")
        return key[len(base) :]
