"""Immich's real schema (tests/stack/real) on PostgreSQL 17 and 18 with pgvector: backup,
drill, wipe, restore --database and verify give back every row of every table (an md5 of each
table's ordered rows), the earthdistance search through its GiST index and the CLIP
nearest-neighbour search through its HNSW index; the drill refuses an older major and an image
without the vector extension in one line, before anything runs.

Each major runs as a compose project of its own (its own container names, `name:`), both
started at once by one module fixture, beside the shared test stack:
- 17: Immich's current table names (asset, asset_exif, "user", ...), and the database started
  the way Immich's compose file starts its pgvecto.rs image (`command: postgres -c
  shared_preload_libraries=... -c search_path="$$user", public, vectors`), which the drill's
  throwaway container must inherit;
- 18: the names before Immich v1.137 (assets, exif, users, ...: tests/stack/real/legacy).
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import _tool, bucket_of, docker
from tests.helpers import REPO_ROOT, make_library, run_cli, start_cli, tree, wait_for

pytestmark = pytest.mark.docker

REAL = REPO_ROOT / "tests" / "stack" / "real"
NO_VECTOR_IMAGE = "immich-stream-test/postgres:17-novector"
OLDER_IMAGE = "immich-stream-test/postgres:15"

COMPOSE = """\
name: immich-real{major}
services:
  immich-server:
    container_name: immich_real{major}_server
    image: immich-stream-test/postgres:{major}-pgvector
    entrypoint: ["/bin/bash", "-c", "trap 'exit 0' TERM INT; sleep infinity & wait"]
    volumes:
      - ${{UPLOAD_LOCATION}}:/data
  database:
    container_name: immich_real{major}_postgres
    image: immich-stream-test/postgres:{major}-pgvector
{command}    environment:
      POSTGRES_PASSWORD: ${{DB_PASSWORD}}
      POSTGRES_USER: ${{DB_USERNAME}}
      POSTGRES_DB: ${{DB_DATABASE_NAME}}
      POSTGRES_INITDB_ARGS: "--data-checksums"
    volumes:
      - ${{DB_DATA_LOCATION}}:/var/lib/postgresql/data
      - ./seed:/docker-entrypoint-initdb.d:ro
    stop_signal: SIGINT
"""
# Immich's documented command for its pgvecto.rs image, with pgvector's library in its place
# (pgvecto.rs is not in Debian's archive: the `vectors` schema is on search_path, empty)
PGVECTORS_COMMAND = (
    "    command: >-\n      postgres -c shared_preload_libraries=vector.so\n"
    "      -c 'search_path=\"$$user\", public, vectors' -c logging_collector=off\n"
)

ERAS = {"17": ("current", "asset", "asset_exif"), "18": ("legacy", "assets", "exif")}


@dataclass
class RealStack:
    major: str
    dir: Path
    library: Path
    db: str  # container name
    compose: list[str]

    def psql(self, sql: str, db: str = "immich") -> str:
        return docker("exec", self.db, "psql", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-qAtc", sql)

    def env(self, s3: dict[str, str]) -> dict[str, str]:
        return dict(s3, IMMICH_DIR=str(self.dir), DB_CONTAINER=self.db)


def _start(major: str, base: Path) -> RealStack:
    d = base / f"real{major}"
    library, seed = d / "library", d / "seed"
    library.mkdir(parents=True)
    seed.mkdir()
    for f in REAL.glob("*.sql"):
        shutil.copy(f, seed)
    if ERAS[major][0] == "legacy":
        for f in (REAL / "legacy").glob("*.sql"):
            shutil.copy(f, seed)
    command = PGVECTORS_COMMAND if major == "17" else ""
    (d / "docker-compose.yml").write_text(COMPOSE.format(major=major, command=command))
    (d / ".env").write_text(
        f"UPLOAD_LOCATION={library}\nDB_DATA_LOCATION=./postgres\nDB_PASSWORD=real-db-password\n"
        "DB_USERNAME=postgres\nDB_DATABASE_NAME=immich\n"
    )
    compose = [_tool("docker-compose"), "--project-directory", str(d), "-f", str(d / "docker-compose.yml")]
    subprocess.run(
        ["docker", "rm", "-f", f"immich_real{major}_server", f"immich_real{major}_postgres"], capture_output=True
    )
    subprocess.run([*compose, "up", "-d"], check=True, capture_output=True)
    return RealStack(major, d, library, f"immich_real{major}_postgres", compose)


def _ready(s: RealStack) -> bool:
    # the entrypoint's own server runs on the socket only: TCP answers once seeding is over
    ok = subprocess.run(["docker", "exec", s.db, "pg_isready", "-h", "127.0.0.1"], capture_output=True).returncode == 0
    if not ok and "ERROR" in subprocess.run(["docker", "logs", s.db], capture_output=True, text=True).stderr:
        raise AssertionError(f"seeding {s.db} failed: {docker('logs', s.db)}")
    return ok


def image_of(major: str) -> str:
    return f"immich-stream-test/postgres:{major}-pgvector"


def have_image(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


class Stacks(dict[str, RealStack]):
    """The started stacks; asking for a major whose image setup_machine.sh could not build
    (Debian's testing suite without the package that day) fails that test, naming why."""

    def __missing__(self, major: str) -> RealStack:
        pytest.fail(
            f"no image {image_of(major)}: tests/setup_machine.sh could not build it "
            f"(see /var/log/immich-stream-debootstrap-{major}.log)"
        )


@pytest.fixture(scope="module")
def real_stacks(machine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RealStack]]:
    base = tmp_path_factory.mktemp("real")
    stacks = Stacks({m: _start(m, base) for m in ERAS if have_image(image_of(m))})  # both seed at once
    try:
        for s in stacks.values():
            wait_for(lambda s=s: _ready(s), 120, 0.3, f"the database of {s.db}")
        yield stacks
    finally:
        for s in stacks.values():
            subprocess.run([*s.compose, "down"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def no_vector_image(machine: None) -> str:
    """PostgreSQL 17 without the vector extension (built locally once, cached by tag)."""
    if not have_image(image_of("17")):
        pytest.fail(f"no image {image_of('17')}: tests/setup_machine.sh could not build it")
    if not have_image(NO_VECTOR_IMAGE):
        dockerfile = (
            "FROM immich-stream-test/postgres:17-pgvector\nRUN rm -f /usr/share/postgresql/17/extension/vector[.-]*\n"
        )
        subprocess.run(
            ["docker", "build", "-q", "-t", NO_VECTOR_IMAGE, "-"],
            input=dockerfile.encode(),
            env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/local/bin:/usr/bin:/bin"},
            check=True,
            capture_output=True,
        )
    return NO_VECTOR_IMAGE


def throwaway_command(pid: int) -> str:
    """The command of the drill's throwaway container (labelled, named after the drill's pid)."""
    found: list[str] = []

    def seen() -> bool:
        names = docker("ps", "-a", "--filter", "label=immich-stream.drill", "--format", "{{.Names}}").split()
        for name in (n for n in names if n.startswith(f"immich-stream-drill-{pid}-")):
            cmd = subprocess.run(
                ["docker", "inspect", "-f", "{{json .Config.Cmd}}", name], capture_output=True, text=True
            )
            if cmd.returncode == 0:
                found.append(cmd.stdout)
        return bool(found)

    wait_for(seen, 60, 0.05, "the drill's throwaway container")
    return " ".join(json.loads(found[0]) or [])


def table_checksums(s: RealStack) -> dict[str, str]:
    """md5 of each table's rows in text form, in order: every value of every row, not a count."""
    tables = s.psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").split()
    sql = " UNION ALL ".join(
        f"SELECT '{t}', count(*) || ':' || md5(coalesce(string_agg(r::text, E'\\n' ORDER BY r::text), '')) "
        f'FROM public."{t}" r'
        for t in tables
    )
    return dict(line.split("|", 1) for line in s.psql(sql).splitlines())


PARIS = "ll_to_earth_public(48.8566, 2.3522)"
EARTH = (
    f"SELECT name FROM geodata_places WHERE earth_box({PARIS}, 3000000) @> ll_to_earth_public(latitude, longitude) "
    f"ORDER BY earth_distance({PARIS}, ll_to_earth_public(latitude, longitude)), id LIMIT 5"
)
PROBE = '(SELECT embedding FROM smart_search ORDER BY "assetId" LIMIT 1)'
NEAREST = f'SELECT "assetId" FROM smart_search ORDER BY embedding <=> {PROBE}, "assetId" LIMIT 5'


def searches(s: RealStack) -> dict[str, str]:
    """Immich's place search and CLIP search, exact (sequential scans), and the plans that
    must use the GiST and HNSW indexes."""
    exact = "SET enable_indexscan = off; SET enable_bitmapscan = off; "
    indexed = "SET enable_seqscan = off; "
    return {
        "places": s.psql(exact + EARTH),
        "nearest": s.psql(exact + NEAREST),
        "places_plan": s.psql(indexed + "EXPLAIN " + EARTH),
        "nearest_plan": s.psql(indexed + "EXPLAIN " + NEAREST.replace(', "assetId"', "")),
        "nearest_indexed": s.psql(indexed + NEAREST.replace(', "assetId"', "").replace("LIMIT 5", "LIMIT 1")),
    }


@pytest.mark.parametrize("major", sorted(ERAS))
def test_real_schema_round_trip(
    major: str, real_stacks: dict[str, RealStack], s3_env: dict[str, str], tmp_path: Path, no_vector_image: str
) -> None:
    s = real_stacks[major]
    era, asset, exif = ERAS[major]
    env = s.env(s3_env)
    make_library(s.library, photos=4, odd_names=False)
    before = table_checksums(s)
    found = searches(s)
    # the seed is what the tests claim: real rows, GPS, vectors, triggers fired, the right era
    assert int(before[asset].split(":")[0]) == 1199 and int(before["smart_search"].split(":")[0]) == 1199
    assert int(s.psql(f"SELECT count(*) FROM {exif} WHERE latitude IS NOT NULL AND city IS NOT NULL")) > 500
    assert before["asset_audit" if era == "current" else "assets_audit"].startswith("1:")
    assert before["user_audit" if era == "current" else "users_audit"].startswith("1:")
    assert s.psql("SELECT extname FROM pg_extension WHERE extname = 'vector'") == "vector"
    assert "IDX_geodata_gist_earthcoord" in found["places_plan"] and "clip_index" in found["nearest_plan"]
    assert len(found["places"].splitlines()) == 5 and len(found["nearest"].splitlines()) == 5

    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err

    proc = start_cli("drill", "--json", env=env)
    cmd = throwaway_command(proc.pid)  # what the drill's throwaway container runs
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err + out
    if major == "17":  # Immich's pgvecto.rs command, inherited: shared_preload_libraries, search_path
        assert "shared_preload_libraries=vector.so" in cmd and 'search_path="$user", public, vectors' in cmd, cmd
    report = json.loads(out)["summary"]
    assert report["ok"] and report["server_version"].startswith(f"{major}."), report
    assert report["earthdistance"].startswith("ok") and "places within 1000 km" in report["earthdistance"], report
    counts = {t.split(".", 1)[1].strip('"'): c["restored"] for t, c in report["tables"].items()}
    assert counts == {t: int(v.split(":")[0]) for t, v in before.items()}

    if major == "17":
        # an older major, then an image without pgvector: one line each, before any container runs
        for image, words in (
            (OLDER_IMAGE, "runs PostgreSQL 15, older than the dump's 17."),
            (no_vector_image, "lacks the extension vector"),
        ):
            r = run_cli("drill", "--image", image, env=env)
            assert r.code == 1 and words in r.last_error and "nothing was changed" in r.last_error, r.err
            assert len([ln for ln in r.err.splitlines() if "error" in ln.lower()]) == 1, r.err

    s.psql("DROP DATABASE immich WITH (FORCE)", db="postgres")  # the database is gone
    r = run_cli("restore", "--database", env=env)
    assert r.code == 0, r.err
    assert table_checksums(s) == before
    after = searches(s)
    assert after["places"] == found["places"] and after["nearest"] == found["nearest"]
    assert "IDX_geodata_gist_earthcoord" in after["places_plan"] and "clip_index" in after["nearest_plan"]
    assert after["nearest_indexed"] == found["nearest"].splitlines()[0]  # the probe finds itself through HNSW
    # the triggers came back and fire
    s.psql(f"DELETE FROM {asset} WHERE \"originalFileName\" = 'IMG_7.jpg'")
    assert s.psql(f"SELECT count(*) FROM {'asset_audit' if era == 'current' else 'assets_audit'}") == "2"

    r = run_cli("verify", "--read-data", env=env)
    assert r.code == 0, r.err


def test_immich_dump_job(real_stacks: dict[str, RealStack], s3_env: dict[str, str], tmp_path: Path) -> None:
    """Immich's own nightly dump (UPLOAD_LOCATION/backups/immich-db-backup-*.sql.gz, pg_dumpall
    gzipped) of a real-schema database: `snapshots` and `doctor` say the job is on and what it
    left; `--exclude backups` leaves the files out of the snapshot; `drill --from-file` and
    `restore --database --from-file` read such a file; doctor sees the job turned off."""
    s = real_stacks["17"]
    env = s.env(s3_env)
    make_library(s.library, photos=2, odd_names=False)  # with a stand-in of an old dump in backups/
    dumpall = subprocess.run(
        ["docker", "exec", s.db, "pg_dumpall", "--clean", "--if-exists", "--username=postgres"],
        capture_output=True,
        check=True,
    ).stdout
    name = f"immich-db-backup-{time.strftime('%Y%m%dT%H%M%S')}-v2.3.1-pg17.6.sql.gz"
    dump = s.library / "backups" / name
    dump.write_bytes(gzip.compress(dumpall, 1))
    before = table_checksums(s)

    r = run_cli("backup", "--stop", "none", "--exclude", "backups", env=env)
    assert r.code == 0, r.err
    r = run_cli("snapshots", env=env)
    assert r.code == 0, r.err
    job = next((ln for ln in r.out.splitlines() if ln.startswith("Immich's own database dumps, at ")), r.out)
    assert "on (0 02 * * *, keeps 14); 2 files in backups/" in job
    assert "left out of the snapshots (--exclude backups)" in job, r.out
    r = run_cli("restore", "--root", "library", "--to", str(tmp_path / "lib"), env=env)
    assert r.code == 0, r.err
    assert sorted(p.name for p in (tmp_path / "lib" / "backups").iterdir()) == [".immich"]  # the marker only
    assert "regenerate" not in r.out  # nothing to regenerate: our dump is the database

    r = run_cli("doctor", env=env)
    line = next(ln for ln in r.out.splitlines() if "Immich's own database dumps" in ln)
    assert "on (0 02 * * *, keeps 14); 2 files in backups/" in line and "--exclude backups" in line, r.out

    r = run_cli("drill", "--from-file", str(dump), "--json", env=env)
    assert r.code == 0, r.err + r.out
    assert json.loads(r.out)["summary"]["ok"]

    s.psql("DROP DATABASE immich WITH (FORCE)", db="postgres")
    r = run_cli("restore", "--database", "--from-file", str(dump), env=env)
    assert r.code == 0, r.err
    assert table_checksums(s) == before

    s.psql("""INSERT INTO system_metadata VALUES ('system-config', '{"backup": {"database": {"enabled": false}}}')""")
    r = run_cli("doctor", env=env)
    line = next(ln for ln in r.out.splitlines() if "Immich's own database dumps" in ln)
    assert "off; 2 files in backups/" in line, r.out


ALBUM_TABLES = {
    "current": ("album", "album_asset", "asset_file"),
    "legacy": ("albums", "albums_assets_assets", "asset_files"),
}


@pytest.mark.parametrize("major", sorted(ERAS))
def test_find_and_restore_a_deleted_album(
    major: str, real_stacks: dict[str, RealStack], s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Issue 26: every file the seeded database names exists in the library; after a backup
    and the deletion of an album's assets (rows and files), `find --album` lists them in the
    snapshot (from the catalog the backup stored, and from the dump when it is gone) and
    `restore --album` brings back exactly their originals and derived files, byte-identical."""
    s = real_stacks[major]
    era, asset, _ = ERAS[major]
    album, link, files = ALBUM_TABLES[era]
    env = s.env(s3_env)
    if era == "legacy":  # and an encrypted repository: the catalog is sealed like the dump
        identity = tmp_path / "age.key"
        subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
        env["IMMICH_STREAM_AGE_IDENTITY"] = str(identity)
    name = "Album 1 of User 2"
    if not (s.library / "library" / ".immich").exists():  # run alone: Immich's marker files first
        make_library(s.library, photos=2, odd_names=False)
    paths = s.psql(
        f'SELECT "originalPath" FROM {asset} UNION SELECT "encodedVideoPath" FROM {asset} '
        f"UNION SELECT path FROM {files}"
    ).splitlines()
    for p in paths:
        if p.startswith("/data/"):
            f = s.library / p[len("/data/") :]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(f"{major} {p}\n".encode() * (1 + len(p) % 5))
    in_album = (
        f'SELECT l."assetsId" FROM {link} l JOIN {album} al ON al.id = l."albumsId" WHERE al."albumName" = \'{name}\''
    )
    wanted = s.psql(
        f'SELECT "originalPath" FROM {asset} WHERE id IN ({in_album}) UNION SELECT "encodedVideoPath" FROM {asset} '
        f"WHERE id IN ({in_album}) AND \"encodedVideoPath\" <> '' UNION SELECT path FROM {files} "
        f'WHERE "assetId" IN ({in_album})'
    ).splitlines()
    assert len(wanted) > 60 and all(p.startswith("/data/") for p in wanted)
    before = {p[len("/data/") :].encode(): (s.library / p[len("/data/") :]).read_bytes() for p in wanted}

    r = run_cli("backup", "--stop", "none", "--exclude", "backups", env=env)
    assert r.code == 0, r.err
    for p in wanted:  # the album's assets deleted: files and rows
        (s.library / p[len("/data/") :]).unlink()
    s.psql(f"DELETE FROM {asset} WHERE id IN ({in_album})")

    r = run_cli("find", "--album", name, env=env)
    assert r.code == 0, r.err
    for rel in before:
        assert f"library/{rel.decode()}" in r.out
    assert "reading the snapshot's dump" not in r.err, r.err  # the stored catalog answered (sealed or not)
    stored = r.out
    bucket = bucket_of(s3_env)
    catalogs = [k for k in bucket.keys() if k.endswith("/catalog.jsonl.gz")]
    assert len(catalogs) == 1  # written by the backup
    raw = bucket.get(catalogs[0])
    if era == "legacy":
        assert raw.startswith(b"age-encryption.org/v1\n")
    else:
        assert f'"{name}"'.encode() in gzip.decompress(raw)
    # a catalog altered behind the tool's back (no key needed to write a plain or an age
    # file) is not believed: it does not match snapshot.json, and the dump answers
    forged = {"catalog": 1, "era": "new", "tables": {}, "assets": 0, "users": [], "albums": [name], "people": []}
    bucket.put(catalogs[0], gzip.compress(json.dumps(forged).encode() + b"\n"))
    r = run_cli("find", "--album", name, env=env)
    assert (r.code, r.out) == (0, stored), r.err
    assert "does not match snapshot.json" in r.err or "cannot be read" in r.err, r.err
    bucket.delete(catalogs[0])
    r = run_cli("find", "--album", name, env=env)  # none stored: the dump answers
    assert (r.code, r.out) == (0, stored), r.err

    target = tmp_path / "album"
    r = run_cli("restore", "--album", name, "--to", str(target), env=env)
    assert r.code == 0, r.err
    got = {rel: p.read_bytes() for rel, p in tree(target).items() if p.is_file()}
    assert got == before  # exactly those files, byte-identical, in UPLOAD_LOCATION's layout
