"""Backups that never silently drop data (issue 8): suspicious libraries refused before the
stack is touched, objects gone from the bucket uploaded again, rewrites with a preserved
mtime noticed, long names stored, lost answers and large streams handled."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest

from tests.conftest import CONTAINERS, ImmichStack, S3Server, bucket_of, running_containers
from tests.helpers import USER_ID, Bucket, make_library, make_settings, run_cli, tree

MIB = 1024 * 1024


def lines_of(bucket: Bucket, sid: str, root: str = "library") -> dict[bytes, dict]:
    return {unquote_to_bytes(m["path"]): m for m in bucket.manifest(sid) if m["root"] == root}


def rel(stack: ImmichStack, path: Path) -> bytes:
    return os.fsencode(path.relative_to(stack.library))


# -- item 3: an unmounted, emptied or shrunk library ------------------------------------------


def test_library_without_immich_markers_is_refused_before_the_stack_is_touched(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    """An unmounted disk leaves an empty directory (or one without Immich's .immich markers)."""
    (stack.library / "library").mkdir()
    (stack.library / "library" / "stray.jpg").write_bytes(b"not a library")
    before = stack.started_at()
    r = run_cli("backup", env=env)
    assert r.code == 4, r.err
    assert "lacks Immich's marker files (library/.immich, upload/.immich" in r.last_error
    assert "--allow-shrink" in r.last_error and "nothing was stopped" in r.last_error
    assert stack.started_at() == before, "the stack was stopped for a library that was not there"
    assert bucket.snapshots(complete_only=False) == []

    # deliberately: --allow-shrink takes it (an Immich too old for markers, a first run)
    r = run_cli("backup", "--stop", "none", "--allow-shrink", env=env)
    assert r.code == 0, r.err
    # and the next run only warns: the snapshot before it had no markers either
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    assert "has no .immich marker" in r.err
    assert len(bucket.snapshots()) == 2


def test_emptied_or_shrunk_library_is_refused_and_allow_shrink_skips_prune(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    make_library(stack.library, photos=20)
    assert run_cli("backup", env=env).code == 0
    [good] = bucket.snapshots()

    # more than half of the photos and thumbnails gone, markers still there
    victims = sorted(p for p in stack.library.rglob("*") if p.is_file() and p.name != ".immich")
    for p in victims[: int(len(victims) * 0.7)]:
        p.unlink()
    before = stack.started_at()
    r = run_cli("backup", "--prune", "--keep-last", "1", env=env)
    assert r.code == 4, r.err
    assert f"where snapshot {good} had" in r.last_error and "lost more than 50%" in r.last_error
    assert stack.started_at() == before
    assert bucket.snapshots(complete_only=False) == [good]

    # a higher threshold lets this one through
    r = run_cli("backup", "--stop", "none", "--max-shrink", "90%", env=env)
    assert r.code == 0, r.err
    assert len(bucket.snapshots()) == 2

    # everything gone but the markers: refused again, against the newest snapshot
    for p in stack.library.rglob("*"):
        if p.is_file() and p.name != ".immich":
            p.unlink()
    r = run_cli("backup", "--stop", "none", "--max-shrink", "90%", env=env)
    assert r.code == 4 and "holds 6 files" in r.last_error, r.err

    # a deliberate mass deletion: committed, and --prune does not age the good ones out
    r = run_cli("backup", "--stop", "none", "--allow-shrink", "--prune", "--keep-last", "1", env=env)
    assert r.code == 0, r.err
    assert "not pruning after a backup of a library that shrank" in r.err
    assert len(bucket.snapshots()) == 3 and good in bucket.snapshots()
    assert running_containers() == set(CONTAINERS)


def test_library_cut_short_in_place_is_refused_before_the_stack_stops(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    """Same paths, every file truncated to a byte (a failed sync, a broken copy back): the
    file count is unchanged, the bytes are not. The check before the stop lstats every file,
    so the stack is never stopped for it (the check at the end would refuse only after)."""
    make_library(stack.library, photos=6, odd_names=False)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    [good] = bucket.snapshots()
    for p in stack.library.rglob("*"):
        if p.is_file() and p.name != ".immich":
            os.truncate(p, 1)
    before = stack.started_at()
    r = run_cli("backup", env=env)  # --stop all: a check after the stop would come too late
    assert r.code == 4, r.err
    assert f"where snapshot {good} had" in r.last_error and "lost more than 50%" in r.last_error, r.last_error
    assert "during the run" not in r.last_error  # the pre-stop check's line, not the end's
    assert stack.started_at() == before, "the stack was stopped for a library cut short"
    assert running_containers() == set(CONTAINERS)
    assert bucket.snapshots(complete_only=False) == [good]


# -- item 5: a reused object that is gone -----------------------------------------------------


def test_object_missing_from_the_bucket_is_uploaded_again(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    make_library(stack.library, photos=8, large=[600 * 1024])
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    [first] = bucket.snapshots()
    old = lines_of(bucket, first)
    big = next(stack.library.rglob("large-0.mp4"))  # an object of its own
    key = old[rel(stack, big)]["key"]
    assert key == f"data/{first}/library/{old[rel(stack, big)]['path']}"
    photo = next((stack.library / "library").rglob("IMG_*.jpg"))  # a blob of a pack
    pack = old[rel(stack, photo)]["key"]
    in_pack = {p for p, m in old.items() if m.get("key") == pack}
    assert rel(stack, photo) in in_pack and "offset" in old[rel(stack, photo)]
    bucket.delete(key)  # a lifecycle rule, a manual cleanup, a bug
    bucket.delete(pack)  # every file in it is gone with it

    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    assert f"its object {key} is missing from the bucket: uploading it again" in r.err
    assert f"its object {pack} is missing from the bucket: uploading it again" in r.err
    gone = in_pack | {rel(stack, big)}
    assert f"{len(gone)} unchanged files were uploaded again" in r.out
    second = bucket.snapshots()[-1]
    lines = lines_of(bucket, second)
    line = lines[rel(stack, big)]
    assert line["key"].startswith(f"data/{second}/library/")
    assert bucket.read(line) == big.read_bytes()
    # only the missing ones went up again: what this run uploaded holds exactly them
    again = {p for p, m in lines.items() if m.get("key", "").startswith(f"data/{second}/")}
    assert again == gone
    for p in gone:
        assert bucket.read(lines[p]) == (stack.library / os.fsdecode(p)).read_bytes(), p
    new_packs = {lines[p]["key"] for p in in_pack}
    assert set(bucket.keys(f"data/{second}/")) == {line["key"]} | new_packs
    for p, m in lines.items():  # the others still name the first run's bytes
        if m["type"] == "file" and p not in gone:
            assert (m["key"], m.get("offset")) == (old[p]["key"], old[p].get("offset")), p
    assert bucket.snapshot(second)["files"]["reuploaded"] == len(gone)
    v = run_cli("verify", "latest", "--read-data", env=env)
    assert v.code == 0, v.err + v.out


# -- item 7: ctime, device, and metadata-only changes ----------------------------------------


def test_rewrite_with_preserved_mtime_is_uploaded_and_a_touch_is_not(
    env: dict, stack: ImmichStack, bucket: Bucket
) -> None:
    make_library(stack.library, photos=8, large=[6 * MIB])
    env["IMMICH_STREAM_PART_SIZE"] = "5MiB"  # the 6 MiB video goes the multipart way
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    [first] = bucket.snapshots()

    photos = sorted((stack.library / "library").rglob("IMG_*.jpg"))
    rewritten, touched = photos[0], photos[1]
    video = next(stack.library.rglob("large-0.mp4"))
    # `cp -p` / `rsync -a` / exiftool -P: new bytes, same size, the old mtime put back
    st = rewritten.stat()
    new_bytes = os.urandom(st.st_size)
    rewritten.write_bytes(new_bytes)
    os.utime(rewritten, ns=(st.st_atime_ns, st.st_mtime_ns))
    vst = video.stat()
    new_video = os.urandom(vst.st_size)
    video.write_bytes(new_video)
    os.utime(video, ns=(vst.st_atime_ns, vst.st_mtime_ns))
    # a touch and a chown: metadata only, the bytes are the same
    os.utime(touched, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    os.chown(photos[2], 1234, 1234)

    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    second = bucket.snapshots()[-1]
    lines = lines_of(bucket, second)
    old = lines_of(bucket, first)
    assert bucket.read(lines[rel(stack, rewritten)]) == new_bytes
    assert bucket.read(lines[rel(stack, video)]) == new_video
    where = lambda m: (m["key"], m.get("offset"))  # noqa: E731  # the object, and the blob in a pack
    assert where(lines[rel(stack, touched)]) == where(old[rel(stack, touched)]), "a touch uploaded the file again"
    assert where(lines[rel(stack, photos[2])]) == where(old[rel(stack, photos[2])])
    assert lines[rel(stack, touched)]["mtime_ns"] == 1_600_000_000 * 10**9
    assert lines[rel(stack, photos[2])]["uid"] == 1234
    # what this run uploaded: the video's object, and a pack holding exactly the rewritten photo
    assert set(bucket.keys(f"data/{second}/")) == {lines[rel(stack, rewritten)]["key"], lines[rel(stack, video)]["key"]}
    assert lines[rel(stack, video)]["key"] == f"data/{second}/library/{lines[rel(stack, video)]['path']}"
    assert [p for p, m in lines.items() if m.get("key") == lines[rel(stack, rewritten)]["key"]] == [
        rel(stack, rewritten)
    ]
    files = bucket.snapshot(second)["files"]
    assert files["changed"] == 2 and files["touched"] == 2, files


# -- item 8: long names ------------------------------------------------------------------------


def test_paths_too_long_for_s3_keys_round_trip(env: dict, stack: ImmichStack, bucket: Bucket, tmp_path: Path) -> None:
    make_library(stack.library, photos=3)
    deep = stack.library / "library" / USER_ID
    for i in range(5):
        deep = deep / (f"{i}" * 240)
    deep.mkdir(parents=True)
    # larger than a pack's files (512 KiB): objects of their own, at keys named by their paths
    (deep / "deep-photo.jpg").write_bytes(b"deep" * 150_000)  # the key would pass 1,024 bytes
    odd_dir = os.path.join(os.fsencode(stack.library), b"library", b"odd")
    os.makedirs(odd_dir, exist_ok=True)
    odd = os.path.join(odd_dir, b"\xff" * 250 + b".jpg")  # 254 bytes: escaped, a 1,000-byte key part
    with open(odd, "wb") as fh:
        fh.write(b"odd bytes" * 70_000)

    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    [sid] = bucket.snapshots()
    keys = bucket.keys("data/")
    assert all(len(f"{bucket.prefix}/{k}".encode()) <= 1024 for k in keys)
    hashed = [k for k in keys if "/%long/" in k]
    assert len(hashed) == 2, keys
    lines = lines_of(bucket, sid)
    assert lines[os.path.relpath(odd, os.fsencode(stack.library))]["key"] in hashed

    target = tmp_path / "restored"
    r = run_cli("restore", sid, "--root", "library", "--to", str(target), env=env)
    assert r.code == 0, r.err
    restored = tree(target)
    for relpath, path in tree(stack.library).items():
        assert restored[relpath].read_bytes() == path.read_bytes(), relpath
    assert run_cli("verify", sid, "--read-data", env=env).code == 0


def test_unreadable_file_gives_exit_3_and_a_committed_snapshot(env: dict, stack: ImmichStack, bucket: Bucket) -> None:
    """A file even root cannot open (a write-only sysfs attribute bound into the library)."""
    source = Path("/sys/bus/pci/rescan")
    if not source.exists():
        pytest.skip("no write-only sysfs file to bind here")
    make_library(stack.library, photos=5)
    victim = stack.library / "library" / "unreadable.jpg"
    victim.write_bytes(b"")
    subprocess.run(["mount", "--bind", str(source), str(victim)], check=True)
    try:
        r = run_cli("backup", "--stop", "none", env=env)
    finally:
        subprocess.run(["umount", str(victim)], check=True)
    assert r.code == 3, r.err
    assert "INCOMPLETE: 1 files could not be read" in r.out
    [sid] = bucket.snapshots()
    snap = bucket.snapshot(sid)
    assert snap["complete"] is False and snap["files"]["failed"] == 1
    assert any("library/unreadable.jpg: cannot be read (Permission denied)" in p for p in snap["problems"])
    lines = lines_of(bucket, sid)
    assert b"library/unreadable.jpg" not in lines
    assert sum(1 for m in lines.values() if m["type"] == "file") == len(tree(stack.library)) - 1


# -- item 10: a lost answer to CompleteMultipartUpload ----------------------------------------


def test_lost_answer_to_complete_multipart_is_not_a_failure(
    env: dict, stack: ImmichStack, rclone_s3: S3Server, proxy_factory
) -> None:
    """The server completed the upload; its answer was lost; the retry finds no such upload."""
    make_library(stack.library, photos=3, large=[11 * MIB])
    proxy = proxy_factory(rclone_s3.endpoint)
    env["S3_ENDPOINT_URL"] = proxy.endpoint
    env["IMMICH_STREAM_PART_SIZE"] = "5MiB"

    def completes_video(method: str, path: str, query: dict) -> bool:
        return method == "POST" and "uploadId" in query and path.endswith("large-0.mp4")

    rule = proxy.add(completes_video, status=500, after=True, times=1)
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    assert rule.hits == 1
    assert "the answer to completing" in r.err
    bucket = bucket_of(env)
    [sid] = bucket.snapshots()
    video = next(stack.library.rglob("large-0.mp4"))
    line = lines_of(bucket, sid)[rel(stack, video)]
    assert bucket.read(line) == video.read_bytes()
    assert bucket.open_multipart_uploads() == []


# -- item 11: streams larger than the memory budget's parts -----------------------------------


async def test_stream_parts_never_outgrow_the_memory_budget(rclone_s3: S3Server, monkeypatch, tmp_path: Path) -> None:
    """Scaled down: 4 KiB parts, a 16 KiB budget, and parts that would double past it."""
    from immich_stream.s3 import checksums as store_mod
    from immich_stream.s3.budget import ByteBudget
    from immich_stream.s3.checksums import max_stream_size, stream_part_size
    from immich_stream.s3.options import StoreOptions
    from immich_stream.s3.store import Store
    from immich_stream.s3.writers import StreamWriter
    from tests.conftest import KEY, SECRET

    monkeypatch.setattr(store_mod, "PARTS_PER_STEP", 8)  # the growth schedule, 125x compressed
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    bucket = rclone_s3.new_bucket()
    settings = make_settings(
        endpoint=rclone_s3.endpoint, bucket=bucket, home=tmp_path, IMMICH_STREAM_JOBS="8", IMMICH_STREAM_RETRIES="3"
    )
    budget = ByteBudget(16 * 1024)
    assert [stream_part_size(n, 4096, 8192) for n in (1, 8, 9, 17, 25, 80)] == [4096] * 2 + [8192] * 4
    data = os.urandom(40 * 4096 + 123)

    async with Store(StoreOptions.from_settings(settings)) as store:
        async with StreamWriter(store, "big/stream", budget, 4096) as out:
            for i in range(0, len(data), 1000):
                await asyncio.wait_for(out.write(data[i : i + 1000]), 30)  # a deadlock fails here
            await asyncio.wait_for(out.finish(), 30)
        assert out.parts > 16 and budget.used == 0
        assert budget.peak <= budget.limit
        got = await store.get("big/stream")
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    # the documented maximum with --max-memory 256MiB (streams get 64 MiB, parts grow to 32)
    monkeypatch.undo()
    assert max_stream_size(8 * MIB, 32 * MIB) == (1000 * 8 + 1000 * 16 + 8000 * 32) * MIB  # 273 GiB
