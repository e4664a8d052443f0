"""`restore --database`: stop the app containers, pipe the dump (a snapshot's, checked
against snapshot.json before COMMIT, or --from-file) into psql in the database container
as one transaction with the search_path correction, start them again. The drill sends
its dump through the same functions into its throwaway container.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from immich_stream.config import Settings
from immich_stream.errors import ConfigError, DumpError, RepoError, StackError
from immich_stream.host.docker_exec import pipe_into
from immich_stream.host.hoststate import stack_lock
from immich_stream.host.postgres import (
    CLUSTER_DUMP,
    DumpScanner,
    SearchPathFix,
    check_target,
    ensure_database,
    psql_restore_command,
    read_head,
)
from immich_stream.host.stack import Docker, Stack, StackGuard, connect, find_containers, recover
from immich_stream.progress import Reporter
from immich_stream.repository.locks import RepoLock
from immich_stream.repository.manifest import gunzip_stream
from immich_stream.repository.repo import Repo, Snapshot
from immich_stream.repository.sealed import SealedStore
from immich_stream.repository.session import open_reader, reading
from immich_stream.repository.summary import SnapshotSummary
from immich_stream.restore.restorer import CHUNK
from immich_stream.s3.watchdog import s3_hang, with_watchdog

log = logging.getLogger(__name__)


@dataclass
class DatabaseRestored:
    bytes: int  # of SQL sent to psql
    seconds: float
    downtime: float  # the app containers were stopped this long


def came_from_text(summary: SnapshotSummary) -> str:
    """`Immich v1.2 (ghcr.io/...), PostgreSQL 14.10 (ghcr.io/immich-app/postgres:14...)`, or ""."""
    parts = []
    im = summary.immich
    if im.version or im.image:
        parts.append(f"Immich {im.version or '?'}" + (f" ({im.image})" if im.image else ""))
    db = summary.database
    if db.server_version or db.image:
        parts.append(f"PostgreSQL {db.server_version or '?'}" + (f" ({db.image})" if db.image else ""))
    return ", ".join(parts)


async def snapshot_sql(store: SealedStore, repo: Repo, snap: Snapshot) -> AsyncGenerator[bytes, None]:
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


async def dump_chunks(store: SealedStore, repo: Repo, snap: Snapshot) -> AsyncGenerator[bytes, None]:
    """The snapshot's dump as one transaction for psql (see psql_stream)."""
    scanner = DumpScanner(snap.summary.database.name)
    async for chunk in psql_stream(await read_head(snapshot_sql(store, repo, snap), scanner), scanner, ""):
        yield chunk


async def prepare_dump(
    docker: Docker,
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
    async with connect(settings.tuning.docker_deadline) as docker, contextlib.AsyncExitStack() as exits:
        store: SealedStore | None = None
        snap: Snapshot | None = None
        lock: RepoLock | None = None
        if from_file is None:
            repo, lock = await exits.enter_async_context(open_reader(settings, "restore"))
            store = repo.store
            snap = await repo.resolve(which)
            sql = snapshot_sql(store, repo, snap)
            came_from = f"snapshot {snap.id}" + (f": {cf}" if (cf := came_from_text(snap.summary)) else "")
        else:
            sql = file_sql(from_file)
            came_from = f"file {from_file}"
        exits.push_async_callback(sql.aclose)
        await find_containers(docker, settings)
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
            if store is None:
                await work()
            else:
                # psql may rightly be silent for long (an index on a large table): only S3 not
                # answering for the stall timeout fails the restore (rolled back, apps started).
                hung = s3_hang(store, settings.stall_timeout, "the restore was rolled back and the stack started again")
                await with_watchdog(store, math.inf, work(), reading(lock, hung))
        finally:
            phase.close()
    return snap, DatabaseRestored(sent, time.monotonic() - started, guard.downtime)
