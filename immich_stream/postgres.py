"""Postgres: pg_dump and psql inside the database container (through docker_exec.py).

Backup: pg_dump's stdout is gzip-compressed in chunks as it arrives and streamed into a
multipart upload of unknown length. Memory: one part buffer plus one compression chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiodocker

from immich_stream.docker_exec import run_in_container, stream_out
from immich_stream.errors import DumpError

try:  # same gzip format, several times faster than zlib
    from isal import isal_zlib as _gz

    GZIP_LEVEL = 2  # isal's levels are 0-3
except ImportError:  # pragma: no cover
    import zlib as _gz  # type: ignore[no-redef]

    GZIP_LEVEL = 1

log = logging.getLogger(__name__)

COMPRESS_CHUNK = 1 << 20  # raw bytes gathered before one compression call (in a thread)


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
