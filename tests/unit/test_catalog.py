"""The Immich catalog read from pg_dump text (immich_stream/browse/catalog.py).

The dumps in tests/data/catalog/ were made by the real PostgreSQL 17 (pg_dump) from Immich's
real schema and rows (tests/stack/real/10-schema.sql, 20-rows.sql, trimmed to 120 assets by
trim.sql), once in the names since StandardizeNames with absolute /data/ paths, once in the
names before it (legacy/30-legacy-names.sql) with relative upload/ paths and one
/usr/src/app/upload/ path (legacy-paths.sql); make.sh remakes them.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from immich_stream.browse.catalog import CatalogBuilder, CatalogError, field_text, parse_array, parse_copy
from immich_stream.browse.catalog_find import Selectors, parse_taken
from immich_stream.errors import ConfigError, NothingMatched

DATA = Path(__file__).resolve().parent.parent / "data" / "catalog"


def catalog(sql: bytes, chunk: int = 65536, **kw: object) -> tuple[dict, list[dict]]:
    b = CatalogBuilder(**kw)  # type: ignore[arg-type]
    for i in range(0, len(sql), chunk):
        b.feed(sql[i : i + chunk])
    header, *assets = [json.loads(line) for line in b.lines()]
    return header, assets


def dump(era: str) -> bytes:
    return gzip.decompress((DATA / f"{era}-era.sql.gz").read_bytes())


def by_name(assets: list[dict]) -> dict[str, dict]:
    return {a["name"]: a for a in assets}


def test_both_eras_and_both_path_forms_give_the_same_catalog() -> None:
    new_header, new = catalog(dump("new"), chunk=777)  # rows cut anywhere
    old_header, old = catalog(dump("old"))
    assert (new_header["era"], old_header["era"]) == ("new", "old")
    assert new_header["tables"]["asset"] == "asset" and old_header["tables"]["asset"] == "assets"
    assert old_header["tables"]["album_asset"] == "albums_assets_assets"
    assert len(new) == len(old) == new_header["assets"] == 120
    # relative upload/..., absolute /usr/src/app/upload/... and /data/...: the same library paths
    assert sorted(new, key=lambda a: a["id"]) == sorted(old, key=lambda a: a["id"])
    assert {h: new_header[h] for h in ("users", "albums", "people")} == {
        h: old_header[h] for h in ("users", "albums", "people")
    }


def test_an_assets_owner_albums_people_and_every_file() -> None:
    header, assets = catalog(dump("new"))
    assets_by = by_name(assets)
    assert len(header["users"]) == 4 and ["user1@example.org", "User 1"] in header["users"]
    assert "Vacances d'été\\2023" in header["albums"]  # an escaped backslash in a COPY field
    assert "Album 5 of User 3" not in header["albums"]  # deleted by 20-rows.sql
    assert "" not in header["people"] and "Person 1" in header["people"]

    live = assets_by["IMG_43.jpg"]  # a live photo: its motion video's files belong to it
    kinds = {kind: (root, path) for root, path, kind in live["files"]}
    assert kinds["original"][0] == "library" and kinds["original"][1].startswith("library/")
    assert kinds["original"][1].endswith("/IMG_43.jpg")
    assert kinds["live-video"][1].endswith("/IMG_20.mp4")
    assert kinds["live-encoded-video"][1].startswith("encoded-video/")
    assert kinds["thumbnail"][1].startswith("thumbs/") and kinds["preview"][1].endswith("-preview.jpeg")
    # a sidecar: an asset_file row (since v1.135) or the sidecarPath column (before)
    assert any(k == "sidecar" and p.endswith("IMG_63.jpg.xmp") for _, p, k in assets_by["IMG_63.jpg"]["files"])
    assert any(k == "sidecar" and p.endswith("IMG_83.jpg.xmp") for _, p, k in assets_by["IMG_83.jpg"]["files"])
    # an external library's file: its root named as backups name it
    nas = assets_by["DSC_920.jpg"]
    assert nas["files"][0] == ["external:mnt-nas-photos", "2015/DSC_920.jpg", "original"]
    assert nas["user"] == "user1@example.org" and nas["owner"] == "User 1"
    assert assets_by["Été\tà \\ la mer.jpg"]["type"] == "VIDEO"  # tab and backslash escapes
    # taken-at: exif's dateTimeOriginal, as ISO 8601
    assert assets_by["IMG_63.jpg"]["taken"] == "2010-04-08T15:00:00+00:00"
    with_people = [a for a in assets if a["people"]]
    in_albums = [a for a in assets if a["albums"]]
    assert with_people and in_albums and len(in_albums) < len(assets)


def test_a_dump_of_another_schema_or_of_both_eras_is_refused_in_one_line() -> None:
    other = b"COPY public.things (id, name) FROM stdin;\n1\tx\n\\.\n"
    with pytest.raises(CatalogError, match="not an Immich database of a known schema"):
        catalog(other)
    new, old = dump("new"), dump("old")
    with pytest.raises(CatalogError, match="both naming eras"):
        catalog(new + old)
    odd = b'COPY public.asset (id, "ownerId", path) FROM stdin;\n\\.\n'
    with pytest.raises(CatalogError, match="lacks the columns"):
        catalog(odd)


def test_cluster_dump_reads_only_the_database_asked_for() -> None:
    # the other database holds the old era's tables: read too, they would be refused (both eras)
    sql = b"-- PostgreSQL database cluster dump\n\\connect other\n" + dump("old") + b"\\connect immich\n" + dump("new")
    header, assets = catalog(sql, database="immich")
    assert header["era"] == "new" and len(assets) == 120


def test_copy_text_format_fields_and_arrays() -> None:
    assert field_text(b"\\N") is None
    assert field_text(b"a\\tb\\\\c\\nd\\101\\x41") == "a\tb\\c\ndAA"
    assert parse_array('{/mnt/nas/photos,"/mnt/a b","x\\"y",NULL}') == ["/mnt/nas/photos", "/mnt/a b", 'x"y']
    assert parse_copy(b'COPY public."user" (id, "createdAt", "a""b") FROM stdin;') == (
        "user",
        ["id", "createdAt", 'a"b'],
    )


def test_album_asset_with_singular_column_names() -> None:
    new = dump("new").replace(
        b'COPY public.album_asset ("albumsId", "assetsId"', b'COPY public.album_asset ("albumId", "assetId"'
    )
    _, a = catalog(dump("new"))
    _, b = catalog(new)
    assert a == b


def test_selectors_combine_and_unknown_names_list_the_nearest() -> None:
    header, assets = catalog(dump("new"))
    one = Selectors(albums=["album 1 of user 1"])  # no regard to case
    picked = [a for a in assets if one.matches(a)]
    assert picked and all("Album 1 of User 1" in a["albums"] for a in picked)
    both = Selectors(albums=["Album 1 of User 1"], names=["IMG_*"], taken=["2010-01-01..2012-12-31"])
    narrower = [a for a in assets if both.matches(a)]
    assert narrower and set(map(id, narrower)) < set(map(id, picked))
    assert all(a["name"].startswith("IMG_") and a["taken"] < "2013" for a in narrower)
    by_user = [a for a in assets if Selectors(users=["User 4"]).matches(a)]
    assert by_user and by_user == [a for a in assets if Selectors(users=["USER4@example.org"]).matches(a)]
    with pytest.raises(NothingMatched, match=r"no album 'Album 1 of Usr 1' .*'Album 1 of User 1'"):
        Selectors(albums=["Album 1 of Usr 1"]).check_names(header, "S")
    with pytest.raises(ConfigError, match="not a date"):
        parse_taken("last summer")
    lo, hi = parse_taken("2023-07-01..2023-07-01")
    assert lo is not None and hi is not None and (hi - lo).total_seconds() > 86399


def test_columns_a_version_lacks_read_as_null() -> None:
    """An Immich without sidecarPath, encodedVideoPath or deletedAt columns (some versions
    dropped or had not yet added them): those read as NULL, the rest as usual."""
    u, a, al = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222", "3" * 8
    sql = (
        f'COPY public."user" (id, email, name) FROM stdin;\n{u}\tme@example.org\tMe\n\\.\n'
        f'COPY public.album (id, "albumName") FROM stdin;\n{al}\tTrip\n\\.\n'
        f'COPY public.album_asset ("albumId", "assetId") FROM stdin;\n{al}\t{a}\n\\.\n'
        f'COPY public.asset (id, "ownerId", type, "originalPath", "originalFileName", "fileCreatedAt", '
        f'"localDateTime") FROM stdin;\n{a}\t{u}\tIMAGE\t/data/library/{u}/a.jpg\ta.jpg\t2020-01-02 03:04:05+00\t'
        "2020-01-02 04:04:05+00\n\\.\n"
    ).encode()
    header, assets = catalog(sql, chunk=5)
    assert header["era"] == "new"
    assert assets == [
        {
            "id": a,
            "user": "me@example.org",
            "owner": "Me",
            "name": "a.jpg",
            "type": "IMAGE",
            "taken": "2020-01-02T03:04:05+00:00",
            "albums": ["Trip"],
            "people": [],
            "files": [["library", f"library/{u}/a.jpg", "original"]],
        }
    ]


def test_names_layout_resolves_collisions_and_unsafe_names() -> None:
    from immich_stream.browse.catalog_restore import NO_ALBUM, names_layout

    def asset(i: int, name: str, albums: list[str], files: list[list[str]]) -> dict:
        return {"id": str(i), "name": name, "taken": f"2023-01-0{i}", "albums": albums, "files": files}

    got = names_layout(
        [
            asset(1, "IMG_1.jpg", ["Trip", "Other"], [["library", "library/u/a/IMG_1.jpg", "original"]]),
            asset(
                2,
                "IMG_1.jpg",
                ["Other", "Trip"],
                [
                    ["library", "library/u/b/IMG_1.jpg", "original"],
                    ["library", "library/u/b/IMG_1.jpg.xmp", "sidecar"],
                    ["library", "thumbs/u/b-thumbnail.webp", "thumbnail"],  # derived: not in this layout
                    ["library", "library/u/b/IMG_1.mov", "live-video"],
                ],
            ),
            asset(3, "../x/..", [], [["library", "library/u/c/x", "original"], ["", "/elsewhere/x", "original"]]),
        ],
        ["trip"],
    )
    assert got == {
        ("library", b"library/u/a/IMG_1.jpg"): b"Trip/IMG_1.jpg",
        ("library", b"library/u/b/IMG_1.jpg"): b"Trip/IMG_1 (2).jpg",
        ("library", b"library/u/b/IMG_1.jpg.xmp"): b"Trip/IMG_1 (2).jpg.xmp",
        ("library", b"library/u/b/IMG_1.mov"): b"Trip/IMG_1 (2).mov",
        ("library", b"library/u/c/x"): NO_ALBUM.encode() + b"/.._x_..",
    }


def test_a_huge_row_of_a_table_not_read_is_not_carried() -> None:
    """A row of 32 MiB in a table the catalog skips (a big text or bytea column), fed in the
    dump's 1 MiB batches: the reader keeps a few bytes of it, not the row (nor copies it
    again on every batch: the dump waits for the reader)."""
    import tracemalloc

    b = CatalogBuilder()
    b.feed(b"COPY public.system_metadata (key, value) FROM stdin;\nk\t")
    tracemalloc.start()
    try:
        piece = b"x" * (1 << 20)
        for _ in range(32):
            b.feed(piece)
        b.feed(b"\n\\.\n")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB held for a row the catalog does not read"
    sql = dump("new")
    b.feed(sql)
    assert json.loads(next(iter(b.lines())))["assets"] == 120  # the rest of the dump still read


def test_a_huge_row_of_a_table_read_stops_the_catalog_not_the_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row longer than MAX_ROW in a table the catalog reads: feed_safely gives up the
    catalog (one line, said at -v) instead of holding and re-copying the row."""
    from immich_stream.browse import catalog as cat

    monkeypatch.setattr(cat, "MAX_ROW", 4 << 20)
    b = CatalogBuilder()
    b.feed_safely(b'COPY public.asset_exif ("assetId", "dateTimeOriginal", description) FROM stdin;\na\t\\N\t')
    for _ in range(8):
        b.feed_safely(b"d" * (1 << 20))
    assert b.error is not None and "longer than" in str(b.error)
    assert len(b._carry) == 0 and not b.rows
    with pytest.raises(CatalogError, match="longer than"):
        next(iter(b.lines()))


def test_a_catalog_that_cannot_be_made_never_fails_the_backup(caplog: pytest.LogCaptureFixture) -> None:
    """Rows the dump's reader took but the catalog cannot make sense of (here an external
    library's import paths as a malformed array literal): no catalog, one warning, and the
    backup's store_catalog goes on (it let all but CatalogError through, after the upload)."""
    from immich_stream.browse.catalog_store import made

    b = CatalogBuilder()
    b.feed_safely(dump("new") + b'COPY public.library ("importPaths", id) FROM stdin;\n{"/mnt/a\tl9\n\\.\n')
    assert b.error is None
    with caplog.at_level("WARNING"):
        assert made(b, "s1") is None
    assert "no Immich catalog stored with snapshot s1" in caplog.text and not b.rows
    good = CatalogBuilder()
    good.feed_safely(dump("new"))
    data = made(good, "s2")
    assert data is not None and json.loads(gzip.decompress(data).split(b"\n")[0])["assets"] == 120


@pytest.mark.timeout(10)
def test_names_layout_of_an_asset_with_two_files_of_one_kind_ends() -> None:
    """Two sidecars of one asset (its sidecarPath and an asset_file row of type sidecar), or
    a live video of the photo's own extension: each file its own name (the search for a
    free " (n)" looped forever, as the asset's names clashed with each other at every n)."""
    from immich_stream.browse.catalog_restore import names_layout

    files = [
        ["library", "library/u/IMG_1", "original"],
        ["library", "library/u/IMG_1.xmp", "sidecar"],
        ["library", "library/u/IMG_1.jpg.xmp", "sidecar"],
        ["library", "library/u/IMG_1.xmp", "sidecar"],  # the same file twice: one name
        ["library", "encoded-video/u/IMG_1", "live-video"],
    ]
    got = names_layout([{"id": "1", "name": "IMG_1", "taken": None, "albums": ["A"], "files": files}], ["A"])
    assert len(got) == 4 and len(set(got.values())) == 4
    assert got[("library", b"library/u/IMG_1")] == b"A/IMG_1"
    assert got[("library", b"library/u/IMG_1.xmp")] == b"A/IMG_1.xmp"


def test_names_layout_cuts_names_too_long_for_a_filesystem(tmp_path: Path) -> None:
    """An album of 200 "ä" (400 bytes) and a file name of 300 bytes: each part at most 255
    bytes, so the files can be written (every one failed with ENAMETOOLONG)."""
    from immich_stream.browse.catalog_restore import names_layout

    name = "x" * 300 + ".jpg"
    files = [["library", "library/u/a.jpg", "original"], ["library", "library/u/a.jpg.xmp", "sidecar"]]
    got = names_layout([{"id": "1", "name": name, "taken": None, "albums": ["ä" * 200], "files": files}], [])
    for path in got.values():
        assert all(len(part) <= 255 for part in path.split(b"/"))
        (tmp_path / path.decode()).parent.mkdir(exist_ok=True)
        (tmp_path / path.decode()).write_bytes(b"1")
    assert got[("library", b"library/u/a.jpg")].endswith(b"x.jpg")
    assert got[("library", b"library/u/a.jpg.xmp")].endswith(b"x.jpg.xmp")


def test_find_shows_names_from_the_database_without_control_characters() -> None:
    """An uploader's file name with a newline (a forged line of find's output), an escape
    sequence, or bytes not UTF-8 (surrogates: print failed on them) shows as \\xNN."""
    from immich_stream.commands.catalog import _files, _line

    asset = {
        "taken": "2023-01-01T10:00:00+00:00",
        "name": "a\n2020-01-01 00:00  b.jpg\x1b[2J\udce9",
        "user": "u@x",
        "albums": ["Trip\r"],
        "files": [["library", "library/u/a\nb\udce9.jpg", "original"]],
    }
    shown = [_line(asset), *_files(asset)]
    assert all("\n" not in s and "\x1b" not in s and "\r" not in s for s in shown)
    assert "a\\x0a2020" in shown[0] and "\\x1b[2J\\xe9" in shown[0] and "Trip\\x0d" in shown[0]
    for s in shown:
        s.encode("utf-8")  # printable on a UTF-8 terminal


def test_a_backups_catalog_reader_keeps_at_most_its_limit() -> None:
    """Past max_kept bytes of rows the reader lets them all go and says why (the backup's
    memory does not grow with the library); without a limit (find) the same dump reads."""
    import tracemalloc

    sql = dump("new")
    whole = CatalogBuilder()
    whole.feed(sql)
    assert 0 < whole.kept < 200_000  # 120 assets and their files
    capped = CatalogBuilder(max_kept=whole.kept // 2)
    tracemalloc.start()
    try:
        for i in range(0, len(sql), 65536):
            capped.feed_safely(sql[i : i + 65536])
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert capped.error is not None and "none is stored with this snapshot" in str(capped.error)
    assert not capped.rows and held < whole.kept // 2
    with pytest.raises(CatalogError, match="reads its dump instead"):
        next(iter(capped.lines()))


def test_a_backups_catalog_places_paths_by_the_compose_files_mount() -> None:
    """UPLOAD_LOCATION mounted at /photos in immich_server (a compose file of one's own): the
    catalog a backup stores places its paths in the library root, as `find` does when it
    builds one from the dump (the stored one had every file under no root, so restore
    --album found nothing in the snapshots that have one)."""
    from immich_stream.browse.catalog_find import mounts_in
    from immich_stream.browse.catalog_store import made

    compose = {"docker-compose.yml": "services:\n  immich-server:\n    volumes:\n      - ${UPLOAD_LOCATION}:/photos\n"}
    sql = dump("new").replace(b"/data/", b"/photos/")
    b = CatalogBuilder()
    b.feed_safely(sql)
    b.library_mounts = mounts_in(compose)  # what store_catalog does with the backup's compose files
    data = made(b, "s1")
    assert data is not None
    assets = [json.loads(line) for line in gzip.decompress(data).splitlines()[1:]]
    roots = {root for a in assets for root, _, _ in a["files"]}
    assert "library" in roots and "" not in roots and mounts_in(compose) == ("/photos",)


def test_name_glob_compares_without_regard_to_case() -> None:
    """docs/commands/find.md: names compare without regard to case; --name's glob did not
    (fnmatch on Linux): 'img_44*.heic' missed IMG_4411.HEIC."""
    asset = {"name": "IMG_4411.HEIC", "albums": [], "people": []}
    assert Selectors(names=["img_44*.heic"]).matches(asset)
    assert Selectors(names=["IMG_44*.HEIC"]).matches(asset)
    assert not Selectors(names=["img_45*"]).matches(asset)


def test_names_layout_names_differing_only_in_case_are_told_apart() -> None:
    """IMG_1.JPG and img_1.jpg in one album (or albums Trip and trip): on a disk that ignores
    case (exFAT, macOS, Windows: where a names tree is copied) one would replace the other."""
    from immich_stream.browse.catalog_restore import names_layout

    def asset(i: int, name: str, album: str) -> dict:
        return {
            "id": str(i),
            "name": name,
            "taken": f"2023-01-0{i}",
            "albums": [album],
            "files": [["library", f"p{i}", "original"]],
        }

    got = names_layout(
        [asset(1, "IMG_1.JPG", "Trip"), asset(2, "img_1.jpg", "Trip"), asset(3, "IMG_1.jpg", "trip")], []
    )
    assert list(got.values()) == [b"Trip/IMG_1.JPG", b"Trip/img_1 (2).jpg", b"trip/IMG_1 (3).jpg"]
    assert len({v.lower() for v in got.values()}) == 3
