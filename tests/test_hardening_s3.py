"""Issue 22, the S3 group: what every S3 server stores of odd file names (3), a slow uplink
is progress (11), rclone's answer to listing multipart uploads before any (14), and doctor's
probes when doctor is interrupted (24).

Real servers throughout (SeaweedFS, rclone serve s3); the fault proxy only for a throttled
or frozen upload, which no real server can be told to do."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.conftest import (
    CONTAINERS,
    KEY,
    SECRET,
    ImmichStack,
    RcloneServer,
    S3Server,
    bucket_of,
    running_containers,
)
from tests.faultproxy import FaultProxy, is_part_upload
from tests.helpers import USER_ID, Bucket, make_library, run_cli, start_cli, tree, wait_for

MIB = 1024 * 1024

# -- 3: odd file names, byte for byte, on SeaweedFS and rclone ---------------------------------

ODD = "library/" + USER_ID + "/odd/"
ODD_NAMES = [
    b"back\\slash.jpg",  # SeaweedFS turned a raw \ into / (a folder): missing, re-uploaded, pruned
    b"dir\\with\\two.jpg",
    b"\\leading.jpg",
    b"trailing\\",
    b"100% real %41.jpg",  # a literal %41 must stay three characters
    b"  spaces  around  .jpg",
    "ünïcødé 写真 📷 e\u0301.jpg".encode(),
    b"a" * 255,  # the longest name Linux allows, fits a key part as it is
    b"\\%" + b"b" * 253,  # 255 bytes that pass 255 once escaped: stored under %long/
    b"non-utf8-\xff\\x.jpg",
]


def _odd_library(library: Path) -> dict[bytes, bytes]:
    make_library(library, photos=3, odd_names=False)
    written = {}
    for n, name in enumerate(ODD_NAMES):
        path = os.fsencode(library) + b"/" + os.fsencode(ODD) + name
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = f"odd file {n} ".encode() * (50 + n)
        with open(path, "wb") as fh:
            fh.write(data)
        written[os.fsencode(ODD) + name] = data
    return written


@pytest.mark.parametrize("server", ["seaweedfs", "rclone"])
def test_odd_file_names_are_stored_exactly_on_every_server(
    server: str, request: pytest.FixtureRequest, env: dict, stack: ImmichStack, tmp_path: Path
) -> None:
    s3: S3Server = request.getfixturevalue("seaweed_s3" if server == "seaweedfs" else "rclone_s3")
    env = dict(env, S3_ENDPOINT_URL=s3.endpoint, S3_BUCKET=s3.new_bucket())
    odd = _odd_library(stack.library)
    bucket = bucket_of(env)

    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    [first] = bucket.snapshots()
    keys = bucket.keys("data/")
    for line in bucket.manifest(first):
        if line["type"] == "file":
            assert line["key"] in keys, f"{line['key']!r} is not in the bucket as sent"
    r = run_cli("verify", "--read-data", env=env)
    assert r.code == 0, r.err

    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    second = bucket.snapshots()[-1]
    assert second != first
    assert bucket.keys(f"data/{second}/") == {}, "the second backup uploaded files again"
    files = bucket.snapshot(second)["files"]
    assert files["new"] == files["changed"] == files["reuploaded"] == 0, files

    r = run_cli("prune", "--keep-last", "5", env=env)
    assert r.code == 0, r.err
    assert bucket.keys("data/") == keys, "prune deleted objects of kept snapshots"
    r = run_cli("verify", "--read-data", env=env)
    assert r.code == 0, r.err

    target = tmp_path / "restore"
    r = run_cli("restore", "--root", "library", "--to", str(target), env=env)
    assert r.code == 0, r.err
    restored = tree(target)
    for rel, data in odd.items():
        assert rel in restored, f"{rel!r} was not restored"
        assert restored[rel].read_bytes() == data


# -- 14: rclone answers NoSuchUpload to a listing of multipart uploads before the first -----


def test_prune_works_on_a_restarted_rclone_server(env: dict, stack: ImmichStack, tmp_path: Path) -> None:
    """rclone keeps multipart state in memory: a server started again (a reboot) answers
    NoSuchUpload to the listing until its first multipart upload in that bucket."""
    (tmp_path / "rclone-dir").mkdir()
    server = RcloneServer(tmp_path / "rclone-dir")
    try:
        env = dict(env, S3_ENDPOINT_URL=server.endpoint, S3_BUCKET=S3Server(server.endpoint, "rclone").new_bucket())
        make_library(stack.library, photos=3, odd_names=False)
        assert run_cli("backup", "--stop", "none", env=env).code == 0
        assert run_cli("backup", "--stop", "none", env=env).code == 0
        server.stop()
        server = RcloneServer(server.root)
        env["S3_ENDPOINT_URL"] = server.endpoint
        r = run_cli("prune", "--keep-last", "1", env=env)
        assert r.code == 0, r.err
        assert len(bucket_of(env).snapshots()) == 1
    finally:
        server.stop()


# -- 11: a slow uplink is progress; a frozen server is not ------------------------------------


def _slow_env(env: dict, proxy: FaultProxy) -> dict:
    return dict(
        env,
        S3_ENDPOINT_URL=proxy.endpoint,
        IMMICH_STREAM_PART_SIZE="5MiB",
        IMMICH_STREAM_STALL_TIMEOUT="4s",
    )


def test_a_slow_uplink_is_progress_not_a_stall(env: dict, stack: ImmichStack, proxy_factory: type[FaultProxy]) -> None:
    """A part that takes longer than the stall timeout to send (a 5 MiB part at 0.5 MiB/s:
    10 s against 4 s) is bytes moving the whole time: the backup goes on and commits."""
    make_library(stack.library, photos=3, odd_names=False, large=[11 * MIB])
    proxy = proxy_factory(env["S3_ENDPOINT_URL"])
    slow = proxy.add(lambda m, p, q: is_part_upload(m, p, q) and "/data/" in p, upload_rate=0.5 * MIB)
    started = time.monotonic()
    r = run_cli("backup", "--stop", "none", env=_slow_env(env, proxy), timeout=180)
    assert r.code == 0, r.err
    assert slow.hits >= 2
    assert time.monotonic() - started > 10  # the parts really took longer than the stall timeout
    bucket = bucket_of(env)
    [sid] = bucket.snapshots()
    [big] = [m for m in bucket.manifest(sid) if m["path"].endswith("large-0.mp4")]
    assert bucket.keys("data/")[big["key"]] == 11 * MIB


def test_a_server_that_stops_reading_a_part_trips_the_watchdog(
    env: dict, stack: ImmichStack, proxy_factory: type[FaultProxy]
) -> None:
    """The same upload, but the server stops taking the body after 1 MiB: no byte moves
    any more (the socket buffers fill and stay full), so the stall timeout ends the run and
    the stack runs again."""
    make_library(stack.library, photos=3, odd_names=False, large=[11 * MIB])
    proxy = proxy_factory(env["S3_ENDPOINT_URL"])
    proxy.add(lambda m, p, q: is_part_upload(m, p, q) and "/data/" in p, upload_rate=0.5 * MIB, hold_after=MIB)
    started = time.monotonic()
    r = run_cli("backup", "--stop", "app", env=_slow_env(env, proxy), timeout=180)
    assert r.code == 1, r.err
    assert "no progress for" in r.last_error, r.err
    assert time.monotonic() - started < 90
    assert running_containers() == set(CONTAINERS)
    assert bucket_of(env).snapshots() == []


# -- 24: doctor: the round trip of odd names (3), its probes when it is interrupted (24) -------


@pytest.mark.slow
def test_doctor_checks_odd_names_round_trip(s3_env: dict, seaweed_s3: S3Server, tmp_path: Path) -> None:
    from tests.test_monitoring import doctor_rows

    weed = dict(s3_env, S3_ENDPOINT_URL=seaweed_s3.endpoint, S3_BUCKET=seaweed_s3.new_bucket())
    weed["LIBRARY_DIR"] = str(tmp_path)
    rows = doctor_rows(run_cli("doctor", env=dict(weed, IMMICH_STREAM_STOP="app")).out)
    status, detail = rows["odd file names"]
    assert status == "ok", detail
    assert "stored exactly" in detail and "a raw \\ becomes /" in detail
    assert "doctor/" not in str(bucket_of(weed).keys(""))


def _doctor_keys(env: dict) -> list[str]:
    bucket = Bucket(env["S3_ENDPOINT_URL"], env["S3_BUCKET"], KEY, SECRET, "immich-backup")
    return list(bucket.keys("doctor/"))


def _uploads(env: dict) -> list[str]:
    try:
        return Bucket(env["S3_ENDPOINT_URL"], env["S3_BUCKET"], KEY, SECRET).open_multipart_uploads()
    except ClientError as exc:  # rclone before its first multipart upload (item 14)
        if exc.response["Error"]["Code"] == "NoSuchUpload":
            return []
        raise


def _held_probe(where: str) -> Callable[[str, str, dict[str, str]], bool]:
    """Where doctor hangs: reading back its probe object (written, not yet deleted), or
    sending the second part of its multipart probe (the upload open)."""
    if where == "object":
        return lambda m, p, q: m == "GET" and "/doctor/" in p and p.endswith("/probe")
    return lambda m, p, q: is_part_upload(m, p, q) and q.get("partNumber") == "2"


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "where"), [(signal.SIGINT, "object"), (signal.SIGTERM, "upload")])
def test_an_interrupted_doctor_removes_its_probes(
    sig: signal.Signals, where: str, s3_env: dict, proxy_factory: type[FaultProxy], tmp_path: Path
) -> None:
    proxy = proxy_factory(s3_env["S3_ENDPOINT_URL"])
    held = proxy.add(_held_probe(where), delay=3600)
    env = dict(s3_env, S3_ENDPOINT_URL=proxy.endpoint, LIBRARY_DIR=str(tmp_path), IMMICH_STREAM_STOP="app")
    proc = start_cli("doctor", env=env)
    try:
        wait_for(lambda: held.hits >= 1, 60, 0.1, "doctor's probe")
        assert _doctor_keys(s3_env) if where == "object" else _uploads(s3_env), "the probe is there"
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert _uploads(s3_env) == []
    assert _doctor_keys(s3_env) == []


@pytest.mark.slow
def test_doctor_collects_probes_a_killed_doctor_left(
    s3_env: dict, proxy_factory: type[FaultProxy], tmp_path: Path
) -> None:
    proxy = proxy_factory(s3_env["S3_ENDPOINT_URL"])
    held = proxy.add(_held_probe("object"), delay=3600)
    env = dict(s3_env, LIBRARY_DIR=str(tmp_path), IMMICH_STREAM_STOP="app", IMMICH_STREAM_LOCK_STALE="2s")
    proc = start_cli("doctor", env=dict(env, S3_ENDPOINT_URL=proxy.endpoint))
    try:
        wait_for(lambda: held.hits >= 1, 60, 0.1, "doctor's multipart probe")
        os.kill(proc.pid, signal.SIGKILL)  # no finally runs
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _doctor_keys(s3_env), "the killed doctor left its probe"
    time.sleep(3)  # older than the stale threshold
    run_cli("doctor", env=env)
    assert _uploads(s3_env) == []
    assert _doctor_keys(s3_env) == []
