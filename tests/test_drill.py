"""drill, and snapshots that know where they came from: every backup is proven to restore,
in a throwaway PostgreSQL container, never the live database."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from immich_stream.host.metadata import redact
from tests.conftest import CONTAINERS, ImmichStack, docker, running_containers
from tests.helpers import Bucket, make_library, run_cli, start_cli, wait_for

LABEL = "immich-stream.drill"
NO_EARTH_IMAGE = "immich-stream-test/postgres:15-noearth"
TABLES = ("users", "assets", "exif", "albums", "albums_assets", "geodata_places")


def drill_leftovers() -> list[str]:
    containers = docker("ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.Names}}").split()
    volumes = docker("volume", "ls", "--filter", f"label={LABEL}", "--format", "{{.Name}}").split()
    return [f"container {c}" for c in containers] + [f"volume {v}" for v in volumes]


def wait_drill_container(pid: int) -> None:
    mine = f"container immich-stream-drill-{pid}-"
    wait_for(lambda: any(x.startswith(mine) for x in drill_leftovers()), 60, 0.05, "the drill container")


def row_counts(stack: ImmichStack) -> dict[str, int]:
    return {f"public.{t}": int(stack.psql(f"SELECT count(*) FROM {t}")) for t in TABLES}


@pytest.fixture(scope="session")
def no_earth_image(machine: None) -> str:
    """The test image without the earthdistance extension (built locally, cached by tag)."""
    if subprocess.run(["docker", "image", "inspect", NO_EARTH_IMAGE], capture_output=True).returncode != 0:
        dockerfile = (
            "FROM immich-stream-test/postgres:15\nRUN rm -f /usr/share/postgresql/15/extension/earthdistance*\n"
        )
        subprocess.run(
            ["docker", "build", "-q", "-t", NO_EARTH_IMAGE, "-"],
            input=dockerfile.encode(),
            env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/local/bin:/usr/bin:/bin"},
            check=True,
            capture_output=True,
        )
    return NO_EARTH_IMAGE


@pytest.fixture
def backed_up(env: dict, stack: ImmichStack, bucket: Bucket) -> str:
    make_library(stack.library, photos=6, odd_names=False)
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    [sid] = bucket.snapshots()
    return sid


def test_snapshot_records_what_a_restore_needs(env: dict, stack: ImmichStack, bucket: Bucket, backed_up: str) -> None:
    db = bucket.snapshot(backed_up)["database"]
    counts = row_counts(stack)
    assert {t: db["tables"][t] for t in counts} == counts  # counted from the COPY blocks as the dump streamed
    assert db["server_version"].startswith("15.") and db["server_version_num"] // 10000 == 15
    assert {"cube", "earthdistance", "pg_trgm", "unaccent", "plpgsql"} <= set(db["extensions"])
    assert db["image"] == "immich-stream-test/postgres:15" and db["image_id"].startswith("sha256:")
    immich = bucket.snapshot(backed_up)["immich"]
    assert immich["image"] == "immich-stream-test/postgres:15" and immich["container"] == "immich_server"

    r = run_cli("snapshots", env=env)
    assert r.code == 0 and "postgres" in r.out and " 15." in r.out, r.out
    [row] = json.loads(run_cli("snapshots", "--json", env=env).out)["summary"]["snapshots"]
    assert row["postgres_version"].startswith("15.") and row["tables"]["public.assets"] == counts["public.assets"]


def test_drill_of_a_good_snapshot_passes(env: dict, stack: ImmichStack, backed_up: str) -> None:
    before = stack.started_at()
    stack.psql("CREATE TABLE drill_canary (x int)")  # the live database must not be touched
    try:
        r = run_cli("drill", "latest", "--files", "3", "--json", env=env)
        assert r.code == 0, r.err + r.out
        report = json.loads(r.out)["summary"]
        assert report["ok"] and report["mismatches"] == [] and report["expected_from"] == "snapshot.json"
        assert report["tables"]["public.assets"]["restored"] == 90000
        assert report["earthdistance"].startswith("ok")
        assert report["files_checked"] == 3
        assert stack.started_at() == before and running_containers() == set(CONTAINERS)
        assert stack.psql("SELECT count(*) FROM drill_canary") == "0"
    finally:
        stack.psql("DROP TABLE drill_canary")
    assert drill_leftovers() == []


def test_drill_files_reads_every_form_and_names_a_damaged_blob(env: dict, bucket: Bucket, backed_up: str) -> None:
    """--files reads each file as its line stores it (docs/format.md: a blob of a pack by its
    range, an object of its own whole) and names exactly the file whose bytes are wrong."""
    library = [m for m in bucket.manifest(backed_up) if m["root"] == "library" and m["type"] == "file"]
    assert any("offset" in m for m in library) and any("offset" not in m for m in library)
    r = run_cli("drill", "latest", "--files", str(len(library)), "--json", env=env)
    assert r.code == 0, r.err + r.out
    report = json.loads(r.out)["summary"]
    assert report["mismatches"] == [] and report["files_checked"] == len(library)
    assert report["files_bytes"] == sum(m["size"] for m in library)
    blob = max((m for m in library if "offset" in m), key=lambda m: m["size"])
    data = bytearray(bucket.get(blob["key"]))
    data[blob["offset"] + blob["size"] // 2] ^= 0xFF
    bucket.put(blob["key"], bytes(data))
    r = run_cli("drill", "latest", "--files", str(len(library)), "--json", env=env)
    assert r.code == 1, r.err + r.out
    [bad] = json.loads(r.out)["summary"]["mismatches"]
    assert bad.startswith(f"library/{blob['path']}: ") and "manifest says" in bad, bad


def test_drill_interrupted_leaves_nothing_behind(env: dict, stack: ImmichStack, backed_up: str) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = start_cli("drill", env=env)
        wait_drill_container(proc.pid)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=90)
        assert proc.returncode in (130, 143), err
        assert drill_leftovers() == [], err
    # SIGKILL: nothing can clean up; the next drill removes what the dead one left
    proc = start_cli("drill", env=env)
    wait_drill_container(proc.pid)
    proc.kill()
    proc.communicate(timeout=30)
    assert any(f"immich-stream-drill-{proc.pid}-" in x for x in drill_leftovers())
    r = run_cli("drill", env=env)
    assert r.code == 0, r.err
    assert drill_leftovers() == []
    assert running_containers() == set(CONTAINERS)


def test_drill_names_the_table_whose_rows_do_not_match(env: dict, bucket: Bucket, backed_up: str) -> None:
    key = f"snapshots/{backed_up}/snapshot.json"
    good = bucket.get(key)
    meta = json.loads(good)
    meta["database"]["tables"]["public.albums"] += 1
    bucket.put(key, json.dumps(meta).encode())
    r = run_cli("drill", env=env)
    assert r.code == 1, r.err
    assert "mismatch  table public.albums: 100 rows restored, snapshot.json records 101" in r.out
    assert "1 mismatches" in r.last_error
    bucket.put(key, good)

    dump = f"snapshots/{backed_up}/database.sql.gz"
    bucket.put(dump, bucket.get(dump)[:-5000])  # truncated
    r = run_cli("drill", env=env)
    assert r.code == 1 and "truncated" in r.last_error, r.err


def test_incompatible_image_refused_before_anything_changes(
    env: dict, stack: ImmichStack, backed_up: str, no_earth_image: str
) -> None:
    r = run_cli("drill", "--image", no_earth_image, env=env)
    assert r.code == 1
    assert "lacks the extension earthdistance" in r.last_error and "nothing was changed" in r.last_error, r.err
    assert "PostgreSQL 15." in r.last_error  # names the image the snapshot came from

    # restore --database into a server without earthdistance: refused, the stack not stopped
    name = "immich_stream_noearth_pg"
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    docker("run", "-d", "--name", name, "--network", "none", "-e", "POSTGRES_PASSWORD=x", no_earth_image)
    try:
        wait_for(
            lambda: subprocess.run(["docker", "exec", name, "pg_isready", "-h", "127.0.0.1"]).returncode == 0,
            60,
            0.2,
            "the server without earthdistance",
        )
        before = stack.started_at()
        r = run_cli("restore", "--database", env=dict(env, DB_CONTAINER=name))
        assert r.code == 1 and "lacks the extension earthdistance" in r.last_error, r.err
        assert stack.started_at() == before
        tables = docker(
            "exec", name, "psql", "-U", "postgres", "-Atc", "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        assert tables == "0"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_pg_dumpall_file_restores_and_drills(env: dict, stack: ImmichStack, tmp_path: Path) -> None:
    """Immich before 2.5 and its own nightly backups/ files: pg_dumpall output, gzipped."""
    counts = row_counts(stack)
    dumpall = subprocess.run(
        ["docker", "exec", "immich_postgres", "pg_dumpall", "--clean", "--if-exists", "--username=postgres"],
        capture_output=True,
        check=True,
    ).stdout
    path = tmp_path / "immich-db-backup-1700000000000.sql.gz"
    path.write_bytes(gzip.compress(dumpall, 1))

    r = run_cli("drill", "--from-file", str(path), "--json", env=env)
    assert r.code == 0, r.err + r.out
    report = json.loads(r.out)["summary"]
    assert report["expected_from"] == "the dump"
    assert {t: report["tables"][t]["restored"] for t in counts} == counts

    stack.psql("DELETE FROM albums_assets")
    stack.psql("DROP TABLE exif")
    proc = subprocess.run(
        [sys.executable, "-m", "immich_stream", "restore", "--database", "--from-file", "-"],
        input=dumpall,
        env=env,
        capture_output=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert row_counts(stack) == counts
    assert running_containers() == set(CONTAINERS)


def test_config_files_round_trip_without_secrets(env: dict, stack: ImmichStack, bucket: Bucket, tmp_path: Path) -> None:
    make_library(stack.library, photos=2, odd_names=False)
    dotenv = stack.dir / ".env"
    original = dotenv.read_text()
    extra = "IMMICH_VERSION=v1.123.4\nJWT_SECRET=jwt-secret-value\nMAPS_API_KEY='key-value'\n"
    dotenv.write_text(original + extra)
    try:
        r = run_cli("backup", "--stop", "none", env=env)
        assert r.code == 0, r.err
    finally:
        dotenv.write_text(original)
    [sid] = bucket.snapshots()
    raw = bucket.get(f"snapshots/{sid}/snapshot.json").decode()
    for secret in ("test-db-password", "jwt-secret-value", "key-value"):
        assert secret not in raw
    assert json.loads(raw)["immich"]["version"] == "v1.123.4"
    assert "v1.123.4" in run_cli("snapshots", env=env).out

    out = tmp_path / "rebuild"
    r = run_cli("restore", "latest", "--config-files", "--to", str(out), env=env)
    assert r.code == 0, r.err
    assert "DB_PASSWORD" in r.out and "JWT_SECRET" in r.out and "MAPS_API_KEY" in r.out
    # everything but the placeholders' entrypoint command line (not known to be harmless)
    compose = (stack.dir / "docker-compose.yml").read_text()
    assert (out / "docker-compose.yml").read_text() == redact("docker-compose.yml", compose)[0]
    assert "image: ${IMMICH_TEST_DB_IMAGE:-immich-stream-test/postgres:15}" in compose
    expected = (original + extra).replace("test-db-password", "immich-stream-removed-secret")
    expected = expected.replace("jwt-secret-value", "immich-stream-removed-secret")
    expected = expected.replace("'key-value'", "immich-stream-removed-secret")
    assert (out / ".env").read_text() == expected
    assert (out / ".env").stat().st_mode & 0o077 == 0
