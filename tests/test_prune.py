"""prune and locks: retention exactly as restic's, garbage collected, runs kept apart."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from immich_stream.repository.prune import Policy, apply_policy
from tests.conftest import CONTAINERS, ImmichStack, S3Server, bucket_of, moto_env, running_containers
from tests.faultproxy import is_put
from tests.helpers import Bucket, make_library, run_cli, start_cli, wait_for
from tests.unit.test_prune import POLICIES, sid, times


@pytest.fixture(scope="module")
def restic_repo(machine: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """restic (installed by the machine setup) as the oracle: about 30 s, so it runs with the docker tests."""
    root = tmp_path_factory.mktemp("restic")
    env = {
        **os.environ,
        "RESTIC_REPOSITORY": str(root / "repo"),
        "RESTIC_PASSWORD": "test",
        "TZ": "UTC",
        "RESTIC_CACHE_DIR": str(root / "cache"),
    }
    data = root / "data"
    data.mkdir()
    (data / "f").write_text("x")
    subprocess.run(["restic", "init", "-q"], env=env, check=True)

    def backup(t: dt.datetime) -> None:
        subprocess.run(
            ["restic", "backup", "-q", "--time", t.strftime("%Y-%m-%d %H:%M:%S"), str(data)], env=env, check=True
        )

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
    out = subprocess.run(
        ["restic", "forget", "--dry-run", "--json", *args], env=env, check=True, capture_output=True, text=True
    ).stdout
    groups = json.loads(out)
    kept = [s["time"] for g in groups for s in g["keep"]]
    return sorted(dt.datetime.fromisoformat(k[:19]).replace(tzinfo=dt.UTC).strftime("%Y-%m-%dT%H%M%SZ") for k in kept)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
def test_retention_keeps_exactly_what_restic_keeps(restic_repo: dict[str, str], policy: Policy) -> None:
    ids = [sid(t, i) for i, t in enumerate(times())]
    keep, remove = apply_policy(ids, policy)
    assert sorted(keep + remove) == sorted(ids)
    assert [k[:18] for k in keep] == restic_keeps(restic_repo, policy)


# -- prune against the bucket --------------------------------------------------------------------


def data_keys(bucket: Bucket) -> set[str]:
    return set(bucket.keys("data/"))


def refs(line: dict) -> set[str]:
    """The objects a manifest line's bytes are in (docs/format.md): its object or pack, or its chunks' packs."""
    return {c[0] for c in line.get("chunks") or []} | ({line["key"]} if line.get("key") else set())


def keys_of(bucket: Bucket, sid: str) -> set[str]:
    return {k for m in bucket.manifest(sid) for k in refs(m)}


def referenced(bucket: Bucket) -> set[str]:
    return {k for s in bucket.snapshots() for k in keys_of(bucket, s)}


def test_prune_removes_snapshots_and_garbage_keeps_shared_objects(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    make_library(stack.library, photos=6)
    env = dict(env, IMMICH_STREAM_STOP="none")
    assert run_cli("backup", env=env).code == 0
    victim = next((stack.library / "thumbs").rglob("*.webp"))
    victim.write_bytes(b"changed once")
    assert run_cli("backup", env=env).code == 0
    victim.unlink()
    assert run_cli("backup", env=env).code == 0
    first, second, third = bucket.snapshots()
    shared = keys_of(bucket, first) & keys_of(bucket, third)  # uploaded by the first run, still used by the third

    before = bucket.keys()
    r = run_cli("prune", "--keep-last", "1", "--dry-run", "--max-unused", "0%", env=env)
    assert r.code == 0, r.err
    assert f"2 would remove: {first}, {second}" in r.out
    doomed = data_keys(bucket) - keys_of(bucket, third)
    # the second run's pack (the changed thumbnail alone); the first's packs stay, partly used
    assert f"data       {len(doomed)} objects" in r.out and len(doomed) >= 1
    assert re.search(r"^repack +[1-9]\d* packs to repack", r.out, re.M), r.out
    assert bucket.keys() == before, "a dry run changed the bucket"

    r = run_cli("prune", "--keep-last", "1", "--max-unused", "0%", env=env)
    assert r.code == 0, r.err
    assert bucket.snapshots() == [third]
    assert not any(k.startswith(f"snapshots/{first}/") or k.startswith(f"snapshots/{second}/") for k in bucket.keys())
    assert data_keys(bucket) == referenced(bucket), "unreferenced data left, or referenced data deleted"
    # objects of the removed snapshot the kept one uses stay; packs of it, partly used, were repacked
    assert shared and {k for k in shared if "/%pack/" not in k} <= data_keys(bucket)
    assert re.search(r"^repack +[1-9]\d* packs repacked into [1-9]", r.out, re.M), r.out
    r = run_cli("verify", "--all", "--read-data", env=env)
    assert r.code == 0 and "no problems" in r.out


def test_prune_refuses_without_policy(env: dict) -> None:
    r = run_cli("prune", env=env)
    assert r.code == 2 and "no retention policy" in r.last_error
    r = run_cli("backup", "--prune", env=env)
    assert r.code == 2 and "no retention policy" in r.last_error


def test_prune_with_a_policy_that_keeps_nothing_touches_nothing(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, photos=2)
    env = dict(env, IMMICH_STREAM_STOP="none")
    assert run_cli("backup", env=env).code == 0
    assert run_cli("backup", env=env).code == 0
    before = bucket.keys()
    assert len(bucket.snapshots()) == 2
    for within in ("0d", "0h", "0m", "0y"):
        r = run_cli("prune", "--keep-within", within, env=env)
        assert r.code == 2, r.err
        assert r.err.strip() == r.last_error and f"keep-within {within} keeps nothing" in r.last_error
    r = run_cli("backup", "--prune", "--keep-within", "0d", env=env)
    assert r.code == 2 and "keeps nothing" in r.last_error
    assert bucket.keys() == before, "a policy that keeps nothing changed the bucket"
    r = run_cli("verify", "--all", "--read-data", env=env)
    assert r.code == 0 and "2 snapshots" in r.out and "no problems" in r.out


def test_backup_with_prune_uses_configured_policy(
    env: dict, stack: ImmichStack, bucket: Bucket, tmp_path: Path
) -> None:
    make_library(stack.library, photos=2)
    conf = tmp_path / "c.toml"
    conf.write_text('[prune]\nkeep_last = 2\n[backup]\nstop = "none"\n')
    env = dict(env, IMMICH_STREAM_CONFIG=str(conf))
    for _ in range(3):
        r = run_cli("backup", "--prune", env=env)
        assert r.code == 0, r.err
    assert len(bucket.snapshots()) == 2
    assert "prune done: policy keep-last 2" in r.out


def test_stale_incomplete_snapshots_and_uploads_go_fresh_ones_stay(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    # rclone, not moto: moto reports every multipart upload as initiated in 2010.
    make_library(stack.library, photos=2)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    old_id = sid(dt.datetime.now(dt.UTC) - dt.timedelta(days=3), 1)
    bucket.put(f"snapshots/{old_id}/manifest.jsonl.gz", b"killed run")
    bucket.put(f"data/{old_id}/library/orphan.jpg", b"from a killed run")
    old_upload = bucket.s3.create_multipart_upload(Bucket=bucket.name, Key=f"immich-backup/data/{old_id}/old.mp4")
    time.sleep(3)
    fresh_id = sid(dt.datetime.now(dt.UTC), 2)
    bucket.put(f"snapshots/{fresh_id}/manifest.jsonl.gz", b"a run in progress")
    bucket.put(f"data/{fresh_id}/library/in-progress.jpg", b"being uploaded")
    bucket.s3.create_multipart_upload(Bucket=bucket.name, Key=f"immich-backup/data/{fresh_id}/fresh.mp4")

    r = run_cli("prune", "--keep-last", "5", "--stale-after", "2s", env=env)
    assert r.code == 0, r.err
    assert "1 incomplete snapshots, 1 unfinished uploads removed" in r.out
    keys = bucket.keys()
    assert f"snapshots/{old_id}/manifest.jsonl.gz" not in keys and f"data/{old_id}/library/orphan.jpg" not in keys
    assert f"snapshots/{fresh_id}/manifest.jsonl.gz" in keys and f"data/{fresh_id}/library/in-progress.jpg" in keys
    uploads = bucket.s3.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [f"immich-backup/data/{fresh_id}/fresh.mp4"]
    assert old_upload["UploadId"] not in {u["UploadId"] for u in uploads}


# -- locks ---------------------------------------------------------------------------------------


def put_lock(
    bucket: Bucket,
    host: str,
    refreshed_ago: float,
    command: str = "backup",
    exclusive: bool = False,
    pid: int = 4242,
    run: str | None = None,
) -> str:
    """A lock object of another host, written now; its body claims (by the holder's clock)
    to have been refreshed `refreshed_ago` seconds ago."""
    now = time.time()
    key = f"locks/test-{host}-{int(refreshed_ago)}.json"
    body = {
        "host": host,
        "pid": pid,
        "command": command,
        "exclusive": exclusive,
        "started": now - refreshed_ago - 10,
        "refreshed": now - refreshed_ago,
    }
    if run:
        body.update(run=run, token="f" * 32)
    bucket.put(key, json.dumps(body).encode())
    return key


def start_locked_backup(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory, wrapper: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[str], dict, Bucket]:
    """A backup slowed down by the proxy, returned once its lock object is in the bucket.
    `wrapper` runs it under another command (e.g. in its own pid namespace)."""
    # small files go up in a few packs (docs/format.md): objects of their own and a longer
    # delay per upload keep the backup running for seconds
    make_library(stack.library, photos=30, large=[1_200_000] * 6)  # over SMALL_OBJECT: --jobs at once
    proxy = proxy_factory(moto_s3.endpoint)
    slow = moto_env(env, moto_s3, proxy.endpoint)
    proxy.add(lambda m, p, q: is_put(m, p, q) and "/data/" in p, delay=3.0)
    bucket = bucket_of(slow)
    if wrapper:
        backup = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "immich_stream", "backup", "--stop", "none"],
            env=slow,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
    else:
        backup = start_cli("backup", "--stop", "none", env=slow)
    wait_for(lambda: bucket.keys("locks/"), 60, what="the backup's lock")
    return backup, slow, bucket


def test_prune_during_backup_waits_then_fails_naming_the_holder(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
    backup, env, bucket = start_locked_backup(env, stack, moto_s3, proxy_factory)
    r = run_cli("prune", "--keep-last", "1", "--lock-wait", "2s", env=env)
    assert r.code == 1
    assert "the repository is locked by backup (pid" in r.last_error and socket.gethostname() in r.last_error
    _out, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err
    assert bucket.keys("locks/") == {}, "the backup left its lock behind"
    assert run_cli("prune", "--keep-last", "1", "--lock-wait", "2s", env=env).code == 0


def test_killed_backup_lock_stops_nothing_and_local_lock(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory
) -> None:
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
    # (what remains is its tombstone: see locks.py)
    assert [k for k in bucket.keys("locks/") if k.endswith(".json")] == [], "prune left the dead run's stale lock"
    r = run_cli("backup", "--stop", "none", env=direct)
    assert r.code == 0, r.err
    r = run_cli("unlock", env=direct)
    assert r.code == 0 and "no locks" in r.out


def test_foreign_locks_judged_by_server_clock_unlock_force_says_what_it_endangers(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    make_library(stack.library, photos=2)
    env = dict(env, IMMICH_STREAM_STOP="none")
    assert run_cli("backup", env=env).code == 0
    # Written just now, though its holder's clock says three hours ago (another machine's
    # clock): fresh by the server's clock, so it blocks.
    fresh = put_lock(bucket, "other-host", refreshed_ago=3 * 3600, command="prune", exclusive=True)
    before = running_containers()
    r = run_cli("backup", "--lock-wait", "1s", env=env)
    assert r.code == 1 and "locked by prune (pid 4242 on other-host, exclusive" in r.last_error
    assert running_containers() == before == set(CONTAINERS)
    r = run_cli("unlock", env=env)
    assert "kept live lock of prune (pid 4242 on other-host" in r.out
    r = run_cli("unlock", "--force", env=env)
    assert "removed lock of prune (pid 4242 on other-host" in r.out and "(it was live)" in r.out
    assert fresh not in bucket.keys()

    run = sid(dt.datetime.now(dt.UTC), 7)
    live = put_lock(bucket, "other-host", refreshed_ago=0, run=run)
    r = run_cli("unlock", "--force", env=env)
    assert r.code == 0 and f"run {run} can no longer commit; its uploads (data/{run}/, snapshots/{run}/)" in r.out
    assert live not in bucket.keys()

    # Stale only once the server's clock says so (IMMICH_STREAM_LOCK_STALE shortens the 30 minutes).
    quick = dict(env, IMMICH_STREAM_LOCK_STALE="2s")
    stale = put_lock(bucket, "other-host", refreshed_ago=0, command="backup", exclusive=False)
    time.sleep(3)
    r = run_cli("prune", "--keep-last", "1", "--lock-wait", "1s", env=quick)
    assert r.code == 0, r.err  # not refreshed for 3 s by the server's clock: stale, ignored
    assert stale not in bucket.keys("locks/"), "prune kept a stale lock (its run can no longer commit)"
    stale = put_lock(bucket, "other-host", refreshed_ago=0, command="backup", exclusive=False)
    time.sleep(3)
    r = run_cli("unlock", env=quick)
    assert "removed lock of backup (pid 4242 on other-host" in r.out
    assert [k for k in bucket.keys("locks/") if k.endswith(".json")] == []


def test_prune_racing_a_backup_on_a_host_of_the_same_name_waits(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory, tmp_path: Path
) -> None:
    # Two "hosts" of one hostname (containers): the backup runs in its own pid namespace (its
    # pid is 1 there, some other process here) with its own state directory.
    env = dict(env, IMMICH_STREAM_JOBS="2")
    backup, slow, bucket = start_locked_backup(
        env, stack, moto_s3, proxy_factory, wrapper=("unshare", "--pid", "--fork")
    )
    wait_for(lambda: bucket.keys("data/"), 60, what="the backup's first uploads")
    time.sleep(1.5)  # older than --stale-after below
    other_host = dict(slow, IMMICH_STREAM_STATE_DIR=str(tmp_path / "other-host-state"))
    r = run_cli("prune", "--keep-last", "1", "--stale-after", "1s", "--lock-wait", "3s", env=other_host)
    assert backup.poll() is None, "the backup ended before prune looked: the race did not happen"
    assert r.code == 1 and "the repository is locked by backup (pid" in r.last_error, r.err
    _out, err = backup.communicate(timeout=180)
    assert backup.returncode == 0, err
    assert len(bucket.snapshots()) == 1
    r = run_cli("verify", "--all", "--read-data", env=other_host)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err


@pytest.mark.parametrize("lock_stale", [None, "6s"], ids=["commit-check", "refresher"])
def test_backup_whose_lock_was_removed_does_not_commit(
    env: dict, stack: ImmichStack, moto_s3: S3Server, proxy_factory, lock_stale: str | None
) -> None:
    # With a short staleness the lock is refreshed every second: the refresher sees it gone
    # and must not write it again.
    if lock_stale:
        env = dict(env, IMMICH_STREAM_LOCK_STALE=lock_stale)
    backup, _slow, bucket = start_locked_backup(env, stack, moto_s3, proxy_factory)
    for key in bucket.keys("locks/"):
        bucket.delete(key)  # as `unlock --force` elsewhere would, while the backup runs
    assert backup.poll() is None
    out, err = backup.communicate(timeout=180)
    assert backup.returncode == 1, out + err
    last = [ln for ln in err.splitlines() if ln.startswith("immich-stream: error:")][-1]
    assert "lost the repository lock" in last and "nothing was committed" in last
    if lock_stale:
        assert "was removed: this run will not commit" in err  # seen by the refresher, while it ran
    else:  # it got as far as uploading, and stopped at the commit's check
        assert bucket.keys("data/"), "the lock was removed before the run uploaded anything"
    assert bucket.snapshots() == [], "committed without its lock"
    assert bucket.keys("locks/") == {}, "the lost lock was written again"
    assert running_containers() == set(CONTAINERS)


# -- odd bucket contents -------------------------------------------------------------------------


def test_folder_markers_and_stray_objects_are_skipped_other_prefixes_untouched(
    env: dict, stack: ImmichStack, moto_s3: S3Server
) -> None:
    # moto keeps keys ending in "/" as objects (as AWS does) and dates every multipart upload
    # 2010: stale for any threshold.
    env = moto_env(env, moto_s3)
    env["IMMICH_STREAM_STOP"] = "none"
    bucket = bucket_of(env)
    make_library(stack.library, photos=2)
    assert run_cli("backup", env=env).code == 0
    assert run_cli("backup", env=env).code == 0
    first, second = bucket.snapshots()
    s3, name = bucket.s3, bucket.name
    run = sid(dt.datetime.now(dt.UTC) - dt.timedelta(days=3), 9)
    odd = [
        "immich-backup/",
        "immich-backup/snapshots/",
        "immich-backup/data/",
        "immich-backup/locks/",
        "immich-backup/snapshots/README.txt",
        "immich-backup/snapshots/not-an-id/snapshot.json",
        "immich-backup/data/stray.bin",
        "immich-backup/data/not-a-run/library/x.jpg",
        f"immich-backup2/data/{run}/library/other.jpg",
        "other-app/file.bin",
    ]
    for key in odd:
        s3.put_object(Bucket=name, Key=key, Body=b"" if key.endswith("/") else b"not immich-stream's")
    others = {
        s3.create_multipart_upload(Bucket=name, Key=key)["UploadId"]
        for key in (f"immich-backup2/data/{run}/library/big.mp4", "other-app/big.bin", "immich-backup/stray-upload.bin")
    }

    r = run_cli("snapshots", env=env)
    assert r.code == 0, r.err
    assert first in r.out and second in r.out and "2 snapshots" in r.out
    r = run_cli("prune", "--keep-last", "1", "--stale-after", "1s", env=env)
    assert r.code == 0, r.err
    assert bucket.snapshots() == [second, "not-an-id"]  # the stray "snapshot" is not ours: left alone
    listed = {
        o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name) for o in page.get("Contents", [])
    }
    assert set(odd) <= listed, f"prune deleted what is not its own: {set(odd) - listed}"
    uploads = {u["UploadId"] for u in s3.list_multipart_uploads(Bucket=name).get("Uploads", [])}
    assert others <= uploads, "prune aborted another prefix's (or a stray) multipart upload"
    r = run_cli("verify", "--all", "--read-data", env=env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err

    # A repository at the bucket's root would make every key its own: refused.
    s3.put_object(Bucket=name, Key="config.json", Body=bucket.get("config.json"))
    for prefix in ("", "/"):
        r = run_cli("prune", "--keep-last", "1", "--stale-after", "1s", "--prefix", prefix, env=env)
        assert r.code == 2 and r.err.strip() == r.last_error and "prefix" in r.last_error and "empty" in r.last_error
    uploads = {u["UploadId"] for u in s3.list_multipart_uploads(Bucket=name).get("Uploads", [])}
    assert others <= uploads


@pytest.mark.slow
@pytest.mark.parametrize("repack", [False, True], ids=["max-unused 100%", "repack"])
def test_prune_keeps_every_pack_and_chunk_a_kept_snapshot_or_a_resumable_run_names_in_every_format(
    s3_env: dict[str, str], tmp_path: Path, repack: bool
) -> None:
    """Snapshots of the three formats (objects of their own; blobs of packs; chunks) in one
    repository: all verify and restore; a prune that keeps only the newest keeps every
    object, pack and chunk pack it names (of the removed snapshots' runs too) and what an
    interrupted run's journal names, deletes the rest, and says how many bytes sit unused
    in the packs it kept. With repacking (the default --max-unused 5%), the pack two thirds
    unused is replaced by a new one holding the one file still named, the manifest names
    that, and the pack a resumable run's journal names is left as it is."""
    from immich_stream.repository.layout import new_snapshot_id
    from tests.test_hardening_restore import Entry, restored, write_snapshot

    bodies = {n: os.urandom(3000 + 100 * i) for i, n in enumerate(["old", "whole", "x1", "x2", "x3", "db", "db2"])}
    now = dt.datetime.now(dt.UTC)
    s1 = write_snapshot(s3_env, {"upload/old.jpg": Entry(bodies["old"]), "upload/whole.jpg": Entry(bodies["whole"])},
                        hours_ago=48)  # fmt: skip
    bucket = bucket_of(s3_env)
    m1 = {m["path"]: m for m in bucket.manifest(s1)}
    s2 = write_snapshot(
        s3_env,
        {
            "upload/whole.jpg": Entry(bodies["whole"], reuse=m1["upload/whole.jpg"]),
            **{f"upload/{n}.jpg": Entry(bodies[n], pack="p") for n in ("x1", "x2", "x3")},
            "upload/db.bin": Entry(bodies["db"] * 3, chunk=4096, pack="c"),
            "upload/db2.bin": Entry(bodies["db2"], chunk=2048, pack="c2"),
        },
        hours_ago=24,
    )
    m2 = {m["path"]: m for m in bucket.manifest(s2)}
    three = {
        "upload/whole.jpg": Entry(bodies["whole"], reuse=m1["upload/whole.jpg"]),
        "upload/x1.jpg": Entry(bodies["x1"], reuse=m2["upload/x1.jpg"]),
        "upload/db.bin": Entry(bodies["db"] * 3, reuse=m2["upload/db.bin"]),
    }
    s3 = write_snapshot(s3_env, three)
    # an interrupted run, not stale: its journal names db2's chunks (it would resume from them)
    run = new_snapshot_id(now)
    journal = json.dumps({**m2["upload/db2.bin"], "path": "upload/db2-resumed.bin"}) + "\n"
    bucket.put(f"snapshots/{run}/journal/main-000000.jsonl.gz", gzip.compress(journal.encode()))

    r = run_cli("verify", "--all", "--read-data", env=s3_env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err
    for snap, want in ((s1, 2), (s2, 6)):  # format 1, and format 3 with an object of format 1
        r = run_cli("restore", snap, "--root", "library", "--to", str(tmp_path / snap), env=s3_env)
        assert r.code == 0, r.err
        assert len(restored(tmp_path / snap)) == want
    pack_p, pack_c, pack_c2 = (m2[p]["key"] if p.endswith(".jpg") else m2[p]["chunks"][0][0]
                               for p in ("upload/x1.jpg", "upload/db.bin", "upload/db2.bin"))  # fmt: skip
    whole = m1["upload/whole.jpg"]["key"]
    before = data_keys(bucket)
    assert {pack_p, pack_c, pack_c2, whole, m1["upload/old.jpg"]["key"]} <= before

    size_p = bucket.keys("data/")[pack_p]
    r = run_cli("prune", "--keep-last", "1", *([] if repack else ["--max-unused", "100%"]), env=s3_env)
    assert r.code == 0, r.err
    assert bucket.snapshots() == [s3]
    after = data_keys(bucket)
    unused = size_p - len(bodies["x1"])  # x2 and x3: no kept snapshot needs them
    assert unused == len(bodies["x2"]) + len(bodies["x3"])
    [line] = [ln for ln in r.out.splitlines() if ln.startswith("packs")]
    [repacked] = [ln for ln in r.out.splitlines() if ln.startswith("repack")]
    if not repack:
        assert after == {whole, pack_p, pack_c, pack_c2}, sorted(after)  # what s3 and the journal name, no more
        assert line.startswith("packs      1 kept partly used"), r.out
        assert f"{unused / 1024:.1f} KiB" in line or f"{unused} B" in line, line
        assert repacked.startswith("repack     0 packs repacked"), r.out
    else:
        m3 = {m["path"]: m for m in bucket.manifest(s3)}
        new_pack = m3["upload/x1.jpg"]["key"]
        assert new_pack != pack_p and "/%pack/" in new_pack and m3["upload/x1.jpg"]["offset"] == 0
        assert after == {whole, new_pack, pack_c, pack_c2}, sorted(after)  # pack_p is gone
        assert bucket.get(new_pack) == bodies["x1"]  # the one file still named, nothing else
        assert m3["upload/db.bin"]["chunks"] == m2["upload/db.bin"]["chunks"]  # pack_c: all of it named
        assert m3["upload/whole.jpg"]["key"] == whole
        assert line.startswith("packs      0 kept partly used"), r.out
        assert repacked.startswith("repack     1 packs repacked into 1 ("), r.out
        assert "1 manifests written again" in repacked, r.out
        assert not any(k.endswith("manifest.rewrite.jsonl.gz") for k in bucket.keys())
    r = run_cli("verify", "--read-data", env=s3_env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err
    r = run_cli("restore", s3, "--root", "library", "--to", str(tmp_path / "s3"), env=s3_env)
    assert r.code == 0, r.err
    assert restored(tmp_path / "s3") == {os.fsencode(p): e.body for p, e in three.items()}
