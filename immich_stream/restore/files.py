"""`restore`: the files of a snapshot into a directory (the database: database.py).

Concurrent, bounded downloads, each written to a temporary name beside its target and
renamed into place only after its size and sha256 match the manifest (restorer.py).
Files already in place with the right size and sha256 are skipped, so an interrupted
restore is simply run again. Manifest paths are never trusted: nothing is written outside
the target. What could not be restored is named at the end with another copy (copies.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import json
import logging
import math
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from immich_stream.config import Settings
from immich_stream.errors import ConfigError, ImmichStreamError, NothingMatched, ObjectNotFound, RepoError, StoreError
from immich_stream.progress import Reporter
from immich_stream.repository.layout import ROOTS, is_root, root_dir, unescape_path
from immich_stream.repository.manifest import DamagedLine, ManifestLine
from immich_stream.repository.packs import BATCH_FILES, BATCH_GAP, BATCH_SPAN
from immich_stream.repository.repo import Repo, Snapshot
from immich_stream.repository.session import open_reader, reading, still_reading
from immich_stream.repository.thaw import archived_digests, need_thawed, thaw
from immich_stream.restore.copies import LOOKUP_LIMIT, find_copies, name_failures
from immich_stream.restore.restorer import MARKER, FileRestorer, InTheWay, RestoreStats, UnsafePath
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.checksums import SMALL_FACTOR, SMALL_OBJECT
from immich_stream.s3.classify import TRANSIENT_CODES
from immich_stream.s3.watchdog import s3_hang, with_watchdog

log = logging.getLogger(__name__)


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


Select = Callable[[ManifestLine], bool]  # a restore of chosen files (the catalog's: browse/catalog_find.py)


def _matches(line: ManifestLine, roots: set[str], includes: list[str], select: Select | None = None) -> bool:
    if line.root not in roots:
        return False
    if select is not None and not select(line):
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


def _check_target(target: Path, snap: Snapshot, overwrite: bool) -> bool:
    """Refuse a target that is not empty (but an unfinished restore of this snapshot, or
    with --overwrite); True when it is empty (nothing can be in place)."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"restore target {target} is not a directory: choose a directory")
    if not target.exists():
        return True
    entries = [e for e in os.listdir(target) if e != MARKER]
    if not entries:
        return not os.path.lexists(target / MARKER)
    if overwrite:
        return False
    marker = target / MARKER
    if os.path.lexists(marker):
        previous = _marker_snapshot(marker)
        if previous == snap.id:
            log.info("resuming the unfinished restore of %s into %s", snap.id, target)
            return False
        if previous is None:
            raise ConfigError(f"{marker} is not a restore's marker: remove it, or add --overwrite")
        raise ConfigError(
            f"{target} holds an unfinished restore of snapshot {previous}: restore that one, or add --overwrite"
        )
    raise ConfigError(f"restore target {target} is not empty: choose an empty directory or add --overwrite")


async def _check_something_matches(
    repo: Repo, snap: Snapshot, roots: list[str] | None, wanted: set[str], includes: list[str], select: Select | None
) -> None:
    """A --root the snapshot lacks, or --include patterns that match nothing, are said at
    once (exit 1), before anything is written: a restore of 0 files is not a success."""
    present = set(snap.summary.roots)
    if roots and present and not wanted & present:
        raise NothingMatched(
            f"nothing matched: snapshot {snap.id} holds no {', '.join(roots)} root (it holds "
            f"{', '.join(sorted(present))}; a backup with --stop app or none takes no cold copy): nothing was written"
        )
    if select is not None:
        async for line in repo.read_manifest(snap.id, damaged=True):
            if not isinstance(line, DamagedLine) and _matches(line, wanted, includes, select):
                return
        raise NothingMatched(
            f"nothing matched: none of the selected assets' files is in snapshot {snap.id} (its library was "
            "backed up without them, or under another root): nothing was written"
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


DIRS_AT_ONCE = 256  # directories made in one trip to a worker thread

# ends so after its retries is counted as no answer (see restore_files). Not AccessDenied,
# which a per-object policy gives.
SERVER_CODES = TRANSIENT_CODES | {
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


async def restore_files(
    settings: Settings,
    reporter: Reporter,
    which: str,
    target: Path,
    roots: list[str] | None,
    includes: list[str],
    overwrite: bool,
    wait: bool = True,
    select: Select | None = None,
    rename: Callable[[ManifestLine], bytes] | None = None,
) -> tuple[Snapshot, RestoreStats]:
    """The snapshot's files (of `roots`, matching `includes` and `select`) under target;
    `rename` gives each file its path under target instead of its root's layout."""
    started = time.monotonic()
    stats = RestoreStats()
    budget = ByteBudget(settings.max_memory)
    async with (
        open_reader(settings, "restore") as (repo, lock),
        contextlib.AsyncExitStack() as exits,
    ):
        store = repo.store
        snap = await repo.resolve(which)
        fresh = _check_target(target, snap, overwrite)
        wanted = set(roots or (*ROOTS, *snap.summary.roots))
        await _check_something_matches(repo, snap, roots, wanted, includes, select)
        # before the target is marked: a --no-wait run leaves nothing behind to resume
        await _thaw_needed(repo, snap, settings, reporter, wanted, includes, wait, await archived_digests(repo), select)
        target_fd = await asyncio.to_thread(_open_target, target)
        exits.callback(os.close, target_fd)
        await asyncio.to_thread(_mark_target, target_fd, snap.id)
        everything = not includes and select is None and wanted >= set(snap.summary.roots)
        total = (snap.summary.files.bytes_total or None) if everything else None
        phase = reporter.phase("restore files", total)
        single = roots is not None and len(roots) == 1
        restorer = FileRestorer(store, repo, target, target_fd, single, overwrite, stats, phase, budget, rename)
        exits.callback(restorer.close)
        restorer.fresh = fresh
        dirs: list[ManifestLine] = []
        failures: list[tuple[ManifestLine, str]] = []  # files not restored, named at the end
        # Small files are round trips more than bytes (two thumbnails per photo): SMALL_FACTOR
        # times as many of them at once; a larger file holds one of --jobs slots.
        workers = settings.jobs * SMALL_FACTOR
        large = asyncio.Semaphore(settings.jobs)
        queue: asyncio.Queue[ManifestLine | list[ManifestLine] | None] = asyncio.Queue(workers * 2)

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

        batch: list[ManifestLine] = []  # files in one pack, close together: one ranged read
        span = [0, 0]  # the bytes of the pack the batch's files lie in

        async def add_file(line: ManifestLine) -> None:
            nonlocal batch
            if line.offset is None or line.key is None:
                await queue.put(line)
                return
            lo, hi = line.offset, line.offset + line.size
            if batch:
                # a pack holds its files in the order they were read, which is the walk's
                # but for the few read at once: a batch takes any file near its span
                start, end = min(span[0], lo), max(span[1], hi)
                if (
                    line.key == batch[0].key
                    and span[0] - BATCH_GAP <= lo
                    and hi <= span[1] + BATCH_GAP
                    and end - start <= BATCH_SPAN
                    and len(batch) < BATCH_FILES
                ):
                    batch.append(line)
                    span[:] = [start, end]
                    return
                await queue.put(batch)
            batch = [line]
            span[:] = [lo, hi]

        pending_dirs: list[tuple[bytes, ManifestLine]] = []

        async def make_dirs() -> None:
            """The directories met so far, in one trip to a worker thread (a thread trip
            each cost more than making it)."""
            made = pending_dirs[:]
            pending_dirs.clear()
            failed = dict(await restorer.in_fs_thread(restorer.make_dirs, [rel for rel, _ in made])) if made else {}
            for i, (_, line) in enumerate(made):
                if i in failed:
                    problem(line, failed[i])
                    continue
                dirs.append(line)  # modes and mtimes once their contents are written
                stats.dirs += 1

        async def produce() -> None:
            async for line in repo.read_manifest(snap.id, damaged=True):
                still_reading(lock)
                if isinstance(line, DamagedLine):  # its root unreadable: named whatever was asked for
                    if not is_root(line.root) or _matches(line, wanted, includes, select):
                        stats.files += 1
                        problem(line, RepoError(f"its manifest line is damaged ({line.damage}): run `verify`"))
                    continue
                if not _matches(line, wanted, includes, select):
                    continue
                rel = restorer.dest(line)  # refuses unsafe paths before anything is written for them
                if (damage := _damaged(line)) is not None:
                    if line.type == "file":
                        stats.files += 1
                    problem(line, RepoError(f"its manifest line is damaged ({damage}): run `verify`"))
                    continue
                if line.type == "dir":
                    pending_dirs.append((rel, line))
                    if len(pending_dirs) >= DIRS_AT_ONCE:
                        await make_dirs()
                elif line.type == "symlink":
                    try:
                        await restorer.symlink(line)
                    except (InTheWay, OSError) as exc:
                        problem(line, exc)
                else:
                    stats.files += 1
                    await add_file(line)
            await make_dirs()
            if batch:
                await queue.put(batch)
            for _ in range(workers):
                await queue.put(None)

        # downloads in a row that failed without an answer from S3 about their object (a file
        # found in place is no answer: a resumed run alternates them with the missing ones)
        unanswered = 0

        async def work() -> None:
            while (item := await queue.get()) is not None:
                await attempt(item)

        async def attempt(item: ManifestLine | list[ManifestLine]) -> None:
            nonlocal unanswered
            line = item[0] if isinstance(item, list) else item
            lines = item if isinstance(item, list) else [item]
            try:
                if isinstance(item, list):
                    for failed, why in await restorer.from_pack(item):
                        problem(failed, why)
                    downloaded = True
                elif line.size <= SMALL_OBJECT:
                    downloaded = await restorer.file(line)
                else:
                    async with large:
                        downloaded = await restorer.file(line)
            except UnsafePath:
                raise
            except ObjectNotFound:
                for ln in lines:
                    problem(ln, f"its object {ln.first_key} is missing from the bucket")
            except StoreError as exc:
                if isinstance(item, list) and len(item) > 1 and exc.code in ("InvalidRange", "416"):
                    for ln in item:  # a pack shorter than its lines say: each file alone (below)
                        await attempt(ln)
                    return
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
                for ln in lines:
                    problem(ln, exc)
            except (RepoError, InTheWay, OSError) as exc:
                if isinstance(item, list) and len(item) > 1 and isinstance(exc, RepoError):
                    # a damaged span of a pack (an age chunk that does not open, a pack that
                    # ends early): each file read alone, so that exactly the damaged ones fail
                    for ln in item:
                        await attempt(ln)
                    return
                for ln in lines:
                    problem(ln, exc)
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
                    lock,
                    s3_hang(repo.store, settings.stall_timeout, "the restore stopped; the same command resumes it"),
                ),
            )
        finally:
            phase.close()
        # deepest first: setting a parent's mtime is the last touch; a symlink in a
        # directory's place is refused, not followed
        for line, exc in await restorer.in_fs_thread(
            restorer.set_metas, [(restorer.dest(ln), ln) for ln in reversed(dirs)]
        ):
            stats.failed += 1
            stats.problems.add(f"{line.root}/{line.path}: {exc}")
        for root, meta in snap.summary.root_meta.items():
            if root in wanted and is_root(root):
                line = ManifestLine(root, "", "dir", 0, meta.mtime_ns, meta.mode, meta.uid, meta.gid, 0)
                with contextlib.suppress(InTheWay, OSError):  # nothing of it restored, or not a directory
                    await asyncio.to_thread(restorer.set_meta, b"" if single else root_dir(root), line)
        if failures:
            copies: list[dict[str, str]] = [{} for _ in failures]
            try:
                await with_watchdog(
                    repo.store,
                    math.inf,
                    find_copies(repo, snap, failures, copies),
                    reading(lock, s3_hang(repo.store, settings.stall_timeout, "the search for other copies stopped")),
                )
            finally:  # named even when S3 stops answering meanwhile
                name_failures(failures, copies, stats.problems)
        if stats.failed == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(MARKER, dir_fd=target_fd)
    stats.seconds = time.monotonic() - started
    return snap, stats


async def _thaw_needed(
    repo: Repo,
    snap: Snapshot,
    settings: Settings,
    reporter: Reporter,
    roots: set[str],
    includes: list[str],
    wait: bool,
    archived: set[bytes],
    select: Select | None = None,
) -> None:
    """Thaw the archived objects (GLACIER, DEEP_ARCHIVE) this restore will download, before
    any download starts (see thaw.py); `archived`: archived_digests' listing of data/."""
    if not archived:
        return
    needed: dict[bytes, str] = {}
    async for line in repo.read_manifest(snap.id, damaged=True):
        if _matches(line, roots, includes, select):
            need_thawed(repo, line, archived, needed)
    await thaw(repo.store, needed.values(), settings, reporter, wait)
