"""restore must never leave half a database, nor write outside its target."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import stat
from pathlib import Path

from tests.conftest import CONTAINERS, ImmichStack, running_containers
from tests.faultproxy import get_of
from tests.helpers import Bucket, make_library, run_cli, start_cli, tree, wait_for


def fingerprint(stack: ImmichStack, oids: bool = True) -> str:
    """Every table of the public schema with its row count and (oids) its oid: a table
    dropped and created again, even with the same rows, has a new oid."""
    oid = "'=' || c.oid" if oids else "''"
    return stack.psql(f"""
        SELECT string_agg(c.relname || {oid} || ':' || (xpath('/row/n/text()', query_to_xml(
            format('SELECT count(*) AS n FROM public.%I', c.relname), false, true, '')))[1]::text, ' '
            ORDER BY c.relname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind = 'r'""")


MARKERS = "SELECT string_agg(note, ',' ORDER BY note) FROM restore_marker"
NEAR_ZERO = 'SELECT count(*) FROM geodata_places WHERE earth_box(ll_to_earth(0, 0), 2000000) @> "earthCoord"'


def test_failed_database_restore_changes_nothing(env: dict, stack: ImmichStack, bucket: Bucket, proxy_factory) -> None:
    stack.psql(
        "DROP TABLE IF EXISTS restore_marker; CREATE TABLE restore_marker (note text); "
        "INSERT INTO restore_marker VALUES ('in the snapshot')"
    )
    try:
        near = stack.psql(NEAR_ZERO)
        make_library(stack.library, photos=1)
        assert run_cli("backup", "--stop", "none", env=env).code == 0
        [sid] = bucket.snapshots()
        key, meta_key = f"snapshots/{sid}/database.sql.gz", f"snapshots/{sid}/snapshot.json"
        dump, meta = bucket.get(key), bucket.get(meta_key)
        sql = gzip.decompress(dump)
        in_snapshot = fingerprint(stack, oids=False)
        stack.psql("INSERT INTO restore_marker VALUES ('after the snapshot')")  # a restore must remove it, or keep it
        before = fingerprint(stack)

        def unchanged() -> None:
            assert running_containers() == set(CONTAINERS)  # the apps run again
            assert stack.psql(MARKERS) == "after the snapshot,in the snapshot"
            assert fingerprint(stack) == before  # no table dropped or re-created, no row lost or added

        # S3 dies a third into the stream: the connection breaks, every later GET answers 500
        proxy = proxy_factory(env["S3_ENDPOINT_URL"])
        proxy.add(get_of("database.sql.gz"), times=1, cut_after=len(dump) // 3)
        proxy.add(get_of("database.sql.gz"), status=500)
        via_proxy = dict(env, S3_ENDPOINT_URL=proxy.endpoint)
        r = run_cli("restore", "latest", "--database", env=via_proxy)
        assert r.code == 1 and "download" in r.last_error and "database.sql.gz" in r.last_error, r.err
        unchanged()

        # a truncated object: the gzip ends early
        bucket.put(key, dump[: len(dump) // 2])
        r = run_cli("restore", "--database", env=env)
        assert r.code == 1 and "truncated" in r.last_error, r.err
        unchanged()

        # a different but valid gzip, applied to the end by psql: its sha256 is not the snapshot's
        bucket.put(
            key,
            gzip.compress(
                sql.replace(b"-- PostgreSQL database dump", b"-- PostgreSQL database dumq", 1), compresslevel=1
            ),
        )
        r = run_cli("restore", "--database", env=env)
        assert r.code == 1 and "does not match snapshot.json" in r.last_error, r.err
        unchanged()

        # psql fails half-way through a dump that matches its snapshot.json
        cut = sql.index(b"\nALTER TABLE ", len(sql) // 2) + 1  # a statement boundary, outside any COPY data
        broken = sql[:cut] + b"SELECT immich_stream_no_such_function();\n" + sql[cut:]
        bucket.put(key, gzip.compress(broken, compresslevel=1))
        forged = json.loads(meta)
        forged["database"].update(sha256=hashlib.sha256(broken).hexdigest(), size=len(broken))
        bucket.put(meta_key, json.dumps(forged).encode())
        r = run_cli("restore", "--database", env=env)
        assert r.code == 1 and "psql failed" in r.last_error and "immich_stream_no_such_function" in r.last_error, r.err
        unchanged()
        bucket.put(meta_key, meta)

        # SIGTERM while the dump streams in slowly
        bucket.put(key, dump)
        proxy.rules.clear()
        slow = proxy.add(get_of("database.sql.gz"), rate=len(dump) / 6)
        proc = start_cli("restore", "--database", env=via_proxy)
        wait_for(lambda: slow.sent >= len(dump) // 3, 60, 0.05, "a third of the dump sent")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143 and "immich-stream: error: interrupted by SIGTERM" in err, err
        unchanged()

        # and the whole dump, untouched, is restored: rows as in the snapshot
        r = run_cli("restore", "--database", env=env)
        assert r.code == 0, r.err
        assert stack.psql(MARKERS) == "in the snapshot"
        assert fingerprint(stack, oids=False) == in_snapshot  # the snapshot's tables and rows
        assert stack.psql(NEAR_ZERO) == near  # the search_path correction still applies
        assert running_containers() == set(CONTAINERS)
    finally:
        stack.ensure_running()
        stack.psql("DROP TABLE IF EXISTS restore_marker")


def test_restore_writes_only_inside_the_target(
    env: dict, stack: ImmichStack, bucket: Bucket, proxy_factory, tmp_path: Path
) -> None:
    make_library(stack.library, photos=6, odd_names=False)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    [sid] = bucket.snapshots()
    files = sorted(
        (m for m in bucket.manifest(sid) if m["type"] == "file" and m["root"] == "library"), key=lambda m: -m["size"]
    )
    big, other, third, fourth = files[:4]
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.jpg"
    victim.write_bytes(b"not the restore's to touch")
    victim.chmod(0o600)
    os.utime(victim, ns=(1_000_000_000, 1_000_000_000))

    def state() -> dict:
        return {
            p.name: (p.read_bytes(), stat.S_IMODE(p.lstat().st_mode), p.lstat().st_mtime_ns) for p in outside.iterdir()
        }

    before = state()
    long_a, long_b = "x" * 200 + "-a.jpg", "x" * 200 + "-b.jpg"  # the same first 200 bytes
    # symlinks out of the target named like the next file's temporary file: as earlier
    # versions named it, and as this one does (the name is predictable: a resume reuses it)
    tag = hashlib.sha256(b"photo2.jpg").hexdigest()[:16]
    link = dict(big, type="symlink", target=str(victim), key=None, sha256=None, size=0)
    link.pop("offset", None)  # a symlink names no blob
    forged = [
        dict(link, path="forged/.photo.jpg.immich-stream-partial"),
        dict(big, path="forged/photo.jpg", mode=0o777),
        dict(link, path=f"forged/.photo2.jpg.{tag}.immich-stream-partial"),
        dict(fourth, path="forged/photo2.jpg", mode=0o777),
        dict(other, path=f"forged/{long_a}"),
        dict(third, path=f"forged/{long_b}"),
    ]
    bucket.put(
        f"snapshots/{sid}/manifest.jsonl.gz", gzip.compress(b"".join(json.dumps(m).encode() + b"\n" for m in forged))
    )
    proxy = proxy_factory(env["S3_ENDPOINT_URL"])
    proxy.add(lambda method, path, query: method == "GET" and "/data/" in path, delay=0.5)  # downloads overlap
    target = tmp_path / "target"
    r = run_cli(
        "restore",
        "--root",
        "library",
        "--to",
        str(target),
        env=dict(env, S3_ENDPOINT_URL=proxy.endpoint, IMMICH_STREAM_JOBS="4"),
    )

    assert state() == before  # bytes, mode and mtime of everything outside
    assert r.code == 0, r.err
    restored = target / "forged"
    assert (restored / "photo.jpg").read_bytes() == bucket.read(big)
    assert stat.S_IMODE((restored / "photo.jpg").stat().st_mode) == 0o777
    assert (restored / long_a).read_bytes() == bucket.read(other)
    assert (restored / long_b).read_bytes() == bucket.read(third)
    assert (restored / "photo2.jpg").read_bytes() == bucket.read(fourth)
    assert os.readlink(restored / ".photo.jpg.immich-stream-partial") == str(victim)  # restored as a symlink
    assert sorted(tree(target)) == sorted(
        os.fsencode(f"forged/{n}") for n in ("photo.jpg", "photo2.jpg", long_a, long_b)
    )
