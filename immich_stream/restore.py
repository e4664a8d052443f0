"""`restore`: files of a snapshot into a directory, or its database into the container.

Files: concurrent, bounded downloads, each written to a temporary name beside its target
and renamed into place only after its size and sha256 match the manifest. Files already
in place with the right size and sha256 are skipped, so an interrupted restore is simply
run again. Manifest paths are never trusted: nothing is written outside the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker

from immich_stream.budget import ByteBudget
from immich_stream.config import Settings
from immich_stream.docker_exec import pipe_into
from immich_stream.errors import (
    ConfigError,
    DumpError,
    ImmichStreamError,
    NothingMatched,
    ObjectNotFound,
    RepoError,
    StackError,
    StoreError,
)
from immich_stream.hoststate import stack_lock
from immich_stream.metadata import came_from as came_from_text
from immich_stream.postgres import (
    CLUSTER_DUMP,
    DumpScanner,
    SearchPathFix,
    check_target,
    ensure_database,
    psql_restore_command,
    read_head,
)
from immich_stream.problems import Problems
from immich_stream.progress import Phase, Reporter
from immich_stream.repo import (
    ROOTS,
    DamagedLine,
    ManifestLine,
    Repo,
    Snapshot,
    gunzip_stream,
    key_digest,
    unescape_path,
)
from immich_stream.session import open_repo, reader, reading, still_reading
from immich_stream.stack import Stack, StackGuard, connect, recover
from immich_stream.store import _TRANSIENT_CODES, CHUNK_SHARED, SMALL_FACTOR, SMALL_OBJECT, Store
from immich_stream.thaw import archived_digests, thaw
from immich_stream.watchdog import s3_hang, with_watchdog

log = logging.getLogger(__name__)

MARKER = ".immich-stream-restore"  # in the target while a restore is unfinished
PARTIAL = ".immich-stream-partial"
CHUNK = 1 << 20


@dataclass
class RestoreStats:
    files: int = 0
    restored: int = 0
    skipped: int = 0  # already in place
    dirs: int = 0
    symlinks: int = 0
    bytes_downloaded: int = 0
    failed: int = 0
    first_failure: str = ""  # why the first file was not restored (said when none was)
    problems: Problems = field(default_factory=Problems)
    seconds: float = 0.0


@dataclass
class DatabaseRestored:
    bytes: int  # of SQL sent to psql
    seconds: float
    downtime: float  # the app containers were stopped this long


class UnsafePath(RepoError):
    """A manifest path that would write outside the target: stops the whole restore."""


def safe_relpath(line: ManifestLine) -> bytes:
    """The line's path, refused if it could point outside the target."""
    raw = line.relpath
    if not raw or b"\x00" in raw or raw.startswith(b"/") or any(part in (b"", b".", b"..") for part in raw.split(b"/")):
        raise UnsafePath(
            f"refusing manifest path {line.path!r} in root {line.root}: absolute, '..', empty or NUL "
            "components; the manifest is damaged or forged"
        )
    if line.root not in ROOTS:
        raise UnsafePath(f"refusing manifest root {line.root!r}: not one of {', '.join(ROOTS)}")
    return raw


def _damaged(line: ManifestLine) -> str | None:
    """What in a manifest line no file system takes (a damaged or forged line): that entry
    is not restored, the rest is. None for a sound line."""
    if not 0 <= line.size < 1 << 63:
        return f"size {line.size}"
    if not 0 <= line.mode <= 0o7777:
        return f"mode {line.mode:o}"
    if not -(1 << 63) <= line.mtime_ns < 1 << 63:
        return f"mtime {line.mtime_ns} ns"
    for what, ident in (("uid", line.uid), ("gid", line.gid)):
        if not 0 <= ident < (1 << 32) - 1:
            return f"{what} {ident}"
    if line.type == "symlink" and (not line.target or b"\x00" in unescape_path(line.target)):
        return "a symlink target that is empty or holds NUL"
    return None


def _matches(line: ManifestLine, roots: set[str], includes: list[str]) -> bool:
    if line.root not in roots:
        return False
    if not includes:
        return True
    path = line.relpath.decode("utf-8", "surrogateescape")
    return any(fnmatch.fnmatchcase(path, g) for g in includes)


def _open_target(target: Path) -> int:
    """The target directory (made when absent), opened once: every path below it is reached
    from this descriptor one name at a time, never through a symlink. The target itself may
    be a symlink: the user named it."""
    target.mkdir(parents=True, exist_ok=True)
    return os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _mark_target(target_fd: int, snap_id: str) -> None:
    """The resume marker, created anew: whatever holds its name (a planted symlink, a hard
    link) is unlinked, never followed or written through."""
    try:
        os.unlink(MARKER, dir_fd=target_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise ConfigError(f"{MARKER} in the restore target is a directory: remove it") from None
    fd = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=target_fd)
    with open(fd, "w") as fh:
        fh.write(json.dumps({"snapshot": snap_id}) + "\n")


def _marker_snapshot(marker: Path) -> str | None:
    """The snapshot an unfinished restore's marker names; None for anything else (read
    without following a symlink)."""
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        previous = json.loads(os.read(fd, 4096) if stat.S_ISREG(os.fstat(fd).st_mode) else b"").get("snapshot")
    except (OSError, ValueError, AttributeError):
        return None
    finally:
        os.close(fd)
    return previous if isinstance(previous, str) else None


def _check_target(target: Path, snap: Snapshot, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ConfigError(f"restore target {target} is not a directory: choose a directory")
    if not target.exists():
        return
    entries = [e for e in os.listdir(target) if e != MARKER]
    if not entries or overwrite:
        return
    marker = target / MARKER
    if os.path.lexists(marker):
        previous = _marker_snapshot(marker)
        if previous == snap.id:
            log.info("resuming the unfinished restore of %s into %s", snap.id, target)
            return
        if previous is None:
            raise ConfigError(f"{marker} is not a restore's marker: remove it, or add --overwrite")
        raise ConfigError(
            f"{target} holds an unfinished restore of snapshot {previous}: restore that one, or add --overwrite"
        )
    raise ConfigError(f"restore target {target} is not empty: choose an empty directory or add --overwrite")


async def _check_something_matches(
    repo: Repo, snap: Snapshot, roots: list[str] | None, wanted: set[str], includes: list[str]
) -> None:
    """A --root the snapshot lacks, or --include patterns that match nothing, are said at
    once (exit 1), before anything is written: a restore of 0 files is not a success."""
    present = set(snap.summary.roots)
    if roots and present and not wanted & present:
        raise NothingMatched(
            f"nothing matched: snapshot {snap.id} holds no {', '.join(roots)} root (it holds "
            f"{', '.join(sorted(present))}; a backup with --stop app or none takes no cold copy): nothing was written"
        )
    if not includes:
        return
    folder = None  # a directory matched: it alone is not what a restore is for
    async for line in repo.read_manifest(snap.id, damaged=True):  # up to the first file or symlink matched
        if _matches(line, wanted, includes):
            if line.type != "dir":
                return
            folder = folder or line.path
    within = f" under {', '.join(roots)}" if roots else ""
    hint = f" (only the folder {folder}: add /* to take what it holds, e.g. {folder}/*)" if folder else ""
    raise NothingMatched(
        f"nothing matched --include {', '.join(includes)} in snapshot {snap.id}{within}{hint}: patterns match "
        "paths relative to the root (library/upload/a.jpg is upload/a.jpg; * crosses /); nothing was written"
    )


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class InTheWay(ImmichStreamError):
    """Something in the target where the snapshot has another type that this restore may not
    replace (a directory with files where it has a file; anything without --overwrite):
    that path is not restored, the rest is."""


# S3 answers about the server or the credentials, never about one object: a download that
# ends so after its retries is counted as no answer (see restore_files). Not AccessDenied,
# which a per-object policy gives.
SERVER_CODES = _TRANSIENT_CODES | {
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "AccountProblem",
    "RequestTimeTooSkewed",
}

# The target's file system, not one file: full, over quota, read-only, out of descriptors.
TARGET_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EMFILE, errno.ENFILE}


class TargetFailed(ImmichStreamError):
    """The target's file system refuses every file (see TARGET_ERRNOS): the restore stops
    at once and resumes, instead of failing the rest of the library one file at a time."""


class FileRestorer:
    """Writes below the target only through descriptors: each directory is opened from its
    parent, one name at a time, with O_NOFOLLOW; files are created with O_EXCL beside their
    name and renamed into place (a rename replaces a symlink, it never follows one). A symlink
    or file in the place of a directory is never written through: refused, or with
    --overwrite replaced by the directory."""

    def __init__(
        self,
        store: Store,
        repo: Repo,
        target: Path,
        target_fd: int,
        single_root: bool,
        overwrite: bool,
        stats: RestoreStats,
        phase: Phase,
        budget: ByteBudget,
    ) -> None:
        self.store = store
        self.repo = repo
        self.target = os.fsencode(target)
        self.target_fd = target_fd
        self.single_root = single_root
        self.overwrite = overwrite
        self.stats = stats
        self.phase = phase
        self.budget = budget
        self.as_root = os.geteuid() == 0

    def shown(self, rel: bytes) -> str:
        return os.fsdecode(os.path.join(self.target, rel))

    def dest(self, line: ManifestLine) -> bytes:
        """The line's path relative to the target."""
        rel = safe_relpath(line)
        if self.single_root:
            if rel == MARKER.encode():
                raise UnsafePath(
                    f"refusing manifest path {line.path!r} in root {line.root}: {MARKER} is the name of "
                    "restore's own marker; the manifest is damaged or forged"
                )
            return rel
        return line.root.encode() + b"/" + rel

    def open_dir(self, rel: bytes, create: bool) -> int:
        """The directory rel (b"" is the target), opened one name at a time from the target,
        never through a symlink. create: missing directories are made, and with --overwrite a
        file or symlink in the place of one is replaced by it. Blocking."""
        fd = os.open(".", DIR_FLAGS, dir_fd=self.target_fd)
        try:
            done = b""
            for name in rel.split(b"/") if rel else []:
                done = os.path.join(done, name)
                child = self._enter(fd, name, done, create)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _enter(self, parent: int, name: bytes, rel: bytes, create: bool) -> int:
        for _ in range(3):  # another worker may make the same directory at the same time
            try:
                return os.open(name, DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=parent)
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                continue  # it became one meanwhile
            link = stat.S_ISLNK(st.st_mode)
            if link and create and not self.overwrite:
                raise UnsafePath(
                    f"refusing to write under {self.shown(rel)}: it is a symlink, and a restore never writes "
                    "through one (it leads out of the restore target or back into it); the manifest is damaged "
                    "or forged, or add --overwrite to replace it with the directory"
                )
            if not create or not self.overwrite:
                what = "a symlink" if link else "a file"
                raise InTheWay(
                    f"{self.shown(rel)} is {what} where the snapshot has a directory: add --overwrite to replace it"
                )
            os.unlink(name, dir_fd=parent)  # the file or symlink goes; nothing is followed
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
        raise InTheWay(f"{self.shown(rel)} changed type while it was restored: run the same command again")

    def make_dir(self, rel: bytes) -> None:
        os.close(self.open_dir(rel, create=True))

    def make_room(self, parent: int, name: bytes) -> None:
        """A file or symlink arrives at name by a rename, which replaces a file or a symlink
        there (never following it) but not a directory: an empty one goes with --overwrite."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        if not self.overwrite:
            raise InTheWay("a directory is in its place: add --overwrite to replace it")
        try:
            os.rmdir(name, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise InTheWay(
                "a directory that is not empty is in its place: move it away, then run the same command again"
            ) from None

    def _meta_fd(self, fd: int, line: ManifestLine) -> None:
        # Through the open descriptor: never through a symlink put in the file's place.
        if self.as_root:
            with contextlib.suppress(OSError):
                os.fchown(fd, line.uid, line.gid)
        os.fchmod(fd, line.mode)  # after chown, which clears setuid bits
        os.utime(fd, ns=(line.mtime_ns, line.mtime_ns))

    def set_meta(self, rel: bytes, line: ManifestLine) -> None:
        """Owner, mode and mtime of a directory in place; a symlink there is refused, not followed."""
        fd = self.open_dir(rel, create=False)
        try:
            self._meta_fd(fd, line)
        finally:
            os.close(fd)

    def in_place(self, parent: int, name: bytes, line: ManifestLine) -> bool:
        """True when name already holds exactly this file (a regular file of that size and
        sha256); its owner, mode and mtime are then set. Blocking: run it in a thread."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink: replaced by the file, never read through
                return False
            raise
        st = os.fstat(fd)
        # A hard link shares its owner, mode and mtime with a file elsewhere (a `cp -al` copy,
        # or planted): never set through it; the file is replaced by one of its own instead.
        if not stat.S_ISREG(st.st_mode) or st.st_size != line.size or st.st_nlink != 1:  # a directory: see make_room
            os.close(fd)
            return False
        with open(fd, "rb") as fh:
            h = hashlib.sha256()
            while chunk := fh.read(CHUNK):
                h.update(chunk)
            if h.hexdigest() != line.sha256:
                return False
            self._meta_fd(fd, line)
            return True

    @staticmethod
    def partial_name(name: bytes) -> bytes:
        """A temporary name beside name. It carries a digest of the whole name (two long names
        sharing a prefix do not collide) and is the same on every run, so a resumed restore
        finds what a killed one left."""
        tag = hashlib.sha256(name).hexdigest()[:16].encode()
        return b"." + name[:150] + b"." + tag + PARTIAL.encode()

    @classmethod
    def create_partial(cls, parent: int, name: bytes) -> tuple[int, bytes]:
        """The temporary file for name, created exclusively and never through a symlink.
        Whatever holds its name (a leftover, or a manifest entry named like it) is unlinked
        first: never opened, never followed."""
        partial = cls.partial_name(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial, dir_fd=parent)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(partial, flags, 0o600, dir_fd=parent), partial

    def open_target(self, rel: bytes, line: ManifestLine) -> tuple[int, int, bytes] | None:
        """Everything before a download, in one trip to a worker thread: the directory (its
        descriptor is returned), the check for the file already in place (None), room made,
        the partial file with its final size allocated (a fragmented or half-full disk shows
        now, not at the end)."""
        head, name = os.path.split(rel)
        parent = self.open_dir(head, create=True)
        try:
            if self.in_place(parent, name, line):
                os.close(parent)
                return None
            if line.key is None or line.sha256 is None:
                raise RepoError(f"manifest line {line.root}/{line.path} has no object key: the manifest is damaged")
            self.make_room(parent, name)
            fd, partial = self.create_partial(parent, name)
            if line.size > 0:
                try:
                    os.posix_fallocate(fd, 0, line.size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        os.close(fd)
                        os.unlink(partial, dir_fd=parent)
                        raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(parent)
            raise
        return parent, fd, partial

    @staticmethod
    def write_hashed(fd: int, data: memoryview, h: Any) -> None:
        """Hash and write a piece of a download (in the thread that received it: see
        Store.download; hashlib and os.write give the GIL up while they work)."""
        h.update(data)
        while data:
            data = data[os.write(fd, data) :]

    def finish_file(
        self, parent: int, fd: int, partial: bytes, name: bytes, line: ManifestLine, h: Any, size: int
    ) -> None:
        """The size and sha256 checked against the manifest, owner, mode and mtime set, the
        file renamed into place, in one trip to a worker thread. Owns (closes) fd and parent
        whatever happens, and removes the partial file unless it was renamed."""
        assert line.sha256 is not None
        try:
            try:
                if size != line.size or h.hexdigest() != line.sha256:
                    raise RepoError(
                        f"object {line.key} does not match its manifest line ({size} bytes, sha256 "
                        f"{h.hexdigest()[:12]}..., expected {line.size} and {line.sha256[:12]}...): "
                        "run `verify --read-data`"
                    )
                self._meta_fd(fd, line)
            finally:
                os.close(fd)
            # a symlink at name is replaced, not followed
            os.replace(partial, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial, dir_fd=parent)
            raise
        finally:
            os.close(parent)

    async def file(self, line: ManifestLine) -> bool:
        """Restore one file; True when it was downloaded, False when found in place."""
        rel = self.dest(line)
        opened = await asyncio.to_thread(self.open_target, rel, line)
        if opened is None:
            self.stats.skipped += 1
            self.phase.update(line.size, files=1)
            return False
        assert line.key is not None and line.sha256 is not None
        parent, fd, partial = opened
        h = hashlib.sha256()
        size = 0

        def sink(data: memoryview) -> None:
            nonlocal size
            self.write_hashed(fd, data, h)
            size += len(data)

        # the download's receive buffer (the data goes from it to the file)
        held = min(max(line.size, 1), CHUNK_SHARED)
        owned = True  # fd and parent: until finish_file takes them
        try:
            await self.budget.acquire(held)
            try:
                await self.store.download(
                    self.repo.object_key(line.key), sink, line.size, small=line.size <= SMALL_OBJECT
                )
            finally:
                await asyncio.shield(self.budget.release(held))
                self.stats.bytes_downloaded += size
                self.phase.update(size)
            owned = False  # a cancellation while the thread runs must not close them under it
            await asyncio.to_thread(self.finish_file, parent, fd, partial, os.path.basename(rel), line, h, size)
        except BaseException:
            if owned:
                os.close(fd)  # Store.download returned: nothing writes to it any more
                with contextlib.suppress(OSError):
                    os.unlink(partial, dir_fd=parent)
                os.close(parent)
            raise
        self.stats.restored += 1
        self.phase.update(0, files=1)
        return True

    async def symlink(self, line: ManifestLine) -> None:
        head, name = os.path.split(self.dest(line))
        raw_target = unescape_path(line.target or "")

        def make() -> None:
            parent = self.open_dir(head, create=True)
            try:
                self.make_room(parent, name)
                # made beside its name, then renamed over whatever is there: never followed
                tmp = self.partial_name(name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=parent)
                os.symlink(raw_target, tmp, dir_fd=parent)
                try:
                    if self.as_root:
                        with contextlib.suppress(OSError):
                            os.chown(tmp, line.uid, line.gid, dir_fd=parent, follow_symlinks=False)
                    os.utime(tmp, ns=(line.mtime_ns, line.mtime_ns), dir_fd=parent, follow_symlinks=False)
                    os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=parent)
                    raise
            finally:
                os.close(parent)

        await asyncio.to_thread(make)
        self.stats.symlinks += 1


LOOKUP_LIMIT = 1000  # files not restored that are looked up in other snapshots (the rest: named only)
COPIES_NAMED = 3  # other snapshots named per file


async def _find_copies(
    repo: Repo, snap: Snapshot, failures: list[tuple[ManifestLine, str]], copies: list[dict[str, str]]
) -> None:
    """For each file not restored, the other committed snapshots whose manifests hold the
    same content (sha256) under another object that is in the bucket: a copy to restore it
    from (into copies: snapshot -> the path it holds it at). The manifests are streamed one at a time, newest
    first; one that cannot be read is skipped."""
    by_sha: dict[str, list[int]] = {}
    for i, (line, _) in enumerate(failures):
        assert line.sha256 is not None
        by_sha.setdefault(line.sha256, []).append(i)
    others = [s for s in reversed(await repo.snapshot_ids()) if s != snap.id]
    if others:
        log.info("looking for other copies of %d files in %d other snapshots", len(failures), len(others))
    present: dict[str, bool] = {}  # object key -> in the bucket (a copy lost too is not named)
    tried = [0] * len(failures)  # keys looked up per file: bounded, however many snapshots miss it

    async def there(key: str) -> bool:
        if key not in present:
            present[key] = await repo.store.head(repo.object_key(key)) is not None
        return present[key]

    for sid in others:
        try:
            async for other in repo.read_manifest(sid, damaged=True):
                if other.type != "file" or other.sha256 not in by_sha or other.key is None:
                    continue
                for i in by_sha[other.sha256]:
                    if other.key == failures[i][0].key or len(copies[i]) >= COPIES_NAMED or sid in copies[i]:
                        continue
                    if other.key not in present:
                        if tried[i] >= 2 * COPIES_NAMED:
                            continue
                        tried[i] += 1
                    if await there(other.key):
                        copies[i][sid] = f"{other.root}/{other.path}"
        except (RepoError, StoreError) as exc:
            log.warning("could not look for other copies in snapshot %s: %s", sid, exc)


def _name_failures(failures: list[tuple[ManifestLine, str]], copies: list[dict[str, str]], problems: Problems) -> None:
    """Each file not restored in one line: the path, why, and where another copy is."""
    for (line, why), found in zip(failures, copies, strict=True):
        where = f"{line.root}/{line.path}"
        if found:
            named = ", ".join(f"snapshot {sid}" + ("" if p == where else f" as {p}") for sid, p in found.items())
            tail = f"another copy: {named}"
        else:
            tail = "no other snapshot holds a copy"
        problems.add(f"{where}: not restored: {why}; {tail}")


async def restore_files(
    settings: Settings,
    reporter: Reporter,
    which: str,
    target: Path,
    roots: list[str] | None,
    includes: list[str],
    overwrite: bool,
    wait: bool = True,
) -> tuple[Snapshot, RestoreStats]:
    started = time.monotonic()
    stats = RestoreStats()
    budget = ByteBudget(settings.max_memory)
    async with open_repo(settings, lock=reader(settings, "restore")) as repo, contextlib.AsyncExitStack() as exits:
        store = repo.store
        snap = await repo.resolve(which)
        _check_target(target, snap, overwrite)
        wanted = set(roots or ROOTS)
        await _check_something_matches(repo, snap, roots, wanted, includes)
        # before the target is marked: a --no-wait run leaves nothing behind to resume
        await _thaw_needed(repo, snap, settings, reporter, wanted, includes, wait)
        target_fd = await asyncio.to_thread(_open_target, target)
        exits.callback(os.close, target_fd)
        await asyncio.to_thread(_mark_target, target_fd, snap.id)
        everything = not includes and wanted >= set(snap.summary.roots)
        total = (snap.summary.files.bytes_total or None) if everything else None
        phase = reporter.phase("restore files", total)
        single = roots is not None and len(roots) == 1
        restorer = FileRestorer(store, repo, target, target_fd, single, overwrite, stats, phase, budget)
        dirs: list[ManifestLine] = []
        failures: list[tuple[ManifestLine, str]] = []  # files not restored, named at the end
        # Small files are round trips more than bytes (two thumbnails per photo): SMALL_FACTOR
        # times as many of them at once; a larger file holds one of --jobs slots.
        workers = settings.jobs * SMALL_FACTOR
        large = asyncio.Semaphore(settings.jobs)
        queue: asyncio.Queue[ManifestLine | None] = asyncio.Queue(workers * 2)

        def problem(line: ManifestLine, exc: Exception | str) -> None:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                fs = os.fstatvfs(target_fd)
                if line.size > fs.f_blocks * fs.f_frsize:  # a damaged size, not a full disk: this file only
                    exc = RepoError(f"its manifest size ({line.size} bytes) is more than the whole target file system")
            if isinstance(exc, OSError) and exc.errno in TARGET_ERRNOS:
                raise TargetFailed(
                    f"cannot write into {target}: {exc.strerror} (at {line.root}/{line.path}): make room (or fix "
                    "the file system), then run the same command again: it resumes"
                ) from None
            stats.failed += 1
            stats.first_failure = stats.first_failure or str(exc)
            # only a bad object calls for another copy; a target in the way or a local error does not
            looked_up = isinstance(exc, (str, StoreError, RepoError))
            if looked_up and line.type == "file" and line.sha256 is not None and len(failures) < LOOKUP_LIMIT:
                failures.append((line, str(exc)))
            else:
                stats.problems.add(f"{line.root}/{line.path}: not restored: {exc}")

        async def produce() -> None:
            async for line in repo.read_manifest(snap.id, damaged=True):
                still_reading(repo)
                if isinstance(line, DamagedLine):  # its root unreadable: named whatever was asked for
                    if line.root not in ROOTS or _matches(line, wanted, includes):
                        stats.files += 1
                        problem(line, RepoError(f"its manifest line is damaged ({line.damage}): run `verify`"))
                    continue
                if not _matches(line, wanted, includes):
                    continue
                rel = restorer.dest(line)  # refuses unsafe paths before anything is written for them
                if (damage := _damaged(line)) is not None:
                    if line.type == "file":
                        stats.files += 1
                    problem(line, RepoError(f"its manifest line is damaged ({damage}): run `verify`"))
                    continue
                if line.type == "dir":
                    try:
                        await asyncio.to_thread(restorer.make_dir, rel)
                    except (InTheWay, OSError) as exc:
                        problem(line, exc)
                        continue
                    dirs.append(line)  # modes and mtimes once their contents are written
                    stats.dirs += 1
                elif line.type == "symlink":
                    try:
                        await restorer.symlink(line)
                    except (InTheWay, OSError) as exc:
                        problem(line, exc)
                else:
                    stats.files += 1
                    await queue.put(line)
            for _ in range(workers):
                await queue.put(None)

        # downloads in a row that failed without an answer from S3 about their object (a file
        # found in place is no answer: a resumed run alternates them with the missing ones)
        unanswered = 0

        async def work() -> None:
            nonlocal unanswered
            while (line := await queue.get()) is not None:
                try:
                    if line.size <= SMALL_OBJECT:
                        downloaded = await restorer.file(line)
                    else:
                        async with large:
                            downloaded = await restorer.file(line)
                except UnsafePath:
                    raise
                except ObjectNotFound:
                    problem(line, f"its object {line.key} is missing from the bucket")
                except StoreError as exc:
                    # A server that answers about this object (access denied, archived) fails
                    # this file; one that does not answer at all, or only with its own trouble
                    # after every retry (503 SlowDown, 500), fails the run (it resumes).
                    if exc.code is None or exc.code in SERVER_CODES:
                        unanswered += 1
                        if unanswered > workers:
                            raise StoreError(
                                f"{exc} ({unanswered} downloads in a row failed so): the restore stopped; the same "
                                "command resumes it"
                            ) from exc
                    problem(line, exc)
                except (RepoError, InTheWay, OSError) as exc:
                    problem(line, exc)
                else:
                    if downloaded:
                        unanswered = 0

        async def transfer() -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(produce())
                for _ in range(workers):
                    tg.create_task(work())

        try:
            # A frozen S3 must not keep a restore alive for hours of timeouts and retries.
            await with_watchdog(
                repo.store,
                math.inf,
                transfer(),
                reading(
                    repo,
                    s3_hang(repo.store, settings.stall_timeout, "the restore stopped; the same command resumes it"),
                ),
            )
        finally:
            phase.close()
        for line in reversed(dirs):  # deepest first: setting a parent's mtime is the last touch
            try:
                await asyncio.to_thread(restorer.set_meta, restorer.dest(line), line)
            except (InTheWay, OSError) as exc:  # e.g. a symlink in the directory's place (refused, not followed)
                stats.failed += 1
                stats.problems.add(f"{line.root}/{line.path}: {exc}")
        for root, meta in snap.summary.root_meta.items():
            if root in wanted and root in ROOTS:
                line = ManifestLine(root, "", "dir", 0, meta.mtime_ns, meta.mode, meta.uid, meta.gid, 0)
                with contextlib.suppress(InTheWay, OSError):  # nothing of it restored, or not a directory
                    await asyncio.to_thread(restorer.set_meta, b"" if single else root.encode(), line)
        if failures:
            copies: list[dict[str, str]] = [{} for _ in failures]
            try:
                await with_watchdog(
                    repo.store,
                    math.inf,
                    _find_copies(repo, snap, failures, copies),
                    reading(repo, s3_hang(repo.store, settings.stall_timeout, "the search for other copies stopped")),
                )
            finally:  # named even when S3 stops answering meanwhile
                _name_failures(failures, copies, stats.problems)
        if stats.failed == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(MARKER, dir_fd=target_fd)
    stats.seconds = time.monotonic() - started
    return snap, stats


async def _thaw_needed(
    repo: Repo, snap: Snapshot, settings: Settings, reporter: Reporter, roots: set[str], includes: list[str], wait: bool
) -> None:
    """Thaw the archived objects (GLACIER, DEEP_ARCHIVE) this restore will download, before
    any download starts (see thaw.py); one listing of data/ when none is archived."""
    archived = await archived_digests(repo)
    if not archived:
        return
    needed: dict[bytes, str] = {}
    async for line in repo.read_manifest(snap.id, damaged=True):
        if line.type == "file" and line.key is not None and _matches(line, roots, includes):
            d = key_digest(line.key)
            if d in archived:
                needed.setdefault(d, repo.object_key(line.key))
    await thaw(repo.store, needed.values(), settings, reporter, wait)


async def snapshot_sql(store: Store, repo: Repo, snap: Snapshot) -> AsyncGenerator[bytes, None]:
    """The snapshot's dump as SQL; raises at its end unless the gzip ended properly and the
    SQL matched snapshot.json's size and sha256 (so a COMMIT after it is never sent)."""
    key = repo.dump_key(snap.id)
    db = snap.summary.database
    expected_sha, expected_size = db.sha256, db.size
    if not expected_sha:
        raise RepoError(
            f"snapshot {snap.id} records no sha256 of its database dump: snapshot.json is damaged; "
            "use --dump-to to inspect the dump"
        )
    h = hashlib.sha256()
    size = 0
    async for data in gunzip_stream(store.iter_object(key)):  # raises when the gzip is corrupt or ends early
        h.update(data)
        size += len(data)
        yield data
    if h.hexdigest() != expected_sha or (expected_size is not None and size != expected_size):
        raise RepoError(
            f"{key} does not match snapshot.json ({size} bytes of SQL, sha256 {h.hexdigest()[:12]}..., "
            f"expected {expected_size} and {expected_sha[:12]}...): the database was not changed; "
            "run `verify --read-data`"
        )


DUMP_COMPLETE = b"-- PostgreSQL database dump complete"
CLUSTER_COMPLETE = b"-- PostgreSQL database cluster dump complete"
TRAILER_SPAN = 4096  # pg_dump 17.6+ writes a \\unrestrict line after its closing comment


async def file_sql(path: str) -> AsyncGenerator[bytes, None]:
    """SQL from a file or stdin (`-`), gzip-compressed or plain (told by its first bytes)."""
    fh = os.fdopen(os.dup(0), "rb") if path == "-" else None
    try:
        if fh is None:
            try:
                fh = await asyncio.to_thread(open, path, "rb")
            except OSError as exc:
                raise ConfigError(f"--from-file {path}: {exc.strerror}: give a readable dump file") from None

        async def raw() -> AsyncGenerator[bytes, None]:
            assert fh is not None
            while chunk := await asyncio.to_thread(fh.read, CHUNK):
                yield chunk

        chunks = raw()
        first = await anext(chunks, b"")
        if not first:
            raise ConfigError(f"--from-file {path} is empty: give a pg_dump or pg_dumpall file")

        async def whole() -> AsyncGenerator[bytes, None]:
            yield first
            async for chunk in chunks:
                yield chunk

        stream = gunzip_stream(whole()) if first[:2] == b"\x1f\x8b" else whole()
        head = tail = b""
        async for data in stream:
            if len(head) < TRAILER_SPAN:
                head += data[: TRAILER_SPAN - len(head)]
            tail = (tail + data)[-TRAILER_SPAN:]
            yield data
        # A dump cut short (at a statement boundary, gzipped or not) is still valid SQL:
        # only pg_dump's own closing line tells it is whole. Raising here, before the
        # COMMIT, rolls the restore back.
        cluster = CLUSTER_DUMP in head
        closing = CLUSTER_COMPLETE if cluster else DUMP_COMPLETE
        if closing not in tail:
            # a pg_dumpall cannot be one transaction (CREATE DATABASE): what it ran stays
            outcome = (
                "what it held was restored up to the cut: restore the whole dump again"
                if cluster
                else "the database was not changed (rolled back): give the whole dump"
            )
            raise DumpError(
                f"--from-file {path} ends without {'pg_dumpall' if cluster else 'pg_dump'}'s closing line "
                f'"{closing.decode()}": it was cut short; {outcome}'
            )
    finally:
        if fh is not None:
            fh.close()


def _quote_ident(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


class ClusterFix(SearchPathFix):
    """A pg_dumpall stream as Immich's documentation restores it (psql into `postgres`),
    less the two statements that always fail on the server it goes into: dropping and
    creating the role psql is connected as. Every other error stops the restore."""

    def __init__(self, user: str) -> None:
        super().__init__()
        role = _quote_ident(user).encode()
        self._skip = (b"\nDROP ROLE IF EXISTS " + role + b";\n", b"\nCREATE ROLE " + role + b";\n")

    def _fix(self, data: bytes) -> bytes:
        data = b"\n" + super()._fix(data)
        for line in self._skip:
            data = data.replace(line, b"\n")
        return data[1:]


async def psql_stream(
    sql: AsyncIterator[bytes], scanner: DumpScanner, user: str, log_missing: bool = True
) -> AsyncGenerator[bytes, None]:
    """SQL for psql with the search_path correction applied. A pg_dump goes in as one
    transaction: BEGIN first, COMMIT only once the whole SQL arrived and checked out
    (whatever stops it earlier leaves the transaction without COMMIT, and the server rolls
    it back when psql exits). A pg_dumpall cannot be one transaction (CREATE DATABASE,
    \\connect): it goes in as Immich documents it."""
    fix: SearchPathFix | None = None
    async for data in sql:
        if fix is None:  # the scanner has seen the dump's header by now (read_head)
            fix = ClusterFix(user) if scanner.cluster else SearchPathFix()
            if not scanner.cluster:
                yield b"BEGIN;\n"
        out = fix.feed(data)
        if out:
            yield out
    if fix is None:
        raise DumpError("the dump is empty: nothing was changed")
    tail = fix.flush()
    if tail:
        yield tail
    if fix.replaced == 0 and log_missing:
        log.warning("the dump had no search_path line to correct; restoring it as it is")
    if not scanner.cluster:
        yield b"\nCOMMIT;\n"  # a newline first: the dump's last line may lack one


async def dump_chunks(store: Store, repo: Repo, snap: Snapshot) -> AsyncGenerator[bytes, None]:
    """The snapshot's dump as one transaction for psql (see psql_stream)."""
    scanner = DumpScanner(snap.summary.database.name)
    async for chunk in psql_stream(await read_head(snapshot_sql(store, repo, snap), scanner), scanner, ""):
        yield chunk


async def prepare_dump(
    docker: aiodocker.Docker,
    container: str,
    user: str,
    dbname: str,
    sql: AsyncIterator[bytes],
    came_from: str,
    from_file: bool = False,
) -> tuple[DumpScanner, AsyncIterator[bytes]]:
    """Read the dump's head and refuse, before anything is changed, a target server that
    cannot take it. Returns the scanner (it counts the rows as the rest streams) and the
    whole SQL to send."""
    scanner = DumpScanner(dbname)
    whole = await read_head(sql, scanner)
    if from_file and not scanner.source_version and not scanner.copy_seen and not scanner.extensions:
        raise DumpError(
            f"{came_from} is not a pg_dump or pg_dumpall SQL dump (no header, no COPY; a custom-format "
            "dump needs pg_restore): nothing was changed"
        )
    await check_target(docker, container, user, scanner, came_from)
    return scanner, whole


async def restore_database(
    settings: Settings, reporter: Reporter, which: str, from_file: str | None = None
) -> tuple[Snapshot | None, DatabaseRestored]:
    """Stop the app containers, pipe the dump into psql in the database container, start them."""
    started = time.monotonic()
    if from_file is None:
        settings.require("bucket")
    # The host lock of backups: a restore and a backup never stop and start one stack at once.
    with stack_lock(settings.project):
        return await _restore_database_locked(settings, reporter, which, started, from_file)


async def _restore_database_locked(
    settings: Settings, reporter: Reporter, which: str, started: float, from_file: str | None = None
) -> tuple[Snapshot | None, DatabaseRestored]:
    async with connect() as docker, contextlib.AsyncExitStack() as exits:
        store: Store | None = None
        snap: Snapshot | None = None
        repo: Repo | None = None
        if from_file is None:
            repo = await exits.enter_async_context(open_repo(settings, lock=reader(settings, "restore")))
            store = repo.store
            snap = await repo.resolve(which)
            sql = snapshot_sql(store, repo, snap)
            came_from = f"snapshot {snap.id}" + (f": {cf}" if (cf := came_from_text(snap.summary)) else "")
        else:
            sql = file_sql(from_file)
            came_from = f"file {from_file}"
        exits.push_async_callback(sql.aclose)
        stack = Stack(docker, settings.project, settings.db_container)
        await stack.ping()
        # A backup killed with the stack down left a note of what it stopped: act on it
        # (start them) before this run's own stop and start would overwrite it.
        if await recover(stack):
            log.info("the Immich stack left stopped by an earlier run is running again")
        containers = await stack.containers()
        db = [c for c in containers if c.name == settings.db_container]
        if not db or not db[0].running:
            raise StackError(f"database container {settings.db_container!r} is not running: start it (only it) first")
        app = [c.name for c in containers if c.running and c.name != settings.db_container]
        phase = reporter.phase("restore database", snap.summary.database.size if snap else None)
        sent = 0

        guard = StackGuard(stack)

        async def work() -> None:
            nonlocal sent
            # Before anything is stopped: the dump's version and extensions against the server.
            scanner, whole = await prepare_dump(
                docker, settings.db_container, settings.db_user, settings.db_name, sql, came_from, from_file is not None
            )

            async def counted() -> AsyncGenerator[bytes, None]:
                nonlocal sent
                async with contextlib.aclosing(psql_stream(whole, scanner, settings.db_user)) as chunks:
                    async for chunk in chunks:
                        sent += len(chunk)
                        phase.update(len(chunk))
                        yield chunk

            async with guard:
                await guard.stop(app)
                dbname = settings.db_name
                if scanner.cluster:
                    dbname = "postgres"  # pg_dumpall drops and creates the databases itself
                else:
                    created = await ensure_database(docker, settings.db_container, settings.db_user, dbname)
                    if created:
                        log.info("created database %s", dbname)
                await pipe_into(
                    docker,
                    settings.db_container,
                    psql_restore_command(settings.db_user, dbname),
                    counted(),
                    "psql",
                )
                await guard.restore()

        try:
            if store is None or repo is None:
                await work()
            else:
                # psql may rightly be silent for long (an index on a large table): only S3 not
                # answering for the stall timeout fails the restore (rolled back, apps started).
                hung = s3_hang(store, settings.stall_timeout, "the restore was rolled back and the stack started again")
                await with_watchdog(store, math.inf, work(), reading(repo, hung))
        finally:
            phase.close()
    return snap, DatabaseRestored(sent, time.monotonic() - started, guard.downtime)


async def write_config_files(settings: Settings, which: str, target: Path) -> tuple[Snapshot, list[Path], list[str]]:
    """The snapshot's recorded docker-compose.yml and .env into target (never over an
    existing file); returns the files written and the secrets left as placeholders."""
    async with open_repo(settings, lock=reader(settings, "restore")) as repo:
        snap = await repo.resolve(which)
    files = snap.summary.config_files
    if not files:
        raise RepoError(
            f"snapshot {snap.id} records no config files (made by an older version, or IMMICH_DIR was not "
            "set): take them from Immich's release page"
        )
    for name in files:
        if "/" in name or name in ("", ".", ".."):
            raise RepoError(f"snapshot {snap.id} records a config file named {name!r}: snapshot.json is damaged")

    def write() -> list[Path]:
        target.mkdir(parents=True, exist_ok=True)
        existing = [name for name in files if os.path.lexists(target / name)]
        if existing:
            raise ConfigError(f"{target} already holds {', '.join(existing)}: choose an empty directory")
        written = []
        for name, text in files.items():
            path = target / name
            # .env will hold DB_PASSWORD again: only its owner may read it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600 if name == ".env" else 0o644)
            with open(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            written.append(path)
        return written

    written = await asyncio.to_thread(write)
    return snap, written, snap.summary.config_secrets


def _open_dump_dest(dest: str) -> tuple[int, str | None]:
    """Where --dump-to writes: (descriptor, partial file to rename to dest at the end, or
    None). A character device or a pipe (/dev/null, a FIFO; a symlink to one, as
    /dev/stdout is) is written as a stream, never replaced by a file. A file is written to
    dest.immich-stream-partial, created exclusively and never through a symlink: whatever
    holds that name (a leftover, a planted symlink or hard link) is unlinked first, never
    opened."""
    if dest == "-":
        return os.dup(1), None
    try:
        st = os.stat(dest)
        mode: int | None = st.st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        return _open_same_stream(dest, (st.st_dev, st.st_ino)), None  # ENXIO: a FIFO without a reader yet
    if mode is not None and not stat.S_ISREG(mode):
        raise ConfigError(f"--dump-to {dest} is not a file, a character device or a pipe: give a file name")
    partial = dest + PARTIAL
    try:
        os.unlink(partial)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"--dump-to: cannot remove {partial} ({exc.strerror}): remove it, then run again") from None
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"--dump-to: {partial} was created again by something else as it was removed: choose another place"
        ) from None
    return fd, partial


def _open_same_stream(dest: str, expected: tuple[int, int] | None = None) -> int:
    """dest opened for writing as a stream, checked through the descriptor to be the device
    or pipe seen before (expected: its st_dev, st_ino) and not what took its name meanwhile
    (a symlink to a file, a file): that is never written."""
    fd = os.open(dest, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)) or (
        expected is not None and (st.st_dev, st.st_ino) != expected
    ):
        os.close(fd)
        raise ConfigError(
            f"--dump-to {dest} changed while the restore opened it (it is no longer the device or pipe it was): "
            "nothing was written to it; check what replaced it, then run again"
        )
    os.set_blocking(fd, True)
    return fd


async def _open_stream(dest: str) -> int:
    """A FIFO opens for writing only once it has a reader: wait for one without blocking a
    thread (a signal still ends the run), then write to it blocking. Only that FIFO: if
    something else takes its name meanwhile, nothing is written (see _open_same_stream)."""
    try:
        st = os.stat(dest)
    except OSError as exc:
        raise ConfigError(f"--dump-to {dest}: {exc.strerror}") from None
    seen = (st.st_dev, st.st_ino)
    while True:
        try:
            return _open_same_stream(dest, seen)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise ConfigError(f"--dump-to {dest}: {exc.strerror}") from None
            await asyncio.sleep(0.2)


class DumpToFailed(ImmichStreamError):
    """--dump-to could not be written to the end (exit 1)."""


async def dump_to(settings: Settings, which: str, dest: str) -> tuple[Snapshot, int]:
    """Write the snapshot's database.sql.gz, as stored, to a file, a device or pipe, or
    stdout (see _open_dump_dest); check its sha256. A file appears only once whole."""
    async with open_repo(settings, lock=reader(settings, "restore")) as repo:
        store = repo.store
        snap = await repo.resolve(which)
        key = repo.dump_key(snap.id)
        h = hashlib.sha256()
        size = 0
        try:
            fd, partial = await asyncio.to_thread(_open_dump_dest, dest)
        except OSError as exc:  # a FIFO without a reader yet (ENXIO), or the file's directory
            if exc.errno != errno.ENXIO:
                raise ConfigError(f"--dump-to {dest}: {exc.strerror}") from None
            fd, partial = await _open_stream(dest), None
        try:
            try:
                with os.fdopen(fd, "wb") as fh:
                    async for chunk in store.iter_object(key):
                        still_reading(repo)
                        h.update(chunk)
                        size += len(chunk)
                        await asyncio.to_thread(fh.write, chunk)
            except OSError as exc:  # the local side: a reader that left (`| head`), a full disk
                why = "its reader closed it" if exc.errno == errno.EPIPE else exc.strerror
                raise DumpToFailed(
                    f"--dump-to {dest}: {why} after at most {size} bytes: the dump was not delivered whole; run again"
                ) from None
            expected = snap.summary.database.compressed_sha256
            if expected and h.hexdigest() != expected:
                raise RepoError(f"{key} does not match snapshot.json's sha256: run `verify --read-data`")
            if partial is not None:
                os.replace(partial, dest)
        except BaseException:
            if partial is not None:
                with contextlib.suppress(OSError):
                    os.unlink(partial)
            raise
    return snap, size
