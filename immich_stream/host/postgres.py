"""Postgres: pg_dump and psql inside the database container (through docker_exec.py).

Backup: pg_dump's stdout is gzip-compressed in chunks as it arrives and streamed into a
multipart upload of unknown length. Memory: one part buffer plus one compression chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiodocker

from immich_stream.errors import DumpError
from immich_stream.host.docker_exec import run_in_container, stream_out

try:  # same gzip format, several times faster than zlib
    from isal import isal_zlib as _gz

    GZIP_LEVEL = 2  # isal's levels are 0-3
except ImportError:  # pragma: no cover
    import zlib as _gz  # type: ignore[no-redef]

    GZIP_LEVEL = 1

log = logging.getLogger(__name__)

COMPRESS_CHUNK = 1 << 20  # raw bytes gathered before one compression call (in a thread)


@dataclass
class ServerFacts:
    """What a restore target must offer: asked of the server after the dump (no downtime)."""

    version: str | None = None  # server_version, e.g. "15.4 (Debian 15.4-1)"
    version_num: int | None = None  # server_version_num, e.g. 150004
    extensions: dict[str, str] = field(default_factory=dict)  # pg_extension: name -> version

    @property
    def major(self) -> int | None:
        return self.version_num // 10000 if self.version_num else None


@dataclass
class DumpResult:
    raw_bytes: int = 0
    gz_bytes: int = 0
    raw_sha256: str = ""
    gz_sha256: str = ""
    parts: int = 0
    seconds: float = 0.0
    tables: dict[str, int] = field(default_factory=dict)  # rows per COPY block, counted as it streamed
    server: ServerFacts = field(default_factory=ServerFacts)
    stored: int | None = None  # bytes in the bucket, when encrypted


TABLE_NAME = re.compile(r'^(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)\.(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)$')
DUMPED_FROM = b"-- Dumped from database version "
CLUSTER_DUMP = b"-- PostgreSQL database cluster dump"


class DumpScanner:
    """Reads pg_dump (or pg_dumpall) SQL as it passes, in any chunking: rows of every
    `COPY ... FROM stdin` block per table (COPY's text format puts one row on a line and
    escapes a lone `\\.`), the source server's version, the extensions it creates, and for
    a cluster dump the database each block belongs to (`\\connect`). No query, no copy of
    the data: inside a COPY block only newlines are counted."""

    def __init__(self, database: str = "") -> None:
        self.database = database  # in a cluster dump, the database whose tables count
        self.cluster = False
        self.source_version: str | None = None  # "15.4 (Debian ...)" from the dump's header
        self.extensions: dict[str, list[str]] = {}  # database ("" before any \connect) -> names
        self.rows: dict[str, dict[str, int]] = {}  # database -> table -> rows
        self.copy_seen = False  # a COPY block of the database of interest has begun
        self._db = ""
        self._table: str | None = None
        self._carry = b""

    @property
    def tables(self) -> dict[str, int]:
        """Rows per table of the database of interest (the only one in a pg_dump)."""
        return self.rows.get(self.database if self.cluster else "", {})

    @property
    def needed_extensions(self) -> list[str]:
        if not self.cluster:
            return sorted(self.extensions.get("", []))
        return sorted({e for names in self.extensions.values() for e in names})

    @property
    def source_major(self) -> int | None:
        m = re.match(r"(\d+)(?:\.(\d+))?", self.source_version or "")
        if not m:
            return None
        major = int(m.group(1))
        return major if major >= 10 else major * 100 + int(m.group(2) or 0)  # 9.6 -> 906

    def feed(self, data: bytes) -> None:
        buf = self._carry + data if self._carry else data
        self._carry = b""
        pos, n = 0, len(buf)
        while pos < n:
            if self._table is not None:  # pos is at the start of a line inside a COPY block
                counts = self.rows[self._db]
                if buf.startswith(b"\\.\n", pos):  # the end line right here
                    self._table = None
                    pos += 3
                    continue
                end = buf.find(b"\n\\.\n", pos)  # a row's newline, then the end line
                if end >= 0:
                    counts[self._table] += buf.count(b"\n", pos, end + 1)
                    self._table = None
                    pos = end + 4
                    continue
                last = buf.rfind(b"\n", pos)
                if last >= 0:
                    counts[self._table] += buf.count(b"\n", pos, last + 1)
                    pos = last + 1
                self._carry = buf[pos:]
                return
            eol = buf.find(b"\n", pos)
            if eol < 0:
                self._carry = buf[pos:]
                return
            self._line(buf[pos:eol])
            pos = eol + 1

    def _line(self, line: bytes) -> None:
        if line.startswith(b"COPY ") and line.endswith(b" FROM stdin;"):
            name = line[5:].split(b" (", 1)[0].split(b" FROM stdin;", 1)[0].decode("utf-8", "replace")
            self._table = name
            self.rows.setdefault(self._db, {}).setdefault(name, 0)
            if not self.cluster or self._db == self.database:
                self.copy_seen = True
        elif line.startswith(b"CREATE EXTENSION "):
            m = re.match(rb'CREATE EXTENSION (?:IF NOT EXISTS )?("(?:[^"]|"")+"|[^\s;]+)', line)
            if m:
                name = m.group(1).decode("utf-8", "replace").strip('"').replace('""', '"')
                names = self.extensions.setdefault(self._db, [])
                if name not in names:
                    names.append(name)
        elif line.startswith(DUMPED_FROM):
            if self.source_version is None:
                self.source_version = line[len(DUMPED_FROM) :].decode("utf-8", "replace").strip()
        elif line.startswith(CLUSTER_DUMP):
            self.cluster = True
        elif line.startswith(b"\\connect "):
            m = re.search(rb"dbname='((?:[^']|'')*)'", line)
            raw = m.group(1).replace(b"''", b"'") if m else line.split()[-1].strip(b'"')
            self._db = raw.decode("utf-8", "replace")


def pg_dump_command(user: str, dbname: str) -> list[str]:
    # What Immich's own documentation uses since v2.5.
    return ["pg_dump", "--clean", "--if-exists", f"--dbname={dbname}", f"--username={user}"]


class GzipChunker:
    """Compress in ~1 MiB batches in a worker thread; hash both sides as they pass."""

    def __init__(self, scanner: DumpScanner | None = None, also: Callable[[bytes], None] | None = None) -> None:
        self._z = _gz.compressobj(GZIP_LEVEL, _gz.DEFLATED, 31)
        self.scanner = scanner
        # another reader of the SQL as it passes (the Immich catalog's): in a thread of its
        # own beside the compression, which lets go of the GIL
        self.also = also
        self.raw = hashlib.sha256()
        self.gz = hashlib.sha256()
        self.raw_bytes = 0
        self.gz_bytes = 0

    def _compress(self, data: bytes, final: bool) -> bytes:
        self.raw.update(data)
        self.raw_bytes += len(data)
        if self.scanner is not None:
            self.scanner.feed(data)
        out = self._z.compress(data) + (self._z.flush() if final else b"")
        self.gz.update(out)
        self.gz_bytes += len(out)
        return out

    async def compress(self, data: bytes, final: bool = False) -> bytes:
        if self.also is None or not data:
            return await asyncio.to_thread(self._compress, data, final)
        out, _ = await asyncio.gather(
            asyncio.to_thread(self._compress, data, final), asyncio.to_thread(self.also, data)
        )
        return out


async def dump_database(
    docker: aiodocker.Docker,
    container: str,
    user: str,
    dbname: str,
    write: Callable[[bytes], Any],
    progress: Callable[[int], None] | None = None,
    also: Callable[[bytes], None] | None = None,
) -> DumpResult:
    """Run pg_dump and feed its gzip-compressed output to `await write(chunk)`; count the
    rows of its COPY blocks as they pass (and hand the SQL to `also`), then ask the server
    for its version and extensions."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    scanner = DumpScanner()
    gz = GzipChunker(scanner, also)
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
    seconds = loop.time() - start
    # After the dump, not before: the apps may already be running again, nothing waits on this.
    server = await server_facts(docker, container, user, dbname)
    return DumpResult(
        gz.raw_bytes, gz.gz_bytes, gz.raw.hexdigest(), gz.gz.hexdigest(), 0, seconds, scanner.tables, server
    )


async def psql_query(
    docker: aiodocker.Docker, container: str, user: str, dbname: str, sql: str, timeout: float | None = None
) -> list[list[str]]:
    """Rows of one query (unaligned, tab-separated), through psql in the container; with
    `timeout`, the server itself ends it after that many seconds (waiting on a lock included)."""
    cmd = ["psql", f"--username={user}", f"--dbname={dbname}", "--no-psqlrc", "-X", "-At", "-F", "\t", "-c", sql]
    if timeout is not None:
        ms = max(1, int(timeout * 1000))
        cmd = ["env", f"PGOPTIONS=-c statement_timeout={ms} -c lock_timeout={ms}", *cmd]
    code, out = await run_in_container(docker, container, cmd)
    text = out.decode("utf-8", "replace")
    if code != 0:
        raise DumpError(f"psql failed in {container}: {text.strip().splitlines()[-1] if text.strip() else code}")
    return [line.split("\t") for line in text.splitlines() if line]


async def count_rows_up_to(
    docker: aiodocker.Docker,
    container: str,
    user: str,
    dbname: str,
    limits: dict[str, int],
    timeout: float | None = None,
) -> dict[str, int | None]:
    """Rows of each table, counted only up to its limit (what a shrink check needs: a
    bounded read, however large the table), None for a table that does not exist; one
    query that cannot fail on a missing table. Names as pg_dump's COPY lines give them."""
    good = [t for t in limits if TABLE_NAME.match(t)]
    out: dict[str, int | None] = {}
    if not good:
        return out
    parts = []
    for i, name in enumerate(good):
        lit = name.replace("'", "''")
        inner = f"SELECT count(*) AS c FROM (SELECT 1 FROM ONLY {name} LIMIT {int(limits[name])}) s".replace("'", "''")
        parts.append(
            f"SELECT {i}, CASE WHEN to_regclass('{lit}') IS NULL THEN -1 ELSE "
            f"(xpath('/row/c/text()', query_to_xml('{inner}', false, true, '')))[1]::text::bigint END"
        )
    for index, rows in await psql_query(docker, container, user, dbname, " UNION ALL ".join(parts), timeout):
        out[good[int(index)]] = None if int(rows) < 0 else int(rows)
    return out


async def server_facts(docker: aiodocker.Docker, container: str, user: str, dbname: str) -> ServerFacts:
    rows = await psql_query(
        docker,
        container,
        user,
        dbname,
        "SELECT 'v', current_setting('server_version'), current_setting('server_version_num') "
        "UNION ALL SELECT 'e', extname, extversion FROM pg_extension",
    )
    facts = ServerFacts()
    for row in rows:
        kind, a, b = [*row, "", ""][:3]
        if kind == "v":
            facts.version, facts.version_num = a, int(b)
        elif kind == "e":
            facts.extensions[a] = b
    return facts


class Incompatible(DumpError):
    """The target server cannot take the dump (older major version, missing extension):
    refused before anything was changed."""


async def check_target(
    docker: aiodocker.Docker,
    container: str,
    user: str,
    dump: DumpScanner,
    came_from: str,
) -> ServerFacts:
    """Refuse a restore that cannot work, before anything is changed: a server older than
    the dump's, or an extension the dump creates that the server does not have."""
    rows = await psql_query(
        docker,
        container,
        user,
        "postgres",
        "SELECT 'v', current_setting('server_version_num') UNION ALL SELECT 'a', name FROM pg_available_extensions",
    )
    available = {r[1] for r in rows if r[0] == "a" and len(r) > 1}
    num = next(int(r[1]) for r in rows if r[0] == "v")
    target = ServerFacts(version_num=num)
    where = f" (the dump came from {came_from})" if came_from else ""
    major = num // 10000 if num >= 100000 else num // 100
    src = dump.source_major
    if src is not None and major < src:
        raise Incompatible(
            f"{container} runs PostgreSQL {major}, older than the dump's {dump.source_version}{where}: "
            f"restore into PostgreSQL {src} or newer; nothing was changed"
        )
    missing = [e for e in dump.needed_extensions if e not in available]
    if missing:
        raise Incompatible(
            f"{container} lacks the extension{'s' if len(missing) > 1 else ''} {', '.join(missing)} that the "
            f"dump creates{where}: use the image the snapshot came from (or one that has them); "
            "nothing was changed"
        )
    return target


HEAD_LIMIT = 64 << 20  # SQL read ahead to find the version and extensions before a restore starts


async def read_head(sql: AsyncIterator[bytes], scanner: DumpScanner) -> AsyncGenerator[bytes, None]:
    """Read (and hold) the SQL up to its first COPY block of the database of interest, so
    that its header and CREATE EXTENSION lines are known before anything is changed; then
    return a stream of the whole SQL (held part first) that feeds the scanner as it goes."""
    head: list[bytes] = []
    size = 0
    async for chunk in sql:
        head.append(chunk)
        size += len(chunk)
        scanner.feed(chunk)
        if scanner.copy_seen or size >= HEAD_LIMIT:
            break

    async def whole() -> AsyncGenerator[bytes, None]:
        while head:
            yield head.pop(0)
        async for chunk in sql:
            scanner.feed(chunk)
            yield chunk

    return whole()


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
