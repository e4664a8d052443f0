"""Issue 22, locks and deadlines: readers hold a shared lock prune respects, a wedged dockerd
cannot keep a run (and its lock) alive, a signal after the commit says so, and a lock is
believed only while the S3 server's clock says it was kept fresh."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import CONTAINERS, ImmichStack, S3Server, bucket_of, moto_env, running_containers
from tests.dockerproxy import DockerProxy
from tests.faultproxy import is_put
from tests.helpers import Bucket, file_digest, make_library, run_cli, start_cli, tree, wait_for


def start_locked_backup(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> tuple[subprocess.Popen[str], dict, Bucket]:
    """A backup slowed down by the proxy, returned once its lock object is in the bucket.
    Its data PUTs are held 2 s each: its small files go up in a few packs, so the run is a
    handful of PUTs and must still be uploading when the test suspends or kills it."""
    make_library(stack.library, photos=30)
    proxy = proxy_factory(moto_s3.endpoint)
    slow = moto_env(env, moto_s3, proxy.endpoint)
    proxy.add(lambda m, p, q: is_put(m, p, q) and "/data/" in p, delay=2.0)
    bucket = bucket_of(slow)
    backup = start_cli("backup", "--stop", "none", env=slow)
    wait_for(lambda: bucket.keys("locks/"), 60, what="the backup's lock")
    return backup, slow, bucket


MIB = 1024 * 1024


def lock_bodies(bucket: Bucket) -> list[dict]:
    out = []
    for key in bucket.keys("locks/"):
        if key.endswith(".json"):
            try:
                out.append(json.loads(bucket.get(key)))
            except Exception:  # released between list and get
                continue
    return out


# -- item 2: restore, verify (and drill) hold a shared lock that prune respects -----------------


@pytest.mark.parametrize("reader", ["restore", "verify"])
def test_prune_refuses_while_a_reader_holds_the_repository_and_the_read_completes(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory, tmp_path: Path, reader: str
) -> None:
    # Snapshot 1 holds a large file that snapshot 2 no longer has: pruning to the last
    # snapshot would delete it as garbage while it is being read.
    written = make_library(stack.library, photos=6, odd_names=False, large=[4 * MIB])
    direct = moto_env(env, moto_s3)
    bucket = bucket_of(direct)
    assert run_cli("backup", "--stop", "none", env=direct).code == 0
    [first] = bucket.snapshots()
    expected = {rel: file_digest(p) for rel, p in tree(stack.library).items()}
    assert len(expected) == len(written)
    for rel, _ in tree(stack.library).items():
        if rel.endswith(b"large-0.mp4"):
            os.unlink(stack.library / os.fsdecode(rel))
    assert run_cli("backup", "--stop", "none", "--allow-shrink", env=direct).code == 0
    assert len(bucket.snapshots()) == 2

    proxy = proxy_factory(moto_s3.endpoint)
    slow = dict(direct, S3_ENDPOINT_URL=proxy.endpoint)
    proxy.add(lambda m, p, q: m == "GET" and p.endswith("large-0.mp4"), rate=400_000)
    target = tmp_path / "restored"
    if reader == "restore":
        proc = start_cli("restore", first, "--root", "library", "--to", str(target), env=slow)
    else:
        proc = start_cli("verify", first, "--read-data", env=slow)
    wait_for(
        lambda: any(b["command"] == reader for b in lock_bodies(bucket)) or proc.poll() is not None,
        60,
        what=f"the {reader}'s lock",
    )
    assert proc.poll() is None, proc.communicate()
    r = run_cli("prune", "--keep-last", "1", "--lock-wait", "2s", env=direct)
    out, err = proc.communicate(timeout=180)
    assert r.code == 1, r.err
    assert f"the repository is locked by {reader} (pid {proc.pid}" in r.last_error
    assert len(r.err.strip().splitlines()[-1]) < 400
    assert proc.returncode == 0, err
    assert bucket.snapshots() == sorted(bucket.snapshots()) and first in bucket.snapshots()
    if reader == "restore":
        assert {rel: file_digest(p) for rel, p in tree(target).items()} == expected
    else:
        assert "no problems" in out
    assert bucket.keys("locks/") == {}, "the reader left its lock behind"
    # once the reader is done, prune goes ahead
    assert run_cli("prune", "--keep-last", "1", "--lock-wait", "2s", env=direct).code == 0
    assert first not in bucket.snapshots()


# -- item 13: a signal after the commit ----------------------------------------------------------


def test_sigterm_while_removing_the_journal_exits_6_naming_the_committed_snapshot(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    make_library(stack.library, photos=4, odd_names=False)
    proxy = proxy_factory(moto_s3.endpoint)
    slow = moto_env(env, moto_s3, proxy.endpoint)
    bucket = bucket_of(slow)
    # the listing of this run's own journal happens only once it committed: hold it there
    held = proxy.add(lambda m, p, q: m == "GET" and "/journal/" in q.get("prefix", ""), delay=20)
    proc = start_cli("backup", "--stop", "none", env=slow)
    wait_for(lambda: held.hits or proc.poll() is not None, 120, what="the journal's removal")
    assert proc.poll() is None, proc.communicate()
    [sid] = bucket.snapshots()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 6, err
    last = [ln for ln in err.splitlines() if ln.startswith("immich-stream: error:")][-1]
    assert f"snapshot {sid} committed" in last and "nothing was committed" not in err
    assert bucket.snapshots() == [sid]


# -- item 12: every Docker call has a deadline ---------------------------------------------------


def test_wedged_dockerd_in_preflight_fails_the_backup_and_releases_the_lock(
    env: dict, stack: ImmichStack, tmp_path: Path, bucket: Bucket
) -> None:
    make_library(stack.library, photos=3, odd_names=False)
    proxy = DockerProxy(str(tmp_path / "docker.sock"))
    try:
        proxy.hang = lambda method, path: True  # dockerd accepts connections, answers nothing
        started = time.monotonic()
        r = run_cli(
            "backup",
            env=dict(env, DOCKER_HOST=proxy.docker_host, IMMICH_STREAM_DOCKER_DEADLINE="3s"),
            timeout=90,
        )
    finally:
        proxy.stop()
    assert proxy.hung, "the proxy held nothing"
    assert r.code == 1, r.err
    assert "Docker did not answer" in r.last_error and "within 3 s" in r.last_error, r.err
    assert time.monotonic() - started < 60
    assert bucket.keys("locks/") == {}, "the lock outlived the run"
    assert bucket.snapshots() == []
    assert running_containers() >= set(CONTAINERS)


def test_wedged_dockerd_after_restore_database_stopped_the_apps_starts_them_again(
    env: dict, stack: ImmichStack, tmp_path: Path, bucket: Bucket
) -> None:
    make_library(stack.library, photos=3, odd_names=False)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    before = stack.started_at()
    proxy = DockerProxy(str(tmp_path / "docker.sock"))

    def after_the_stop(method: str, path: str) -> bool:
        stopped = any(m == "POST" and p.endswith("/stop") for m, p in proxy.requests)
        return stopped and "/exec" in path  # docker exec wedges once the apps are down

    try:
        proxy.hang = after_the_stop
        r = run_cli(
            "restore",
            "--database",
            env=dict(env, DOCKER_HOST=proxy.docker_host, IMMICH_STREAM_DOCKER_DEADLINE="10s"),
            timeout=90,
        )
    finally:
        proxy.stop()
    assert proxy.hung, "the proxy held nothing"
    assert r.code == 1, r.err
    assert "Docker did not answer" in r.last_error, r.err
    assert stack.started_at() != before, "the apps were never stopped"
    assert running_containers() >= set(CONTAINERS)
    assert bucket.keys("locks/") == {}


# -- item 24: the lock's clock, a refresh racing `unlock --force`, a killed run's lock ----------


def test_backup_suspended_past_its_lock_staleness_does_not_commit(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A laptop or VM suspended mid-backup: its monotonic clock stood still, the S3 server's
    did not. The moto server runs in this process, so its clock can jump as a suspend looks
    from the server: the run's lock went unrefreshed for two hours (any other host's prune
    meanwhile took it for stale) although the run itself saw no time pass."""
    import moto.s3.models as s3_models

    backup, _slow, bucket = start_locked_backup(env, stack, moto_s3, proxy_factory)
    wait_for(lambda: bucket.keys("data/") or backup.poll() is not None, 60, what="the first uploads")
    os.kill(backup.pid, signal.SIGSTOP)  # suspended ...
    real = s3_models.utcnow
    monkeypatch.setattr(s3_models, "utcnow", lambda: real() + dt.timedelta(hours=2))
    time.sleep(1)
    os.kill(backup.pid, signal.SIGCONT)  # ... and resumed two hours later, by the server's clock
    _out, err = backup.communicate(timeout=180)
    assert backup.returncode == 1, err
    last = [ln for ln in err.splitlines() if ln.startswith("immich-stream: error:")][-1]
    assert "lost the repository lock" in last and "nothing was committed" in last, last
    assert "server" in last, last
    assert bucket.snapshots() == [] and bucket.snapshots(complete_only=False), "committed with a stale lock"
    assert bucket.keys("locks/") == {}


def test_lock_removed_by_unlock_force_while_its_refresh_is_in_flight_is_not_written_again(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    """`unlock --force` lands between a refresh's check (HEAD, GET) and its write (PUT): the
    PUT must not silently bring the lock back."""
    env = dict(env, IMMICH_STREAM_LOCK_STALE="60s")  # a refresh every 10 s
    make_library(stack.library, photos=150)
    proxy = proxy_factory(moto_s3.endpoint)
    slow = moto_env(env, moto_s3, proxy.endpoint)
    bucket = bucket_of(slow)
    direct = dict(slow, S3_ENDPOINT_URL=moto_s3.endpoint)
    # held 30 s: the library is a few packs and large files, all sent at once, so the run
    # is one round of PUTs; it must still be uploading well after the lock's first refresh
    # (at 10 s) and its write held 8 s (measured: with 10 s the run ended at the refresh)
    proxy.add(lambda m, p, q: is_put(m, p, q) and "/data/" in p, delay=30.0)
    backup = start_cli("backup", "--stop", "none", env=slow)
    wait_for(lambda: bucket.keys("locks/") or backup.poll() is not None, 60, what="the backup's lock")
    # From now on every write of the lock is held 8 s on its way to the server.
    refresh = proxy.add(lambda m, p, q: m == "PUT" and "/locks/" in p, delay=8)
    wait_for(lambda: refresh.hits or backup.poll() is not None, 60, what="a refresh of the lock")
    assert backup.poll() is None, backup.communicate()
    r = run_cli("unlock", "--force", env=direct)
    assert r.code == 0 and "removed lock of backup" in r.out, r.out + r.err
    _out, err = backup.communicate(timeout=240)
    assert backup.returncode == 1, err
    last = [ln for ln in err.splitlines() if ln.startswith("immich-stream: error:")][-1]
    assert "lost the repository lock" in last and "nothing was committed" in last, last
    assert bucket.snapshots() == [], "committed after its lock was removed"
    assert [k for k in bucket.keys("locks/") if k.endswith(".json")] == [], "the removed lock was written again"


def test_backup_that_lost_its_lock_stops_at_once_and_starts_the_stack(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    """The refresher finds the lock removed: the run cannot commit, so it stops then, not
    after uploading the rest with Immich down."""
    env = dict(env, IMMICH_STREAM_LOCK_STALE="12s", IMMICH_STREAM_LIVE_PASS="0")  # a refresh every 2 s
    make_library(stack.library, photos=60)
    proxy = proxy_factory(moto_s3.endpoint)
    slow = moto_env(env, moto_s3, proxy.endpoint)
    bucket = bucket_of(slow)
    # a minute of uploads: the data directory and the library are a dozen packs and large files
    proxy.add(lambda m, p, q: is_put(m, p, q) and "/data/" in p, delay=5.0)
    backup = start_cli("backup", env=slow)
    wait_for(
        lambda: "immich_server" not in running_containers() or backup.poll() is not None, 60, what="the stack to stop"
    )
    assert backup.poll() is None, backup.communicate()
    r = run_cli("unlock", "--force", env=dict(slow, S3_ENDPOINT_URL=moto_s3.endpoint))
    assert r.code == 0 and "removed lock of backup" in r.out, r.out + r.err
    removed = time.monotonic()
    try:
        _out, err = backup.communicate(timeout=60)
    finally:
        if backup.poll() is None:  # went on without its lock (the failure this test is for)
            backup.send_signal(signal.SIGTERM)
            backup.communicate(timeout=120)
    assert backup.returncode == 1, err
    assert time.monotonic() - removed < 20, "the run went on uploading without its lock"
    last = [ln for ln in err.splitlines() if ln.startswith("immich-stream: error:")][-1]
    assert "lost the repository lock" in last and "nothing was committed" in last, last
    assert bucket.snapshots() == []
    assert running_containers() == set(CONTAINERS)


def test_killed_runs_lock_is_collected_by_prune_once_stale_by_the_servers_clock(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory, tmp_path: Path
) -> None:
    env = dict(env, IMMICH_STREAM_LOCK_STALE="8s")
    backup, slow, bucket = start_locked_backup(env, stack, moto_s3, proxy_factory)
    wait_for(lambda: bucket.keys("data/") or backup.poll() is not None, 60, what="the first uploads")
    backup.kill()
    backup.communicate(timeout=30)
    [lock] = lock_bodies(bucket)
    run = lock["run"]
    assert bucket.keys(f"data/{run}/")
    # Another host (its own state directory: it cannot know the run is gone): the lock holds
    # it off until the server's clock says it is stale, then prune removes the lock and
    # collects the dead run's uploads.
    other = dict(slow, S3_ENDPOINT_URL=moto_s3.endpoint, IMMICH_STREAM_STATE_DIR=str(tmp_path / "other-host"))
    r = run_cli("prune", "--keep-last", "1", "--stale-after", "1s", "--lock-wait", "1s", env=other)
    assert r.code == 1 and "the repository is locked by backup" in r.last_error, r.err
    started = time.monotonic()
    r = run_cli("prune", "--keep-last", "1", "--stale-after", "1s", "--lock-wait", "60s", env=other)
    assert r.code == 0, r.err
    assert time.monotonic() - started < 45
    assert [k for k in bucket.keys("locks/") if k.endswith(".json")] == [], "prune left the dead run's lock"
    assert bucket.keys(f"data/{run}/") == {} and bucket.snapshots(complete_only=False) == []
