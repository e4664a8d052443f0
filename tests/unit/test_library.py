"""Unit tests of immich_stream/backup/library.py: the database shrink rule."""

from __future__ import annotations

from tests.test_image import image  # noqa: F401 - the fixture that builds the project's image


def test_database_shrink_rule_tells_a_rename_from_an_emptied_table() -> None:
    from immich_stream.backup.library import shrunk_tables

    before = {"public.assets": 90000, "public.exif": 90000, "public.users": 5, "public.albums": 100}
    # Immich renaming its tables in an upgrade: the rows are there under new names
    assert shrunk_tables({"public.asset": 90010, "public.asset_exif": 90000, "public.users": 5}, before, 0.5) == []
    # a fresh schema of a newer Immich: new names, empty; small tables never count
    assert shrunk_tables({"public.asset": 0, "public.users": 0}, before, 0.5) == [
        "public.albums 100 -> gone",
        "public.assets 90000 -> gone",
        "public.exif 90000 -> gone",
    ]
    assert shrunk_tables({**before, "public.exif": 44999}, before, 0.5) == ["public.exif 90000 -> 44999"]
    assert shrunk_tables({**before, "public.exif": 45000}, before, 0.5) == []
