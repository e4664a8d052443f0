"""Object Lock's rules (repository/retention.py) and --as-of's TIME (commands/common.py)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt

import pytest

from immich_stream.commands.common import as_of
from immich_stream.config import Settings, Tuning
from immich_stream.errors import ConfigError
from immich_stream.repository.layout import Layout
from immich_stream.repository.retention import LockPolicy, locked_key

SID = "2026-05-01T030000Z-ab12"


@pytest.mark.parametrize(
    ("rel", "locked"),
    [
        ("config.json", True),
        (f"data/{SID}/%pack/0123456789abcdef", True),
        (f"data/{SID}/library/upload/a.jpg", True),
        (f"snapshots/{SID}/manifest.jsonl.gz", True),
        (f"snapshots/{SID}/database.sql.gz", True),
        (f"snapshots/{SID}/snapshot.json", True),
        (f"snapshots/{SID}/journal/main-000000.jsonl.gz", False),
        (f"snapshots/{SID}/manifest.rewrite.jsonl.gz", False),
        ("locks/1796412527-vm-8415-4de5a981.json", False),
        (f"preflight/vm-{SID}", False),
        ("doctor/ab12/probe", False),
    ],
)
def test_only_a_snapshots_objects_and_the_config_are_retained(rel: str, locked: bool) -> None:
    assert locked_key(Layout("immich-backup"), rel) is locked


def test_new_objects_get_twice_the_days_and_need_n_days_from_now() -> None:
    now = dt.datetime(2026, 5, 1, 3, tzinfo=dt.UTC)
    assert LockPolicy.of(Settings()) is None  # off by default
    policy = LockPolicy.of(dataclasses.replace(Settings(), lock_days=30, lock_mode="compliance"), now)
    assert policy is not None and policy.mode == "COMPLIANCE"
    assert policy.until == now + dt.timedelta(days=60)
    assert policy.needed(now) == now + dt.timedelta(days=30, hours=1)
    short = LockPolicy.of(dataclasses.replace(Settings(), lock_days=2, tuning=Tuning(lock_day=4.0)), now)
    assert short is not None and short.until == now + dt.timedelta(seconds=16)


def test_as_of_takes_iso_8601_with_a_zone_or_a_duration_ago() -> None:
    def parse(text: str) -> dt.datetime | None:
        return as_of(argparse.Namespace(as_of=text))

    assert parse("2026-05-01T03:00:00Z") == dt.datetime(2026, 5, 1, 3, tzinfo=dt.UTC)
    assert parse("2026-05-01T05:00+02:00") == dt.datetime(2026, 5, 1, 3, tzinfo=dt.UTC)
    ago = parse("3d")
    assert ago is not None and abs((dt.datetime.now(dt.UTC) - ago).total_seconds() - 3 * 86400) < 60
    for bad in ("2026-05-01T03:00", "yesterday", "2026-13-01T00:00Z", "1000000d", "99999999999d"):
        with pytest.raises(ConfigError, match="--as-of"):
            parse(bad)


def test_an_as_of_view_refuses_every_write() -> None:
    from immich_stream.errors import StoreError
    from immich_stream.s3.asof import AsOfStore
    from immich_stream.s3.options import StoreOptions

    view = AsOfStore(StoreOptions(bucket="photos"), dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
    for write in (view.put, view.delete, view.create_multipart, view.abort_multipart, view.restore_object):
        with pytest.raises(StoreError, match="read-only view"):
            write("immich-backup/config.json", b"")
