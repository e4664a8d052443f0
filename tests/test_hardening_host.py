"""Issue 22, the host's side: Immich folders that are symlinks, a database emptied behind
our back, a plain dump cut short, a backup container inside Immich's own compose project,
a drill on an image that creates no database, progress bars on a terminal, and a one-off
container run whose recovery file would vanish with it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from immich_stream.config import format_size
from tests.conftest import CONTAINERS, KEY, SECRET, ImmichStack, docker, running_containers
from tests.helpers import Bucket, make_library, run_cli, tree, wait_for
from tests.test_image import image  # noqa: F401 - the fixture that builds the project's image

# -- 4: Immich folders that are symlinks -----------------------------------------------------


def test_symlinked_immich_folders_are_backed_up_and_restored(
    env: dict, stack: ImmichStack, bucket: Bucket, tmp_path: Path
) -> None:
    """`library -> /mnt/photos` (and UPLOAD_LOCATION itself a symlink): the photos are in the
    snapshot and come back byte-identical, never an exit 0 without them."""
    written = make_library(stack.library, photos=8, odd_names=False)
    elsewhere = tmp_path / "mnt-photos"
    shutil.move(stack.library / "library", elsewhere)
    (stack.library / "library").symlink_to(elsewhere)
    upload_link = tmp_path / "upload-location"
    upload_link.symlink_to(stack.library)
    r = run_cli("backup", "--stop", "none", env=dict(env, LIBRARY_DIR=str(upload_link)))
    assert r.code == 0, r.err
    [sid] = bucket.snapshots()
    lib = {m["path"]: m for m in bucket.manifest(sid) if m["root"] == "library"}
    assert lib["library"]["type"] == "dir"
    photos = [p for p in written if p.startswith(b"library/")]
    assert len(photos) > 8 and all(p.decode() in lib for p in photos)

    r = run_cli("restore", sid, "--to", str(tmp_path / "back"), env=env)
    assert r.code == 0, r.err
    back = tree(tmp_path / "back" / "library")
    assert {p: __import__("hashlib").sha256(back[p].read_bytes()).hexdigest().encode() for p in back} == written
    assert not (tmp_path / "back" / "library" / "library").is_symlink()


def test_a_broken_symlinked_folder_is_refused(env: dict, stack: ImmichStack, bucket: Bucket, tmp_path: Path) -> None:
    make_library(stack.library, photos=3, odd_names=False)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    shutil.move(stack.library / "library", tmp_path / "gone")
    (stack.library / "library").symlink_to(tmp_path / "unmounted")
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 4, r.err
    assert "library" in r.last_error and len(bucket.snapshots()) == 1


# -- 5: the database's shrink guard ----------------------------------------------------------


def test_emptied_database_is_refused_unless_allow_shrink(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, photos=3, odd_names=False)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    [good] = bucket.snapshots()
    try:
        stack.psql("TRUNCATE users CASCADE")  # a fresh schema: users, assets, exif, albums all empty
        before = stack.started_at()
        r = run_cli("backup", env=env)
        assert r.code == 4, r.err
        assert "public.assets" in r.last_error and "public.exif" in r.last_error, r.err
        assert "--allow-shrink" in r.last_error
        assert len([ln for ln in r.err.splitlines() if ln.startswith("immich-stream: error:")]) == 1
        assert bucket.snapshots() == [good]
        assert stack.started_at() == before  # refused before anything was stopped

        r = run_cli("backup", "--allow-shrink", env=env)
        assert r.code == 0, r.err
        new = [s for s in bucket.snapshots() if s != good]
        assert len(new) == 1 and bucket.snapshot(new[0])["database"]["tables"]["public.assets"] == 0
        assert running_containers() == set(CONTAINERS)
    finally:
        r = run_cli("restore", "--database", good, env=env)
        assert r.code == 0, r.err
    assert stack.psql("SELECT count(*) FROM assets") == "90000"


# -- 5b: a plain dump cut at a statement boundary --------------------------------------------


def test_plain_dump_cut_at_a_statement_boundary_changes_nothing(env: dict, stack: ImmichStack, tmp_path: Path) -> None:
    sql = subprocess.run(
        ["docker", "exec", "immich_postgres", "pg_dump", "--clean", "--if-exists", "-U", "postgres", "immich"],
        capture_output=True,
        check=True,
    ).stdout
    assert b"-- PostgreSQL database dump complete" in sql[-200:]
    # after the last COPY block, before the constraints and indexes: a dump that restores
    # tables without their keys
    cut = sql.index(b"\nALTER TABLE ONLY ", sql.rindex(b"\n\\.\n")) + 1
    (tmp_path / "cut.sql").write_bytes(sql[:cut])
    (tmp_path / "whole.sql").write_bytes(sql)
    albums = stack.psql("SELECT count(*) FROM albums_assets")
    assert int(albums) > 0
    stack.psql("DELETE FROM albums_assets")
    try:
        started = time.monotonic()
        r = run_cli("restore", "--database", "--from-file", str(tmp_path / "cut.sql"), env=env)
        assert r.code == 1, r.err
        assert "PostgreSQL database dump complete" in r.last_error and "not changed" in r.last_error, r.err
        assert stack.psql("SELECT count(*) FROM albums_assets") == "0"  # rolled back
        assert stack.psql("SELECT count(*) FROM pg_indexes WHERE indexname = 'IDX_assets_owner'") == "1"
        assert running_containers() == set(CONTAINERS)
        assert time.monotonic() - started < 120
    finally:
        r = run_cli("restore", "--database", "--from-file", str(tmp_path / "whole.sql"), env=env)
        assert r.code == 0, r.err
    assert stack.psql("SELECT count(*) FROM albums_assets") == albums


# -- 22: the drill on an image that creates no database; a restore failing at once -----------

NO_DB_IMAGE = "immich-stream-test/postgres:15-nodb"


@pytest.fixture(scope="module")
def no_db_image(machine: None) -> str:
    """The test image, but its entrypoint ignores POSTGRES_DB (as some images do)."""
    dockerfile = (
        "FROM immich-stream-test/postgres:15\n"
        'ENTRYPOINT ["/usr/bin/env", "-u", "POSTGRES_DB", "/usr/local/bin/docker-entrypoint.sh"]\n'
    )
    subprocess.run(
        ["docker", "build", "-q", "-t", NO_DB_IMAGE, "-"],
        input=dockerfile.encode(),
        env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/local/bin:/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )
    return NO_DB_IMAGE


def _plain_dump() -> bytes:
    return subprocess.run(
        ["docker", "exec", "immich_postgres", "pg_dump", "--clean", "--if-exists", "-U", "postgres", "immich"],
        capture_output=True,
        check=True,
    ).stdout


def test_drill_creates_the_database_an_image_does_not(
    env: dict, stack: ImmichStack, tmp_path: Path, no_db_image: str
) -> None:
    path = tmp_path / "dump.sql"
    path.write_bytes(_plain_dump())
    r = run_cli("drill", "--from-file", str(path), "--image", no_db_image, "--json", env=env)
    assert r.code == 0, r.err + r.out
    report = json.loads(r.out)["summary"]
    assert report["ok"] and report["tables"]["public.assets"]["restored"] == 90000


def test_drill_reports_a_failed_restore_when_it_fails(env: dict, stack: ImmichStack, tmp_path: Path) -> None:
    sql = _plain_dump()
    head = sql.index(b"\nCREATE TABLE ") + 1
    path = tmp_path / "bad.sql"
    path.write_bytes(sql[:head] + b"SELECT * FROM no_such_table_here;\n" + sql[head:])
    started = time.monotonic()
    r = run_cli("drill", "--from-file", str(path), env=env)
    took = time.monotonic() - started
    assert r.code == 1, r.err
    assert "no_such_table_here" in r.last_error, r.err
    assert took < 30, f"the drill took {took:.0f} s to report a psql that failed at once"


# -- 23: progress on a terminal; the summary's "uploaded" -----------------------------------


def test_uploaded_counts_the_live_pass_too(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, photos=10, odd_names=False)
    r = run_cli("backup", "--stop", "all", "--json", env=env)
    assert r.code == 0, r.err
    summary = json.loads(r.out)["summary"]
    added = sum(bucket.keys("data/").values())
    assert summary["live_files"]["bytes_uploaded"] > 0  # the live pass uploaded most of it
    assert summary["bytes_uploaded"] == added
    r = run_cli("snapshots", "--json", env=env)
    assert r.code == 0, r.err
    [row] = json.loads(r.out)["summary"]["snapshots"]
    assert row["bytes_new"] == added

    (stack.library / "library" / "new-photo.jpg").write_bytes(b"x" * 300_000)
    before = sum(bucket.keys("data/").values())
    r = run_cli("backup", "--stop", "all", env=env)
    assert r.code == 0, r.err
    added = sum(bucket.keys("data/").values()) - before
    line = next(ln for ln in r.out.splitlines() if ln.startswith("bytes "))
    assert line.endswith(f"{format_size(added)} uploaded"), (line, added)


# -- 5c and 24: the image as a sidecar -------------------------------------------------------

SIDECAR = "immich_backup_sidecar_test"
STATE_VOLUME = "immich-stream-test-state"


def _sidecar_args(env: dict, stack: ImmichStack) -> list[str]:
    settings = {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "S3_ENDPOINT_URL": env["S3_ENDPOINT_URL"],
        "S3_BUCKET": env["S3_BUCKET"],
        "S3_PATH_STYLE": "true",
        "COMPOSE_PROJECT_NAME": "immich",
        "DB_CONTAINER": "immich_postgres",
        "LIBRARY_DIR": "/data/library",
        "POSTGRES_DIR": "/data/postgres",
        "IMMICH_STREAM_TEST_AUTO_INIT": "1",  # a fresh bucket, as the rest of the suite (init: test_image)
    }
    return [
        "--network",
        "host",
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        "-v",
        f"{stack.library}:/data/library:ro",
        "-v",
        f"{stack.postgres}:/data/postgres:ro",
        *[a for k, v in settings.items() for a in ("-e", f"{k}={v}")],
    ]


def test_sidecar_in_immichs_compose_project_never_stops_itself(
    image: str,  # noqa: F811
    env: dict,
    stack: ImmichStack,
    bucket: Bucket,
) -> None:
    """A backup service added to Immich's own docker-compose.yml: the stack is stopped
    around it, it runs to its end, and the app containers run again."""
    make_library(stack.library, photos=4, odd_names=False)
    subprocess.run(["docker", "rm", "-f", SIDECAR], capture_output=True)
    before = stack.started_at()
    try:
        docker(
            "run",
            "-d",
            "--name",
            SIDECAR,
            "--label",
            "com.docker.compose.project=immich",
            "--label",
            "com.docker.compose.service=immich-backup",
            "-v",
            f"{STATE_VOLUME}:/state",
            *_sidecar_args(env, stack),
            image,
            "backup",
        )
        code = int(subprocess.run(["docker", "wait", SIDECAR], capture_output=True, text=True, timeout=240).stdout)
        logs = subprocess.run(["docker", "logs", SIDECAR], capture_output=True, text=True).stderr
        assert code == 0, logs
        assert docker("inspect", "-f", "{{.State.OOMKilled}} {{.RestartCount}}", SIDECAR) == "false 0"
        assert not re.search(rf"stopping [^\n]*{SIDECAR}", logs), logs
        assert f"{SIDECAR}" in logs and "left running" in logs, logs
        assert len(bucket.snapshots()) == 1
        assert all(stack.started_at()[c] != before[c] for c in CONTAINERS)  # the rest was stopped around it
        wait_for(lambda: running_containers() >= set(CONTAINERS), 30, 0.2, "the stack")
    finally:
        subprocess.run(["docker", "rm", "-f", SIDECAR], capture_output=True)
        subprocess.run(["docker", "volume", "rm", "-f", STATE_VOLUME], capture_output=True)


def test_one_off_container_without_a_state_volume_stops_nothing(
    image: str,  # noqa: F811
    env: dict,
    stack: ImmichStack,
    bucket: Bucket,
) -> None:
    """`docker run --rm` without /state mounted: its record of what it stopped would go with
    it, so a killed run would leave Immich down with nothing to start it again. Refused
    before anything is stopped; --stop none (which stops nothing) still runs."""
    make_library(stack.library, photos=2, odd_names=False)
    before = stack.started_at()
    proc = subprocess.run(
        ["docker", "run", "--rm", *_sidecar_args(env, stack), image, "backup"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("immich-stream: error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and "/state" in errors[0] and "-v" in errors[0], proc.stderr
    assert stack.started_at() == before and bucket.snapshots() == []
    proc = subprocess.run(
        ["docker", "run", "--rm", *_sidecar_args(env, stack), image, "backup", "--stop", "none"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(bucket.snapshots()) == 1


def test_killed_sidecar_is_repaired_by_the_next_container_run(
    image: str,  # noqa: F811
    env: dict,
    stack: ImmichStack,
    bucket: Bucket,
) -> None:
    """A sidecar killed with the stack stopped: the next container run, sharing the state
    volume (and, with host networking, the host name, and pid 1), starts the stack first."""
    make_library(stack.library, photos=2, odd_names=False)
    subprocess.run(["docker", "rm", "-f", SIDECAR], capture_output=True)
    subprocess.run(["docker", "volume", "rm", "-f", STATE_VOLUME], capture_output=True)
    common = [
        "--label",
        "com.docker.compose.project=immich",
        "-v",
        f"{STATE_VOLUME}:/state",
        *_sidecar_args(env, stack),
    ]
    try:
        # slowed down so that it is caught with the stack stopped
        docker("run", "-d", "--name", SIDECAR, *common, "-e", "IMMICH_STREAM_LIMIT_UPLOAD=2", image, "backup")

        def stopped() -> bool:
            logs = subprocess.run(["docker", "logs", SIDECAR], capture_output=True, text=True).stderr
            return "stopping immich_postgres" in logs

        wait_for(stopped, 180, 0.1, "the sidecar to stop the stack")
        docker("kill", SIDECAR)
        assert "immich_server" not in running_containers()
        proc = subprocess.run(
            ["docker", "run", "--rm", *common, image, "backup", "--stop", "none"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr
        assert "was killed with the stack stopped" in proc.stderr
        assert running_containers() >= set(CONTAINERS)
    finally:
        subprocess.run(["docker", "rm", "-f", SIDECAR], capture_output=True)
        subprocess.run(["docker", "volume", "rm", "-f", STATE_VOLUME], capture_output=True)
        stack.ensure_running()
