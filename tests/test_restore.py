"""restore, verify, snapshots: every backup can come back, byte for byte and row for row."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import stat
import subprocess
from pathlib import Path

from tests.conftest import CONTAINERS, ImmichStack, bucket_of, docker, running_containers
from tests.faultproxy import any_request
from tests.helpers import USER_ID, Bucket, make_library, run_cli, start_cli, tree, wait_for

TABLES = ("users", "assets", "exif", "albums", "albums_assets", "geodata_places")
NEAR_ZERO = 'SELECT count(*) FROM geodata_places WHERE earth_box(ll_to_earth(0, 0), 2000000) @> "earthCoord"'


def snapshot_of_tree(root: Path) -> dict[bytes, tuple[str, int, int]]:
    return {
        rel: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
        for rel, p in tree(root).items()
    }


def row_counts(stack: ImmichStack) -> dict[str, str]:
    return {t: stack.psql(f"SELECT count(*) FROM {t}") for t in TABLES}


def test_round_trip_files_and_database(env: dict, stack: ImmichStack, bucket: Bucket, tmp_path: Path) -> None:
    make_library(stack.library, photos=30)
    os.chmod(stack.library / "profile" / USER_ID / "avatar.jpg", 0o600)
    before_files = snapshot_of_tree(stack.library)
    before_rows = row_counts(stack)
    near = stack.psql(NEAR_ZERO)
    assert run_cli("backup", env=env).code == 0

    # disaster: the library and the database are gone
    stack.clear_library()
    stack.psql("DROP DATABASE immich WITH (FORCE)", db="postgres")
    stack.psql("CREATE DATABASE immich", db="postgres")
    assert stack.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == "0"

    r = run_cli("restore", "latest", "--root", "library", "--to", str(stack.library), env=env)
    assert r.code == 0, r.err
    assert snapshot_of_tree(stack.library) == before_files  # bytes, mtimes and modes

    r = run_cli("restore", "--database", env=env)
    assert r.code == 0, r.err
    assert "restored database immich from snapshot" in r.out
    assert row_counts(stack) == before_rows
    assert stack.psql(NEAR_ZERO) == near  # earthdistance works: the search_path correction applied
    assert running_containers() == set(CONTAINERS)


def test_restored_cold_copy_of_postgres_starts(env: dict, stack: ImmichStack, tmp_path: Path) -> None:
    make_library(stack.library, photos=3)
    rows = stack.psql("SELECT count(*) FROM assets")
    assert run_cli("backup", env=env).code == 0
    target = tmp_path / "pgdata"
    r = run_cli("restore", "--root", "postgres", "--to", str(target), env=env)
    assert r.code == 0, r.err
    assert stat.S_IMODE(target.stat().st_mode) in (0o700, 0o750)
    assert (target / "pg_tblspc").is_dir() and not (target / "postmaster.pid").exists()
    owner = (stack.postgres / "PG_VERSION").stat().st_uid
    assert (target / "PG_VERSION").stat().st_uid == owner  # ownership kept (restored as root)
    name = "immich_stream_restored_pg"
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    docker("run", "-d", "--name", name, "-v", f"{target}:/var/lib/postgresql/data", "immich-stream-test/postgres:15")
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    ["docker", "exec", name, "pg_isready", "-h", "127.0.0.1", "-U", "postgres"], capture_output=True
                ).returncode
                == 0
            ),
            60,
            0.2,
            "the restored cluster",
        )
        assert (
            docker("exec", name, "psql", "-U", "postgres", "-d", "immich", "-Atc", "SELECT count(*) FROM assets")
            == rows
        )
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_older_snapshot_gives_older_versions(env: dict, stack: ImmichStack, tmp_path: Path) -> None:
    make_library(stack.library, photos=5)
    photo = next((stack.library / "library").rglob("IMG_*.jpg"))
    old = photo.read_bytes()
    env_none = dict(env, IMMICH_STREAM_STOP="none")
    assert run_cli("backup", env=env_none).code == 0
    photo.write_bytes(b"edited " + old)
    (stack.library / "library" / "later.jpg").write_bytes(b"new later")
    assert run_cli("backup", env=env_none).code == 0
    first, second = bucket_of(env).snapshots()
    rel = photo.relative_to(stack.library)
    r = run_cli("restore", first, "--to", str(tmp_path / "old"), env=env)
    assert r.code == 0, r.err
    assert (tmp_path / "old" / "library" / rel).read_bytes() == old
    assert not (tmp_path / "old" / "library" / "library" / "later.jpg").exists()
    r = run_cli("restore", second, "--to", str(tmp_path / "new"), "--include", "library/*", env=env)
    assert r.code == 0, r.err
    assert (tmp_path / "new" / "library" / rel).read_bytes() == b"edited " + old
    assert not (tmp_path / "new" / "library" / "thumbs").exists()  # --include kept to library/


def test_verify_finds_missing_and_corrupt_objects(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    """Every form of stored bytes (docs/format.md): an object of its own lost, one byte of a
    blob in a pack flipped, one byte of a database chunk flipped: the listing sees the loss,
    --read-data the flips, and each file whose bytes are wrong is named, no other."""
    make_library(stack.library, photos=8, large=[700_000])
    assert run_cli("backup", env=env).code == 0  # the cold copy too: the data directory as chunks
    r = run_cli("verify", "--read-data", env=env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err
    [sid] = bucket.snapshots()
    files = [m for m in bucket.manifest(sid) if m["type"] == "file" and m["size"] > 100]
    whole = next(m for m in files if m.get("key") and "offset" not in m)
    blob = next(m for m in files if "offset" in m)
    chunked = next(m for m in files if m.get("chunks"))
    chunk = chunked["chunks"][0]
    every = [m for m in bucket.manifest(sid) if m["type"] == "file"]
    sharing = {m["path"] for m in every if any(c[:3] == chunk[:3] for c in m.get("chunks") or [])}
    missing = whole["key"]
    bucket.delete(missing)
    for key, at in ((blob["key"], blob["offset"] + blob["size"] // 2), (chunk[0], chunk[1] + chunk[2] // 2)):
        data = bytearray(bucket.get(key))
        data[at] ^= 0xFF  # same size, one byte flipped behind its back
        bucket.put(key, bytes(data))

    r = run_cli("verify", env=env)
    assert r.code == 1
    assert f"missing object {missing} (library/{whole['path']})" in r.out
    assert "corrupt" not in r.out  # sizes alone cannot see a flip
    r = run_cli("verify", "--read-data", env=env)
    assert r.code == 1
    assert f"missing object {missing}" in r.out
    assert [ln for ln in r.out.splitlines() if f"corrupt object {blob['key']} " in ln and "library/" in ln] == [
        next(ln for ln in r.out.splitlines() if f"(library/{blob['path']})" in ln)
    ], r.out  # the one file of the pack, not its neighbours
    named = {
        ln.split("(postgres/", 1)[1].split(")", 1)[0] for ln in r.out.splitlines() if f"corrupt object {chunk[0]}" in ln
    }
    assert named == sharing, r.out
    assert f"{2 + len(sharing)} problems found" in r.last_error, r.out

    dump = f"snapshots/{sid}/database.sql.gz"
    bucket.put(dump, bucket.get(dump)[:-100])
    r = run_cli("verify", "--read-data-subset", "10%", env=env)
    assert r.code == 1 and "database dump" in r.out


def test_restore_refuses_paths_outside_the_target(
    env: dict, stack: ImmichStack, bucket: Bucket, tmp_path: Path
) -> None:
    make_library(stack.library, photos=2)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    [sid] = bucket.snapshots()
    lines = bucket.manifest(sid)
    some = next(m for m in lines if m["type"] == "file")
    outside = tmp_path / "outside"
    outside.mkdir()
    forged = [dict(some, path="../escaped.jpg"), *lines]
    bucket.put(
        f"snapshots/{sid}/manifest.jsonl.gz", gzip.compress(b"".join(json.dumps(m).encode() + b"\n" for m in forged))
    )
    target = outside / "target"
    r = run_cli("restore", "--root", "library", "--to", str(target), env=env)
    assert r.code == 1
    assert "refusing manifest path '../escaped.jpg'" in r.last_error
    assert not (outside / "escaped.jpg").exists()

    # a symlink out of the target, then a file "under" it
    forged = [
        dict(some, path="link", type="symlink", target=str(outside), key=None),
        dict(some, path="link/escaped2.jpg"),
        *lines,
    ]
    bucket.put(
        f"snapshots/{sid}/manifest.jsonl.gz", gzip.compress(b"".join(json.dumps(m).encode() + b"\n" for m in forged))
    )
    r = run_cli("restore", "--root", "library", "--to", str(tmp_path / "t2"), env=env)
    assert r.code == 1 and "leads out of the restore target" in r.last_error
    assert not (outside / "escaped2.jpg").exists()


def test_interrupted_restore_resumes_without_downloading_again(
    env: dict, stack: ImmichStack, moto_s3, proxy_factory, tmp_path: Path
) -> None:
    from tests.conftest import moto_env

    make_library(stack.library, photos=40)
    env = moto_env(env, moto_s3)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    target = tmp_path / "restore"
    proxy = proxy_factory(moto_s3.endpoint)
    proxy.add(any_request, delay=0.15)
    slow = dict(env, S3_ENDPOINT_URL=proxy.endpoint, IMMICH_STREAM_JOBS="2")
    proc = start_cli("restore", "--root", "library", "--to", str(target), env=slow)

    def finished() -> dict:
        return {rel: p for rel, p in tree(target).items() if b".immich-stream" not in rel} if target.exists() else {}

    wait_for(lambda: len(finished()) >= 10, 60, what="some files restored")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done_before = finished()
    assert 10 <= len(done_before) < len(tree(stack.library))

    r = run_cli("restore", "--root", "library", "--to", str(target), env=env)  # no --overwrite needed
    assert r.code == 0, r.err
    assert snapshot_of_tree(target) == snapshot_of_tree(stack.library)
    skipped = int(r.out.split(" already in place")[0].rsplit(", ", 1)[1])
    assert skipped >= len(done_before)

    r = run_cli("restore", "--root", "library", "--to", str(target), env=env)
    assert r.code == 2 and "is not empty" in r.last_error  # a finished restore is not resumed


def test_snapshots_listing_and_dump_to(env: dict, stack: ImmichStack, bucket: Bucket, tmp_path: Path) -> None:
    make_library(stack.library, photos=3)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    assert run_cli("backup", "--stop", "app", env=env).code == 0
    bucket.put("snapshots/2030-01-01T000000Z-dead/manifest.jsonl.gz", b"half-written")
    r = run_cli("snapshots", "--json", env=env)
    assert r.code == 0
    rows = json.loads(r.out)["summary"]["snapshots"]
    assert [x["mode"] for x in rows] == ["none", "app"]
    assert all(x["files"] == len(tree(stack.library)) and x["dump_bytes"] > 1_000_000 for x in rows)
    assert rows[0]["bytes_new"] > 0 and rows[1]["bytes_new"] == 0
    r = run_cli("snapshots", "--all", env=env)
    assert "2030-01-01T000000Z-dead" in r.out and "incomplete" in r.out and "2 snapshots" in r.out
    out = tmp_path / "immich.sql.gz"
    r = run_cli("restore", rows[0]["id"], "--dump-to", str(out), env=env)
    assert r.code == 0, r.err
    assert out.read_bytes() == bucket.get(f"snapshots/{rows[0]['id']}/database.sql.gz")
    assert b"CREATE TABLE public.assets" in gzip.decompress(out.read_bytes())


def test_restore_database_psql_error_restarts_stack(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, photos=2)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    [sid] = bucket.snapshots()
    key = f"snapshots/{sid}/database.sql.gz"
    broken = b"CREATE TABLE broken (;\n"
    bucket.put(key, gzip.compress(broken))
    meta = bucket.snapshot(sid)  # a dump that matches its snapshot.json, and still fails in psql
    meta["database"].update(sha256=hashlib.sha256(broken).hexdigest(), size=len(broken))
    bucket.put(f"snapshots/{sid}/snapshot.json", json.dumps(meta).encode())
    r = run_cli("restore", "--database", env=env)
    assert r.code == 1
    assert "psql failed in immich_postgres" in r.last_error and "syntax error" in r.last_error
    assert running_containers() == set(CONTAINERS)
    assert stack.psql("SELECT count(*) FROM assets") == "90000"  # one transaction: nothing changed
