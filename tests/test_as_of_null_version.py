"""--as-of (s3/asof.py) on a bucket whose versioning was turned on after the repository was
written (the usual way to Object Lock an existing bucket): the objects written before have the
version id "null". A read as of a time before an overwrite must get that version's bytes, not
the current (overwritten) ones."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

from immich_stream.s3.asof import AsOfStore
from immich_stream.s3.options import StoreOptions
from tests.conftest import KEY, SECRET, S3Server
from tests.helpers import Bucket


async def _read(endpoint: str, bucket: str, key: str, when: dt.datetime) -> tuple[bytes, int | None]:
    options = StoreOptions(bucket=bucket, endpoint_url=endpoint, path_style=True, credentials=(KEY, SECRET))
    async with AsOfStore(options, when) as store:
        return await store.get(key), await store.head(key)


@pytest.mark.slow
def test_as_of_reads_the_null_version_not_the_overwrite(moto_s3: S3Server) -> None:
    name = "ao-" + str(time.time_ns())[-12:]
    s3 = Bucket(moto_s3.endpoint, name, KEY, SECRET).s3
    s3.create_bucket(Bucket=name)
    key = "p/data/x"
    s3.put_object(Bucket=name, Key=key, Body=b"genuine bytes")  # before versioning: version "null"
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    time.sleep(1.2)
    then = dt.datetime.now(dt.UTC)
    time.sleep(1.2)
    s3.put_object(Bucket=name, Key=key, Body=b"ransomware!!")  # the overwrite, a real version id
    assert asyncio.run(_read(moto_s3.endpoint, name, key, then)) == (b"genuine bytes", 13)


async def _open_config(endpoint: str, bucket: str, when: dt.datetime) -> tuple[bytes, int, bytes]:
    options = StoreOptions(bucket=bucket, endpoint_url=endpoint, path_style=True, credentials=(KEY, SECRET))
    async with AsOfStore(options, when) as store:
        config = await store.get("p/config.json")
        held = len(store._seen)
        return config, held, await store.get("p/data/s1/f7")


def test_as_of_reading_config_json_does_not_list_the_whole_repository(moto_s3: S3Server) -> None:
    """config.json's folder is the repository's: its versions are resolved without listing (and
    holding in memory) the version of every object under data/ and snapshots/."""
    name = "ao-" + str(time.time_ns())[-12:]
    s3 = Bucket(moto_s3.endpoint, name, KEY, SECRET).s3
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=name, Key="p/config.json", Body=b"{}")
    for i in range(40):
        s3.put_object(Bucket=name, Key=f"p/data/s1/f{i}", Body=b"x%d" % i)
    time.sleep(1.2)
    config, held, data = asyncio.run(_open_config(moto_s3.endpoint, name, dt.datetime.now(dt.UTC)))
    assert (config, data) == (b"{}", b"x7")
    assert held == 1, f"{held} versions listed and held to read config.json"
