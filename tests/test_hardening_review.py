"""A hostile review of issue 22's merged hardening: a reader whose lock is lost stops, the
offline key restores an authenticated repository, a damaged or forged manifest line costs
only its entry (or is named forged), a replaced config.json is forged, and more.

Snapshots are written through the repository code (tests/test_hardening_restore.py's
write_snapshot) into a bucket on the real rclone S3 server; the real CLI reads them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import bucket_of
from tests.helpers import run_cli, start_cli, wait_for
from tests.test_hardening_restore import photos, restored, write_snapshot

EXIT_PARTIAL = 7
EXIT_FORGED = 8


# -- 1: a reader whose lock is lost stops -------------------------------------------------------


@pytest.mark.parametrize("command", ["restore", "verify"])
def test_a_reader_whose_lock_was_removed_stops_before_prune_can_delete_its_snapshot(
    s3_env: dict[str, str], proxy_factory, tmp_path: Path, command: str
) -> None:
    """`unlock --force` mid-restore: the restore's refresher stops for good, so prune may
    delete the snapshot it reads. It must stop with one line saying why, not go on (and end
    in a partial restore advising to run again, or a verify that reports a pruned snapshot)."""
    entries = photos(40)
    sid = write_snapshot(s3_env, entries)
    proxy = proxy_factory(s3_env["S3_ENDPOINT_URL"])
    proxy.add(lambda m, path, q: m == "GET" and "/data/" in path, delay=1.0)  # a slow download per file
    env = dict(s3_env, S3_ENDPOINT_URL=proxy.endpoint, IMMICH_STREAM_JOBS="1", IMMICH_STREAM_LOCK_STALE="12s")
    target = tmp_path / "target"
    args = ["restore", sid, "--to", str(target)] if command == "restore" else ["verify", sid, "--read-data"]
    proc = start_cli(*args, env=env)
    bucket = bucket_of(s3_env)
    wait_for(lambda: any(k.endswith(".json") for k in bucket.keys("locks/")), 30, what="the reader's lock")
    time.sleep(1)
    r = run_cli("unlock", "--force", env=s3_env)
    assert r.code == 0, r.err
    try:
        _out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    errors = [ln for ln in err.splitlines() if ln.startswith("immich-stream: error:")]
    assert proc.returncode == 1, err
    assert errors and "lost the repository lock" in errors[-1] and "run it again" in errors[-1], err
    if command == "restore":
        got = restored(target)
        assert got and len(got) < len(entries), "it stopped midway; what it wrote stays"
        assert all(body == entries[os.fsdecode(rel).removeprefix("library/")].body for rel, body in got.items())
