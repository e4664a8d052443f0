"""--checksum md5|sha256|crc32c: every upload carries a check the server verifies.

Against a real SeaweedFS (it verifies Content-MD5 and x-amz-checksum-*), with the fault proxy
flipping one byte of a request body on its way: the server must refuse the corrupted request,
and the retry must land the right bytes. Covers a single PUT and a multipart upload (parts of
SeaweedFS's 5 MiB minimum), through the code path backups and restores use (Store).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store
from immich_stream.s3.writers import MultipartUpload
from tests.conftest import KEY, SECRET, S3Server
from tests.faultproxy import FaultProxy, is_part_upload, is_put
from tests.helpers import Bucket, make_settings

MIB = 1024 * 1024
HEADERS = {"md5": "content-md5", "sha256": "x-amz-checksum-sha256", "crc32c": "x-amz-checksum-crc32c"}


def assert_carried_only(headers: dict[str, str], checksum: str) -> None:
    """The corrupted request carried the chosen check, and no other (sha256 and crc32c
    replace the MD5 pass, they do not add to it)."""
    assert HEADERS[checksum] in headers, headers
    assert not {h for c, h in HEADERS.items() if c != checksum} & set(headers), headers


def rejected(proxy: FaultProxy) -> list[tuple[str, str, int]]:
    return [r for r in proxy.requests if r[0] == "PUT" and 400 <= r[2] < 500]


@pytest.mark.parametrize("checksum", ["md5", "sha256", "crc32c"])
async def test_corrupted_put_is_rejected_and_sent_again(
    checksum: str,
    seaweed_s3: S3Server,
    proxy_factory: type[FaultProxy],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = seaweed_s3.new_bucket()
    proxy = proxy_factory(seaweed_s3.endpoint)
    rule = proxy.add(lambda m, p, q: is_put(m, p, q) and p.endswith("/photo.jpg"), corrupt=True, times=1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    data = os.urandom(300_000)
    async with Store(
        StoreOptions.from_settings(
            make_settings(
                endpoint=proxy.endpoint,
                bucket=bucket,
                home=tmp_path,
                IMMICH_STREAM_CHECKSUM=checksum,
                IMMICH_STREAM_RETRIES="3",
            )
        )
    ) as store:
        await store.put("lib/photo.jpg", data)

    assert rule.hits == 1  # one body arrived with a byte flipped...
    assert_carried_only(rule.headers_seen[0], checksum)
    assert len(rejected(proxy)) == 1, proxy.requests  # ...the server refused it...
    stored = Bucket(seaweed_s3.endpoint, bucket, KEY, SECRET, "lib").get("photo.jpg")
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()  # ...and the retry landed it


@pytest.mark.parametrize("checksum", ["md5", "sha256", "crc32c"])
async def test_corrupted_part_is_rejected_and_sent_again(
    checksum: str,
    seaweed_s3: S3Server,
    proxy_factory: type[FaultProxy],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = seaweed_s3.new_bucket()
    proxy = proxy_factory(seaweed_s3.endpoint)
    rule = proxy.add(lambda m, p, q: is_part_upload(m, p, q) and q.get("partNumber") == "1", corrupt=True, times=1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    parts = [os.urandom(5 * MIB), os.urandom(1 * MIB)]
    budget = ByteBudget(64 * MIB)
    settings = make_settings(
        endpoint=proxy.endpoint,
        bucket=bucket,
        home=tmp_path,
        IMMICH_STREAM_CHECKSUM=checksum,
        IMMICH_STREAM_RETRIES="3",
    )
    async with (
        Store(StoreOptions.from_settings(settings)) as store,
        MultipartUpload(store, "lib/video.mp4", budget) as mp,
    ):
        for part in parts:
            await budget.acquire(len(part))
            await mp.add(part)
        await mp.complete()

    assert rule.hits == 1
    assert_carried_only(rule.headers_seen[0], checksum)
    assert len(rejected(proxy)) == 1, proxy.requests
    stored = Bucket(seaweed_s3.endpoint, bucket, KEY, SECRET, "lib").get("video.mp4")
    assert stored == b"".join(parts)


async def test_without_a_checksum_header_the_corruption_would_land(
    seaweed_s3: S3Server, proxy_factory: type[FaultProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same flipped byte in a PUT that carries no checksum header is stored
    as sent, so the rejections above are the headers' doing."""
    bucket = seaweed_s3.new_bucket()
    proxy = proxy_factory(seaweed_s3.endpoint)
    proxy.add(lambda m, p, q: is_put(m, p, q) and p.endswith("/plain.bin"), corrupt=True, times=1)
    data = os.urandom(300_000)
    Bucket(proxy.endpoint, bucket, KEY, SECRET, "lib").put("plain.bin", data)
    stored = Bucket(seaweed_s3.endpoint, bucket, KEY, SECRET, "lib").get("plain.bin")
    assert stored != data and len(stored) == len(data)
