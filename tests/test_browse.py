"""ls, find and diff (issue 26, from the manifests alone): the CLI against snapshots of
real directories, walked by the backup's own walker and written by the repository's own
writers into a real S3 server (rclone), plaintext and encrypted; and the memory bound at
200,000 manifest entries."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from immich_stream import config
from tests.conftest import bucket_of
from tests.helpers import Result, make_settings, run_cli
from tests.test_encryption import keygen

pytestmark = pytest.mark.slow  # the CLI as a process

T0 = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.UTC)


async def _snapshot_of(settings: config.Settings, library: Path, when: dt.datetime) -> str:
    """A committed snapshot of `library` as a backup writes one: the walker's entries,
    each file's object, the manifest (with its MACs in an authenticated repository)."""
    from immich_stream.backup.walk import walk
    from immich_stream.repository.age import load_keys
    from immich_stream.repository.layout import new_snapshot_id
    from immich_stream.repository.manifest import ManifestLine, ManifestWriter
    from immich_stream.repository.repo import Repo
    from immich_stream.repository.summary import FileCounts, ManifestInfo, SnapshotSummary
    from immich_stream.s3.budget import ByteBudget
    from immich_stream.s3.options import StoreOptions
    from immich_stream.s3.store import Store

    keys = load_keys(settings.age_identity, settings.age_recipients)
    async with Store(StoreOptions.from_settings(settings)) as raw:
        repo = Repo(raw, settings.prefix)
        await repo.ensure_config(keys)
        if keys is not None:
            await repo.check_config(keys, writing=True, upgrade=True)
        store = repo.store
        sid = new_snapshot_id(when)
        files = size = 0
        mac = repo.manifest_mac(sid)
        async with ManifestWriter(store, repo.manifest_key(sid), ByteBudget(64 << 20), settings.part_size, mac) as mw:
            async for entry in walk(str(library), lambda p: None):
                line = ManifestLine.from_entry("library", entry)
                if entry.type == "file":
                    body = (library / os.fsdecode(entry.relpath)).read_bytes()
                    line.sha256 = hashlib.sha256(body).hexdigest()
                    line.key = repo.data_key(sid, "library", line.path)
                    await store.put(repo.object_key(line.key), body)
                    line.stored = store.sealing.size(len(body)) if store.sealing else None
                    files, size = files + 1, size + len(body)
                await mw.add(line)
            await mw.finish()
        await repo.commit(
            SnapshotSummary(
                id=sid,
                time=when.isoformat(),
                roots={"library": str(library)},
                files=FileCounts(files=files, bytes_total=size),
                manifest=ManifestInfo(repo.relative_key(repo.manifest_key(sid)), mw.lines),
            )
        )
    return sid


def snapshot(env: dict[str, str], library: Path, hours: int = 0) -> str:
    settings = make_settings(env, export_credentials=True)
    return asyncio.run(_snapshot_of(settings, library, T0 + dt.timedelta(hours=hours)))


def write(root: Path, files: dict[str, bytes]) -> None:
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))  # 2023-11-14 22:13:20 UTC


LIBRARY = {
    "library/admin/2023/IMG_4411.HEIC": b"h" * 4411,
    "library/admin/2023/IMG_4412.jpg": b"j" * 1000,
    "library/admin/2023/new\nline.jpg": b"n" * 7,
    "library/admin/2024/IMG_5000.jpg": b"k" * 2500,
    "upload/admin/aa/bb/asset.mp4": b"v" * 9000,
    "thumbs/admin/aa/bb/asset-thumbnail.webp": b"t" * 300,
}


def lines(r: Result) -> list[str]:
    return r.out.splitlines()


def test_ls_lists_a_directory_a_file_and_refuses_what_is_not_there(s3_env: dict[str, str], tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    write(lib, LIBRARY)
    (lib / "library/admin/2023/latest.jpg").symlink_to("IMG_4412.jpg")
    os.utime(lib / "library/admin/2023/latest.jpg", ns=(0, 1_700_000_000 * 10**9), follow_symlinks=False)
    sid = snapshot(s3_env, lib)

    r = run_cli("ls", env=s3_env)  # latest, the root
    assert r.code == 0, r.err
    assert [ln.split()[-1] for ln in lines(r)] == ["library/", "thumbs/", "upload/"]
    assert lines(r)[0].startswith("dir ")

    r = run_cli("ls", sid[:12], "/library/admin/2023/", env=s3_env)  # a unique prefix, slashes around
    assert r.code == 0, r.err
    assert lines(r) == [
        "file            4411  2023-11-14 22:13:20  IMG_4411.HEIC",
        "file            1000  2023-11-14 22:13:20  IMG_4412.jpg",
        "symlink            -  2023-11-14 22:13:20  latest.jpg -> IMG_4412.jpg",
        "file               7  2023-11-14 22:13:20  new%0Aline.jpg",  # one name, one line
    ]

    r = run_cli("ls", "latest", "library/admin/2023/IMG_4411.HEIC", "--long", env=s3_env)  # a file: itself
    assert r.code == 0, r.err
    sha = hashlib.sha256(LIBRARY["library/admin/2023/IMG_4411.HEIC"]).hexdigest()
    mode, uid, gid, size, _day, _time, prefix, name = lines(r)[0].split()
    assert (mode, size, prefix, name) == ("-rw-r--r--", "4411", sha[:12], "library/admin/2023/IMG_4411.HEIC")
    assert (int(uid), int(gid)) == (os.getuid(), os.getgid())

    r = run_cli("ls", "library/admin/2024", env=s3_env)  # a lone PATH: in the latest snapshot
    assert r.code == 0 and lines(r) == ["file            2500  2023-11-14 22:13:20  IMG_5000.jpg"], r.err

    r = run_cli("ls", "latest", "library/admin", "--json", env=s3_env)
    assert r.code == 0, r.err
    docs = [json.loads(ln) for ln in lines(r)]
    assert [(d["name"], d["type"]) for d in docs[:-1]] == [("2023", "dir"), ("2024", "dir")]
    assert docs[0]["path"] == "library/admin/2023" and docs[0]["message_type"] == "entry"
    assert docs[-1]["message_type"] == "summary" and docs[-1]["summary"]["entries"] == 2

    r = run_cli("ls", "latest", "library/admin/2025", env=s3_env)
    assert r.code == 1 and r.out == ""
    assert r.last_error == (
        f"immich-stream: error: library/admin/2025 is not in snapshot {sid} (root library): "
        "list its parent directory, or search with `find '*2025*'`"
    )
    r = run_cli("ls", "2020-01-01T", env=s3_env)
    assert r.code == 1 and "no snapshot matches '2020-01-01T'" in r.last_error
    r = run_cli("ls", "latest", "--root", "external:photos", env=s3_env)
    assert r.code == 1 and f"snapshot {sid} holds nothing in root external:photos" in r.last_error


def test_find_names_the_snapshots_holding_a_file_newest_first(s3_env: dict[str, str], tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    write(lib, LIBRARY)
    first = snapshot(s3_env, lib, 0)
    (lib / "library/admin/2023/IMG_4411.HEIC").unlink()  # deleted last week
    second = snapshot(s3_env, lib, 1)

    r = run_cli("find", "IMG_44*", env=s3_env)
    assert r.code == 0, r.err
    hits = [ln.split() for ln in lines(r)]
    assert [(h[0], h[1], h[2], h[-1]) for h in hits] == [
        (second, "library", "1000", "library/admin/2023/IMG_4412.jpg"),
        (first, "library", "4411", "library/admin/2023/IMG_4411.HEIC"),
        (first, "library", "1000", "library/admin/2023/IMG_4412.jpg"),
    ]
    r = run_cli("find", "library/*/2024", "--snapshot", "latest", "--json", env=s3_env)  # a whole path: the dir
    assert r.code == 0, r.err
    docs = [json.loads(ln) for ln in lines(r)]
    assert [(d["snapshot"], d["path"], d["type"]) for d in docs[:-1]] == [(second, "library/admin/2024", "dir")]

    r = run_cli("find", "IMG_9999*", env=s3_env)
    assert r.code == 1 and r.out == ""
    assert r.last_error == "immich-stream: error: nothing matched IMG_9999* in 2 snapshots"
    r = run_cli("find", "IMG_4411*", "--root", "postgres", "--snapshot", first, env=s3_env)
    assert r.code == 1 and r.last_error.endswith("nothing matched IMG_4411* in 1 snapshot")
    r = run_cli("find", env=s3_env)
    assert r.code == 2 and "find needs a PATTERN" in r.last_error


def test_diff_reports_a_moved_tree_as_moves_with_their_bytes(s3_env: dict[str, str], tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    write(lib, LIBRARY)
    first = snapshot(s3_env, lib, 0)
    # the storage template turned on: the year folders move under the user's label
    (lib / "library/Alice").mkdir()
    shutil.move(lib / "library/admin/2023", lib / "library/Alice/2023")
    write(lib, {"upload/admin/aa/bb/asset.mp4": b"w" * 9100, "upload/admin/cc/new.jpg": b"x" * 50})
    (lib / "thumbs/admin/aa/bb/asset-thumbnail.webp").unlink()
    second = snapshot(s3_env, lib, 1)

    r = run_cli("diff", first, second, env=s3_env)
    assert r.code == 0, r.err
    out = lines(r)
    moves = sorted(ln for ln in out if ln.startswith(">"))
    assert moves == [
        ">  library:library/admin/2023/IMG_4411.HEIC -> library:library/Alice/2023/IMG_4411.HEIC  (4411)",
        ">  library:library/admin/2023/IMG_4412.jpg -> library:library/Alice/2023/IMG_4412.jpg  (1000)",
        ">  library:library/admin/2023/new%0Aline.jpg -> library:library/Alice/2023/new%0Aline.jpg  (7)",
    ]
    assert "M  library:upload/admin/aa/bb/asset.mp4  (9000 -> 9100)" in out
    assert "-  library:thumbs/admin/aa/bb/asset-thumbnail.webp  (300)" in out
    assert "+  library:upload/admin/cc/new.jpg  (50)" in out
    assert not [ln for ln in out if ln.startswith(("+", "-")) and "IMG_44" in ln], "a move is not delete + add"
    assert out[-1] == "moved:   3 files, 5.3 KiB"

    r = run_cli("diff", first, second, "--json", env=s3_env)
    assert r.code == 0, r.err
    summary = json.loads(lines(r)[-1])["summary"]
    assert summary["moved"] == {"entries": 3, "files": 3, "bytes": 4411 + 1000 + 7}
    assert summary["added"] == {"entries": 4, "files": 1, "bytes": 50}  # Alice/, Alice/2023/, cc/, new.jpg
    assert summary["removed"] == {"entries": 2, "files": 1, "bytes": 300}  # admin/2023/ and the thumbnail
    assert summary["changed"] == {"entries": 1, "files": 1, "bytes": 9100}
    assert summary["changed_old_bytes"] == 9000
    changes = [json.loads(ln) for ln in lines(r)[:-1]]
    moved = next(c for c in changes if c["kind"] == "moved" and c["path"].endswith("IMG_4411.HEIC"))
    assert moved["from_path"] == "library/admin/2023/IMG_4411.HEIC" and moved["size"] == 4411

    r = run_cli("diff", first, first, "--json", env=s3_env)
    assert r.code == 0 and len(lines(r)) == 1  # the same snapshot: nothing but the summary


def test_ls_find_diff_on_an_encrypted_repository_and_no_repository(s3_env: dict[str, str], tmp_path: Path) -> None:
    own, offline = tmp_path / "own.key", tmp_path / "offline.key"
    keygen(own)
    env = dict(s3_env, IMMICH_STREAM_AGE_IDENTITY=str(own), IMMICH_STREAM_AGE_RECIPIENTS=keygen(offline))
    lib = tmp_path / "lib"
    write(lib, LIBRARY)
    first = snapshot(env, lib, 0)
    (lib / "upload/admin/aa/bb/asset.mp4").rename(lib / "upload/admin/moved.mp4")
    second = snapshot(env, lib, 1)
    # the manifest is an age file, its lines followed by MAC lines (the key's auth line: trust on first use)
    assert bucket_of(env).get(f"snapshots/{second}/manifest.jsonl.gz").startswith(b"age-encryption.org/v1")
    assert "# immich-stream-auth:" in own.read_text()

    r = run_cli("ls", "latest", "upload/admin", env=env)
    assert r.code == 0, r.err
    assert [ln.split()[-1] for ln in lines(r)] == ["aa/", "moved.mp4"]
    r = run_cli("find", "*.mp4", env=env)
    assert r.code == 0, r.err
    assert [(ln.split()[0], ln.split()[-1]) for ln in lines(r)] == [
        (second, "upload/admin/moved.mp4"),
        (first, "upload/admin/aa/bb/asset.mp4"),
    ]
    r = run_cli("diff", first, second, env=env)
    assert r.code == 0, r.err
    assert ">  library:upload/admin/aa/bb/asset.mp4 -> library:upload/admin/moved.mp4  (9000)" in lines(r)

    # no repository at this bucket/prefix: refused like every other command (exit 9)
    bare = {k: v for k, v in s3_env.items() if k != "IMMICH_STREAM_TEST_AUTO_INIT"}
    for args in (["ls"], ["find", "x"], ["diff", "a", "b"]):
        r = run_cli(*args, env=dict(bare, S3_PREFIX="nothing-here"))
        assert r.code == 9, (args, r.err)


def test_ls_and_find_of_200000_entries_stay_within_a_memory_bound(s3_env: dict[str, str]) -> None:
    """The manifest is streamed: the peak RSS of ls and find over 200,000 entries stays
    within a fixed margin of the same commands on a 10-entry snapshot (what a reader holds
    is one decompressed chunk of the manifest, whatever its length). Holding the lines
    (~600 bytes each as objects) would take over 100 MiB more. Figures: docs/performance.md."""
    from bench.browse import synthetic_snapshot

    settings = make_settings(s3_env, export_credentials=True)
    tiny = asyncio.run(synthetic_snapshot(settings, 10, T0))
    big = asyncio.run(synthetic_snapshot(settings, 200_000, T0 + dt.timedelta(hours=1)))

    floor = run_cli("ls", tiny, "library/admin", env=s3_env)
    assert floor.code == 0 and lines(floor)[0].endswith(" 00000/"), floor.err
    last = run_cli("ls", big, "library/admin/00399", env=s3_env)  # the last folder: the whole manifest read
    assert last.code == 0, last.err
    assert len(lines(last)) == 200_000 - 2 - 399 * 501 - 1  # what is left after 399 full folders
    found = run_cli("find", "IMG_01990[05]?.jpg", env=s3_env)
    assert found.code == 0, found.err
    assert len(lines(found)) == 20 and all(ln.startswith(big) for ln in lines(found))
    margin = 48 * 1024  # KiB; measured: ~24 MiB (one 1 MiB chunk of the manifest decompressed and split)
    for name, r in (("ls", last), ("find", found)):
        grown = r.maxrss_kib - floor.maxrss_kib
        assert grown < margin, f"{name} of 200,000 entries peaked {grown / 1024:.0f} MiB above the 10-entry run"
