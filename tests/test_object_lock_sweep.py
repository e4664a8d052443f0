"""prune's version sweep (repository/prune_locked.py) against an attacker's overwrite, on a
real moto bucket with versioning and Object Lock: the host's key may PutObject, so it can
hide a data object's bytes under a new version of the same key (same size, garbage). The
genuine version is then noncurrent; `lock extend` only ever extends the current version, so
once the genuine one's retention ends, a sweep that deletes noncurrent versions "older than
the window" destroys the only good copy while verify-less prunes report success."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

from immich_stream.repository.manifest import key_digest
from immich_stream.repository.prune_locked import LockReport, sweep
from immich_stream.repository.repo import Repo
from immich_stream.repository.retention import LockPolicy
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store
from tests.conftest import KEY, SECRET, S3Server
from tests.helpers import Bucket

DATA = "p/data/2026-05-01T030000Z-ab12/library/upload/a.jpg"


def _versions(s3, bucket: str, key: str) -> list[dict]:
    resp = s3.list_object_versions(Bucket=bucket, Prefix=key)
    return [v for v in resp.get("Versions", []) if v["Key"] == key]


async def _sweep(endpoint: str, bucket: str, deleted: set[str], needed: set[str] = frozenset()) -> LockReport:
    options = StoreOptions(bucket=bucket, endpoint_url=endpoint, path_style=True, credentials=(KEY, SECRET))
    async with Store(options) as store:
        repo = Repo(store, "p")
        day = dt.timedelta(seconds=1)
        repo.lock = LockPolicy("GOVERNANCE", 1, day, dt.datetime.now(dt.UTC) + 2 * day)
        report = LockReport()
        await sweep(repo, {f"p/{k}" for k in deleted}, report, {key_digest(k) for k in needed})
        return report


@pytest.mark.slow
def test_sweep_keeps_the_version_an_overwrite_hid(moto_s3: S3Server, caplog: pytest.LogCaptureFixture) -> None:
    name = "sw-" + str(time.time_ns())[-12:]
    s3 = Bucket(moto_s3.endpoint, name, KEY, SECRET).s3
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    genuine = b"the photo" * 100
    s3.put_object(
        Bucket=name,
        Key=DATA,
        Body=genuine,
        ObjectLockMode="GOVERNANCE",
        ObjectLockRetainUntilDate=until,
        ChecksumAlgorithm="SHA256",
    )
    s3.put_object(Bucket=name, Key=DATA, Body=b"X" * len(genuine))  # the attacker: same key, same size
    lock = "p/locks/backup-1.json"
    s3.put_object(Bucket=name, Key=lock, Body=b"{}")
    s3.put_object(Bucket=name, Key=lock, Body=b'{"released": true}')
    time.sleep(4)  # the genuine version's retention is over, and it is noncurrent for > 1 "day"
    asyncio.run(_sweep(moto_s3.endpoint, name, set()))
    assert "1 data objects have older versions under their current one" in caplog.text
    kept = _versions(s3, name, DATA)
    assert len(kept) == 2, "the overwritten (genuine) version of a data object was deleted"
    old = next(v for v in kept if not v["IsLatest"])
    body = s3.get_object(Bucket=name, Key=DATA, VersionId=old["VersionId"])["Body"].read()
    assert body == genuine
    assert len(_versions(s3, name, lock)) == 1  # housekeeping objects' old versions still go
    # hidden by a delete marker (a host key that may delete): kept while a snapshot needs it
    s3.delete_object(Bucket=name, Key=DATA)
    time.sleep(1.5)
    asyncio.run(_sweep(moto_s3.endpoint, name, set(), {DATA.removeprefix("p/")}))
    assert len(_versions(s3, name, DATA)) == 2
    # once prune deletes the key (no kept snapshot needs it), every version of it goes
    asyncio.run(_sweep(moto_s3.endpoint, name, {DATA.removeprefix("p/")}))
    assert _versions(s3, name, DATA) == []


def test_sweep_never_removes_the_delete_marker_over_a_locked_version(moto_s3: S3Server) -> None:
    """prune deleted snapshot.json (a delete marker); an older version of it is still locked
    (written before a `key rotate` rewrote it without --lock-days). Deleting the marker with
    the newer versions would make the locked old one current: the dropped snapshot back."""
    name = "sw-" + str(time.time_ns())[-12:]
    s3 = Bucket(moto_s3.endpoint, name, KEY, SECRET).s3
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    key = "p/snapshots/2026-05-01T030000Z-ab12/snapshot.json"
    until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
    s3.put_object(
        Bucket=name,
        Key=key,
        Body=b"{}",
        ObjectLockMode="GOVERNANCE",
        ObjectLockRetainUntilDate=until,
        ChecksumAlgorithm="SHA256",
    )
    s3.put_object(Bucket=name, Key=key, Body=b"{ }")  # rewritten, unlocked
    s3.delete_object(Bucket=name, Key=key)  # prune's delete
    report = asyncio.run(_sweep(moto_s3.endpoint, name, {key.removeprefix("p/")}))
    listed = s3.list_objects_v2(Bucket=name, Prefix="p/snapshots/").get("Contents", [])
    assert listed == [], "a dropped snapshot's snapshot.json came back"
    assert report.kept_locked == 1
