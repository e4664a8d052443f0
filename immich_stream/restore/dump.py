"""`restore --dump-to`: a snapshot's database.sql.gz as stored, into a file (whole or not
at all), a character device, a pipe or stdout, its sha256 checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import stat

from immich_stream.config import Settings
from immich_stream.errors import ConfigError, ImmichStreamError, RepoError
from immich_stream.repository.repo import Snapshot
from immich_stream.repository.session import open_reader, still_reading
from immich_stream.restore.restorer import PARTIAL


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
    async with open_reader(settings, "restore") as (repo, lock):
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
                        still_reading(lock)
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
