"""Fixtures of the unit tests; the session's S3 servers come from tests/conftest.py."""

from __future__ import annotations

import pytest

from immich_stream.config import Settings
from tests.conftest import KEY, SECRET, S3Server
from tests.helpers import make_settings

# -- the upload stage against a real S3 server (rclone) -----------------------------------------


@pytest.fixture
def s3_settings(
    rclone_s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    return make_settings(
        endpoint=rclone_s3.endpoint, bucket=rclone_s3.new_bucket(), home=tmp_path_factory.mktemp("home"),
        IMMICH_STREAM_JOBS="4", IMMICH_STREAM_RETRIES="2", IMMICH_STREAM_PART_SIZE="5MiB",
        IMMICH_STREAM_MAX_MEMORY="64MiB",
    )  # fmt: skip
