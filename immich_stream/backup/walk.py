"""Walk a directory tree in a deterministic order, yielding one Entry per item.

Order: depth first, each directory's entries sorted by their name's bytes, a directory
before its contents. repository/manifest.py's `path_order` gives the same order for paths
read back from a manifest, so the walk and the previous manifest can be merged like two sorted lists.

Names are bytes end to end (spaces, newlines, invalid UTF-8 all survive). Symlinks are
recorded, never followed, but for the top-level folders named in `follow` (Immich's own
folders, which Immich follows: `library -> /mnt/photos`): those are walked as the
directories they point at. Sockets, FIFOs and devices are skipped with a warning.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Entry:
    relpath: bytes  # relative to the root, b"/"-separated
    type: str  # "file", "dir" or "symlink"
    size: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    inode: int
    target: bytes | None = None  # symlinks
    ctime_ns: int = 0  # changes with any write or metadata change, and cannot be set back
    dev: int = 0  # inode numbers are unique per device only


@dataclass(slots=True)
class WalkProblem:
    relpath: bytes
    message: str
    skipped: bool = False  # a socket, FIFO or device: left out on purpose (and warned about), not a failure


def _scan(
    root: bytes, rel: bytes, only: Collection[bytes] | None = None, follow: Collection[bytes] = ()
) -> tuple[list[Entry], list[WalkProblem]]:
    """List one directory (runs in a thread); `only`: just these names in it; `follow`:
    names whose symlink to a directory is walked as that directory."""
    entries: list[Entry] = []
    problems: list[WalkProblem] = []
    path = os.path.join(root, rel) if rel else root
    try:
        with os.scandir(path) as it:
            names = sorted(e.name for e in it if only is None or e.name in only)
    except OSError as exc:
        problems.append(WalkProblem(rel, f"cannot list directory: {exc.strerror}"))
        return entries, problems
    for name in names:
        child = rel + b"/" + name if rel else name
        try:
            st = os.lstat(os.path.join(root, child))
        except OSError as exc:  # vanished or unreadable between listing and lstat
            problems.append(WalkProblem(child, f"cannot stat: {exc.strerror}"))
            continue
        m = st.st_mode
        target = None
        if stat.S_ISLNK(m) and name in follow:
            try:
                st = os.stat(os.path.join(root, child))
            except OSError as exc:
                # never a success without its contents: a folder Immich uses that points nowhere
                problems.append(WalkProblem(child, f"is a symlink to a folder that cannot be read: {exc.strerror}"))
                continue
            if not stat.S_ISDIR(st.st_mode):
                problems.append(WalkProblem(child, "is a symlink to something that is not a folder"))
                continue
            m = st.st_mode
        if stat.S_ISREG(m):
            kind = "file"
        elif stat.S_ISDIR(m):
            kind = "dir"
        elif stat.S_ISLNK(m):
            kind = "symlink"
            try:
                target = os.readlink(os.path.join(root, child))
            except OSError as exc:
                problems.append(WalkProblem(child, f"cannot read symlink: {exc.strerror}"))
                continue
        else:
            what = "socket" if stat.S_ISSOCK(m) else "FIFO" if stat.S_ISFIFO(m) else "device"
            log.warning(
                "skipping %s %s: only files, directories and symlinks are backed up",
                what,
                child.decode(errors="backslashreplace"),
            )
            problems.append(WalkProblem(child, f"skipped {what}", skipped=True))
            continue
        entries.append(
            Entry(
                child,
                kind,
                st.st_size if kind == "file" else 0,
                st.st_mtime_ns,
                stat.S_IMODE(m),
                st.st_uid,
                st.st_gid,
                st.st_ino,
                target,
                st.st_ctime_ns,
                st.st_dev,
            )
        )
    return entries, problems


def _scan_names(
    root: bytes, rel: bytes, only: Collection[bytes] | None = None, follow: Collection[bytes] = ()
) -> tuple[list[Entry], list[WalkProblem]]:
    """_scan without an lstat per name: each entry's type from the directory listing (the
    kernel's d_type, a stat only where the file system gives none), no size or times (0).
    What a walk needs that asks only which paths are there (a third of _scan's cost)."""
    entries: list[Entry] = []
    path = os.path.join(root, rel) if rel else root
    try:
        with os.scandir(path) as it:
            listed = sorted((e.name, e) for e in it if only is None or e.name in only)
    except OSError as exc:
        return entries, [WalkProblem(rel, f"cannot list directory: {exc.strerror}")]
    for name, e in listed:
        try:
            if e.is_dir(follow_symlinks=name in follow):
                kind = "dir"
            elif e.is_file(follow_symlinks=False):
                kind = "file"
            elif e.is_symlink():
                kind = "symlink"
            else:
                continue  # a socket, FIFO or device: not in a backup
        except OSError:
            continue  # vanished meanwhile
        entries.append(Entry(rel + b"/" + name if rel else name, kind, 0, 0, 0, 0, 0, 0))
    return entries, []


WALK_BATCH = 512  # entries handed from the walking thread to the loop at once
WALK_AHEAD = 16  # batches the walking thread may be ahead of the loop


def _walk_thread(
    root_b: bytes,
    prune: Collection[bytes],
    keep: Collection[bytes],
    follow: Collection[bytes],
    emit: Callable[[list[Entry | WalkProblem]], bool],
    scan: Callable[..., tuple[list[Entry], list[WalkProblem]]] = _scan,
) -> None:
    """The whole walk in one thread (a thread trip per directory cost more than listing
    it: 30,000 directories of an Immich library): entries and problems in path_order,
    handed over in batches; emit returns False when the walk is to stop."""
    batch: list[Entry | WalkProblem] = []
    stack: list[list[Entry]] = []
    entries, probs = scan(root_b, b"", None, follow)
    batch += probs
    stack.append(entries[::-1])
    while stack:
        level = stack[-1]
        if not level:
            stack.pop()
            continue
        entry = level.pop()
        batch.append(entry)
        if entry.type == "dir":
            only = keep if entry.relpath in prune else None
            entries, probs = scan(root_b, entry.relpath, only)
            batch += probs
            stack.append(entries[::-1])
        if len(batch) >= WALK_BATCH:
            if not emit(batch):
                return
            batch = []
    if batch:
        emit(batch)


async def walk(
    root: bytes | str,
    on_problem: Callable[[WalkProblem], None],
    prune: Collection[bytes] = (),
    keep: Collection[bytes] = (),
    follow: Collection[bytes] = (),
) -> AsyncGenerator[Entry, None]:
    """Yield every entry under root (not root itself) in path_order order (manifest.py).

    Problems (unreadable directories, vanished files, skipped special files) go to
    `on_problem` and the walk goes on. A directory whose relpath is in `prune` is yielded,
    but of its contents only the names in `keep` (--exclude: Immich's marker files).
    `follow`: names at the top whose symlink to a directory is walked as that directory.

    The listing runs in a thread of its own, at most WALK_AHEAD batches ahead: memory is
    bounded by that and by depth x directory width. Close the generator (aclosing) when
    leaving early: the thread then stops.
    """
    batches = walk_batches(root, on_problem, prune, keep, follow)
    try:
        async for batch in batches:
            for entry in batch:
                yield entry
    finally:
        await batches.aclose()


async def walk_batches(
    root: bytes | str,
    on_problem: Callable[[WalkProblem], None],
    prune: Collection[bytes] = (),
    keep: Collection[bytes] = (),
    follow: Collection[bytes] = (),
    names_only: bool = False,
) -> AsyncGenerator[list[Entry], None]:
    """walk()'s entries a batch (up to WALK_BATCH) at a time, as the walking thread hands
    them over: a consumer that handles a batch in one go spends no await per entry. The
    problems among a batch's entries go to `on_problem` before the batch is yielded.
    `names_only`: paths and types alone (_scan_names: sizes and times 0)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[list[Entry | WalkProblem] | BaseException | None] = asyncio.Queue()
    slots = threading.Semaphore(WALK_AHEAD)
    stop = threading.Event()

    def emit(batch: list[Entry | WalkProblem] | BaseException | None) -> bool:
        while not slots.acquire(timeout=0.5):
            if stop.is_set():
                return False
        if stop.is_set():
            return False
        try:
            loop.call_soon_threadsafe(queue.put_nowait, batch)
        except RuntimeError:  # the loop is closed: nobody reads any more
            return False
        return True

    def run() -> None:
        try:
            _walk_thread(os.fsencode(root), prune, keep, follow, emit, _scan_names if names_only else _scan)
        except BaseException as exc:  # handed to the loop, raised there
            emit(exc)
            return
        emit(None)

    thread = threading.Thread(target=run, name="immich-stream-walk", daemon=True)
    thread.start()
    try:
        while (batch := await queue.get()) is not None:
            slots.release()
            if isinstance(batch, BaseException):
                raise batch
            entries: list[Entry] = []
            for item in batch:
                if isinstance(item, WalkProblem):
                    on_problem(item)
                else:
                    entries.append(item)
            if entries:
                yield entries
    finally:
        stop.set()
        slots.release()
