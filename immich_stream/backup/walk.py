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
import contextlib
import logging
import marshal
import os
import signal
import stat
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass
from typing import Any

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
            problems.append(WalkProblem(child, f"skipped {what}", skipped=True))  # warned by walk_batches
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
) -> AsyncGenerator[list[Entry], None]:
    """walk()'s entries a batch (up to WALK_BATCH) at a time, as the walker hands them
    over: a consumer that handles a batch in one go spends no await per entry. The
    problems among a batch's entries go to `on_problem` before the batch is yielded.

    The walker is a process of its own (this file run by the interpreter, stdlib only):
    its system calls and the Python around each (~5 µs an entry) run on another core,
    not in a thread that takes the GIL from the event loop at every call (a thread is
    the fallback when no process can be started). Its batches come through a pipe
    (marshal: tuples of bytes and ints), at most a pipe's buffer ahead."""
    spec = (os.fsencode(root), sorted(prune), sorted(keep), sorted(follow))
    source = _from_process(spec)
    try:
        first = await anext(source)
    except _NoProcess:
        source = _from_thread(spec)
        first = None
    except StopAsyncIteration:
        return
    try:
        items = first
        while True:
            if items is None:
                try:
                    items = await anext(source)
                except StopAsyncIteration:
                    return
            entries: list[Entry] = []
            for item in items:
                if isinstance(item, WalkProblem):
                    if item.skipped:
                        log.warning(
                            "skipping %s %s: only files, directories and symlinks are backed up",
                            item.message.removeprefix("skipped "),
                            item.relpath.decode(errors="backslashreplace"),
                        )
                    on_problem(item)
                else:
                    entries.append(item)
            items = None
            if entries:
                yield entries
    finally:
        await source.aclose()


Spec = tuple[bytes, list[bytes], list[bytes], list[bytes]]


_RUNNABLE = os.path.isfile(__file__)  # this file can be run by the interpreter (not in a zip)


REAP_TIMEOUT = 5.0  # seconds a killed walk process is waited for


class _NoProcess(Exception):
    """The walker's process could not be started: walk in a thread."""


def _unflat(t: tuple[Any, ...]) -> Entry | WalkProblem:
    return Entry(*t) if len(t) == 11 else WalkProblem(*t)


async def _from_process(spec: Spec) -> AsyncGenerator[list[Entry | WalkProblem], None]:
    if not sys.executable or not _RUNNABLE:
        raise _NoProcess
    try:
        # its own session: a Ctrl-C at the terminal reaches this process, which stops it
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", __file__, marshal.dumps(spec).hex(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    except (OSError, ValueError):
        raise _NoProcess from None
    assert proc.stdout is not None
    started = False
    try:
        while True:
            try:
                n = int.from_bytes(await proc.stdout.readexactly(4), "little")
                if n == 0:
                    return
                items = marshal.loads(await proc.stdout.readexactly(n))
            except asyncio.IncompleteReadError:
                code = await proc.wait()
                if not started:  # this interpreter cannot run it (-I -S): the thread walks
                    log.debug(
                        "the walk's process ended before its first batch (exit code %s): walking in a thread", code
                    )
                    raise _NoProcess from None
                from immich_stream.errors import ImmichStreamError  # not in the walker's process: stdlib only

                how = f"failed (exit code {code})"
                if code < 0:
                    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
                    how = f"was killed by {name} (the out-of-memory killer?)"
                raise ImmichStreamError(
                    f"the walk of {os.fsdecode(spec[0])} ended early: its process {how}; nothing was committed; run again"
                ) from None
            started = True
            if items and len(items[0]) == 1:
                raise RuntimeError(f"the walk failed: {items[0][0]}")
            yield [_unflat(t) for t in items]
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        # what is left in the pipe is read to its end: wait() returns only once the pipe
        # is closed, and a paused reader would never see that. Bounded: a process stuck in
        # a hung disk or network filesystem (state D) ends only when that answers, and a
        # run cancelled by the watchdog must still unwind and start the stack again.
        try:
            async with asyncio.timeout(REAP_TIMEOUT):
                while await proc.stdout.read(1 << 20):
                    pass
                await proc.wait()
        except TimeoutError:
            log.warning(
                "the walk's process %d did not end when killed (a hung disk or network filesystem?): left behind",
                proc.pid,
            )


def _child(spec_hex: str) -> None:
    """The walker's process: batches to stdout, each its length (4 bytes) and a marshal
    of its entries' fields; a length 0 ends the walk; a one-field item is the error that
    ended it."""
    root, prune, keep, follow = marshal.loads(bytes.fromhex(spec_hex))
    with contextlib.suppress(OSError):  # a deeper pipe (Linux): the walk runs further ahead
        import fcntl

        fcntl.fcntl(1, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    with open(1, "wb", buffering=1 << 16, closefd=False) as out:  # the pipe to the reader

        def send(items: list[tuple[Any, ...]]) -> bool:
            data = marshal.dumps(items, 4)
            try:
                out.write(len(data).to_bytes(4, "little") + data)
            except BrokenPipeError:
                return False  # the reader is gone
            return True

        def emit(batch: list[Entry | WalkProblem]) -> bool:
            return send([astuple_(x) for x in batch])

        try:
            _walk_thread(root, set(prune), set(keep), set(follow), emit, _scan)
        except Exception as exc:  # handed to the reader, raised there
            send([(f"{type(exc).__name__}: {exc}",)])
        with contextlib.suppress(BrokenPipeError):
            out.write((0).to_bytes(4, "little"))
            out.flush()


def astuple_(x: Entry | WalkProblem) -> tuple[Any, ...]:
    if isinstance(x, Entry):
        return (x.relpath, x.type, x.size, x.mtime_ns, x.mode, x.uid, x.gid, x.inode, x.target, x.ctime_ns, x.dev)
    return (x.relpath, x.message, x.skipped)


async def _from_thread(spec: Spec) -> AsyncGenerator[list[Entry | WalkProblem], None]:
    """The walk in a thread of this process, at most WALK_AHEAD batches ahead."""
    root, prune, keep, follow = spec
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
            _walk_thread(root, set(prune), set(keep), set(follow), emit, _scan)
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
            yield batch
    finally:
        stop.set()
        slots.release()


if __name__ == "__main__":
    _child(sys.argv[1])
