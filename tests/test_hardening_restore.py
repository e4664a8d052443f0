"""restore under a hostile review (issue 22: items 1, 7, 8, 9, 16, 20): a bad object does not
cost the rest of the library, nothing is written through a symlink or over a device node,
a changed file type in the target is replaced, and a restore that matches nothing says so.

The snapshots are written through the repository code, as a backup writes them, into a
bucket on the real rclone S3 server (no Docker needed); the bucket is then damaged with
boto3 behind the tool's back, and the real CLI restores.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import hashlib
import json
import os
import re
import stat
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import bucket_of
from tests.helpers import REPO_ROOT, Bucket, make_settings, run_cli, start_cli, tree

EXIT_PARTIAL = 7
DUMP_SQL = b"-- PostgreSQL database dump\nSELECT 1;\n-- PostgreSQL database dump complete\n"


@dataclass
class Entry:
    """One manifest entry of a synthetic snapshot: a file (body), a directory or a symlink."""

    body: bytes | None = None
    kind: str = "file"
    target: str | None = None
    mode: int = 0o644
    fields: dict = field(default_factory=dict)  # forged manifest fields
    # format 3 (docs/format.md): a blob of this snapshot's pack of that name; with `chunk`, the
    # file as chunks of that many bytes (zlib where shorter) in that pack ("chunks" if None)
    pack: str | None = None
    chunk: int = 0
    reuse: dict | None = None  # a manifest line of an earlier snapshot: its stored bytes are named, nothing uploaded


def write_snapshot(
    env: dict[str, str], entries: dict[str, Entry], hours_ago: int = 0, dump_sql: bytes | None = None
) -> str:
    """A committed snapshot of the library entries (path -> Entry, in walk order) written
    through the repository code as a backup writes one; every file gets an object of this
    snapshot's own (as a backup that first saw it writes it: format 1), or a place in one
    of its packs (Entry.pack, Entry.chunk: format 3)."""
    from immich_stream.repository.layout import new_snapshot_id
    from immich_stream.repository.manifest import Chunk, ManifestLine, ManifestWriter
    from immich_stream.repository.repo import Repo
    from immich_stream.repository.summary import DatabaseInfo, FileCounts, ManifestInfo, RootMeta, SnapshotSummary
    from immich_stream.s3.budget import ByteBudget
    from immich_stream.s3.options import StoreOptions
    from immich_stream.s3.store import Store

    settings = make_settings(env)
    dump_sql = DUMP_SQL if dump_sql is None else dump_sql  # the module's, at the call (a test patches it)

    async def main() -> str:
        async with Store(StoreOptions.from_settings(settings)) as store:
            repo = Repo(store, settings.prefix)
            await repo.ensure_config()
            sid = new_snapshot_id(dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours_ago))
            lines = []
            total = 0
            packs: dict[str, tuple[str, bytearray]] = {}
            for path, e in entries.items():
                if e.kind == "file":
                    assert e.body is not None
                    sha = hashlib.sha256(e.body).hexdigest()
                    line = ManifestLine("library", path, "file", len(e.body), 10**18, e.mode, 0, 0, 1, sha)
                    if e.reuse is not None:
                        line.key, line.offset = e.reuse.get("key"), e.reuse.get("offset")
                        line.chunks = [Chunk(*c) for c in e.reuse["chunks"]] if "chunks" in e.reuse else None
                    elif e.pack is not None or e.chunk:
                        key, buf = packs.setdefault(e.pack or "chunks", (repo.pack_key(sid), bytearray()))
                        if e.chunk:
                            line.chunks = []
                            for i in range(0, len(e.body), e.chunk):
                                block = e.body[i : i + e.chunk]
                                packed = zlib.compress(block)
                                stored = packed if len(packed) < len(block) else block
                                line.chunks.append(
                                    Chunk(key, len(buf), len(stored), len(block), hashlib.sha256(block).hexdigest())
                                )
                                buf += stored
                        else:
                            line.key, line.offset = key, len(buf)
                            buf += e.body
                    else:
                        line.key = repo.data_key(sid, "library", path)
                        await repo.store.put(repo.object_key(line.key), e.body)
                    total += len(e.body)
                elif e.kind == "dir":
                    line = ManifestLine("library", path, "dir", 0, 10**18, 0o755, 0, 0, 1)
                else:
                    line = ManifestLine("library", path, "symlink", 0, 10**18, 0o777, 0, 0, 1, target=e.target)
                for name, value in e.fields.items():
                    setattr(line, name, value)
                lines.append(line)
            for key, buf in packs.values():  # uploaded before the manifest names them
                await repo.store.put(repo.object_key(key), bytes(buf))
            async with ManifestWriter(
                repo.store, repo.manifest_key(sid), ByteBudget(64 << 20), settings.part_size
            ) as writer:
                for line in lines:
                    await writer.add(line)
                await writer.finish()
            dump = gzip.compress(dump_sql)
            await store.put(repo.dump_key(sid), dump)
            await repo.commit(
                SnapshotSummary(
                    id=sid,
                    time=dt.datetime.now(dt.UTC).isoformat(),
                    roots={"library": "/photos"},
                    root_meta={"library": RootMeta(0o755, 0, 0, 10**18)},
                    files=FileCounts(files=sum(e.kind == "file" for e in entries.values()), bytes_total=total),
                    manifest=ManifestInfo(repo.relative_key(repo.manifest_key(sid)), len(lines)),
                    database=DatabaseInfo(
                        repo.relative_key(repo.dump_key(sid)),
                        "immich",
                        len(dump_sql),
                        len(dump),
                        hashlib.sha256(dump_sql).hexdigest(),
                        hashlib.sha256(dump).hexdigest(),
                    ),
                )
            )
            return sid

    with pytest.MonkeyPatch.context() as mp:  # the S3 client takes its credentials from the environment
        mp.setenv("AWS_ACCESS_KEY_ID", env["AWS_ACCESS_KEY_ID"])
        mp.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
        return asyncio.run(main())


def photos(n: int, tag: str = "") -> dict[str, Entry]:
    return {f"upload/p{i:03d}.jpg": Entry(f"photo {i} {tag}".encode() * (50 + i)) for i in range(n)}


def restored(target: Path) -> dict[bytes, bytes]:
    return {rel: p.read_bytes() for rel, p in tree(target).items() if b".immich-stream" not in rel}


def key_of(bucket: Bucket, sid: str, path: str) -> str:
    return next(m["key"] for m in bucket.manifest(sid) if m["path"] == path)


def outside_state(outside: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        p.name: (p.read_bytes() if p.is_file() else b"", stat.S_IMODE(p.lstat().st_mode), p.lstat().st_mtime_ns)
        for p in outside.iterdir()
    }


# -- item 1: one bad object does not cost the rest ---------------------------------------------


@pytest.mark.slow
def test_restore_goes_past_missing_and_corrupt_objects_and_names_other_copies(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    lost_body = b"the only photo of grandma " * 400
    damaged_body = b"a photo in one snapshot only " * 400
    older = {"upload/a-first-copy.jpg": Entry(lost_body), **photos(3, "old")}
    sid_old = write_snapshot(s3_env, older, hours_ago=24)
    newer = {"upload/a-lost.jpg": Entry(lost_body), "upload/b-damaged.jpg": Entry(damaged_body), **photos(40)}
    sid = write_snapshot(s3_env, newer)
    bucket = bucket_of(s3_env)
    lost_key, damaged_key = key_of(bucket, sid, "upload/a-lost.jpg"), key_of(bucket, sid, "upload/b-damaged.jpg")
    bucket.delete(lost_key)
    data = bytearray(bucket.get(damaged_key))
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    bucket.put(damaged_key, bytes(data))

    target = tmp_path / "restore"
    env = dict(s3_env, IMMICH_STREAM_JOBS="2")
    expected = {
        os.fsencode(p): e.body for p, e in newer.items() if p not in ("upload/a-lost.jpg", "upload/b-damaged.jpg")
    }
    for run in ("first", "rerun"):
        r = run_cli("restore", "latest", "--root", "library", "--to", str(target), env=env)
        assert r.code == EXIT_PARTIAL, f"{run}: {r.err}"
        assert restored(target) == expected  # every other file, byte for byte; nothing half-written
        lost = [ln for ln in r.err.splitlines() if "library/upload/a-lost.jpg" in ln]
        damaged = [ln for ln in r.err.splitlines() if "library/upload/b-damaged.jpg" in ln]
        assert len(lost) == 1 and len(damaged) == 1, r.err
        assert "missing" in lost[0] and f"snapshot {sid_old}" in lost[0] and "upload/a-first-copy.jpg" in lost[0]
        assert "does not match" in damaged[0] and "no other snapshot holds a copy" in damaged[0]
        assert "2 files could not be restored" in r.last_error
    assert "0 downloaded, 40 already in place, 2 failed" in r.out  # the rerun resumed
    readme = (REPO_ROOT / "README.md").read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^\| 7 \| restore finished, but some files could not be restored", readme, re.M)

    # the other copy brings it back
    r = run_cli(
        "restore", sid_old, "--root", "library", "--include", "upload/a-first-copy.jpg", "--to", str(tmp_path / "o"),
        env=env,
    )  # fmt: skip
    assert r.code == 0, r.err
    assert (tmp_path / "o" / "upload" / "a-first-copy.jpg").read_bytes() == lost_body


@pytest.mark.slow
def test_restore_goes_past_a_refused_object_but_stops_when_s3_stops_answering(
    s3_env: dict[str, str], proxy_factory, tmp_path: Path
) -> None:
    """A server that answers about one object (AccessDenied: a per-object policy) fails that
    file only; a server that answers nothing (every download cut off) fails the run at once
    instead of listing every file of the library, and the same command resumes."""
    entries = {"upload/a-refused.jpg": Entry(b"refused " * 100), **photos(30)}
    write_snapshot(s3_env, entries)
    proxy = proxy_factory(s3_env["S3_ENDPOINT_URL"])
    refused = proxy.add(lambda m, path, q: m == "GET" and path.endswith("/a-refused.jpg"), 403, code="AccessDenied")
    env = dict(s3_env, S3_ENDPOINT_URL=proxy.endpoint, IMMICH_STREAM_JOBS="1")
    target = tmp_path / "target"
    r = run_cli("restore", "--root", "library", "--to", str(target), env=env)
    assert r.code == EXIT_PARTIAL, r.err
    assert refused.hits >= 1
    [line] = [ln for ln in r.err.splitlines() if "library/upload/a-refused.jpg: not restored" in ln]
    assert "AccessDenied" in line
    assert restored(target) == {os.fsencode(p): e.body for p, e in entries.items() if p != "upload/a-refused.jpg"}

    proxy.rules.clear()
    cut = proxy.add(lambda m, path, q: m == "GET" and "/data/" in path, cut_after=0)
    fresh = tmp_path / "fresh"
    r = run_cli("restore", "--root", "library", "--to", str(fresh), env=env)
    assert r.code == 1, r.err
    assert "cannot reach S3" in r.last_error and "not restored" not in r.err, r.err
    assert cut.hits < 3 * 31  # it stopped early, not after trying every file
    proxy.rules.clear()
    r = run_cli("restore", "--root", "library", "--to", str(fresh), env=env)  # resumed, no --overwrite
    assert r.code == 0, r.err
    assert restored(fresh) == {os.fsencode(p): e.body for p, e in entries.items()}


# -- item 7: nothing written through a symlink ---------------------------------------------------


@pytest.mark.slow
def test_restore_never_writes_through_a_planted_or_forged_symlink(s3_env: dict[str, str], tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "passwd"
    victim.write_bytes(b"root:x:0:0\n")
    os.utime(victim, ns=(10**9, 10**9))
    before = outside_state(outside)
    entries = {
        "upload": Entry(kind="dir"),
        "upload/d": Entry(kind="dir"),
        "upload/d/in-dir.jpg": Entry(b"in a directory"),
        "upload/photo.jpg": Entry(b"a photo"),
        **photos(3),
    }
    write_snapshot(s3_env, entries)

    # planted in the target: the resume marker, a file and a directory of the snapshot
    target = tmp_path / "target"
    (target / "upload").mkdir(parents=True)
    (target / ".immich-stream-restore").symlink_to(victim)
    (target / "upload" / "photo.jpg").symlink_to(victim)
    (target / "upload" / "d").symlink_to(outside, target_is_directory=True)
    r = run_cli("restore", "--root", "library", "--to", str(target), "--overwrite", env=s3_env)
    assert outside_state(outside) == before
    assert r.code == 0, r.err
    assert restored(target) == {os.fsencode(p): e.body for p, e in entries.items() if e.kind == "file"}
    assert not (target / "upload" / "d").is_symlink()

    # a forged manifest entry named like the marker, left behind by a restore that did not finish
    bucket = bucket_of(s3_env)
    sid = write_snapshot(
        s3_env,
        {".immich-stream-restore": Entry(kind="symlink", target=str(victim)), "upload/x.jpg": Entry(b"x"), **photos(2)},
    )
    bucket.delete(key_of(bucket, sid, "upload/x.jpg"))
    forged = tmp_path / "forged"
    for args in ((), ("--overwrite",)):
        r = run_cli("restore", "--root", "library", "--to", str(forged), *args, env=s3_env)
        assert outside_state(outside) == before, r.err
        assert r.code == 1 and ".immich-stream-restore" in r.last_error, r.err
    assert not (forged / ".immich-stream-restore").is_symlink()


# -- item 16: a path whose type changed --------------------------------------------------------


@pytest.mark.slow
def test_restore_overwrite_replaces_paths_whose_type_changed(s3_env: dict[str, str], tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(b"not the restore's")
    before = outside_state(outside)
    entries = {
        "upload": Entry(kind="dir"),
        "upload/was-dir.jpg": Entry(b"a file where the target has an empty directory"),
        "upload/was-file": Entry(kind="dir"),
        "upload/was-file/a.jpg": Entry(b"under a directory where the target has a file"),
        "upload/was-link": Entry(kind="dir"),
        "upload/was-link/b.jpg": Entry(b"under a directory where the target has a symlink"),
        "upload/was-dir-link": Entry(kind="symlink", target="was-dir.jpg"),
        "upload/busy.jpg": Entry(b"a file where the target has a directory with files"),
        **photos(3),
    }
    write_snapshot(s3_env, entries)
    target = tmp_path / "target"
    up = target / "upload"
    (up / "was-dir.jpg").mkdir(parents=True)
    (up / "was-file").write_bytes(b"old file")
    (up / "was-link").symlink_to(outside, target_is_directory=True)
    (up / "was-dir-link").mkdir()
    (up / "busy.jpg").mkdir()
    (up / "busy.jpg" / "mine.txt").write_bytes(b"someone's file")

    r = run_cli("restore", "--root", "library", "--to", str(target), "--overwrite", env=s3_env)
    assert outside_state(outside) == before
    assert "internal error" not in r.err
    assert r.code == EXIT_PARTIAL, r.err
    [busy] = [ln for ln in r.err.splitlines() if "library/upload/busy.jpg" in ln]
    assert "directory" in busy and "not empty" in busy, busy
    assert (up / "busy.jpg" / "mine.txt").read_bytes() == b"someone's file"  # not deleted
    got = restored(target)
    for path, e in entries.items():
        if e.kind == "file" and path != "upload/busy.jpg":
            assert got[os.fsencode(path)] == e.body, path
    assert os.readlink(up / "was-dir-link") == "was-dir.jpg"
    assert (up / "was-link").is_dir() and not (up / "was-link").is_symlink()

    (up / "busy.jpg" / "mine.txt").unlink()  # the user clears it; the same command finishes the job
    r = run_cli("restore", "--root", "library", "--to", str(target), "--overwrite", env=s3_env)
    assert r.code == 0, r.err
    assert (up / "busy.jpg").read_bytes() == entries["upload/busy.jpg"].body


# -- items 8 and 9: --dump-to and --metrics-file ----------------------------------------------


def _fifo_reader(path: Path) -> tuple[threading.Thread, list[bytes]]:
    got: list[bytes] = []

    def read() -> None:
        with open(path, "rb") as fh:
            got.append(fh.read())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, got


@pytest.mark.slow
def test_dump_to_and_metrics_file_stream_into_a_device_or_a_fifo(s3_env: dict[str, str], tmp_path: Path) -> None:
    write_snapshot(s3_env, photos(2))
    null = tmp_path / "null"  # a device node of the test's own: /dev/null itself is the machine's
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    r = run_cli("restore", "--dump-to", str(null), env=s3_env, timeout=60)
    assert r.code == 0, r.err
    assert stat.S_ISCHR(null.lstat().st_mode)
    r = run_cli("snapshots", "--metrics-file", str(null), env=s3_env, timeout=60)
    assert r.code == 0, r.err
    assert stat.S_ISCHR(null.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".null", "null."))] == []

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = start_cli("restore", "--dump-to", str(fifo), env=s3_env)  # its reader comes later
    time.sleep(3)
    assert proc.poll() is None
    reader, got = _fifo_reader(fifo)
    _out, err = proc.communicate(timeout=60)
    reader.join(10)
    assert proc.returncode == 0, err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert gzip.decompress(got[0]) == DUMP_SQL
    reader, got = _fifo_reader(fifo)
    r = run_cli("snapshots", "--metrics-file", str(fifo), env=s3_env, timeout=60)
    reader.join(10)
    assert r.code == 0, r.err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert b'immich_stream_last_exit_code{command="snapshots"} 0' in got[0]


@pytest.mark.slow
def test_dump_to_never_writes_through_a_planted_partial_file(s3_env: dict[str, str], tmp_path: Path) -> None:
    write_snapshot(s3_env, photos(2))
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "shadow"
    victim.write_bytes(b"root:secret\n")
    before = outside_state(outside)
    for plant in ("symlink", "hardlink"):
        dest = tmp_path / f"{plant}.sql.gz"
        partial = Path(str(dest) + ".immich-stream-partial")
        if plant == "symlink":
            partial.symlink_to(victim)
        else:
            os.link(victim, partial)
        r = run_cli("restore", "--dump-to", str(dest), env=s3_env, timeout=60)
        assert outside_state(outside) == before, plant
        assert r.code == 0, r.err
        assert gzip.decompress(dest.read_bytes()) == DUMP_SQL
        assert not os.path.lexists(partial)


# -- item 20: a restore that matches nothing ---------------------------------------------------


@pytest.mark.slow
def test_restore_that_matches_nothing_says_so(s3_env: dict[str, str], tmp_path: Path) -> None:
    sid = write_snapshot(s3_env, photos(3))  # library only, as --stop app and --stop none take
    target = tmp_path / "target"
    r = run_cli("restore", "--root", "postgres", "--to", str(target), env=s3_env)
    assert r.code == 1, r.err
    assert re.search(rf"nothing matched: snapshot {sid} holds no postgres root", r.last_error), r.err
    assert not target.exists() or not any(target.iterdir())

    r = run_cli("restore", "--include", "upload/*.png", "--include", "nope/*", "--to", str(target), env=s3_env)
    assert r.code == 1, r.err
    assert f"nothing matched --include upload/*.png, nope/* in snapshot {sid}" in r.last_error, r.err
    assert not target.exists() or not any(target.iterdir())

    r = run_cli("restore", "--include", "upload/p001.jpg", "--to", str(target), env=s3_env)
    assert r.code == 0, r.err
    assert list(restored(target)) == [b"library/upload/p001.jpg"]


# -- review: exit 7 never hides a total failure --------------------------------------------------


@pytest.mark.slow
def test_restore_that_brings_back_no_file_is_a_failure_not_partial(s3_env: dict[str, str], tmp_path: Path) -> None:
    """Every object missing (a wiped data/ prefix): not a "partial" restore (exit 7) but a
    failed one (exit 1), said in one line; the target stays resumable."""
    entries = photos(10)
    sid = write_snapshot(s3_env, entries)
    bucket = bucket_of(s3_env)
    for m in bucket.manifest(sid):
        bucket.delete(m["key"])
    target = tmp_path / "target"
    r = run_cli("restore", "--root", "library", "--to", str(target), env=s3_env)
    assert r.code == 1, r.err
    assert "none of the 10 files could be restored" in r.last_error, r.err
    assert "is missing from the bucket" in r.last_error, r.err  # why, in the one line
    assert restored(target) == {}
    r = run_cli("restore", "--root", "library", "--to", str(target), env=s3_env)  # resumes, no --overwrite
    assert r.code == 1 and "none of the 10 files" in r.last_error, r.err


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["cut", "503", "expired-credentials"])
def test_restore_resumed_while_s3_fails_every_download_stops_instead_of_partial(
    s3_env: dict[str, str], proxy_factory, tmp_path: Path, fault: str
) -> None:
    """A rerun where every other file is already in place: the files found in place are no
    answer from S3, and a server that fails every download after its retries (no answer, or
    503 SlowDown) or refuses the credentials (ExpiredToken) is not a set of bad objects: the run stops at once (exit 1), resumably,
    instead of ending "partial" with every missing file listed."""
    entries = photos(30)
    write_snapshot(s3_env, entries)
    target = tmp_path / "target"
    assert run_cli("restore", "--root", "library", "--to", str(target), env=s3_env).code == 0
    gone = sorted((target / "upload").iterdir())[::2]
    for p in gone:
        p.unlink()
    proxy = proxy_factory(s3_env["S3_ENDPOINT_URL"])
    data_get = lambda m, path, q: m == "GET" and "/data/" in path  # noqa: E731
    if fault == "cut":
        rule = proxy.add(data_get, cut_after=0)
    elif fault == "503":
        rule = proxy.add(data_get, 503, code="SlowDown")
    else:  # credentials that expired during the run: no object's fault
        rule = proxy.add(data_get, 403, code="ExpiredToken")
    env = dict(s3_env, S3_ENDPOINT_URL=proxy.endpoint, IMMICH_STREAM_JOBS="1", IMMICH_STREAM_RETRIES="2")
    r = run_cli("restore", "--root", "library", "--to", str(target), "--overwrite", env=env)
    assert r.code == 1, r.err
    assert "not restored" not in r.err, r.err
    assert rule.hits < 2 * len(gone)  # it stopped early, not after trying every file
    proxy.rules.clear()
    r = run_cli("restore", "--root", "library", "--to", str(target), env=env)  # resumed, no --overwrite
    assert r.code == 0, r.err
    assert restored(target) == {os.fsencode(p): e.body for p, e in entries.items()}


@pytest.mark.slow
def test_restore_into_a_full_disk_stops_at_once_and_resumes(s3_env: dict[str, str], tmp_path: Path) -> None:
    """A full target file system is not a bad object: the restore stops at the first file
    that does not fit (exit 1, one line naming the disk), not after failing every other file
    of the library one by one as "partial"; once there is room the same command finishes."""
    entries = {f"upload/big{i:02d}.jpg": Entry(bytes([i]) * 12000) for i in range(20)}
    write_snapshot(s3_env, entries)
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        target = small / "target"
        r = run_cli("restore", "--root", "library", "--to", str(target), env=dict(s3_env, IMMICH_STREAM_JOBS="1"))
        assert r.code == 1, r.err
        assert "not restored" not in r.err, r.err
        assert "no space left" in r.last_error.lower() and str(target) in r.last_error, r.err
        subprocess.run(["mount", "-o", "remount,size=2m", str(small)], check=True)
        r = run_cli("restore", "--root", "library", "--to", str(target), env=s3_env)
        assert r.code == 0, r.err
        assert restored(target) == {os.fsencode(p): e.body for p, e in entries.items()}
    finally:
        subprocess.run(["umount", str(small)], check=True)


# -- review: --dump-to into a FIFO that is replaced while the restore waits for its reader ------


@pytest.mark.slow
@pytest.mark.parametrize("swap", ["symlink", "file"])
def test_dump_to_a_fifo_replaced_while_waiting_never_writes_into_the_replacement(
    s3_env: dict[str, str], tmp_path: Path, swap: str
) -> None:
    write_snapshot(s3_env, photos(2))
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "shadow"
    victim.write_bytes(b"root:secret\n" * 50)
    fifo = tmp_path / "dump.fifo"
    os.mkfifo(fifo)
    proc = start_cli("restore", "--dump-to", str(fifo), env=s3_env)  # waits for a reader
    time.sleep(3)
    assert proc.poll() is None
    before = outside_state(outside)
    fifo.unlink()
    if swap == "symlink":
        fifo.symlink_to(victim)
    else:
        fifo.write_bytes(b"someone's file\n" * 50)
    _out, err = proc.communicate(timeout=60)
    assert outside_state(outside) == before
    if swap == "file":
        assert fifo.read_bytes() == b"someone's file\n" * 50
    assert proc.returncode == 2, err
    assert "changed" in err.strip().splitlines()[-1], err


@pytest.mark.slow
def test_restore_goes_past_a_file_larger_than_the_whole_disk(s3_env: dict[str, str], tmp_path: Path) -> None:
    """A damaged manifest line claiming a size no disk holds is that file's problem, not a
    full disk: the rest is restored (exit 7), and a rerun does not stop at the same file."""
    entries = {"upload/a-huge.jpg": Entry(b"small really", fields={"size": 1 << 40}), **photos(10)}
    write_snapshot(s3_env, entries)
    target = tmp_path / "target"
    for _run in range(2):
        r = run_cli("restore", "--root", "library", "--to", str(target), env=s3_env)
        assert r.code == EXIT_PARTIAL, r.err
        [line] = [ln for ln in r.err.splitlines() if "library/upload/a-huge.jpg: not restored" in ln]
        assert "more than the whole target file system" in line, line
        assert restored(target) == {os.fsencode(p): e.body for p, e in entries.items() if p != "upload/a-huge.jpg"}


@pytest.mark.slow
def test_restore_include_of_a_folder_alone_says_nothing_matched(s3_env: dict[str, str], tmp_path: Path) -> None:
    """--include upload (the folder, not what it holds) selects a directory and no file: a
    restore of 0 files is said (exit 1) with the pattern that would take the folder's files."""
    sid = write_snapshot(s3_env, {"upload": Entry(kind="dir"), **photos(3)})
    target = tmp_path / "target"
    r = run_cli("restore", "--include", "upload", "--to", str(target), env=s3_env)
    assert r.code == 1, r.err
    assert f"nothing matched --include upload in snapshot {sid}" in r.last_error, r.err
    assert "upload/*" in r.last_error, r.err
    assert not target.exists() or not any(target.iterdir())


@pytest.mark.slow
def test_restore_never_changes_a_file_outside_through_a_hard_link(s3_env: dict[str, str], tmp_path: Path) -> None:
    """A target file hard-linked to one outside (a `cp -al` copy, or planted) with the
    snapshot's content is not "in place": owner, mode and mtime set through it would change
    the file outside (a forged mode could make it setuid). It is replaced by a file of its own."""
    body = b"shared photo " * 100
    write_snapshot(s3_env, {"upload/a.jpg": Entry(body, mode=0o4755), **photos(2)})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.jpg").write_bytes(body)
    os.chmod(outside / "a.jpg", 0o644)
    target = tmp_path / "target"
    (target / "upload").mkdir(parents=True)
    os.link(outside / "a.jpg", target / "upload" / "a.jpg")
    before = outside_state(outside)
    r = run_cli("restore", "--root", "library", "--to", str(target), "--overwrite", env=s3_env)
    assert r.code == 0, r.err
    assert outside_state(outside) == before
    got = target / "upload" / "a.jpg"
    assert got.read_bytes() == body and stat.S_IMODE(got.stat().st_mode) == 0o4755 and got.stat().st_nlink == 1


@pytest.mark.slow
def test_dump_to_a_pipe_whose_reader_leaves_early_says_so_in_one_line(
    s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dump-to into a FIFO whose reader stops after a few bytes (`| head`): exit 1 with one
    line saying the dump was not delivered whole, not an "internal error"."""
    sql = (
        b"-- PostgreSQL database dump\n"
        + os.urandom(1 << 20).hex().encode()
        + b"\n-- PostgreSQL database dump complete\n"
    )
    monkeypatch.setattr(__import__(__name__, fromlist=["_"]), "DUMP_SQL", sql)
    write_snapshot(s3_env, photos(1))
    fifo = tmp_path / "dump.fifo"
    os.mkfifo(fifo)
    proc = start_cli("restore", "--dump-to", str(fifo), env=s3_env)
    with open(fifo, "rb") as fh:
        assert len(fh.read(10)) == 10
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert "internal error" not in last and "closed" in last and "not delivered whole" in last, err


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad",
    [
        Entry(kind="symlink", target="a\x00b"),
        Entry(b"x" * 10, fields={"mtime_ns": 10**30}),
        Entry(b"x" * 10, fields={"uid": -5}),
        Entry(kind="dir", fields={"gid": 1 << 40}),
    ],
    ids=["nul-in-symlink-target", "mtime-out-of-range", "negative-uid", "dir-gid-out-of-range"],
)
def test_restore_goes_past_a_damaged_manifest_line(s3_env: dict[str, str], tmp_path: Path, bad: Entry) -> None:
    """A manifest line with a value no file system takes (damaged or forged) costs that entry
    only: named in one line, the rest restored, exit 7; not an "internal error" that stops
    every rerun at the same line."""
    entries = {"upload/bad": bad, **photos(5)}
    write_snapshot(s3_env, entries)
    target = tmp_path / "target"
    r = run_cli("restore", "--root", "library", "--to", str(target), env=s3_env)
    assert r.code == EXIT_PARTIAL, r.err
    assert "internal error" not in r.err
    [line] = [ln for ln in r.err.splitlines() if "library/upload/bad: not restored" in ln]
    assert "damaged" in line, line
    assert restored(target) == {os.fsencode(p): e.body for p, e in photos(5).items()}


@pytest.mark.slow
def test_a_file_kept_out_by_the_target_is_not_reported_as_without_a_copy(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    """A file not restored because of the target (a directory with files in its place) has a
    sound object: its line says what to move, not "no other snapshot holds a copy" (which
    reads as data lost)."""
    entries = {"upload/busy.jpg": Entry(b"a sound object"), **photos(3)}
    write_snapshot(s3_env, entries)
    target = tmp_path / "target"
    (target / "upload" / "busy.jpg").mkdir(parents=True)
    (target / "upload" / "busy.jpg" / "mine.txt").write_bytes(b"someone's file")
    r = run_cli("restore", "--root", "library", "--to", str(target), "--overwrite", env=s3_env)
    assert r.code == EXIT_PARTIAL, r.err
    [busy] = [ln for ln in r.err.splitlines() if "library/upload/busy.jpg: not restored" in ln]
    assert "not empty" in busy and "copy" not in busy, busy


@pytest.mark.slow
def test_restore_names_only_other_copies_that_are_in_the_bucket(s3_env: dict[str, str], tmp_path: Path) -> None:
    """The other copy a line names must be there: one whose object is missing too is not
    named (in a disaster the user would chase it for nothing)."""
    body = b"grandma again " * 300
    sid_old = write_snapshot(s3_env, {"upload/first.jpg": Entry(body), **photos(2, "old")}, hours_ago=24)
    sid = write_snapshot(s3_env, {"upload/lost.jpg": Entry(body), **photos(3)})
    bucket = bucket_of(s3_env)
    bucket.delete(key_of(bucket, sid, "upload/lost.jpg"))
    bucket.delete(key_of(bucket, sid_old, "upload/first.jpg"))
    r = run_cli("restore", sid, "--root", "library", "--to", str(tmp_path / "t"), env=s3_env)
    assert r.code == EXIT_PARTIAL, r.err
    [lost] = [ln for ln in r.err.splitlines() if "library/upload/lost.jpg: not restored" in ln]
    assert sid_old not in lost and "no other snapshot holds a copy" in lost, lost


# -- issue 29: a lost or damaged pack costs exactly the files in it ------------------------------


def problem_paths(text: str, marker: str) -> set[str]:
    """The library paths named by the lines of `text` that hold `marker`."""
    return {m.group(1) for ln in text.splitlines() if marker in ln for m in [re.search(r"library/([^\s:)]+)", ln)] if m}


@pytest.mark.slow
def test_a_lost_pack_fails_exactly_its_files_restore_and_verify_name_them(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Format 3 (docs/format.md): a pack lost from the bucket fails the files whose bytes
    are in it (blobs and chunks), each named, with exit 7; a blob damaged in another pack
    fails that file alone; the restore goes on with everything else (other packs, objects of
    their own, chunks elsewhere) and names another snapshot's copy where one is. verify
    names the same files, and only them."""
    copy_body = b"a photo also in an older snapshot " * 300
    sid_old = write_snapshot(s3_env, {"upload/a-copy.jpg": Entry(copy_body, pack="old")}, hours_ago=24)
    newer = {
        **{f"upload/a{i}.jpg": Entry(f"lost {i} ".encode() * (200 + i), pack="lost") for i in range(4)},
        "upload/a9-copied.jpg": Entry(copy_body, pack="lost"),
        **{f"upload/b{i:03d}.jpg": Entry(f"kept {i} ".encode() * (100 + i), pack="kept") for i in range(30)},
        "upload/c-whole.jpg": Entry(b"an object of its own " * 500),
        "upload/d-chunked.mp4": Entry(os.urandom(5000) + b"\0" * 20000, chunk=4096, pack="chunks"),
        "upload/e-chunked-lost.mp4": Entry(os.urandom(9000), chunk=4096, pack="lost"),
    }
    sid = write_snapshot(s3_env, newer)
    bucket = bucket_of(s3_env)
    manifest = {m["path"]: m for m in bucket.manifest(sid)}
    lost_pack = manifest["upload/a0.jpg"]["key"]
    assert manifest["upload/e-chunked-lost.mp4"]["chunks"][0][0] == lost_pack
    assert manifest["upload/b000.jpg"]["key"] != lost_pack and "offset" in manifest["upload/b000.jpg"]
    r = run_cli("verify", "--read-data", env=s3_env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err  # every form, intact

    bucket.delete(lost_pack)
    damaged = manifest["upload/b007.jpg"]
    kept_pack = bytearray(bucket.get(damaged["key"]))
    kept_pack[damaged["offset"] + damaged["size"] // 2] ^= 0xFF  # one byte of one blob
    bucket.put(damaged["key"], bytes(kept_pack))
    lost = {p for p, m in manifest.items() if lost_pack in (m.get("key"), *(c[0] for c in m.get("chunks") or []))}
    assert lost == {"upload/a0.jpg", "upload/a1.jpg", "upload/a2.jpg", "upload/a3.jpg", "upload/a9-copied.jpg",
                    "upload/e-chunked-lost.mp4"}  # fmt: skip

    target = tmp_path / "restore"
    r = run_cli("restore", "latest", "--root", "library", "--to", str(target), env=s3_env)
    assert r.code == EXIT_PARTIAL, r.err
    assert problem_paths(r.err, "not restored") == lost | {"upload/b007.jpg"}, r.err
    assert restored(target) == {
        os.fsencode(p): e.body for p, e in newer.items() if p not in lost and p != "upload/b007.jpg"
    }
    [copied] = [ln for ln in r.err.splitlines() if "upload/a9-copied.jpg: not restored" in ln]
    assert f"snapshot {sid_old}" in copied and "upload/a-copy.jpg" in copied, copied
    assert "7 files could not be restored" in r.last_error, r.err

    r = run_cli("verify", env=s3_env)  # the listing alone: the lost pack's files
    assert r.code == 1
    assert problem_paths(r.out, f"missing object {lost_pack}") == lost, r.out
    assert f"{len(lost)} problems found" in r.last_error, r.out
    r = run_cli("verify", "--read-data", env=s3_env)
    assert r.code == 1
    assert problem_paths(r.out, f"missing object {lost_pack}") == lost, r.out
    assert problem_paths(r.out, f"corrupt object {damaged['key']}") == {"upload/b007.jpg"}, r.out
    assert f"{len(lost) + 1} problems found" in r.last_error, r.out


@pytest.mark.slow
def test_a_damaged_chunk_fails_every_file_that_shares_it(s3_env: dict[str, str], tmp_path: Path) -> None:
    """Chunks are stored once and named by every file that holds them: one damaged chunk
    is found by verify --read-data (read once) and every file that names it is named, by
    restore too; the files around it in the same pack are fine."""
    block = os.urandom(4096)
    entries = {
        "upload/f1.mp4": Entry(block + os.urandom(3000), chunk=4096),
        "upload/f2.mp4": Entry(os.urandom(8192), chunk=4096),
        "upload/f3.mp4": Entry(block, chunk=4096),
    }
    sid = write_snapshot(s3_env, entries)
    bucket = bucket_of(s3_env)
    manifest = {m["path"]: m for m in bucket.manifest(sid)}
    shared = manifest["upload/f1.mp4"]["chunks"][0]
    lines = bucket.manifest(sid)
    for m in lines:  # as a backup stores it: once, named by both
        if m["path"] == "upload/f3.mp4":
            m["chunks"] = [shared]
    body = "".join(json.dumps(m, separators=(",", ":")) + "\n" for m in lines)
    bucket.put(f"snapshots/{sid}/manifest.jsonl.gz", gzip.compress(body.encode()))
    r = run_cli("verify", "--read-data", env=s3_env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err
    pack = bytearray(bucket.get(shared[0]))
    pack[shared[1] + shared[2] // 2] ^= 0xFF
    bucket.put(shared[0], bytes(pack))

    r = run_cli("verify", "--read-data", env=s3_env)
    assert r.code == 1
    assert problem_paths(r.out, f"corrupt object {shared[0]}") == {"upload/f1.mp4", "upload/f3.mp4"}, r.out
    assert "2 problems found" in r.last_error, r.out
    target = tmp_path / "restore"
    r = run_cli("restore", "latest", "--root", "library", "--to", str(target), env=s3_env)
    assert r.code == EXIT_PARTIAL, r.err
    assert problem_paths(r.err, "not restored") == {"upload/f1.mp4", "upload/f3.mp4"}, r.err
    assert restored(target) == {b"upload/f2.mp4": entries["upload/f2.mp4"].body}
