"""`backup` against the real stack and real S3 servers: bytes in the bucket, the stack
running again, exit codes and one-line errors, nothing left behind."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import signal
import threading
import time
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest

from tests.conftest import CONTAINERS, SECRET, ImmichStack, S3Server, bucket_of, free_port, moto_env, running_containers
from tests.faultproxy import is_part_upload, is_put
from tests.helpers import USER_ID, Bucket, make_library, run_cli, start_cli, tree, wait_for

MIB = 1024 * 1024


def library_lines(manifest: list[dict]) -> dict[bytes, dict]:
    return {unquote_to_bytes(m["path"]): m for m in manifest if m["root"] == "library"}


def assert_files_in_bucket(bucket: Bucket, sid: str, root: Path, name: str = "library") -> dict[bytes, dict]:
    """Every regular file under root is in the snapshot, byte for byte, at the key its line names."""
    lines = {unquote_to_bytes(m["path"]): m for m in bucket.manifest(sid) if m["root"] == name}
    files = tree(root)
    assert files, "the test library is empty"
    for rel, path in files.items():
        line = lines[rel]
        assert line["type"] == "file"
        data = path.read_bytes()
        assert bucket.read(line) == data, rel
        assert line["sha256"] == hashlib.sha256(data).hexdigest()
        assert line["size"] == len(data)
    return lines


def test_full_backup_streams_everything_and_restarts_the_stack(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, large=[13 * MIB])
    env["IMMICH_STREAM_PART_SIZE"] = "5MiB"  # the 13 MiB file goes up in 3 parts
    before = stack.started_at()

    r = run_cli("backup", "-v", env=env)

    assert r.code == 0, r.err
    assert running_containers() == set(CONTAINERS)
    assert all(stack.started_at()[c] != before[c] for c in CONTAINERS), "--stop all stops every container"
    # cron-style output (no terminal): timestamped lines per phase, and never a secret
    assert re.search(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] library files: done, \d+ files", r.err, re.M)
    assert re.search(r"^\[[-\d :]+\] database dump: done", r.err, re.M)
    assert SECRET not in r.err + r.out
    [sid] = bucket.snapshots()
    assert f"snapshot {sid} committed (stop: all)" in r.out
    lines = assert_files_in_bucket(bucket, sid, stack.library)
    odd = [p for p in lines if b"\xff" in p or b"\n" in p or "📷".encode() in p]
    assert len(odd) == 3
    # every object of this run lives under data/<id>/: large files at their path under
    # <root>/, small ones in packs (%pack/), a few of them for the whole library
    files = [m for m in lines.values() if m["type"] == "file"]
    big = [m for m in files if m["size"] > 512 * 1024]
    assert big and all(m["key"] == f"data/{sid}/library/{m['path']}" and "offset" not in m for m in big)
    small = [m for m in files if m["size"] <= 512 * 1024]
    assert all(m["key"].startswith(f"data/{sid}/%pack/") and m["offset"] >= 0 for m in small)
    packs = {m["key"] for m in small}
    # packs of about a part (5 MiB here) each
    assert len(packs) <= sum(m["size"] for m in small) // (5 * MIB) + 1 < len(small) / 10, "small files share packs"

    # cold copy of the data directory, taken while the database was stopped
    pg = {unquote_to_bytes(m["path"]): m for m in bucket.manifest(sid) if m["root"] == "postgres"}
    assert bucket.read(pg[b"PG_VERSION"]) == b"15\n"
    # the data directory is stored in chunks (deduplicated, compressed), in packs
    pg_files = [m for m in pg.values() if m["type"] == "file"]
    assert all("key" not in m and all(c[0].startswith(f"data/{sid}/%pack/") for c in m["chunks"]) for m in pg_files)
    stored = sum(c[2] for m in pg_files for c in m["chunks"])
    assert stored < sum(m["size"] for m in pg_files) / 2, "empty pages and zeroed WAL compress"
    assert b"global/pg_control" in pg and b"base" in pg and pg[b"base"]["type"] == "dir"
    assert b"postmaster.pid" not in pg, "postgres was running during the cold copy"
    assert pg[b"pg_tblspc"]["type"] == "dir"  # empty directories Postgres needs are recorded

    # the dump: gzip of SQL holding the seeded rows
    snap = bucket.snapshot(sid)
    dump = bucket.get(f"snapshots/{sid}/database.sql.gz")
    assert hashlib.sha256(dump).hexdigest() == snap["database"]["compressed_sha256"]
    sql = gzip.decompress(dump)
    assert len(sql) == snap["database"]["size"] and len(sql) > 30 * MIB
    copy = sql.split(b"COPY public.assets ", 1)[1].split(b"\n\\.\n", 1)[0]
    assert copy.count(b"\n") == 90000
    assert b"CREATE EXTENSION IF NOT EXISTS earthdistance" in sql
    assert snap["complete"] is True and snap["mode"] == "all"
    assert snap["files"]["new"] == len(tree(stack.library)) + sum(1 for m in pg.values() if m["type"] == "file")


def test_incremental_runs_upload_only_what_changed(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, photos=30)
    assert run_cli("backup", env=env).code == 0
    r2 = run_cli("backup", env=env)
    assert r2.code == 0, r2.err
    first, second = bucket.snapshots()
    assert not bucket.keys(f"data/{second}/library/"), "an unchanged library uploads nothing"
    assert all(
        m["key"].startswith(f"data/{first}/")
        for m in library_lines(bucket.manifest(second)).values()
        if m["type"] == "file"
    )

    lib = stack.library
    user = USER_ID
    added = lib / "library" / user / "2024" / "new-photo.jpg"
    added.parent.mkdir(parents=True, exist_ok=True)
    added.write_bytes(os.urandom(70_000))
    modified = next(p for p in (lib / "thumbs").rglob("*-preview.jpeg"))
    old_modified = modified.read_bytes()
    modified.write_bytes(os.urandom(50_000))
    # Immich's storage-template migration: upload/... moves into library/...
    moved_from = next((lib / "upload").rglob("*.heic"))
    moved_to = lib / "library" / user / "2023" / "moved-by-template.heic"
    moved_to.parent.mkdir(parents=True, exist_ok=True)
    moved_from.rename(moved_to)
    deleted = next((lib / "encoded-video").rglob("*.mp4"))
    deleted.unlink()

    r3 = run_cli("backup", env=env)
    assert r3.code == 0, r3.err
    third = bucket.snapshots()[-1]
    lines = assert_files_in_bucket(bucket, third, lib)
    rel = lambda p: os.fsencode(p.relative_to(lib))  # noqa: E731
    assert rel(deleted) not in lines and rel(moved_from) not in lines
    assert lines[rel(moved_to)]["key"].startswith(f"data/{first}/"), "a moved file is not uploaded again"
    # both small: in the one pack the third run wrote for the library, and nothing else of it
    assert lines[rel(added)]["key"] == lines[rel(modified)]["key"]
    library_objects = {m["key"] for m in lines.values() if m.get("key", "").startswith(f"data/{third}/")}
    assert library_objects == {lines[rel(added)]["key"]}
    assert not bucket.keys(f"data/{third}/library/")
    snap = bucket.snapshot(third)
    assert snap["files"]["moved"] >= 1 and snap["parent"] == second

    # the first snapshot still points at intact objects, the old version included
    old_lines = library_lines(bucket.manifest(first))
    assert bucket.read(old_lines[rel(modified)]) == old_modified
    for m in old_lines.values():
        if m["type"] == "file":
            assert hashlib.sha256(bucket.read(m)).hexdigest() == m["sha256"]


def test_a_small_database_change_stores_megabytes_not_whole_files(
    env: dict, stack: ImmichStack, bucket: Bucket, tmp_path: Path
) -> None:
    """The data directory by change (issue 29): after 50 rows changed, the next cold copy
    stores a few chunks (the pages and WAL that changed), not the 1 GiB segments and
    16 MiB WAL files they are in, whole and twice (live pass, stopped pass); and the cold
    copy it makes restores byte for byte."""
    make_library(stack.library, photos=3, odd_names=False)
    assert run_cli("backup", env=env).code == 0
    stack.psql("UPDATE assets SET \"originalFileName\" = 'x' || id WHERE id IN (SELECT id FROM assets LIMIT 50)")
    r = run_cli("backup", env=env)
    assert r.code == 0, r.err
    _, second = bucket.snapshots()
    pg = [m for m in bucket.manifest(second) if m["root"] == "postgres" and m["type"] == "file"]
    total = sum(m["size"] for m in pg)
    assert total > 60 * MIB  # a data directory with WAL, not a toy
    new = {k: n for k, n in bucket.keys(f"data/{second}/").items()}
    stored = sum(new.values())
    assert stored < 8 * MIB, f"{stored / MIB:.1f} MiB stored for 50 rows changed in {total / MIB:.0f} MiB"
    changed = [m for m in pg if any(c[0].startswith(f"data/{second}/") for c in m["chunks"])]
    assert changed, "the changed table and its WAL were stored (as chunks)"
    snap = bucket.snapshot(second)  # packs of the live pass (Immich up) and of the stopped pass
    assert snap["files"]["packs"] + snap["live_files"]["packs"] == len(new)

    # the cold copy comes back whole, every file byte for byte
    target = tmp_path / "pg"
    r = run_cli("restore", second, "--root", "postgres", "--to", str(target), env=env)
    assert r.code == 0, r.err
    for m in pg:
        assert (target / os.fsdecode(unquote_to_bytes(m["path"]))).read_bytes() == bucket.read(m), m["path"]


def test_multipart_on_aws_shaped_server(env: dict, stack: ImmichStack, moto_s3: S3Server) -> None:
    """moto answers like AWS: multipart ETags say how many parts went up, and parts under
    5 MiB (but the last) are refused, as AWS does."""
    make_library(stack.library, photos=5, large=[12 * MIB + 12345])
    env = moto_env(env, moto_s3)
    env["IMMICH_STREAM_PART_SIZE"] = "5MiB"
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    bucket = bucket_of(env)
    [sid] = bucket.snapshots()
    snap = bucket.snapshot(sid)
    etag = bucket.s3.head_object(Bucket=bucket.name, Key=f"immich-backup/snapshots/{sid}/database.sql.gz")["ETag"]
    assert etag.strip('"').endswith(f"-{-(-snap['database']['compressed_size'] // (5 * MIB))}")
    lines = assert_files_in_bucket(bucket, sid, stack.library)
    big = next(m for p, m in lines.items() if p.endswith(b"large-0.mp4"))
    head = bucket.s3.head_object(Bucket=bucket.name, Key=f"immich-backup/{big['key']}")
    assert head["ETag"].strip('"').endswith("-3")  # 12 MiB + a bit, in 5 MiB parts
    assert bucket.open_multipart_uploads() == []
    assert running_containers() == set(CONTAINERS)


def test_dump_through_many_small_parts_comes_back_intact(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, photos=5, large=[3 * MIB + 12345])
    env.update(
        {"IMMICH_STREAM_MIN_PART_SIZE": "1MiB", "IMMICH_STREAM_PART_SIZE": "1MiB", "IMMICH_STREAM_MAX_MEMORY": "4MiB"}
    )
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    [sid] = bucket.snapshots()
    snap = bucket.snapshot(sid)
    assert snap["database"]["parts"] == -(-snap["database"]["compressed_size"] // MIB) > 10
    dump = bucket.get(f"snapshots/{sid}/database.sql.gz")
    assert hashlib.sha256(dump).hexdigest() == snap["database"]["compressed_sha256"]
    assert hashlib.sha256(gzip.decompress(dump)).hexdigest() == snap["database"]["sha256"]
    assert_files_in_bucket(bucket, sid, stack.library)


def test_s3_unreachable_never_touches_the_stack(env: dict, stack: ImmichStack) -> None:
    make_library(stack.library, photos=3)
    env["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    env["IMMICH_STREAM_RETRIES"] = "2"
    before = stack.started_at()
    r = run_cli("backup", env=env)
    assert r.code == 1
    assert "cannot reach S3 at http://127.0.0.1" in r.last_error
    assert stack.started_at() == before, "the stack was touched although S3 was down"
    assert running_containers() == set(CONTAINERS)


def test_missing_bucket_and_wrong_project_fail_before_stopping(env: dict, stack: ImmichStack) -> None:
    make_library(stack.library, photos=3)
    before = stack.started_at()
    r = run_cli("backup", "--bucket", "no-such-bucket", env=env)
    assert r.code == 1 and "bucket 'no-such-bucket' does not exist" in r.last_error
    r = run_cli("backup", "--project", "not-immich", env=env)
    assert r.code == 1 and "no containers of compose project 'not-immich' found" in r.last_error
    r = run_cli("backup", "--db-container", "nope_db", env=env)
    assert r.code == 1 and "database container 'nope_db' not found" in r.last_error
    r = run_cli("backup", "--library-dir", str(stack.library / "missing"), env=env)
    assert r.code == 2 and "library_dir" in r.last_error and "does not exist" in r.last_error
    r = run_cli("backup", env=dict(env, DOCKER_HOST="unix:///nonexistent.sock"))
    assert r.code == 1 and "cannot reach Docker at unix:///nonexistent.sock" in r.last_error
    assert stack.started_at() == before


def test_s3_failing_mid_run_aborts_uploads_and_restarts(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    make_library(stack.library, photos=10, large=[12 * MIB])
    proxy = proxy_factory(moto_s3.endpoint)
    env = moto_env(env, moto_s3, proxy.endpoint)
    env.update({"IMMICH_STREAM_PART_SIZE": "5MiB", "IMMICH_STREAM_RETRIES": "2"})
    seen = {"parts": 0}

    def third_part_on(method: str, path: str, query: dict) -> bool:
        if is_part_upload(method, path, query):
            seen["parts"] += 1
            return seen["parts"] > 2
        return False

    proxy.add(third_part_on, status=500)
    r = run_cli("backup", env=env)
    assert r.code == 1, r.err
    assert "S3 error" in r.last_error or "InternalError" in r.last_error
    assert running_containers() == set(CONTAINERS)
    bucket = bucket_of(env)
    assert bucket.snapshots() == []
    assert bucket.open_multipart_uploads() == [], "an upload we saw fail was left open"


def test_wrong_database_name_fails_with_pg_dump_message(env: dict, stack: ImmichStack, moto_s3: S3Server) -> None:
    make_library(stack.library, photos=3)
    env = moto_env(env, moto_s3)
    r = run_cli("backup", "--stop", "app", "--db-name", "nope", env=env)
    assert r.code == 1
    assert "pg_dump failed in immich_postgres" in r.last_error and 'database "nope" does not exist' in r.last_error
    assert len([ln for ln in r.err.splitlines() if "error:" in ln]) == 1
    assert running_containers() == set(CONTAINERS)
    bucket = bucket_of(env)
    assert bucket.snapshots() == [] and bucket.open_multipart_uploads() == []


def _start_slow_backup(env: dict, moto_s3: S3Server, proxy_factory):
    proxy = proxy_factory(moto_s3.endpoint)
    # every upload slow: the run is mid-way, with the stack stopped, for a while (one pass:
    # a live pass would upload everything before the stack is stopped)
    env = {**moto_env(env, moto_s3, proxy.endpoint), "IMMICH_STREAM_LIVE_PASS": "0"}
    proxy.add(is_put, delay=0.3)
    proc = start_cli("backup", env=env)
    wait_for(
        lambda: "immich_server" not in running_containers() or proc.poll() is not None, 60, what="the stack to stop"
    )
    assert proc.poll() is None, proc.communicate()
    wait_for(lambda: len(proxy.requests) > 5, 30, what="uploads to begin")
    return proc, env


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_restarts_stack_and_commits_nothing(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory, sig: signal.Signals
) -> None:
    make_library(stack.library, photos=40)
    proc, env = _start_slow_backup(env, moto_s3, proxy_factory)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert f"interrupted by {sig.name}" in err
    assert running_containers() == set(CONTAINERS)
    bucket = bucket_of(env)
    assert bucket.snapshots() == []
    assert bucket.open_multipart_uploads() == []


def test_sigkill_mid_run_next_run_starts_the_stack_first(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    make_library(stack.library, photos=40)
    proc, slow_env = _start_slow_backup(env, moto_s3, proxy_factory)
    proc.kill()
    proc.communicate(timeout=30)
    time.sleep(0.5)
    assert running_containers() != set(CONTAINERS), "the killed run had the stack stopped"

    r = run_cli("backup", env=env)  # straight to the S3 server this time
    assert r.code == 0, r.err
    assert "was killed with the stack stopped: starting" in r.err
    assert running_containers() == set(CONTAINERS)
    assert bucket_of(slow_env).snapshots() == []  # the killed run committed nothing


def test_special_files_skipped_symlinks_recorded(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, photos=3)
    os.mkfifo(stack.library / "upload" / "a-fifo")
    (stack.library / "library" / "link.jpg").symlink_to("../profile/does-not-matter.jpg")
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    assert "skipping FIFO upload/a-fifo" in r.err
    lines = library_lines(bucket.manifest(bucket.snapshots()[0]))
    assert b"upload/a-fifo" not in lines
    link = lines[b"library/link.jpg"]
    assert link["type"] == "symlink" and link["target"] == "../profile/does-not-matter.jpg" and "key" not in link


def test_zero_staging_and_bounded_memory(env: dict, stack: ImmichStack, bucket: Bucket, tmp_path: Path) -> None:
    make_library(stack.library, photos=60, large=[96 * MIB])
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env.update(
        {
            "TMPDIR": str(tmpdir),
            "PYTHONDONTWRITEBYTECODE": "1",
            "IMMICH_STREAM_MAX_MEMORY": "16MiB",
            "IMMICH_STREAM_PART_SIZE": "5MiB",
        }
    )
    r = run_cli("backup", env=env)
    assert r.code == 0, r.err
    assert list(tmpdir.iterdir()) == []
    assert not any(Path(env["IMMICH_STREAM_STATE_DIR"]).glob("*.json")), "the stack state file outlived the run"
    uploaded = sum(bucket.keys("data/").values())
    assert uploaded > 150 * MIB  # library + cold copy of the data directory
    # Staging would write all of that locally. The only local write is the small stack
    # state file (fsynced while the stack is down; the journal makes it a few pages).
    assert r.written_bytes < 1 * MIB, f"{r.written_bytes} bytes written to local disk"
    # Memory follows --max-memory, not the 96 MiB file (buffering it would pass 155 MiB):
    # about 70 MiB of interpreter, S3 client and buffers beside the 16 MiB budget.
    assert r.maxrss_kib < 125 * 1024, f"peak RSS {r.maxrss_kib // 1024} MiB"


def test_transient_s3_errors_are_retried(env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory) -> None:
    make_library(stack.library, photos=10, large=[12 * MIB])
    proxy = proxy_factory(moto_s3.endpoint)
    env = moto_env(env, moto_s3, proxy.endpoint)
    env.update({"IMMICH_STREAM_PART_SIZE": "5MiB", "IMMICH_STREAM_RETRIES": "3"})
    flaky = proxy.add(is_part_upload, status=503, times=2)  # SlowDown-like answers, then fine
    flaky_put = proxy.add(lambda m, p, q: is_put(m, p, q) and "/data/" in p, status=500, times=3)
    r = run_cli("backup", "--stop", "app", env=env)
    assert r.code == 0, r.err
    assert flaky.hits == 2 and flaky_put.hits == 3
    bucket = bucket_of(env)
    [sid] = bucket.snapshots()
    assert_files_in_bucket(bucket, sid, stack.library)
    assert bucket.open_multipart_uploads() == []


def test_file_changing_while_read_is_reported(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, photos=3)
    growing = stack.library / "upload" / "growing.mp4"
    growing.write_bytes(os.urandom(4 * MIB))
    stop = threading.Event()

    def append() -> None:  # a file still being written while the backup runs
        with open(growing, "ab") as fh:
            while not stop.is_set():
                fh.write(b"x" * 1024)
                fh.flush()
                time.sleep(0.002)

    writer = threading.Thread(target=append)
    writer.start()
    try:
        r = run_cli("backup", "--stop", "none", env=env)
    finally:
        stop.set()
        writer.join()
    assert r.code == 0, r.err
    assert "upload/growing.mp4: changed while being read" in r.err
    assert "files changed while being read" in r.out
    line = library_lines(bucket.manifest(bucket.snapshots()[0]))[b"upload/growing.mp4"]
    data = bucket.read(line)
    assert len(data) == line["size"] and hashlib.sha256(data).hexdigest() == line["sha256"]


def test_bodies_corrupted_in_transit_are_rejected_and_resent(
    env: dict, stack: ImmichStack, rclone_s3: S3Server, proxy_factory
) -> None:
    """Every request carries Content-MD5 and the server checks it: a body altered on the
    way is refused (BadDigest), sent again, and what lands is the file's bytes."""
    make_library(stack.library, photos=6, large=[11 * MIB])
    proxy = proxy_factory(rclone_s3.endpoint)
    # 5 attempts: with small files in packs there are few PUTs, and all three corruptions
    # may hit the same one
    env = dict(env, S3_ENDPOINT_URL=proxy.endpoint, IMMICH_STREAM_PART_SIZE="5MiB", IMMICH_STREAM_RETRIES="5")
    # Single PUTs only: rclone drops a whole multipart upload when one part fails its
    # digest (AWS keeps it), so a corrupted part there fails the run cleanly instead.
    single = proxy.add(
        lambda m, p, q: is_put(m, p, q) and "/data/" in p and "partNumber" not in q, corrupt=True, times=3
    )
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    assert single.hits == 3
    assert [s for _, _, s in proxy.requests].count(400) == 3  # three BadDigest answers, each retried
    bucket = bucket_of(env)
    assert_files_in_bucket(bucket, bucket.snapshots()[0], stack.library)


def test_stalled_s3_fails_the_run_and_restarts_the_stack(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    """A server that accepts a request and never answers must not keep Immich down."""
    make_library(stack.library, photos=10)
    proxy = proxy_factory(moto_s3.endpoint)
    env = moto_env(env, moto_s3, proxy.endpoint)
    env["IMMICH_STREAM_STALL_TIMEOUT"] = "3s"
    proxy.add(lambda m, p, q: is_put(m, p, q) and "/data/" in p, delay=3600)
    started = time.monotonic()
    r = run_cli("backup", env=env, timeout=120)
    assert r.code == 1
    assert "no progress for" in r.last_error and "did not answer (upload" in r.last_error
    assert time.monotonic() - started < 60
    assert running_containers() == set(CONTAINERS)
    assert bucket_of(env).snapshots() == []
