"""pg_dump and psql inside the database container, through docker exec (no shell, no CLI).

Backup: pg_dump's stdout is gzip-compressed in chunks as it arrives and streamed into a
multipart upload of unknown length. Memory: one part buffer plus one compression chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiodocker
import aiohttp

from immich_stream.errors import DumpError, StackError

try:  # same gzip format, several times faster than zlib
    from isal import isal_zlib as _gz

    GZIP_LEVEL = 2  # isal's levels are 0-3
except ImportError:  # pragma: no cover
    import zlib as _gz  # type: ignore[no-redef]

    GZIP_LEVEL = 1

log = logging.getLogger(__name__)

COMPRESS_CHUNK = 1 << 20  # raw bytes gathered before one compression call (in a thread)
EXIT_WAIT = 30.0  # seconds a failed restore waits for psql to exit (its rollback) before going on


async def _exec(docker: aiodocker.Docker, container: str, cmd: list[str], stdin: bool = False) -> Any:
    try:
        c = docker.containers.container(container)
        return await c.exec(cmd=cmd, stdin=stdin, tty=False)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            raise StackError(f"container {container} not found: set DB_CONTAINER to the database container") from None
        if exc.status == 409:
            raise StackError(f"container {container} is not running: start it first") from None
        raise StackError(f"cannot run {cmd[0]} in {container}: {exc.message}") from None


async def _exit_code(exe: Any) -> int:
    # The exit code can be None for a moment after the output ends.
    delay = 0.01
    for _ in range(400):
        info = await exe.inspect()
        if not info.get("Running") and info.get("ExitCode") is not None:
            return int(info["ExitCode"])
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)
    raise StackError("docker exec did not report an exit code")


async def run_in_container(docker: aiodocker.Docker, container: str, cmd: list[str]) -> tuple[int, bytes]:
    """Run a short command; return (exit code, stdout+stderr)."""
    exe = await _exec(docker, container, cmd)
    out = bytearray()
    async with exe.start(detach=False) as stream:
        while (msg := await stream.read_out()) is not None:
            out += msg.data
    return await _exit_code(exe), bytes(out)


async def stream_out(docker: aiodocker.Docker, container: str, cmd: list[str], what: str) -> AsyncIterator[bytes]:
    """Yield a command's stdout as it comes; raise DumpError with its stderr if it fails."""
    exe = await _exec(docker, container, cmd)
    err = bytearray()
    async with exe.start(detach=False) as stream:
        while (msg := await stream.read_out()) is not None:
            if msg.stream == 1:
                yield msg.data
            else:
                err += msg.data
                del err[:-4096]
    code = await _exit_code(exe)
    if code != 0:
        text = err.decode(errors="replace").strip().replace("\n", " | ") or f"exit code {code}"
        raise DumpError(f"{what} failed in {container}: {text}")


@dataclass
class DumpResult:
    raw_bytes: int = 0
    gz_bytes: int = 0
    raw_sha256: str = ""
    gz_sha256: str = ""
    parts: int = 0
    seconds: float = 0.0


def pg_dump_command(user: str, dbname: str) -> list[str]:
    # What Immich's own documentation uses since v2.5.
    return ["pg_dump", "--clean", "--if-exists", f"--dbname={dbname}", f"--username={user}"]


class GzipChunker:
    """Compress in ~1 MiB batches in a worker thread; hash both sides as they pass."""

    def __init__(self) -> None:
        self._z = _gz.compressobj(GZIP_LEVEL, _gz.DEFLATED, 31)
        self.raw = hashlib.sha256()
        self.gz = hashlib.sha256()
        self.raw_bytes = 0
        self.gz_bytes = 0

    def _compress(self, data: bytes, final: bool) -> bytes:
        self.raw.update(data)
        self.raw_bytes += len(data)
        out = self._z.compress(data) + (self._z.flush() if final else b"")
        self.gz.update(out)
        self.gz_bytes += len(out)
        return out

    async def compress(self, data: bytes, final: bool = False) -> bytes:
        return await asyncio.to_thread(self._compress, data, final)


async def dump_database(
    docker: aiodocker.Docker,
    container: str,
    user: str,
    dbname: str,
    write: Callable[[bytes], Any],
    progress: Callable[[int], None] | None = None,
) -> DumpResult:
    """Run pg_dump and feed its gzip-compressed output to `await write(chunk)`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    gz = GzipChunker()
    pending: list[bytes] = []
    pending_size = 0
    async for data in stream_out(docker, container, pg_dump_command(user, dbname), "pg_dump"):
        pending.append(data)
        pending_size += len(data)
        if progress:
            progress(len(data))
        if pending_size >= COMPRESS_CHUNK:
            await write(await gz.compress(b"".join(pending)))
            pending, pending_size = [], 0
    await write(await gz.compress(b"".join(pending), final=True))
    return DumpResult(gz.raw_bytes, gz.gz_bytes, gz.raw.hexdigest(), gz.gz.hexdigest(), 0, loop.time() - start)


SEARCH_PATH_DUMP = b"SELECT pg_catalog.set_config('search_path', '', false);"
# Immich's restore documentation: extensions such as earthdistance resolve their helper
# functions through search_path, which pg_dump empties for the whole session.
SEARCH_PATH_FIXED = b"SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', true);"


class SearchPathFix:
    """Rewrite pg_dump's search_path line in a stream, across chunk boundaries."""

    def __init__(self) -> None:
        self._carry = b""
        self.replaced = 0

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data
        cut = data.rfind(b"\n") + 1  # only whole lines are rewritten
        if cut == 0 and len(data) < 1 << 20:
            self._carry = data
            return b""
        head, self._carry = (data[:cut], data[cut:]) if cut else (data, b"")
        return self._fix(head)

    def flush(self) -> bytes:
        tail, self._carry = self._carry, b""
        return self._fix(tail)

    def _fix(self, data: bytes) -> bytes:
        n = data.count(SEARCH_PATH_DUMP)
        if n:
            self.replaced += n
            data = data.replace(SEARCH_PATH_DUMP, SEARCH_PATH_FIXED)
        return data


def psql_restore_command(user: str, dbname: str) -> list[str]:
    # No --single-transaction: psql would COMMIT at end of input, and dockerd closes psql's
    # stdin (a clean end of input) whenever our side of the exec stream closes, whatever
    # the reason. The caller sends BEGIN first and COMMIT only after a verified stream;
    # psql never commits on its own, and the server rolls back a transaction left open.
    return ["psql", f"--dbname={dbname}", f"--username={user}", "--set", "ON_ERROR_STOP=on", "--quiet", "--no-psqlrc"]


async def ensure_database(docker: aiodocker.Docker, container: str, user: str, dbname: str) -> bool:
    """Create the database when it does not exist (a restore onto a fresh server). True if created."""
    code, out = await run_in_container(
        docker,
        container,
        [
            "psql",
            "--username",
            user,
            "--dbname",
            "postgres",
            "--no-psqlrc",
            "-Atc",
            f"SELECT 1 FROM pg_database WHERE datname = '{dbname.replace(chr(39), chr(39) * 2)}'",
        ],
    )
    if code != 0:
        raise DumpError(f"psql failed in {container}: {out.decode(errors='replace').strip()}")
    if out.strip() == b"1":
        return False
    code, out = await run_in_container(docker, container, ["createdb", "--username", user, dbname])
    if code != 0:
        raise DumpError(f"createdb {dbname} failed in {container}: {out.decode(errors='replace').strip()}")
    return True


async def pipe_into(
    docker: aiodocker.Docker, container: str, cmd: list[str], chunks: AsyncGenerator[bytes, None], what: str
) -> bytes:
    """Feed chunks to a command's stdin while reading its output; raise DumpError if it fails.

    Output is read concurrently (psql blocks when its output pipe is full) and only its
    last 8 KiB kept. stdin is half-closed at the end so the output can still be read.

    The command sees end of input however this ends (dockerd closes its stdin when the
    stream closes), so a prefix of `chunks` must be harmless on its own: the database
    restore sends COMMIT last. On failure or cancellation we wait (bounded) for the command
    to exit, so that nothing is started against the database while it rolls back."""
    exe = await _exec(docker, container, cmd, stdin=True)
    out = bytearray()
    fed = False  # every chunk was handed to the command
    started = False
    try:
        async with exe.start(detach=False) as stream, contextlib.aclosing(chunks):
            started = True

            async def read() -> None:
                while (msg := await stream.read_out()) is not None:
                    out.extend(msg.data)
                    del out[:-8192]

            async def write() -> None:
                nonlocal fed
                async for chunk in chunks:
                    try:
                        await stream.write_in(chunk)
                    except (ConnectionError, aiohttp.ClientConnectionError):
                        return  # the command is gone; its exit code and output say why
                resp = stream._resp
                transport = resp.connection.transport if resp is not None and resp.connection else None
                if transport is None or transport.is_closing():
                    return  # the command is gone before the end
                fed = True
                if transport.can_write_eof():
                    transport.write_eof()  # EOF for the command, the answer still readable
                else:  # pragma: no cover - every Docker transport here supports half-close
                    await stream.close()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(read())
                tg.create_task(write())
    except BaseException:
        if started:
            with contextlib.suppress(Exception):  # the first failure is the one to report
                await asyncio.wait_for(asyncio.shield(_exit_code(exe)), EXIT_WAIT)
        raise
    code = await _exit_code(exe)
    if code != 0 or not fed:
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "ERROR" in ln or "FATAL" in ln] or lines[-3:] or [f"exit code {code}"]
        if not fed and code == 0:
            errors = ["it stopped reading its input before the end"]
        raise DumpError(f"{what} failed in {container}: {' | '.join(errors[:3])}")
    return bytes(out)
