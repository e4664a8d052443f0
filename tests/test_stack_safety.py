"""Immich is never left down (issue 9): a frozen S3 server, signals during cleanup, a
database started during its cold copy, a crash-looping app, --max-downtime, a failing
prune after a committed snapshot. Against the real stack and real S3 servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    CONTAINERS,
    KEY,
    SECRET,
    ImmichStack,
    RcloneServer,
    S3Server,
    bucket_of,
    docker,
    moto_env,
    running_containers,
)
from tests.faultproxy import is_put
from tests.helpers import Bucket, make_library, run_cli, start_cli, wait_for
from tests.test_prune import put_lock

MIB = 1024 * 1024


OwnS3 = RcloneServer


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[OwnS3]:
    server = OwnS3(tmp_path / "own-s3")
    try:
        yield server
    finally:
        server.stop()


def test_frozen_s3_brings_the_stack_back_within_the_stall_bound(env: dict, stack: ImmichStack, own_s3: OwnS3) -> None:
    """A server that takes requests and never answers. The stall timeout (30 s) is longer
    than a request's read timeout (5 s), and there are retries enough for minutes: timeouts
    and retries must not count as progress."""
    make_library(stack.library, photos=30, large=[20 * MIB])
    env.update(
        {
            "S3_ENDPOINT_URL": own_s3.endpoint,
            "S3_BUCKET": "frozen",
            "IMMICH_STREAM_STALL_TIMEOUT": "30s",
            "IMMICH_STREAM_READ_TIMEOUT": "5s",
            "IMMICH_STREAM_RETRIES": "20",
            "IMMICH_STREAM_PART_SIZE": "5MiB",
            "IMMICH_STREAM_LIVE_PASS": "0",  # S3 freezes while the stack is stopped
        }
    )
    Bucket(own_s3.endpoint, "frozen", KEY, SECRET).s3.create_bucket(Bucket="frozen")
    proc = start_cli("backup", env=env)
    try:
        wait_for(
            lambda: "immich_server" not in running_containers() or proc.poll() is not None, 60, what="the stack to stop"
        )
        assert proc.poll() is None, proc.communicate()
        own_s3.freeze()
        frozen = time.monotonic()
        wait_for(lambda: running_containers() == set(CONTAINERS), 30 + 30 + 10, 0.2, "the stack to run again")
        back = time.monotonic() - frozen
        _out, err = proc.communicate(timeout=60 + 10)
        exited = time.monotonic() - frozen
    finally:
        if proc.poll() is None:
            proc.kill()
        own_s3.thaw()
    assert back < 30 + 30, f"Immich was down {back:.0f} s after S3 froze"
    assert exited < back + 60, f"the process lived {exited - back:.0f} s after the restart"
    assert proc.returncode == 1, err
    last = [ln for ln in err.splitlines() if ln.startswith("immich-stream: error:")][-1]
    assert "no progress for" in last and f"S3 at {own_s3.endpoint} did not answer" in last
    bucket = Bucket(own_s3.endpoint, "frozen", KEY, SECRET)
    assert bucket.snapshots() == []
    # thawed, the next run works (no lock or state left that would stop it)
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    assert len(bucket.snapshots()) == 1


def _slow_backup(env: dict, moto_s3: S3Server, proxy_factory, *args: str, delay: float = 1.0):
    proxy = proxy_factory(moto_s3.endpoint)
    # one pass: the slow uploads happen with the stack stopped
    env = {**moto_env(env, moto_s3, proxy.endpoint), "IMMICH_STREAM_LIVE_PASS": "0"}
    proxy.add(is_put, delay=delay)
    proc = start_cli("backup", *args, env=env)
    wait_for(
        lambda: "immich_server" not in running_containers() or proc.poll() is not None, 60, what="the stack to stop"
    )
    assert proc.poll() is None, proc.communicate()
    wait_for(lambda: len(proxy.requests) > 5, 30, what="uploads to begin")
    return proc, env, proxy


def test_second_signal_skips_s3_cleanup_but_never_the_restart(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    make_library(stack.library, photos=30, large=[30 * MIB])
    env["IMMICH_STREAM_PART_SIZE"] = "5MiB"
    proc, env, proxy = _slow_backup(env, moto_s3, proxy_factory, "--stop", "app", delay=1.0)
    # aborting the unfinished uploads would take a long while: the user insists
    proxy.add(lambda m, p, q: m == "DELETE" and "uploadId" in q, delay=60)
    wait_for(lambda: any("?uploads" in path for _, path, _ in proxy.requests), 60, what="a multipart upload")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 15, "the second signal did not hurry the exit"
    assert proc.returncode == 143, err
    assert "SIGTERM received again: exiting as soon as the Immich stack is started again" in err
    assert running_containers() == set(CONTAINERS)
    assert bucket_of(env).snapshots() == []


def test_database_started_during_its_cold_copy_fails_the_run(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    make_library(stack.library, photos=3)
    proxy = proxy_factory(moto_s3.endpoint)
    env = moto_env(env, moto_s3, proxy.endpoint)
    # a slow cold copy: the data directory's chunks go up in a few packs, each held 5 s; with
    # no live pass the first data upload is the data directory's (its root comes first)
    slow = proxy.add(lambda m, p, q: is_put(m, p, q) and "/data/" in p, delay=5.0)
    proc = start_cli("backup", "--no-live-pass", env=env)  # every data directory upload is in the cold copy
    wait_for(
        lambda: slow.hits > 0 or proc.poll() is not None,
        60,
        0.05,
        "the cold copy to begin",
    )
    docker("start", "immich_postgres")  # a restart policy, or an admin, during the copy
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "immich_postgres was started while its data directory was being copied" in err
    assert running_containers() == set(CONTAINERS)
    assert bucket_of(env).snapshots() == []


def test_app_container_that_will_not_stay_up_is_reported_not_fatal(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    make_library(stack.library, photos=5)
    stop = threading.Event()

    events = subprocess.Popen(
        [
            "docker",
            "events",
            "--filter",
            "container=immich_machine_learning",
            "--filter",
            "event=start",
            "--format",
            "{{.Time}}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )

    def crash_loop() -> None:  # each time the backup starts it again, it dies at once
        assert events.stdout is not None
        for _ in events.stdout:
            if stop.is_set():
                return
            kills.append(docker("kill", "immich_machine_learning", check=False))

    kills: list[str] = []
    killer = threading.Thread(target=crash_loop, daemon=True)
    killer.start()
    try:
        r = run_cli("backup", env=env)
    finally:
        stop.set()
        events.terminate()
        killer.join(5)
    assert r.code == 5, (kills, r.err[-3000:])
    assert "committed, but immich_machine_learning did not stay running after the restart" in r.last_error
    [sid] = bucket.snapshots()
    assert bucket.snapshot(sid)["unstable_containers"] == ["immich_machine_learning"]
    assert {"immich_server", "immich_postgres", "immich_redis"} <= running_containers()


def test_max_downtime_starts_the_stack_and_fails_cleanly(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    make_library(stack.library, photos=40)
    proxy = proxy_factory(moto_s3.endpoint)
    env = moto_env(env, moto_s3, proxy.endpoint)
    # small files and the data directory's chunks go up in a few packs: each PUT held 2 s
    # keeps the run past the 3 s (a hundred files of 0.3 s did, before packs)
    proxy.add(is_put, delay=2.0)
    started = time.monotonic()
    proc = start_cli("backup", "--max-downtime", "3s", "--no-live-pass", env=env)
    wait_for(
        lambda: "immich_server" not in running_containers() or proc.poll() is not None, 60, what="the stack to stop"
    )
    down_at = time.monotonic()
    wait_for(lambda: running_containers() == set(CONTAINERS), 30, 0.1, "the stack to run again")
    assert time.monotonic() - down_at < 3 + 5
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "past --max-downtime 3 s: the stack was started again and nothing was committed" in err
    assert bucket_of(env).snapshots() == []
    assert time.monotonic() - started < 60


def test_prune_failing_after_a_committed_snapshot_exits_6(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, photos=3)
    put_lock(bucket, "other-host", 0, command="backup")  # a live backup elsewhere: prune must wait for it
    r = run_cli("backup", "--stop", "none", "--prune", "--keep-last", "1", "--lock-wait", "1s", env=env)
    assert r.code == 6, r.err
    [sid] = bucket.snapshots()
    assert f"snapshot {sid} committed, but prune failed: the repository is locked by backup" in r.last_error
    # a policy that cannot work is refused before anything is touched
    before = stack.started_at()
    r = run_cli("backup", "--prune", "--keep-within", "2weeks", env=env)
    assert r.code == 2 and "keep_within" in r.last_error
    assert stack.started_at() == before


def test_sighup_is_a_clean_stop(env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory) -> None:
    """An SSH session dropping during a manual run."""
    make_library(stack.library, photos=40)
    proc, env, _ = _slow_backup(env, moto_s3, proxy_factory)
    proc.send_signal(signal.SIGHUP)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 129, err
    assert "interrupted by SIGHUP" in err
    assert running_containers() == set(CONTAINERS)
    assert bucket_of(env).snapshots() == []


def test_restore_database_first_starts_what_a_killed_backup_left_stopped(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    make_library(stack.library, photos=3)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    # what a backup killed with SIGKILL leaves: the server stopped, and a note saying so
    docker("stop", "immich_server")
    state = Path(env["IMMICH_STREAM_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    note = state / "stack-immich.json"
    note.write_text(
        json.dumps(
            {
                "containers": ["immich_server"],
                "pid": 999999,
                "host": socket.gethostname(),
                "since": "2026-01-01T00:00:00+00:00",
            }
        )
    )
    r = run_cli("restore", "latest", "--database", env=env)
    assert r.code == 0, r.err
    assert "was killed with the stack stopped: starting immich_server" in r.err
    assert not note.exists()
    assert running_containers() == set(CONTAINERS)


@pytest.mark.slow
def test_a_read_that_hangs_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    """A thread stuck in a read (a dead NFS server; here a FIFO nobody writes to, opened
    blocking) must not keep a failed run alive: Python would join it at exit forever."""
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    script = f"""
import asyncio, sys
from immich_stream.commands import runtime

async def run() -> int:
    try:
        await asyncio.wait_for(asyncio.to_thread(open, {str(fifo)!r}, "rb"), 0.5)
    except TimeoutError:
        return 1
    return 0

def main() -> int:
    with asyncio.Runner(loop_factory=runtime.new_loop) as runner:
        return runner.run(run())

code = main()
runtime.exit_past_hung_threads(code)
sys.exit(code)
"""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "exiting with 1 file operations still hanging" in proc.stderr
    assert time.monotonic() - started < 15


def test_lock_refreshes_are_not_progress_a_blocked_dump_still_stalls(env: dict, stack: ImmichStack) -> None:
    """pg_dump blocked by a table lock sends nothing; the lock refresher's small requests
    (every 10 s here) must not keep the watchdog quiet while Immich is down."""
    make_library(stack.library, photos=3)
    env.update({"IMMICH_STREAM_STALL_TIMEOUT": "30s", "IMMICH_STREAM_LOCK_STALE": "60s"})
    holder = subprocess.Popen(
        ["docker", "exec", "-i", "immich_postgres", "psql", "-U", "postgres", "-d", "immich"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert holder.stdin is not None
    # users (5 rows): the preflight row count skips tables under 100 rows, so the lock
    # blocks pg_dump after the stop, not the count before it (which would refuse the run)
    holder.stdin.write("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(600);\n")
    holder.stdin.flush()
    time.sleep(2)
    proc = start_cli("backup", "--stop", "app", env=env)
    try:
        wait_for(
            lambda: "immich_server" not in running_containers() or proc.poll() is not None, 60, what="the stack to stop"
        )
        down = time.monotonic()
        wait_for(lambda: running_containers() == set(CONTAINERS), 30 + 30, 0.2, "the stack to run again")
        back = time.monotonic() - down
        _out, err = proc.communicate(timeout=60)
    finally:
        holder.kill()
        docker(
            "exec",
            "immich_postgres",
            "psql",
            "-U",
            "postgres",
            "-d",
            "immich",
            "-Atc",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(600)%' "
            "AND pid <> pg_backend_pid()",
            check=False,
        )
        if proc.poll() is None:
            proc.kill()
    assert back < 30 + 30
    assert proc.returncode == 1 and "no progress for" in err, err[-500:]


def test_a_file_larger_than_the_budget_never_waits_for_the_manifest(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    """Scaled down: 64 KiB parts, a 192 KiB budget, thousands of manifest lines, then a file
    whose parts need the whole file budget: the manifest's reserved part must not block it."""
    make_library(stack.library, photos=3)
    many = stack.library / "library" / "many"
    many.mkdir(parents=True)
    for i in range(3000):
        (many / f"file-with-a-fairly-long-name-to-fill-the-manifest-{i:05d}.jpg").write_bytes(b"x" * 10)
    big = stack.library / "library" / "zzz-last" / "big.mp4"
    big.parent.mkdir()
    big.write_bytes(os.urandom(2 * MIB))
    env.update(
        {
            "IMMICH_STREAM_MIN_PART_SIZE": "64KiB",
            "IMMICH_STREAM_PART_SIZE": "64KiB",
            "IMMICH_STREAM_MAX_MEMORY": "192KiB",
            "IMMICH_STREAM_STALL_TIMEOUT": "30s",
        }
    )
    r = run_cli("backup", "--stop", "none", env=env, timeout=180)
    assert r.code == 0, r.err[-800:]
    [sid] = bucket.snapshots()
    line = next(m for m in bucket.manifest(sid) if m["path"].endswith("big.mp4"))
    assert line["key"].endswith("/library/library/zzz-last/big.mp4")  # an object of its own, in parts
    assert bucket.read(line) == big.read_bytes()
