"""One entry of a manifest into the restore target, safely: `FileRestorer` writes below the
target only through descriptors, never through a symlink, each file to a temporary name
beside its place and renamed into place once its size and sha256 match the manifest.
Manifest paths are never trusted: nothing is written outside the target.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from immich_stream.errors import ImmichStreamError, RepoError
from immich_stream.problems import Problems
from immich_stream.progress import Phase
from immich_stream.repository.layout import ROOTS, is_root, root_dir, unescape_path
from immich_stream.repository.manifest import ManifestLine
from immich_stream.repository.packs import PackReader
from immich_stream.repository.repo import Repo
from immich_stream.repository.sealed import SealedStore
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.checksums import CHUNK_SHARED, SMALL_OBJECT

T = TypeVar("T")

FS_THREADS = 2
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
    if not is_root(line.root):
        raise UnsafePath(f"refusing manifest root {line.root!r}: not one of {', '.join(ROOTS)}, external:<name>")
    return raw


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class InTheWay(ImmichStreamError):
    """Something in the target where the snapshot has another type that this restore may not
    replace (a directory with files where it has a file; anything without --overwrite):
    that path is not restored, the rest is."""


# S3 answers about the server or the credentials, never about one object: a download that


class FileRestorer:
    """Writes below the target only through descriptors: each directory is opened from its
    parent, one name at a time, with O_NOFOLLOW; files are created with O_EXCL beside their
    name and renamed into place (a rename replaces a symlink, it never follows one). A symlink
    or file in the place of a directory is never written through: refused, or with
    --overwrite replaced by the directory."""

    def __init__(
        self,
        store: SealedStore,
        repo: Repo,
        target: Path,
        target_fd: int,
        single_root: bool,
        overwrite: bool,
        stats: RestoreStats,
        phase: Phase,
        budget: ByteBudget,
        rename: Callable[[ManifestLine], bytes] | None = None,
    ) -> None:
        self.store = store
        self.rename = rename  # a file's own path under the target (restore --layout names)
        self.repo = repo
        self.target = os.fsencode(target)
        self.target_fd = target_fd
        self.single_root = single_root
        self.overwrite = overwrite
        self.stats = stats
        self.phase = phase
        self.budget = budget
        self.as_root = os.geteuid() == 0
        self.packs = PackReader(store, repo)
        self.fresh = False  # the target was empty when the restore began (restore_files says)
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        # The file system work of packed files, directories and their metadata runs in
        # FS_THREADS threads of its own: spread over the default pool's threads, each of a
        # file's ten system calls handed the GIL to another thread (9 million futex calls
        # for 100,000 files); in one, the kernel's half of the work had one core of two.
        self.fs = concurrent.futures.ThreadPoolExecutor(FS_THREADS, thread_name_prefix="immich-stream-restore")

    def close(self) -> None:
        self.fs.shutdown(wait=True)

    async def in_fs_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.fs, functools.partial(fn, *args))

    def shown(self, rel: bytes) -> str:
        return os.fsdecode(os.path.join(self.target, rel))

    def dest(self, line: ManifestLine) -> bytes:
        """The line's path relative to the target."""
        rel = safe_relpath(line)
        if self.rename is not None and line.type != "dir":
            named = self.rename(line)
            if (
                not named
                or named.startswith(b"/")
                or b"\0" in named
                or named == MARKER.encode()
                or any(part in (b"", b".", b"..") for part in named.split(b"/"))
            ):
                raise UnsafePath(f"refusing the name {named!r} for {line.root}/{line.path}: not a plain relative path")
            return named
        if self.single_root:
            if rel == MARKER.encode():
                raise UnsafePath(
                    f"refusing manifest path {line.path!r} in root {line.root}: {MARKER} is the name of "
                    "restore's own marker; the manifest is damaged or forged"
                )
            return rel
        return root_dir(line.root) + b"/" + rel

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
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                continue  # another thread of the restore is replacing it meanwhile
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
            try:
                os.unlink(name, dir_fd=parent)  # the file or symlink goes; nothing is followed
            except FileNotFoundError:
                pass  # another thread of the restore took it away first
            except IsADirectoryError:
                continue  # and already made the directory
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
        raise InTheWay(f"{self.shown(rel)} changed type while it was restored: run the same command again")

    def make_dir(self, rel: bytes) -> None:
        os.close(self.open_dir(rel, create=True))

    def chain_open(self, chain: list[tuple[bytes, int]], rel: bytes) -> int:
        """open_dir(rel, create=True) that keeps the directories it went through open in
        `chain` ((name, fd) from the target down) for the next path: consecutive paths share
        most of theirs, and each is entered from the deepest directory they share, one name
        at a time as open_dir does. The fd returned belongs to the chain (chain_close)."""
        names = rel.split(b"/") if rel else []
        keep = 0
        while keep < len(chain) and keep < len(names) and chain[keep][0] == names[keep]:
            keep += 1
        while len(chain) > keep:
            os.close(chain.pop()[1])
        if not chain and not names:
            chain.append((b"", os.open(".", DIR_FLAGS, dir_fd=self.target_fd)))
            return chain[-1][1]
        for i in range(keep, len(names)):
            parent = chain[-1][1] if chain else self.target_fd
            done = b"/".join(names[: i + 1])
            chain.append((names[i], self._enter(parent, names[i], done, True)))
        return chain[-1][1] if chain else self.target_fd

    @staticmethod
    def chain_close(chain: list[tuple[bytes, int]]) -> None:
        while chain:
            os.close(chain.pop()[1])

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

    def write_fresh(self, parent: int, name: bytes, line: ManifestLine, blob: memoryview) -> bool:
        """A file whose bytes are all in memory, into a target that was empty when the
        restore began: checked first (size, sha256), written under its temporary name
        (created exclusively, never through a symlink) with its mode, only the metadata
        that differs from what creating it gave set (each such call costs the kernel ~100
        µs here: three per file were most of a 100,000-file restore), then renamed into
        place: a killed restore leaves no short file under a real name. False when the
        temporary name is taken: the caller goes the way of a target that was not empty."""
        assert line.sha256 is not None
        if len(blob) != line.size or hashlib.sha256(blob).hexdigest() != line.sha256:
            raise RepoError(
                f"pack {line.key} does not hold {line.root}/{line.path} as its manifest line says: "
                "run `verify --read-data`"
            )
        simple = line.mode & ~0o777 == 0 and line.mode & self.umask == 0
        partial = self.partial_name(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(partial, flags, line.mode if simple else 0o600, dir_fd=parent)
        except FileExistsError:
            return False
        try:
            try:
                while blob:
                    blob = blob[os.write(fd, blob) :]
                # created as root: owner 0, group 0 but under a setgid directory (fstat is cheap)
                if self.as_root and (line.uid != 0 or os.fstat(fd).st_gid != line.gid):
                    with contextlib.suppress(OSError):
                        os.fchown(fd, line.uid, line.gid)
                if not simple:  # setuid/sticky bits, or bits the umask took: after chown, which clears setuid
                    os.fchmod(fd, line.mode)
                os.utime(fd, ns=(line.mtime_ns, line.mtime_ns))
            finally:
                os.close(fd)
            self.rename_into_place(parent, partial, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial, dir_fd=parent)
            raise
        return True

    def rename_into_place(self, parent: int, partial: bytes, name: bytes) -> None:
        """The temporary file renamed to name: a file or symlink there is replaced (never
        followed); a directory is make_room's (removed with --overwrite when empty, or refused)."""
        try:
            os.replace(partial, name, src_dir_fd=parent, dst_dir_fd=parent)
        except IsADirectoryError:  # not looked for beforehand in a target that was empty
            self.make_room(parent, name)
            os.replace(partial, name, src_dir_fd=parent, dst_dir_fd=parent)

    def create_fresh(self, parent: int, name: bytes) -> tuple[int, bytes]:
        """create_partial in a target that was empty when the restore began: created at
        once (O_EXCL, never through a symlink); only when something holds the name (put
        there meanwhile) is room made as create_partial makes it. Place() then renames it
        over whatever is at name; a directory there is make_room's (removed, or refused)."""
        partial = self.partial_name(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(partial, flags, 0o600, dir_fd=parent), partial
        except FileExistsError:
            return self.create_partial(parent, name)

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
            if not line.has_object:
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
        try:
            self.place(parent, fd, partial, name, line, h, size)
        finally:
            os.close(parent)

    def place(self, parent: int, fd: int, partial: bytes, name: bytes, line: ManifestLine, h: Any, size: int) -> None:
        """finish_file, leaving parent open (owns fd)."""
        assert line.sha256 is not None
        try:
            try:
                if size != line.size or h.hexdigest() != line.sha256:
                    where = f"object {line.key}" if line.key else f"the chunks of {line.root}/{line.path}"
                    raise RepoError(
                        f"{where} does not match its manifest line ({size} bytes, sha256 "
                        f"{h.hexdigest()[:12]}..., expected {line.size} and {line.sha256[:12]}...): "
                        "run `verify --read-data`"
                    )
                self._meta_fd(fd, line)
            finally:
                os.close(fd)
            self.rename_into_place(parent, partial, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial, dir_fd=parent)
            raise

    async def file(self, line: ManifestLine) -> bool:
        """Restore one file; True when it was downloaded, False when found in place."""
        rel = self.dest(line)
        opened = await asyncio.to_thread(self.open_target, rel, line)
        if opened is None:
            self.stats.skipped += 1
            self.phase.update(line.size, files=1)
            return False
        assert line.sha256 is not None
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
                if line.stored_whole:
                    assert line.key is not None
                    await self.store.download(
                        self.repo.object_key(line.key), sink, line.size, small=line.size <= SMALL_OBJECT
                    )
                else:  # in a pack, or chunks
                    async for piece in self.packs.file(line):
                        await asyncio.to_thread(sink, memoryview(piece))
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

    async def from_pack(self, lines: list[ManifestLine]) -> list[tuple[ManifestLine, Exception]]:
        """Files that are blobs of one pack, close together (restore_files batches them): one
        ranged read of their span, then every file written in one trip to a worker thread.
        Returns the files that failed, with why; a failed read raises for them all."""
        start = min(ln.offset or 0 for ln in lines)
        end = max((ln.offset or 0) + ln.size for ln in lines)
        assert lines[0].key is not None
        async with self.budget.hold(end - start):
            data = await self.packs.read(lines[0].key, start, end)
            self.stats.bytes_downloaded += len(data)
            failed, skipped = await self.in_fs_thread(self._write_blobs, lines, data, start)
        self.stats.skipped += skipped
        self.stats.restored += len(lines) - skipped - len(failed)
        self.phase.update(sum(ln.size for ln in lines), files=len(lines) - len(failed))
        return failed

    def _write_blobs(
        self, lines: list[ManifestLine], data: bytes, start: int
    ) -> tuple[list[tuple[ManifestLine, Exception]], int]:
        """(the files that failed with why, how many were found in place). Blocking. A
        directory opened (safely, open_dir) serves the files that follow in it: Immich's
        thumbnails come a few per directory, and opening each path from the target again
        cost more than writing the file."""
        failed: list[tuple[ManifestLine, Exception]] = []
        skipped = 0
        view = memoryview(data)
        chain: list[tuple[bytes, int]] = []  # the directories open down to the last file's
        try:
            for line in lines:
                try:
                    rel = self.dest(line)
                    head, name = os.path.split(rel)
                    try:
                        parent = self.chain_open(chain, head)
                    except BaseException:
                        self.chain_close(chain)  # where it stopped is unknown: start afresh
                        raise
                    pos = (line.offset or 0) - start
                    if self.fresh and self.write_fresh(parent, name, line, view[pos : pos + line.size]):
                        continue
                    if self.fresh:  # nothing was in the target: no file can be in place
                        fd, partial = self.create_fresh(parent, name)
                    else:
                        if self.in_place(parent, name, line):
                            skipped += 1
                            continue
                        self.make_room(parent, name)
                        fd, partial = self.create_partial(parent, name)
                    h = hashlib.sha256()
                    try:
                        self.write_hashed(fd, view[pos : pos + line.size], h)
                    except BaseException:
                        os.close(fd)
                        with contextlib.suppress(OSError):
                            os.unlink(partial, dir_fd=parent)
                        raise
                    self.place(parent, fd, partial, name, line, h, line.size)
                except (RepoError, InTheWay, OSError) as exc:
                    if isinstance(exc, UnsafePath):
                        raise
                    failed.append((line, exc))
        finally:
            self.chain_close(chain)
        return failed, skipped

    def make_dirs(self, rels: list[bytes]) -> list[tuple[int, Exception]]:
        """make_dir of each, in one trip to a worker thread: (index, error) of those that failed."""
        failed: list[tuple[int, Exception]] = []
        chain: list[tuple[bytes, int]] = []
        try:
            for i, rel in enumerate(rels):
                try:
                    self.chain_open(chain, rel)
                except (InTheWay, OSError) as exc:
                    self.chain_close(chain)
                    failed.append((i, exc))
        finally:
            self.chain_close(chain)
        return failed

    def set_metas(self, items: list[tuple[bytes, ManifestLine]]) -> list[tuple[ManifestLine, Exception]]:
        """set_meta of each, in order, in one trip to a worker thread: those that failed."""
        failed: list[tuple[ManifestLine, Exception]] = []
        for rel, line in items:
            try:
                self.set_meta(rel, line)
            except (InTheWay, OSError) as exc:
                failed.append((line, exc))
        return failed

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
