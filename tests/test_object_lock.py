"""Backups the host cannot destroy (issue 24, part 2): with --lock-days every object of a
snapshot is retained by S3 Object Lock; an attacker's deletes and overwrites leave the
repository readable `--as-of` a time before them; prune keeps what is locked until its
retention ends. moto in server mode enforces Object Lock (a locked version cannot be
deleted; a plain delete adds a delete marker)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import time
from pathlib import Path

from tests.conftest import CONTAINERS, KEY, SECRET, ImmichStack, S3Server, bucket_of, running_containers
from tests.helpers import Bucket, make_library, run_cli, tree


def _lock_env(env: dict, moto: S3Server, lock: bool = True) -> dict:
    env = dict(env)
    env["S3_ENDPOINT_URL"] = moto.endpoint
    env["S3_BUCKET"] = name = "lk-" + str(time.time_ns())[-12:]
    Bucket(moto.endpoint, name, KEY, SECRET).s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=lock)
    return env


def _versions(bucket: Bucket) -> list[dict]:
    out: list[dict] = []
    for page in bucket.s3.get_paginator("list_object_versions").paginate(Bucket=bucket.name):
        out += [{**v, "marker": False} for v in page.get("Versions", [])]
        out += [{**m, "marker": True} for m in page.get("DeleteMarkers", [])]
    return out


def _snapshot_keys(bucket: Bucket, sid: str) -> set[str]:
    keys = {f"snapshots/{sid}/{n}" for n in ("manifest.jsonl.gz", "database.sql.gz", "snapshot.json")}
    for line in bucket.manifest(sid):
        keys.update(c[0] for c in line.get("chunks") or [])
        if line.get("key"):
            keys.add(line["key"])
    return keys


def _retention(bucket: Bucket, key: str) -> tuple[str, dt.datetime]:
    h = bucket.s3.head_object(Bucket=bucket.name, Key=f"{bucket.prefix}/{key}")
    return h.get("ObjectLockMode"), h.get("ObjectLockRetainUntilDate")


def test_locked_snapshots_survive_an_attacker(env: dict, stack: ImmichStack, moto_s3: S3Server, tmp_path: Path) -> None:
    make_library(stack.library, photos=4)
    rows = stack.psql("SELECT count(*) FROM assets")
    env = _lock_env(env, moto_s3)
    bucket = bucket_of(env)
    r = run_cli("backup", "--stop", "none", "--lock-days", "1", env=env)
    assert r.code == 0, r.err
    [first] = bucket.snapshots()
    snap = bucket.snapshot(first)
    committed = dt.datetime.fromisoformat(snap["time"])
    keys = _snapshot_keys(bucket, first)
    # (1) every object of the snapshot: retained GOVERNANCE until at least the commit + 1 day
    for key in keys:
        mode, until = _retention(bucket, key)
        assert mode == "GOVERNANCE" and until >= committed + dt.timedelta(days=1), key
    assert dt.datetime.fromisoformat(snap["lock"]["until"]) >= committed + dt.timedelta(days=1)
    reused = {k for k in keys if k.startswith("data/")}
    before = {k: _retention(bucket, k)[1] for k in reused}

    # a longer lock: the parent's guarantee no longer reaches, what is reused is extended (and
    # this run's new objects go through botocore, not the direct PUT path: both carry it)
    r = run_cli(
        "backup",
        "--stop",
        "none",
        "--lock-days",
        "3",
        "--lock-mode",
        "compliance",
        env=dict(env, IMMICH_STREAM_BOTOCORE_ONLY="1"),
    )
    assert r.code == 0, r.err
    second = bucket.snapshots()[-1]
    snap2 = bucket.snapshot(second)
    c2 = dt.datetime.fromisoformat(snap2["time"])
    assert reused <= _snapshot_keys(bucket, second)
    for key in _snapshot_keys(bucket, second):
        mode, until = _retention(bucket, key)
        assert until >= c2 + dt.timedelta(days=3) and mode == ("GOVERNANCE" if key in reused else "COMPLIANCE"), key
    extended = {k: _retention(bucket, k)[1] for k in reused}
    assert all(extended[k] > before[k] for k in reused)
    # the same again: the parent's guarantee reaches far enough, nothing is touched
    r = run_cli("backup", "--stop", "none", "--lock-days", "3", "--lock-mode", "compliance", env=env)
    assert r.code == 0, r.err
    assert {k: _retention(bucket, k)[1] for k in reused} == extended
    ids = bucket.snapshots()
    assert "0 extended" in r.err

    # (2) the attacker: a delete of every version (refused for the locked ones), then junk
    # over every object and a delete marker on every key
    time.sleep(1.2)
    t = dt.datetime.now(dt.UTC)
    time.sleep(1.2)
    s3, name = bucket.s3, bucket.name
    refused = 0
    for v in _versions(bucket):
        try:
            s3.delete_object(Bucket=name, Key=v["Key"], VersionId=v["VersionId"])
        except s3.exceptions.ClientError:
            refused += 1
    for key in {v["Key"] for v in _versions(bucket)}:
        s3.put_object(Bucket=name, Key=key, Body=b"encrypted by ransomware")
        s3.delete_object(Bucket=name, Key=key)
    assert refused >= len(keys) and bucket.snapshots() == []
    assert "no repository at" in run_cli("snapshots", env=env).last_error  # config.json too

    r = run_cli("snapshots", "--as-of", t.isoformat(), "--json", env=env)
    assert r.code == 0, r.err
    assert [x["id"] for x in json.loads(r.out)["summary"]["snapshots"]] == ids
    r = run_cli("verify", "--all", "--read-data", "--as-of", t.isoformat(), env=env)
    assert r.code == 0 and "3 snapshots" in r.out and "no problems" in r.out, r.out + r.err
    target = tmp_path / "back"
    r = run_cli("restore", "--as-of", t.isoformat(), "--to", str(target), "--root", "library", env=env)
    assert r.code == 0, r.err
    want, got = tree(stack.library), tree(target)
    assert sorted(got) == sorted(want) and all(got[p].read_bytes() == want[p].read_bytes() for p in want)
    dump = tmp_path / "immich.sql.gz"
    r = run_cli("restore", "--as-of", t.isoformat(), "--dump-to", str(dump), env=env)
    assert r.code == 0, r.err
    assert b"CREATE TABLE public.assets" in gzip.decompress(dump.read_bytes())
    stack.psql("DROP DATABASE immich WITH (FORCE)", db="postgres")
    stack.psql("CREATE DATABASE immich", db="postgres")
    r = run_cli("restore", "--as-of", t.isoformat(), "--database", env=env)
    assert r.code == 0, r.err
    assert stack.psql("SELECT count(*) FROM assets") == rows and running_containers() == set(CONTAINERS)
    # an as-of view is read-only, and a TIME without a zone is refused in one line
    r = run_cli("restore", "--as-of", "2026-05-01T03:00", "--dump-to", str(dump), env=env)
    assert r.code == 2 and "--as-of" in r.last_error and "zone" in r.last_error


def test_lock_days_on_a_bucket_without_object_lock_is_refused_before_anything_stops(
    env: dict, stack: ImmichStack, moto_s3: S3Server
) -> None:
    env = _lock_env(env, moto_s3, lock=False)
    started = stack.started_at()
    r = run_cli("backup", "--lock-days", "7", env=env)
    assert r.code == 2, r.err
    assert "Object Lock" in r.last_error and "--lock-days 7" in r.last_error
    assert len([ln for ln in r.err.splitlines() if "error" in ln]) == 1
    assert stack.started_at() == started and running_containers() == set(CONTAINERS)
    assert bucket_of(env).snapshots() == []


def test_prune_keeps_locked_snapshots_until_their_retention_ends(
    env: dict, stack: ImmichStack, moto_s3: S3Server
) -> None:
    make_library(stack.library, photos=2)
    env = _lock_env(env, moto_s3)
    env["IMMICH_STREAM_LOCK_DAY"] = "4s"  # --lock-days 2: retained 16 s after each run's start
    bucket = bucket_of(env)
    assert run_cli("backup", "--stop", "none", "--lock-days", "2", env=env).code == 0
    (stack.library / "library" / "gone.jpg").write_bytes(b"only in the first snapshot" * 1000)
    assert run_cli("backup", "--stop", "none", "--lock-days", "2", env=env).code == 0
    (stack.library / "library" / "gone.jpg").unlink()
    assert run_cli("backup", "--stop", "none", "--lock-days", "2", env=env).code == 0
    first, second, third = bucket.snapshots()
    gone = {k for k in _snapshot_keys(bucket, second) - _snapshot_keys(bucket, third) if k.startswith("data/")}
    r = run_cli("prune", "--keep-last", "1", "--lock-days", "2", env=env)
    assert r.code == 0, r.err
    assert f"6 objects kept until their retention ends (snapshots {first}, {second})" in r.out
    assert bucket.snapshots() == [first, second, third]  # locked: kept, whatever the policy says
    # once their retention is over, the next prune deletes them, every version
    until = max(_retention(bucket, f"snapshots/{s}/snapshot.json")[1] for s in (first, second))
    time.sleep(max(0.0, (until - dt.datetime.now(dt.UTC)).total_seconds()) + 1)
    r = run_cli("prune", "--keep-last", "1", "--lock-days", "2", env=env)
    assert r.code == 0, r.err
    assert bucket.snapshots() == [third]
    left = {v["Key"][len(bucket.prefix) + 1 :] for v in _versions(bucket)}
    assert not any(k.startswith((f"snapshots/{first}", f"snapshots/{second}")) for k in left)
    assert not gone & left
    # the locks' old versions (rewritten every 60 s, deleted at each run's end) are gone too:
    # what is left is the last prune's own lock, deleted after its sweep
    assert len([v for v in _versions(bucket) if "/locks/" in v["Key"]]) <= 2
