"""The threaded download path of `restore` (Store.download): resumed, checked, stoppable."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.conftest import ImmichStack
from tests.faultproxy import get_of
from tests.helpers import Bucket, make_library, run_cli
from tests.test_restore import snapshot_of_tree

MIB = 1024 * 1024


def test_restore_resumes_a_broken_download_where_it_stopped(
    env: dict, stack: ImmichStack, bucket: Bucket, proxy_factory, tmp_path: Path
) -> None:
    make_library(stack.library, photos=3)
    video = stack.library / "encoded-video" / "clip.mp4"
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(os.urandom(5 * MIB + 123))  # several 1 MiB reads
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    proxy = proxy_factory(env["S3_ENDPOINT_URL"])
    cut = 2 * MIB + 4567  # not on a read boundary
    broken = proxy.add(get_of("clip.mp4"), times=1, cut_after=cut)
    resumed = proxy.add(get_of("clip.mp4"))
    target = tmp_path / "restore"
    r = run_cli("restore", "--root", "library", "--to", str(target), env=dict(env, S3_ENDPOINT_URL=proxy.endpoint))
    assert r.code == 0, r.err
    assert snapshot_of_tree(target) == snapshot_of_tree(stack.library)
    assert broken.hits == 1 and broken.sent == cut
    assert [h.get("range") for h in resumed.headers_seen] == [f"bytes={cut}-"]


def test_restore_refuses_an_object_that_does_not_match_the_manifest(
    env: dict, stack: ImmichStack, bucket: Bucket, tmp_path: Path
) -> None:
    make_library(stack.library, photos=3)
    video = stack.library / "encoded-video" / "clip.mp4"
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(os.urandom(3 * MIB))
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    [sid] = bucket.snapshots()
    [key] = [m["key"] for m in bucket.manifest(sid) if m["path"].endswith("clip.mp4")]
    damaged = bytearray(bucket.get(key))
    damaged[MIB + 7] ^= 1  # in the second 1 MiB read
    bucket.put(key, bytes(damaged))
    target = tmp_path / "restore"
    r = run_cli("restore", "--root", "library", "--to", str(target), env=env)
    assert r.code == 7 and "could not be restored" in r.last_error, r.err  # partial: the photos are in place
    assert "does not match its manifest line" in r.out + r.err
    assert not (target / "encoded-video" / "clip.mp4").exists()
    assert not [p for p in target.rglob("*") if "partial" in p.name]


def test_restore_from_a_frozen_server_stops_at_the_stall_timeout(
    env: dict, stack: ImmichStack, proxy_factory, tmp_path: Path
) -> None:
    make_library(stack.library, photos=3)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    proxy = proxy_factory(env["S3_ENDPOINT_URL"])
    proxy.add(lambda m, p, q: m == "GET" and "/data/" in p, delay=3600)
    frozen = dict(env, S3_ENDPOINT_URL=proxy.endpoint, IMMICH_STREAM_STALL_TIMEOUT="3s")
    started = time.monotonic()
    r = run_cli("restore", "--root", "library", "--to", str(tmp_path / "restore"), env=frozen, timeout=120)
    assert r.code == 1 and "answered nothing" in r.last_error, r.err
    assert time.monotonic() - started < 60  # the threads blocked in a receive were stopped
