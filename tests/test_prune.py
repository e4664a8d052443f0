"""prune and locks: retention exactly as restic's, garbage collected, runs kept apart."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from immich_stream.errors import ConfigError
from immich_stream.prune import Policy, apply_policy
from tests.conftest import CONTAINERS, ImmichStack, S3Server, bucket_of, moto_env, running_containers
from tests.faultproxy import is_put
from tests.helpers import Bucket, make_library, run_cli, start_cli, wait_for


def sid(t: dt.datetime, n: int = 0) -> str:
    return t.strftime("%Y-%m-%dT%H%M%SZ") + f"-{n:04x}"


def times() -> list[dt.datetime]:
    """Snapshot times with the shapes retention cares about: several a day, gaps of days
    and weeks, month and year boundaries, an ISO week that straddles a year."""
    base = dt.datetime(2021, 11, 28, 3, 0, tzinfo=dt.UTC)
    out = []
    for day in range(0, 50, 1):
        for hour in (3, 9, 21) if day % 7 == 0 else (3,):
            if day % 11 == 5:
                continue  # days without a snapshot
            out.append(base + dt.timedelta(days=day, hours=hour - 3, minutes=day % 5))
    for months in range(3, 30, 2):  # sparse history going back years
        out.append(base - dt.timedelta(days=30 * months, hours=months))
    return sorted(out)


POLICIES = [
    Policy(last=5),
    Policy(daily=7),
    Policy(hourly=10),
    Policy(daily=7, weekly=4),
    Policy(daily=3, weekly=2, monthly=6, yearly=3),
    Policy(weekly=10),
    Policy(monthly=12),
    Policy(yearly=5),
    Policy(last=2, within="14d"),
    Policy(within="1m3d"),
    Policy(within="1y"),
    Policy(last=1, hourly=5, daily=2, weekly=2, monthly=2, yearly=2),
]


@pytest.fixture(scope="module")
def restic_repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("restic")
    env = {**os.environ, "RESTIC_REPOSITORY": str(root / "repo"), "RESTIC_PASSWORD": "test", "TZ": "UTC",
           "RESTIC_CACHE_DIR": str(root / "cache")}
    data = root / "data"
    data.mkdir()
    (data / "f").write_text("x")
    subprocess.run(["restic", "init", "-q"], env=env, check=True)

    def backup(t: dt.datetime) -> None:
        subprocess.run(["restic", "backup", "-q", "--time", t.strftime("%Y-%m-%d %H:%M:%S"), str(data)],
                       env=env, check=True)

    # restic's backups take a shared lock: they can run side by side (each spends most of
    # its time deriving the key from the password).
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(backup, times()))
    return env


def restic_keeps(env: dict[str, str], policy: Policy) -> list[str]:
    args = []
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        if getattr(policy, rule):
            args += [f"--keep-{rule}", str(getattr(policy, rule))]
    if policy.within:
        args += ["--keep-within", policy.within]
    out = subprocess.run(["restic", "forget", "--dry-run", "--json", *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    groups = json.loads(out)
    kept = [s["time"] for g in groups for s in g["keep"]]
    return sorted(dt.datetime.fromisoformat(k[:19]).replace(tzinfo=dt.UTC).strftime("%Y-%m-%dT%H%M%SZ")
                  for k in kept)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
def test_retention_keeps_exactly_what_restic_keeps(restic_repo: dict[str, str], policy: Policy) -> None:
    ids = [sid(t, i) for i, t in enumerate(times())]
    keep, remove = apply_policy(ids, policy)
    assert sorted(keep + remove) == sorted(ids)
    assert [k[:18] for k in keep] == restic_keeps(restic_repo, policy)


def test_retention_by_hand() -> None:
    d = lambda s: sid(dt.datetime.fromisoformat(s).replace(tzinfo=dt.UTC))  # noqa: E731
    ids = [d("2024-03-01 10:00"), d("2024-03-01 12:00"), d("2024-03-02 09:00"), d("2024-03-04 08:00"),
           d("2024-03-04 20:00"), d("2024-03-05 11:00")]
    keep, _ = apply_policy(ids, Policy(daily=3))
    assert keep == [d("2024-03-02 09:00"), d("2024-03-04 20:00"), d("2024-03-05 11:00")]  # days with snapshots
    keep, _ = apply_policy(ids, Policy(within="1d"))
    assert keep == [d("2024-03-04 20:00"), d("2024-03-05 11:00")]  # after newest minus one day
    with pytest.raises(ConfigError, match="no retention policy"):
        apply_policy(ids, Policy())


# -- prune against the bucket --------------------------------------------------------------------

def data_keys(bucket: Bucket) -> set[str]:
    return set(bucket.keys("data/"))


def referenced(bucket: Bucket) -> set[str]:
    return {m["key"] for s in bucket.snapshots() for m in bucket.manifest(s) if m.get("key")}


def test_prune_removes_snapshots_and_garbage_keeps_shared_objects(env: dict, stack: ImmichStack,
                                                                  bucket: Bucket) -> None:
    make_library(stack.library, photos=6)
    env = dict(env, IMMICH_STREAM_STOP="none")
    assert run_cli("backup", env=env).code == 0
    victim = next((stack.library / "thumbs").rglob("*.webp"))
    victim.write_bytes(b"changed once")
    assert run_cli("backup", env=env).code == 0
    victim.unlink()
    assert run_cli("backup", env=env).code == 0
    first, second, third = bucket.snapshots()
    keys_of = lambda s: {m["key"] for m in bucket.manifest(s) if m.get("key")}  # noqa: E731
    shared = keys_of(first) & keys_of(third)  # uploaded by the first run, still used by the third

    before = bucket.keys()
    r = run_cli("prune", "--keep-last", "1", "--dry-run", env=env)
    assert r.code == 0, r.err
    assert f"2 would remove: {first}, {second}" in r.out
    doomed = data_keys(bucket) - {m["key"] for m in bucket.manifest(third) if m.get("key")}
    assert f"data       {len(doomed)} objects" in r.out and len(doomed) == 2
    assert bucket.keys() == before, "a dry run changed the bucket"

    r = run_cli("prune", "--keep-last", "1", env=env)
    assert r.code == 0, r.err
    assert bucket.snapshots() == [third]
    assert not any(k.startswith(f"snapshots/{first}/") or k.startswith(f"snapshots/{second}/") for k in bucket.keys())
    assert data_keys(bucket) == referenced(bucket), "unreferenced data left, or referenced data deleted"
    assert shared and shared <= data_keys(bucket)  # objects of the removed snapshot the kept one uses
    r = run_cli("verify", "--all", "--read-data", env=env)
    assert r.code == 0 and "no problems" in r.out


def test_prune_refuses_without_policy(env: dict) -> None:
    r = run_cli("prune", env=env)
    assert r.code == 2 and "no retention policy" in r.last_error
    r = run_cli("backup", "--prune", env=env)
    assert r.code == 2 and "no retention policy" in r.last_error


def test_backup_with_prune_uses_configured_policy(env: dict, stack: ImmichStack, bucket: Bucket,
                                                  tmp_path: Path) -> None:
    make_library(stack.library, photos=2)
    conf = tmp_path / "c.toml"
    conf.write_text("[prune]\nkeep_last = 2\n[backup]\nstop = \"none\"\n")
    env = dict(env, IMMICH_STREAM_CONFIG=str(conf))
    for _ in range(3):
        r = run_cli("backup", "--prune", env=env)
        assert r.code == 0, r.err
    assert len(bucket.snapshots()) == 2
    assert "prune done: policy keep-last 2" in r.out


def test_stale_incomplete_snapshots_and_uploads_go_fresh_ones_stay(env: dict, stack: ImmichStack,
                                                                   bucket: Bucket) -> None:
    # rclone, not moto: moto reports every multipart upload as initiated in 2010.
    make_library(stack.library, photos=2)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    old_id = sid(dt.datetime.now(dt.UTC) - dt.timedelta(days=3), 1)
    bucket.put(f"snapshots/{old_id}/manifest.jsonl.gz", b"killed run")
    bucket.put(f"data/{old_id}/library/orphan.jpg", b"from a killed run")
    old_upload = bucket.s3.create_multipart_upload(Bucket=bucket.name, Key="immich-backup/data/x/old.mp4")
    time.sleep(3)
    fresh_id = sid(dt.datetime.now(dt.UTC), 2)
    bucket.put(f"snapshots/{fresh_id}/manifest.jsonl.gz", b"a run in progress")
    bucket.put(f"data/{fresh_id}/library/in-progress.jpg", b"being uploaded")
    bucket.s3.create_multipart_upload(Bucket=bucket.name, Key="immich-backup/data/x/fresh.mp4")

    r = run_cli("prune", "--keep-last", "5", "--stale-after", "2s", env=env)
    assert r.code == 0, r.err
    assert "1 incomplete snapshots, 1 unfinished uploads removed" in r.out
    keys = bucket.keys()
    assert f"snapshots/{old_id}/manifest.jsonl.gz" not in keys and f"data/{old_id}/library/orphan.jpg" not in keys
    assert f"snapshots/{fresh_id}/manifest.jsonl.gz" in keys and f"data/{fresh_id}/library/in-progress.jpg" in keys
    uploads = bucket.s3.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["immich-backup/data/x/fresh.mp4"]
    assert old_upload["UploadId"] not in {u["UploadId"] for u in uploads}


# -- locks ---------------------------------------------------------------------------------------

def put_lock(bucket: Bucket, host: str, refreshed_ago: float, command: str = "backup", exclusive: bool = False,
             pid: int = 4242) -> str:
    now = time.time()
    key = f"locks/test-{host}-{int(refreshed_ago)}.json"
    bucket.put(key, json.dumps({"host": host, "pid": pid, "command": command, "exclusive": exclusive,
                                "started": now - refreshed_ago - 10, "refreshed": now - refreshed_ago}).encode())
    return key


def start_locked_backup(env: dict, stack: ImmichStack, moto_s3: S3Server,
                        proxy_factory) -> tuple[subprocess.Popen[str], dict, Bucket]:
    """A backup slowed down by the proxy, returned once its lock object is in the bucket."""
    make_library(stack.library, photos=30)
    proxy = proxy_factory(moto_s3.endpoint)
    slow = moto_env(env, moto_s3, proxy.endpoint)
    proxy.add(lambda m, p, q: is_put(m, p, q) and "/data/" in p, delay=0.3)
    bucket = bucket_of(slow)
    backup = start_cli("backup", "--stop", "none", env=slow)
    wait_for(lambda: bucket.keys("locks/"), 60, what="the backup's lock")
    return backup, slow, bucket


def test_prune_during_backup_waits_then_fails_naming_the_holder(env: dict, stack: ImmichStack, moto_s3: S3Server,
                                                               proxy_factory) -> None:
    backup, env, bucket = start_locked_backup(env, stack, moto_s3, proxy_factory)
    r = run_cli("prune", "--keep-last", "1", "--lock-wait", "2s", env=env)
    assert r.code == 1
    assert "the repository is locked by backup (pid" in r.last_error and socket.gethostname() in r.last_error
    out, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err
    assert bucket.keys("locks/") == {}, "the backup left its lock behind"
    assert run_cli("prune", "--keep-last", "1", "--lock-wait", "2s", env=env).code == 0


def test_killed_backup_lock_stops_nothing_and_local_lock(env: dict, stack: ImmichStack, moto_s3: S3Server,
                                                         proxy_factory) -> None:
    first, slow, bucket = start_locked_backup(env, stack, moto_s3, proxy_factory)
    # a second backup on the same host is refused by the local lock at once
    r = run_cli("backup", "--stop", "none", env=slow)
    assert r.code == 1 and "another immich-stream run on this host" in r.last_error
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert bucket.keys("locks/"), "a killed run cannot remove its lock"

    direct = dict(slow, S3_ENDPOINT_URL=moto_s3.endpoint)
    r = run_cli("prune", "--keep-last", "1", "--lock-wait", "1s", env=direct)  # dead pid on this host: stale
    assert r.code == 0, r.err
    r = run_cli("backup", "--stop", "none", env=direct)
    assert r.code == 0, r.err
    r = run_cli("unlock", env=direct)
    assert r.code == 0 and "removed lock of backup (pid" in r.out
    assert bucket.keys("locks/") == {}


def test_foreign_locks_fresh_block_stale_do_not_unlock_force(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, photos=2)
    env = dict(env, IMMICH_STREAM_STOP="none")
    assert run_cli("backup", env=env).code == 0
    fresh = put_lock(bucket, "other-host", refreshed_ago=5, command="prune", exclusive=True)
    before = running_containers()
    r = run_cli("backup", "--lock-wait", "1s", env=env)
    assert r.code == 1 and "locked by prune (pid 4242 on other-host, exclusive" in r.last_error
    assert running_containers() == before == set(CONTAINERS)
    r = run_cli("unlock", env=env)
    assert "kept live lock of prune (pid 4242 on other-host" in r.out
    r = run_cli("unlock", "--force", env=env)
    assert "removed lock of prune (pid 4242 on other-host" in r.out
    assert fresh not in bucket.keys()

    stale = put_lock(bucket, "other-host", refreshed_ago=3 * 3600, command="backup", exclusive=False)
    r = run_cli("prune", "--keep-last", "1", "--lock-wait", "1s", env=env)
    assert r.code == 0, r.err  # not refreshed for three hours: stale, ignored
    assert stale in bucket.keys("locks/")
    r = run_cli("unlock", env=env)
    assert "removed lock of backup (pid 4242 on other-host" in r.out
    assert bucket.keys("locks/") == {}
