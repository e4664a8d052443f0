"""Downtime that does not grow with the library (issue 11): a live pass uploads while Immich
runs, a stopped pass re-reads only what changed since, the stack starts again as soon as
pg_dump holds its snapshot, and an interrupted run's uploads are taken by the next run.
Against the real stack, real S3 servers, and the fault proxy for slow requests."""

from __future__ import annotations

import gzip
import hashlib
import os
import time

from immich_stream.repository.packs import PACK_FILE_MAX
from tests.conftest import CONTAINERS, ImmichStack, S3Server, bucket_of, moto_env, running_containers
from tests.faultproxy import is_put
from tests.helpers import Bucket, make_library, run_cli, start_cli, wait_for
from tests.test_backup import assert_files_in_bucket

MIB = 1 << 20


def _summary(bucket: Bucket, sid: str) -> dict:
    return bucket.snapshot(sid)


def _data_puts(proxy: object, run: str | None = None) -> list[str]:
    """Paths of the data objects the proxy saw uploaded (single PUTs and completed multiparts)."""
    out = []
    for method, path, status in proxy.requests:  # type: ignore[attr-defined]
        if status != 200 or "/data/" not in path or (run and f"/data/{run}/" not in path):
            continue
        if (method == "PUT" and "partNumber" not in path) or (method == "POST" and "uploadId" in path):
            out.append(path.split("?")[0])
    return out


def test_live_pass_uploads_while_immich_runs_and_the_stopped_pass_reads_what_changed(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    make_library(stack.library, photos=20)
    r = run_cli("backup", env=env)
    assert r.code == 0, r.err
    assert "uploaded while Immich ran; stopping it for the rest" in r.err
    sid = bucket.snapshots()[-1]
    s = _summary(bucket, sid)
    assert_files_in_bucket(bucket, sid, stack.library)
    lib_bytes = s["root_totals"]["library"]["bytes"]
    assert s["live_files"]["bytes_uploaded"] >= lib_bytes, "the library went up before the stack was stopped"
    # the downtime, and what it was spent on, adds up
    parts = s["downtime"]
    assert set(parts) == {"stop", "data_directory", "stopped_pass", "database_start", "start"}
    assert abs(sum(parts.values()) - s["downtime_seconds"]) < 1.0, (parts, s["downtime_seconds"])
    t = s["timeline"]
    assert t["live_pass_done"] <= t["stop_started"] <= t["library_files_started"] <= t["dump_started"]
    assert t["dump_snapshot"] <= t["stack_started"]
    assert "Immich down for" in r.out and "stopped pass" in r.out
    assert running_containers() == set(CONTAINERS)
    assert not bucket.keys(f"snapshots/{sid}/journal/"), "a committed run's journal is removed"


def test_file_changed_between_the_passes_is_captured_with_its_stopped_time_bytes(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    written = make_library(stack.library, photos=20)
    target_rel = next(p for p in written if p.endswith(b"IMG_1005.jpg"))
    target = stack.library / os.fsdecode(target_rel)
    target.write_bytes(os.urandom(700_000))  # above 512 KiB: an object of its own, its PUT seen
    time.sleep(4.5)  # older than the racy window: only the change itself can make it read again
    proxy = proxy_factory(moto_s3.endpoint)
    env = {**moto_env(env, moto_s3, proxy.endpoint), "IMMICH_STREAM_JOBS": "2"}
    proxy.add(lambda m, p, q: is_put(m, p, q) and "/data/" in p and "/library/" in p, delay=0.15)
    proc = start_cli("backup", "--stop", "app", env=env)
    try:
        # the live pass has read and uploaded the file: Immich (still running) rewrites it,
        # same size, mtime set back as exiftool -P would
        wait_for(lambda: any(p.endswith("IMG_1005.jpg") for p in _data_puts(proxy)), 60, 0.02, "the live upload")
        assert "immich_server" in running_containers(), "the live pass runs with Immich up"
        st = target.stat()
        live_key = next(p for p in _data_puts(proxy) if p.endswith("IMG_1005.jpg")).split("/immich-backup/")[1]
        live_bytes = target.read_bytes()
        stopped_bytes = os.urandom(st.st_size)
        target.write_bytes(stopped_bytes)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        _out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    bucket = bucket_of(env)
    sid = bucket.snapshots()[-1]
    lines = assert_files_in_bucket(bucket, sid, stack.library)
    assert bucket.read(lines[target_rel]) == stopped_bytes
    # a second upload by the same run never overwrites the first (a journal line vouches for it)
    assert "/%stopped/" in lines[target_rel]["key"] and bucket.get(live_key) == live_bytes
    assert lines[target_rel]["sha256"] == hashlib.sha256(stopped_bytes).hexdigest()
    assert sum(p.endswith("IMG_1005.jpg") for p in _data_puts(proxy)) == 2, "uploaded live, then again stopped"


def test_file_written_within_the_racy_window_is_read_again_by_the_stopped_pass(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    make_library(stack.library, photos=10)
    time.sleep(4.5)  # everything so far is older than the racy window when the run starts
    fresh = stack.library / "upload" / "fresh.jpg"
    fresh.write_bytes(os.urandom(123_457))
    r = run_cli("backup", "--stop", "app", env=env)
    assert r.code == 0, r.err
    s = _summary(bucket, bucket.snapshots()[-1])
    # the stopped pass trusts the live pass's stat for the old files, not for the fresh one:
    # a rewrite in the same timestamp tick as its read would not have changed it
    assert s["files"]["bytes_read"] == 123_457, s["files"]
    assert s["files"]["bytes_uploaded"] == 0, "the same bytes: the live pass's object is kept"
    assert s["live_files"]["bytes_uploaded"] == s["root_totals"]["library"]["bytes"]


def _slow_dump(proxy: object) -> None:
    proxy.add(lambda m, p, q: is_put(m, p, q) and "database.sql.gz" in p, delay=2.0)  # type: ignore[attr-defined]


def _dump_env(env: dict, moto_s3: S3Server, proxy: object) -> dict:
    # parts of 5 MiB and room for two: pg_dump waits for S3, so the dump streams for seconds
    return {
        **moto_env(env, moto_s3, proxy.endpoint),  # type: ignore[attr-defined]
        "IMMICH_STREAM_PART_SIZE": "5MiB",
        "IMMICH_STREAM_MAX_MEMORY": "24MiB",
    }


def _dump_completed(proxy: object) -> bool:
    return any(
        m == "POST" and "database.sql.gz" in p and "uploadId" in p
        for m, p, _ in proxy.requests  # type: ignore[attr-defined]
    )


def test_apps_start_while_the_dump_streams_and_a_row_inserted_then_is_not_in_it(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    make_library(stack.library, photos=5)
    stack.psql("CREATE TABLE downtime_probe (note text); INSERT INTO downtime_probe VALUES ('before the run')")
    try:
        proxy = proxy_factory(moto_s3.endpoint)
        _slow_dump(proxy)
        env = _dump_env(env, moto_s3, proxy)
        proc = start_cli("backup", env=env)
        try:
            wait_for(lambda: "immich_server" not in running_containers(), 120, 0.05, "the stack to stop")
            wait_for(lambda: running_containers() == set(CONTAINERS), 120, 0.05, "the stack to start again")
            stack.psql("INSERT INTO downtime_probe VALUES ('after the restart')")
            assert proc.poll() is None and not _dump_completed(proxy), "the dump was still streaming"
            _out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        bucket = bucket_of(env)
        sid = bucket.snapshots()[-1]
        sql = gzip.decompress(bucket.get(f"snapshots/{sid}/database.sql.gz"))
        assert b"before the run" in sql and b"after the restart" not in sql
        t = _summary(bucket, sid)["timeline"]
        assert t["dump_snapshot"] <= t["stack_started"] < t["dump_done"], t
    finally:
        stack.psql("DROP TABLE IF EXISTS downtime_probe")


def test_stop_none_walks_the_files_once_pg_dump_holds_its_snapshot(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    make_library(stack.library, photos=5)
    proxy = proxy_factory(moto_s3.endpoint)
    _slow_dump(proxy)
    env = _dump_env(env, moto_s3, proxy)
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    bucket = bucket_of(env)
    t = _summary(bucket, bucket.snapshots()[-1])["timeline"]
    assert t["dump_started"] <= t["dump_snapshot"] <= t["library_files_started"] < t["dump_done"], t
    assert "live_pass_started" not in t


def _journal_chunks(bucket: Bucket) -> list[str]:
    return [k for k in bucket.keys("snapshots/") if "/journal/" in k]


def _killed_run(env: dict, stack: ImmichStack, proxy: object, share: float) -> str:
    """A first backup (slow uploads, journal every second) killed once about `share` of the
    library's objects are uploaded (its large files, and its small ones in packs of less
    than 1 MiB); its run id."""
    sizes = [p.stat().st_size for p in stack.library.rglob("*") if p.is_file()]
    pack = MIB  # at most: fewer objects counted than there are, the wait ends
    objects = sum(1 for n in sizes if n > PACK_FILE_MAX) + sum(n for n in sizes if n <= PACK_FILE_MAX) // pack
    proc = start_cli("backup", "--stop", "app", env=env)
    try:
        wait_for(lambda: len(_data_puts(proxy)) >= max(1, share * objects), 120, 0.05, "uploads")
        chunks = len(_journal_chunks(bucket_of(env)))
        wait_for(lambda: len(_journal_chunks(bucket_of(env))) > chunks, 30, 0.05, "a journal chunk")
        proc.kill()
        proc.communicate(timeout=30)
        time.sleep(1)  # requests the proxy still held reach the server
    finally:
        if proc.poll() is None:
            proc.kill()
    (run,) = {p.split("/data/")[1].split("/")[0] for p in _data_puts(proxy)}
    return run


def test_killed_run_is_resumed_and_prune_keeps_its_uploads_until_stale(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    make_library(stack.library, photos=40)
    proxy = proxy_factory(moto_s3.endpoint)
    env = {
        **moto_env(env, moto_s3, proxy.endpoint),
        "IMMICH_STREAM_JOBS": "2",
        "IMMICH_STREAM_JOURNAL_INTERVAL": "1s",
        # packs of 640 KiB (an eighth of what 10 MiB leave beside the streams' two parts):
        # about twenty for this library, not two
        "IMMICH_STREAM_PART_SIZE": "5MiB",
        "IMMICH_STREAM_MAX_MEMORY": "10MiB",
    }
    # twenty objects, up to four packs in flight: a second each keeps the kill in the live pass
    proxy.add(lambda m, p, q: is_put(m, p, q) and "/data/" in p, delay=1.0)
    killed = _killed_run(env, stack, proxy, 0.5)
    bucket = bucket_of(env)
    uploaded = bucket.keys(f"data/{killed}/")
    assert uploaded and bucket.snapshots() == []
    assert running_containers() == set(CONTAINERS), "killed in the live pass: Immich was never stopped"

    # the killed run's stale lock goes (proved gone on this host); a fresh run's uploads stay
    assert run_cli("unlock", env=env).code == 0
    r = run_cli("prune", "--keep-last", "1", "--stale-after", "1h", env=env)
    assert r.code == 0, r.err
    assert bucket.keys(f"data/{killed}/") == uploaded

    r = run_cli("backup", "--stop", "app", env=env)
    assert r.code == 0, r.err
    sid = bucket.snapshots()[-1]
    s = _summary(bucket, sid)
    lines = assert_files_in_bucket(bucket, sid, stack.library)
    taken = [ln for ln in lines.values() if ln.get("key", "").startswith(f"data/{killed}/")]
    reused = {ln["key"] for ln in taken}
    assert reused, "nothing of the killed run was reused"
    assert any("offset" in ln for ln in taken), "blobs of the killed run's packs are taken too"
    resumed = s["files"]["resumed"]
    assert resumed == len(taken), (resumed, len(taken))
    total = s["root_totals"]["library"]["files"]
    new = [ln for ln in lines.values() if ln.get("key", "").startswith(f"data/{sid}/")]
    assert len(new) == total - resumed, "only what the killed run had not uploaded went up"
    assert set(bucket.keys(f"data/{sid}/")) == {ln["key"] for ln in new}, "and nothing else went up"
    assert run_cli("verify", "--read-data", env=env).code == 0

    # a second killed run, stale by now: what no snapshot references goes, the rest stays
    for p in list(stack.library.rglob("IMG_10[0-1]*.jpg")):
        p.write_bytes(os.urandom(50_000))
    proxy.requests.clear()
    killed2 = _killed_run(env, stack, proxy, 0.05)
    assert bucket.keys(f"data/{killed2}/")
    assert run_cli("unlock", env=env).code == 0
    time.sleep(1.5)
    r = run_cli("prune", "--keep-last", "1", "--stale-after", "1s", env=env)
    assert r.code == 0, r.err
    assert not bucket.keys(f"data/{killed2}/") and not bucket.keys(f"snapshots/{killed2}/")
    still = bucket.keys(f"data/{killed}/")
    # what the snapshot took from the killed run stays, in its packs or (a pack the snapshot
    # uses only partly: prune repacks it) in the packs the snapshot's manifest now names
    named = {k for ln in bucket.manifest(sid) for k in [*(c[0] for c in ln.get("chunks") or []), ln.get("key")] if k}
    assert named <= set(bucket.keys("data/")), "an object the snapshot names is gone"
    assert len(still) < len(uploaded) or len(reused) == len(uploaded)
    assert run_cli("verify", "--read-data", env=env).code == 0


def test_stopped_pass_past_max_downtime_is_abandoned_and_the_next_run_takes_the_live_uploads(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    make_library(stack.library, photos=10)
    proxy = proxy_factory(moto_s3.endpoint)
    env = moto_env(env, moto_s3, proxy.endpoint)
    # the stopped pass reads the live pass's journal back: make that slow
    proxy.add(lambda m, p, q: m == "GET" and "/journal/live-" in p, delay=8.0)
    r = run_cli("backup", "--stop", "app", "--max-downtime", "2s", env=env)
    assert r.code == 1, r.err
    assert "past --max-downtime 2 s: the stack was started again and nothing was committed" in r.err
    assert "the next run goes on from there" in r.err
    assert running_containers() == set(CONTAINERS)
    bucket = bucket_of(env)
    assert bucket.snapshots() == []
    (abandoned,) = bucket.snapshots(complete_only=False)
    assert bucket.keys(f"data/{abandoned}/"), "the live pass had uploaded the library"

    proxy.rules.clear()
    r = run_cli("backup", "--stop", "app", env=env)
    assert r.code == 0, r.err
    sid = bucket.snapshots()[-1]
    s = _summary(bucket, sid)
    lines = assert_files_in_bucket(bucket, sid, stack.library)
    # every file is the live pass's upload; this run uploaded nothing of the library
    taken = [ln for ln in lines.values() if ln.get("key", "").startswith(f"data/{abandoned}/")]
    assert len(taken) == s["root_totals"]["library"]["files"] == s["files"]["resumed"]
    assert not bucket.keys(f"data/{sid}/")
