"""`drill`: prove a snapshot restores, without touching the live database.

The snapshot's dump goes, through the same code as `restore --database` (search_path
correction, one transaction, sha256 checked before COMMIT), into a throwaway PostgreSQL
container: the database container's own image (or --image), no network, its data on a
temporary volume. Then every table's row count is compared with what snapshot.json
recorded (or, for older snapshots and --from-file, with the dump's own COPY blocks), an
earthdistance query runs when the extension is there, and --files N re-hashes N random
library files from S3. The container and its volume are removed whatever happens; a drill
killed with SIGKILL leaves them labelled, and the next drill removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass, field

from immich_stream.config import Settings
from immich_stream.errors import ConfigError, DumpError, ObjectNotFound, RepoError, StoreError
from immich_stream.host.docker_exec import pipe_into
from immich_stream.host.postgres import TABLE_NAME, DumpScanner, ensure_database, psql_query, psql_restore_command
from immich_stream.host.stack import Docker, connect, find_containers
from immich_stream.host.throwaway import Throwaway, inspect_container, reachable, remove_leftovers
from immich_stream.progress import Reporter
from immich_stream.repository.layout import is_external
from immich_stream.repository.locks import RepoLock
from immich_stream.repository.manifest import ManifestLine
from immich_stream.repository.packs import PackReader
from immich_stream.repository.repo import Repo, Snapshot
from immich_stream.repository.sealed import SealedStore
from immich_stream.repository.session import open_reader, reading, still_reading
from immich_stream.repository.thaw import thaw
from immich_stream.restore.database import came_from_text, file_sql, prepare_dump, psql_stream, snapshot_sql
from immich_stream.s3.watchdog import s3_hang, with_watchdog

log = logging.getLogger(__name__)

ONE_DEGREE_M = (111_000, 111_700)  # earth_distance of one degree of longitude on the equator


@dataclass
class TableCheck:
    expected: int | None  # snapshot.json (or, without it, the dump)
    dumped: int | None  # rows in the dump's COPY block
    restored: int | None  # rows in the throwaway database afterwards (None: no such table)


@dataclass
class DrillReport:
    source: str  # "snapshot <id>" or "file <path>"
    snapshot: str | None = None
    came_from: str = ""
    image: str = ""
    server_version: str | None = None
    expected_from: str = ""  # "snapshot.json" or "the dump"
    tables: dict[str, TableCheck] = field(default_factory=dict)
    earthdistance: str | None = None  # None: the extension is not in the dump
    files_checked: int = 0
    files_bytes: int = 0
    sql_bytes: int = 0
    seconds: float = 0.0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_json(self) -> str:
        d = asdict(self)
        d["ok"] = self.ok
        return json.dumps(d, indent=2)


def _count_query(tables: list[str]) -> str:
    """Rows of each table (ONLY: a parent's count must not include its partitions), -1 for
    a table that does not exist, in one query that cannot fail on a missing table."""
    parts = []
    for i, name in enumerate(tables):
        lit = name.replace("'", "''")
        inner = f"SELECT count(*) AS c FROM ONLY {name}".replace("'", "''")
        parts.append(
            f"SELECT {i}, CASE WHEN to_regclass('{lit}') IS NULL THEN -1 ELSE "
            f"(xpath('/row/c/text()', query_to_xml('{inner}', false, true, '')))[1]::text::bigint END"
        )
    return " UNION ALL ".join(parts)


async def count_rows(
    docker: Docker, container: str, user: str, dbname: str, tables: list[str]
) -> dict[str, int | None]:
    good = [t for t in tables if TABLE_NAME.match(t)]
    out: dict[str, int | None] = {t: None for t in tables}
    if not good:
        return out
    for i, n in await psql_query(docker, container, user, dbname, _count_query(good)):
        out[good[int(i)]] = None if int(n) < 0 else int(n)
    return out


async def earthdistance_check(docker: Docker, container: str, user: str, dbname: str) -> str:
    """Immich's place search: ll_to_earth and earth_box, as the search_path correction makes them work."""
    rows = await psql_query(
        docker, container, user, dbname, "SELECT round(earth_distance(ll_to_earth(0, 0), ll_to_earth(0, 1)))"
    )
    metres = float(rows[0][0])
    if not ONE_DEGREE_M[0] <= metres <= ONE_DEGREE_M[1]:
        raise DumpError(f"earth_distance of one degree is {metres:.0f} m")
    geo = await psql_query(
        docker,
        container,
        user,
        dbname,
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'geodata_places' AND column_name = 'earthCoord'",
    )
    if geo and geo[0][0] != "0":
        near = await psql_query(
            docker,
            container,
            user,
            dbname,
            'SELECT count(*) FROM geodata_places WHERE earth_box(ll_to_earth(0, 0), 1000000) @> "earthCoord"',
        )
        return f"ok ({metres:.0f} m per degree; {near[0][0]} places within 1000 km of 0,0)"
    # Immich since its Kysely migrations: no earthCoord column, a GiST index on ll_to_earth_public()
    real = await psql_query(
        docker,
        container,
        user,
        dbname,
        "SELECT to_regprocedure('public.ll_to_earth_public(double precision,double precision)') IS NOT NULL "
        "AND to_regclass('public.geodata_places') IS NOT NULL",
    )
    if real and real[0][0] == "t":
        near = await psql_query(
            docker,
            container,
            user,
            dbname,
            "SELECT count(*) FROM public.geodata_places WHERE earth_box(public.ll_to_earth_public(0, 0), 1000000) "
            "@> public.ll_to_earth_public(latitude, longitude)",
        )
        return f"ok ({metres:.0f} m per degree; {near[0][0]} places within 1000 km of 0,0)"
    return f"ok ({metres:.0f} m per degree)"


async def check_files(
    store: SealedStore,
    repo: Repo,
    lock: RepoLock | None,
    snap: Snapshot,
    n: int,
    report: DrillReport,
    reporter: Reporter,
    settings: Settings,
    wait: bool = True,
) -> None:
    """Re-hash n randomly chosen files of the library and the external libraries from S3
    against the manifest."""
    rng = random.Random()
    sample: list[ManifestLine] = []
    seen = 0
    async for line in repo.read_manifest(snap.id):  # reservoir sampling: one pass, n lines held
        if line.type != "file" or not (line.root == "library" or is_external(line.root)):
            continue
        seen += 1
        if len(sample) < n:
            sample.append(line)
        elif (j := rng.randrange(seen)) < n:
            sample[j] = line
    # the sample's archived objects (GLACIER, DEEP_ARCHIVE: a blob's pack, every chunk's pack)
    # thawed first: a HEAD each tells
    keys = dict.fromkeys(repo.object_key(k) for x in sample for k, _ in x.object_refs())
    await thaw(store, keys, settings, reporter, wait, check_class=True)
    packs = PackReader(store, repo)
    phase = reporter.phase("drill files", sum(line.size for line in sample))
    try:
        for line in sample:
            where = f"library/{line.path}"
            if not line.has_object or line.sha256 is None:
                report.mismatches.append(f"{where}: its manifest line has no object")
                continue
            h = hashlib.sha256()
            size = 0
            try:
                async for chunk in packs.file(line):  # an object of its own, a blob of a pack, or chunks
                    still_reading(lock)
                    h.update(chunk)
                    size += len(chunk)
                    phase.update(len(chunk))
            except ObjectNotFound:
                report.mismatches.append(f"{where}: its object {line.first_key} is missing")
                continue
            except RepoError as exc:  # a pack that ends early or does not open, a damaged chunk
                report.mismatches.append(f"{where}: its object {line.first_key} is damaged: {exc}")
                continue
            report.files_checked += 1
            report.files_bytes += size
            if size != line.size or h.hexdigest() != line.sha256:
                report.mismatches.append(
                    f"{where}: {size} bytes, sha256 {h.hexdigest()[:12]}..., manifest says {line.size} and {line.sha256[:12]}..."
                )
    finally:
        phase.close()


async def run_drill(
    settings: Settings,
    reporter: Reporter,
    which: str,
    image: str | None = None,
    files: int = 0,
    from_file: str | None = None,
    wait: bool = True,
) -> DrillReport:
    started = time.monotonic()
    async with connect(settings.tuning.docker_deadline) as docker, contextlib.AsyncExitStack() as exits:
        await reachable(docker)
        await remove_leftovers(docker)
        await find_containers(docker, settings)
        store: SealedStore | None = None
        repo: Repo | None = None
        lock: RepoLock | None = None
        snap: Snapshot | None = None
        if from_file is None:
            settings.require("bucket")
            opened = await exits.enter_async_context(open_reader(settings, "drill"))
            repo, lock = opened
            store = repo.store
            snap = await repo.resolve(which)
            sql: AsyncGenerator[bytes, None] = snapshot_sql(store, repo, snap)
            report = DrillReport(f"snapshot {snap.id}", snap.id, came_from_text(snap.summary))
        else:
            sql = file_sql(from_file)
            report = DrillReport(f"file {from_file}")
        exits.push_async_callback(sql.aclose)
        live = await inspect_container(docker, settings.db_container)
        if image is None:
            if live is None:
                raise ConfigError(
                    f"database container {settings.db_container!r} not found: give --image with a local PostgreSQL image"
                )
            image = str((live.get("Config") or {}).get("Image") or live["Image"])
        same = live is not None and image in ((live.get("Config") or {}).get("Image"), live.get("Image"))
        report.image = image
        user, dbname = settings.db_user, settings.db_name
        phase = reporter.phase("drill restore", snap.summary.database.size if snap else None)

        async def restore_and_check() -> None:
            async with Throwaway(docker, image, user, dbname, live if same else None) as box:
                await box.wait_ready()
                where = report.source + (f" ({report.came_from})" if report.came_from else "")
                scanner, whole = await prepare_dump(docker, box.name, user, dbname, sql, where, from_file is not None)
                # as `restore --database` does: an image need not create POSTGRES_DB
                if not scanner.cluster and await ensure_database(docker, box.name, user, dbname):
                    log.info("created database %s in %s", dbname, box.name)

                async def counted() -> AsyncGenerator[bytes, None]:
                    async with contextlib.aclosing(psql_stream(whole, scanner, user, log_missing=False)) as chunks:
                        async for chunk in chunks:
                            report.sql_bytes += len(chunk)
                            phase.update(len(chunk))
                            yield chunk

                target_db = "postgres" if scanner.cluster else dbname
                await pipe_into(docker, box.name, psql_restore_command(user, target_db), counted(), "psql")
                rows = await psql_query(docker, box.name, user, dbname, "SELECT current_setting('server_version')")
                report.server_version = rows[0][0] if rows else None
                await compare(docker, box.name, scanner)

        async def compare(docker: Docker, box: str, scanner: DumpScanner) -> None:
            recorded = snap.summary.database.tables if snap is not None else None
            dumped = scanner.tables
            expected = recorded if recorded is not None else dumped
            report.expected_from = "snapshot.json" if recorded is not None else "the dump"
            names = sorted(set(expected) | set(dumped))
            restored = await count_rows(docker, box, user, dbname, names)
            for name in names:
                check = TableCheck(expected.get(name), dumped.get(name), restored.get(name))
                report.tables[name] = check
                if check.restored is None:
                    report.mismatches.append(f"table {name}: missing after the restore")
                elif check.expected is None:
                    report.mismatches.append(
                        f"table {name}: {check.restored} rows restored, but snapshot.json records no such table"
                    )
                elif check.restored != check.expected:
                    report.mismatches.append(
                        f"table {name}: {check.restored} rows restored, {report.expected_from} records {check.expected}"
                    )
            if "earthdistance" in scanner.needed_extensions:
                try:
                    report.earthdistance = await earthdistance_check(docker, box, user, dbname)
                except DumpError as exc:
                    report.earthdistance = f"FAILED: {exc}"
                    report.mismatches.append(f"earthdistance query failed: {exc}")

        try:
            if store is None or repo is None:
                await restore_and_check()
            else:
                hung = s3_hang(store, settings.stall_timeout, "the drill stopped; nothing live was touched")
                await with_watchdog(store, math.inf, restore_and_check(), reading(lock, hung))
        finally:
            phase.close()
        if files and snap is not None and store is not None and repo is not None:
            try:
                await check_files(store, repo, lock, snap, files, report, reporter, settings, wait)
            except StoreError as exc:
                report.mismatches.append(f"library files: {exc}")
    report.seconds = time.monotonic() - started
    return report
