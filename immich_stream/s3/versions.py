"""Versioning and Object Lock requests of a Store's bucket: the bucket's settings
(GetBucketVersioning, GetObjectLockConfiguration), an object's retention (HeadObject,
PutObjectRetention), the versions of keys (ListObjectVersions) and their deletion by
VersionId. Each goes through the Store's one retry wrapper. The repository decides what
to lock and what to delete (repository/retention.py); this only moves the requests.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from immich_stream.errors import StoreError
from immich_stream.s3.store import Store


@dataclass(frozen=True)
class BucketLock:
    versioning: str  # "Enabled", "Suspended" or "" (never enabled)
    object_lock: bool
    default_mode: str | None = None  # the bucket's default retention, if any
    default_days: int | None = None  # Years are given as 365 days each

    def describe(self) -> str:
        default = f"default retention {self.default_mode} {self.default_days} days" if self.default_mode else "none"
        return (
            f"versioning {self.versioning or 'off'}, Object Lock {'enabled' if self.object_lock else 'off'}, "
            f"default retention: {default.removeprefix('default retention ')}"
        )


@dataclass(frozen=True)
class Version:
    key: str
    version_id: str
    last_modified: dt.datetime
    size: int
    latest: bool
    delete_marker: bool
    storage_class: str | None = None


async def bucket_lock(store: Store) -> BucketLock:
    """The bucket's versioning and Object Lock settings. A server that knows neither (rclone
    serve s3 answers NotImplemented) has neither."""
    client: Any = store._client
    b = store.bucket
    try:
        ver = await store._retry.call("read the bucket's versioning", lambda: client.get_bucket_versioning(Bucket=b))
    except StoreError as exc:
        if exc.code in ("NotImplemented", "MethodNotAllowed", "501", "405"):
            return BucketLock("", False)
        raise
    try:
        cfg = await store._retry.call(
            "read the bucket's Object Lock configuration", lambda: client.get_object_lock_configuration(Bucket=b)
        )
    except StoreError as exc:
        if exc.code in (
            "ObjectLockConfigurationNotFoundError",
            "NotImplemented",
            "MethodNotAllowed",
            "InvalidRequest",
            "501",
            "404",
            "405",
        ):
            return BucketLock(str(ver.get("Status") or ""), False)
        raise
    conf = cfg.get("ObjectLockConfiguration") or {}
    rule = (conf.get("Rule") or {}).get("DefaultRetention") or {}
    days = int(rule.get("Days") or 0) + 365 * int(rule.get("Years") or 0)
    mode = rule.get("Mode")
    return BucketLock(
        str(ver.get("Status") or ""),
        conf.get("ObjectLockEnabled") == "Enabled",
        str(mode) if mode else None,
        days or None,
    )


async def retention(store: Store, key: str, version_id: str | None = None) -> tuple[str, dt.datetime] | None:
    """(mode, retain-until) of the object (its current version, or `version_id`), or None
    when it has none (or is gone)."""
    kw: dict[str, Any] = {"Bucket": store.bucket, "Key": key, **store._sse_c_kw}
    if version_id:
        kw["VersionId"] = version_id

    async def go() -> dict[str, Any] | None:
        try:
            return dict(await store._client.head_object(**kw))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "405"):
                return None  # gone, or a delete marker (405)
            raise

    resp = await store._retry.call(f"read the retention of {key}", go, small=True)
    if not resp or not resp.get("ObjectLockMode") or not resp.get("ObjectLockRetainUntilDate"):
        return None
    until = resp["ObjectLockRetainUntilDate"]
    if isinstance(until, str):
        until = dt.datetime.fromisoformat(until.replace("Z", "+00:00"))
    return str(resp["ObjectLockMode"]).upper(), until


async def set_retention(store: Store, key: str, mode: str, until: dt.datetime) -> None:
    """PutObjectRetention on the current version of key (never shortens: callers ask only
    for a later date)."""
    await store._retry.call(
        f"extend the retention of {key}",
        lambda: store._client.put_object_retention(
            Bucket=store.bucket, Key=key, Retention={"Mode": mode.upper(), "RetainUntilDate": until}
        ),
        small=True,
    )


async def list_versions(store: Store, prefix: str, shallow: bool = False) -> AsyncIterator[Version]:
    """Every version and delete marker under prefix: keys in order, each key's newest first
    (shallow: only the keys directly in the folder `prefix`, none in its subfolders)."""
    kw: dict[str, Any] = {"Bucket": store.bucket, "Prefix": prefix, "MaxKeys": 1000}
    if shallow:
        kw["Delimiter"] = "/"
    while True:
        resp = await store._retry.call(
            f"list the versions under {prefix}", functools.partial(store._client.list_object_versions, **kw)
        )
        items = [(v, False) for v in resp.get("Versions", [])] + [(m, True) for m in resp.get("DeleteMarkers", [])]
        # one page holds both lists; order them as S3 does: by key, then newest first
        items.sort(key=lambda it: (it[0]["Key"], -it[0]["LastModified"].timestamp(), not it[0].get("IsLatest")))
        for v, marker in items:
            yield Version(
                v["Key"],
                str(v.get("VersionId") or "null"),
                v["LastModified"],
                int(v.get("Size") or 0),
                bool(v.get("IsLatest")),
                marker,
                v.get("StorageClass"),
            )
        if not resp.get("IsTruncated"):
            return
        kw["KeyMarker"] = resp.get("NextKeyMarker")
        kw["VersionIdMarker"] = resp.get("NextVersionIdMarker")


async def delete_versions(store: Store, versions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Delete (key, version id) pairs for good, 1,000 per request, without bypassing any
    retention. Returns those the server refused (a retention it holds that the caller did
    not know of), for the caller to keep."""
    refused: list[tuple[str, str]] = []
    for i in range(0, len(versions), 1000):
        batch = versions[i : i + 1000]
        body = {"Objects": [{"Key": k, "VersionId": v} for k, v in batch], "Quiet": True}
        resp = await store._retry.call(
            "delete versions", functools.partial(store._client.delete_objects, Bucket=store.bucket, Delete=body)
        )
        refused.extend((e.get("Key", ""), e.get("VersionId", "")) for e in resp.get("Errors") or [])
    return refused
