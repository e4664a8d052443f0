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


def test_dump_scanner_counts_rows_across_every_chunk_boundary() -> None:
    from immich_stream.host.postgres import DumpScanner

    sql = (
        b"-- Dumped from database version 14.10 (Debian)\n"
        b'CREATE EXTENSION IF NOT EXISTS "uuid-ossp" WITH SCHEMA public;\n'
        b"CREATE EXTENSION IF NOT EXISTS vchord CASCADE;\n"
        b"COPY public.a (x, y) FROM stdin;\n1\t2\n3\t\\\\.\n\\.\n\n"
        b'COPY public."B" (x) FROM stdin;\n\\.\nCOPY public.c (x) FROM stdin;\nz\n\\.\n'
    )
    for cut in range(len(sql) + 1):
        for cut2 in range(cut, len(sql) + 1, 7):
            d = DumpScanner()
            for part in (sql[:cut], sql[cut:cut2], sql[cut2:]):
                d.feed(part)
            assert d.tables == {"public.a": 2, 'public."B"': 0, "public.c": 1}, (cut, cut2)
            assert d.needed_extensions == ["uuid-ossp", "vchord"] and d.source_major == 14
