"""Unit tests of immich_stream/host/postgres.py: the search_path fix of a pg_dump stream."""

from __future__ import annotations

from immich_stream.host.postgres import SEARCH_PATH_DUMP, SEARCH_PATH_FIXED, SearchPathFix


def test_search_path_fix_across_every_chunk_boundary() -> None:
    sql = b"SET x = 1;\n" + SEARCH_PATH_DUMP + b"\nCREATE TABLE t ();\n"
    for cut in range(len(sql) + 1):
        fix = SearchPathFix()
        out = fix.feed(sql[:cut]) + fix.feed(sql[cut:]) + fix.flush()
        assert out == sql.replace(SEARCH_PATH_DUMP, SEARCH_PATH_FIXED), cut
        assert fix.replaced == 1
