"""find and restore by what Immich knows (issue 26): a snapshot written through the repository
code into a bucket on the real rclone S3 server, its dump the one the real PostgreSQL made of
Immich's real schema (tests/data/catalog/new-era.sql.gz), its library holding every library
file that dump names; the real CLI answers from the catalog it builds from the stored dump.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from immich_stream.browse.catalog import CatalogBuilder
from tests.helpers import run_cli, tree
from tests.test_hardening_restore import Entry, write_snapshot

DATA = Path(__file__).resolve().parent / "data" / "catalog"
ALBUM = "Album 1 of User 4"


def body(path: str) -> bytes:
    return f"bytes of {path}\n".encode() * (3 + len(path) % 7)


def snapshot(env: dict[str, str]) -> tuple[str, list[dict]]:
    sql = gzip.decompress((DATA / "new-era.sql.gz").read_bytes())
    b = CatalogBuilder()
    b.feed(sql)
    _, *assets = [json.loads(line) for line in b.lines()]
    entries = {path: Entry(body(path)) for a in assets for root, path, _ in a["files"] if root == "library"}
    return write_snapshot(env, dict(sorted(entries.items())), dump_sql=sql), assets


@pytest.mark.slow
def test_find_and_restore_an_album_exactly(s3_env: dict[str, str], tmp_path: Path) -> None:
    sid, assets = snapshot(s3_env)
    album = [a for a in assets if ALBUM in a["albums"]]
    assert 2 <= len(album) < len(assets) // 4

    r = run_cli("find", "--album", ALBUM.lower(), env=s3_env)
    assert r.code == 0, r.err
    assert f"{len(album)} assets, {sum(len(a['files']) for a in album)} files in snapshot {sid}" in r.out
    for a in album:
        assert a["name"] in r.out
        for _, path, _ in a["files"]:
            assert f"library/{path}" in r.out
    others = [a for a in assets if ALBUM not in a["albums"]]
    assert not any(f"library/{p}" in r.out for a in others for _, p, _ in a["files"])

    # combinable: the album's assets of one time span only
    first = min(a["taken"] for a in album)
    r = run_cli("find", "--album", ALBUM, "--taken", f"..{first[:10]}", "--json", env=s3_env)
    assert r.code == 0, r.err
    *found, doc = [json.loads(line) for line in r.out.splitlines()]  # JSON lines: one per asset, the summary last
    want_ids = [a["id"] for a in album if a["taken"][:10] <= first[:10]]
    assert [a["id"] for a in found] == want_ids and {a["message_type"] for a in found} == {"asset"}
    assert doc["summary"]["assets"] == len(want_ids)

    r = run_cli("find", "--album", "Album 1 of Usr 4", env=s3_env)
    assert r.code == 1, r.err
    assert "no album 'Album 1 of Usr 4' (the nearest: 'Album 1 of User 4'" in r.last_error, r.err
    r = run_cli("find", "--album", ALBUM, "--name", "*.HEIC", env=s3_env)
    assert (r.code, r.last_error.split(": ", 2)[-1][:14]) == (1, "nothing matche"), r.err
    r = run_cli("find", "--taken", "last summer", env=s3_env)
    assert r.code == 2 and "not a date" in r.last_error, r.err

    target = tmp_path / "album"
    r = run_cli("restore", sid, "--album", ALBUM, "--to", str(target), env=s3_env)
    assert r.code == 0, r.err
    want = {path.encode(): body(path) for a in album for _, path, _ in a["files"]}
    got = {rel: p.read_bytes() for rel, p in tree(target).items() if p.is_file() and b".immich-stream" not in rel}
    assert got == want  # exactly the album's originals and derived files, byte-identical, nothing else
    assert "UPLOAD_LOCATION" in r.out and "immich upload" in r.out

    names = tmp_path / "names"
    r = run_cli("restore", sid, "--album", ALBUM, "--layout", "names", "--to", str(names), env=s3_env)
    assert r.code == 0, r.err
    got = {rel: p.read_bytes() for rel, p in tree(names).items() if p.is_file() and b".immich-stream" not in rel}
    originals = {f"{ALBUM}/{a['name']}".encode(): body(a["files"][0][1]) for a in album}
    assert originals.items() <= got.items()
    assert all(rel.startswith(ALBUM.encode() + b"/") for rel in got)
    assert f"{ALBUM}/IMG_63.jpg.xmp".encode() in got  # a sidecar beside its photo

    # an album that is not there: nothing written; a dump that is not Immich's: one line, exit 1
    nowhere = tmp_path / "nowhere"
    r = run_cli("restore", sid, "--album", "Album 9 of User 4", "--to", str(nowhere), env=s3_env)
    assert r.code == 1 and "nothing matched" in r.last_error and not nowhere.exists(), r.err
    other = write_snapshot(s3_env, {"library/x.jpg": Entry(b"x")})  # its dump: SELECT 1
    r = run_cli("find", "--snapshot", other, "--album", ALBUM, env=s3_env)
    assert r.code == 1 and "is not an Immich database of a known schema" in r.last_error, r.err
    assert len([ln for ln in r.err.splitlines() if "error" in ln]) == 1, r.err


@pytest.mark.slow
def test_a_planted_catalog_of_any_size_is_not_read_into_memory(s3_env: dict[str, str]) -> None:
    """A bucket writer's object at the catalog's key, far larger than the size snapshot.json
    records: find answers from the dump without downloading it (it was read whole into
    memory, twice over, before its sha256 was found wrong)."""
    import asyncio
    import hashlib

    from immich_stream.repository.repo import Repo
    from immich_stream.s3.options import StoreOptions
    from immich_stream.s3.store import Store
    from tests.helpers import make_settings

    sid, assets = snapshot(s3_env)
    album = [a for a in assets if ALBUM in a["albums"]]
    settings = make_settings(s3_env, export_credentials=True)

    async def plant(big: int) -> None:
        async with Store(StoreOptions.from_settings(settings)) as store:
            repo = Repo(store, settings.prefix)
            doc = json.loads(await store.get(repo.summary_key(sid)))
            doc["catalog"] = {"size": 1000, "sha256": hashlib.sha256(b"x").hexdigest()}
            await store.put(repo.summary_key(sid), json.dumps(doc).encode())
            if big:
                await store.put(repo.catalog_key(sid), bytes(big))

    asyncio.run(plant(0))
    floor = run_cli("find", "--album", ALBUM, env=s3_env)  # recorded, not there: the dump answers
    assert floor.code == 0 and f"{len(album)} assets" in floor.out, floor.err
    asyncio.run(plant(192 << 20))
    r = run_cli("find", "--album", ALBUM, env=s3_env)
    assert r.code == 0 and f"{len(album)} assets" in r.out, r.err
    grown = r.maxrss_kib - floor.maxrss_kib
    assert grown < 64 * 1024, f"find peaked {grown / 1024:.0f} MiB above its run without the planted object"


@pytest.mark.slow
def test_a_forged_catalog_writes_nothing_outside_the_target(s3_env: dict[str, str], tmp_path: Path) -> None:
    """A plaintext repository's catalog forged with its snapshot.json record (a bucket writer
    can there): albums and names of "..", "/" and absolute paths, files named outside the
    snapshot. restore --layout names and library write below --to only; what the manifest
    lacks is not restored."""
    import asyncio
    import hashlib

    from immich_stream.repository.repo import Repo
    from immich_stream.s3.options import StoreOptions
    from immich_stream.s3.store import Store
    from tests.helpers import make_settings

    sid, assets = snapshot(s3_env)
    real = [a for a in assets if a["files"] and a["files"][0][0] == "library"][:3]
    evil = ["../../escape", "/abs/olute", ".."]
    forged = [
        {
            **a,
            "albums": ["Trip", evil[i]],
            "name": evil[(i + 1) % 3],
            "files": [*a["files"], ["library", "../../x", "original"]],
        }
        for i, a in enumerate(real)
    ]
    header = {
        "catalog": 1,
        "era": "new",
        "tables": {},
        "assets": 3,
        "users": [],
        "albums": ["Trip", *evil],
        "people": [],
    }
    data = gzip.compress(b"".join(json.dumps(x).encode() + b"\n" for x in [header, *forged]))
    settings = make_settings(s3_env, export_credentials=True)

    async def plant() -> None:
        async with Store(StoreOptions.from_settings(settings)) as store:
            repo = Repo(store, settings.prefix)
            doc = json.loads(await store.get(repo.summary_key(sid)))
            doc["catalog"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            await store.put(repo.summary_key(sid), json.dumps(doc).encode())
            await store.put(repo.catalog_key(sid), data)

    asyncio.run(plant())
    outside = tmp_path / "a"
    for layout in ("names", "library"):
        target = outside / "b" / layout
        r = run_cli("restore", sid, "--album", "Trip", "--layout", layout, "--to", str(target), env=s3_env)
        assert r.code == 0, r.err
        files = {rel for rel, p in tree(target).items() if p.is_file() and b".immich-stream" not in rel}
        assert len(files) >= 3 and not any(b"/../" in b"/" + f + b"/" for f in files), files
        if layout == "names":
            assert files == {b"Trip/.._.._escape", b"Trip/_", b"Trip/_abs_olute"}
    assert {p.relative_to(outside) for p in outside.rglob("*") if p.parent == outside} == {Path("b")}
    assert {p.name for p in (outside / "b").iterdir()} == {"names", "library"}
