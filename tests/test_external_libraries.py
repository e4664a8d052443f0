"""Immich's external libraries (folders outside UPLOAD_LOCATION, imported by path): found in
the live database and the immich_server container's mounts, backed up as roots of their
own (external:<name>), refused when their disk is not mounted, restored byte for byte.

The test stack mounts two folders into immich_server (docker-compose.test.yml): /mnt/family
and, read-only, /mnt/nas/photos. The database may lack Immich's library table (the seed is
Immich-shaped, not Immich's): it is created here with Immich's columns if missing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from immich_stream.config import format_size
from tests.conftest import CONTAINERS, ImmichStack, running_containers
from tests.helpers import Bucket, make_library, run_cli, tree

FAMILY, NAS = "external:mnt-family", "external:mnt-nas-photos"
# Immich's library table (server/src/schema/tables/library.table.ts), `libraries` before
# its StandardizeNames migration (mid-2025): the columns a backup reads, as Immich has them.
LIBRARY_TABLE = """
CREATE TABLE IF NOT EXISTS "{table}" (
  "id" uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
  "name" character varying NOT NULL,
  "ownerId" uuid NOT NULL,
  "importPaths" text[] NOT NULL,
  "exclusionPatterns" text[] NOT NULL,
  "createdAt" timestamp with time zone NOT NULL DEFAULT now(),
  "updatedAt" timestamp with time zone NOT NULL DEFAULT now(),
  "deletedAt" timestamp with time zone,
  "refreshedAt" timestamp with time zone,
  "updateId" uuid NOT NULL DEFAULT gen_random_uuid()
)"""
# replica: the owner's foreign key (to Immich's real user table, where there is one) not checked
ROWS = """
SET session_replication_role = replica;
INSERT INTO "{table}" ("name", "ownerId", "importPaths", "exclusionPatterns", "deletedAt") VALUES
  ('ext-test Family', gen_random_uuid(), ARRAY['/mnt/family'], ARRAY[]::text[], NULL),
  ('ext-test NAS', gen_random_uuid(), ARRAY['/mnt/nas/photos', '/srv/inside-only'], ARRAY['**/@eaDir/**'], NULL),
  ('ext-test deleted', gen_random_uuid(), ARRAY['/mnt/gone'], ARRAY[]::text[], now())"""


def external_dir(stack: ImmichStack, name: str) -> Path:
    return stack.dir / "external" / name


def empty(path: Path) -> None:
    for child in path.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def fill(root: Path, seed: str, count: int) -> dict[bytes, str]:
    """Photos under root (a few folders deep, odd names among them): {relpath: sha256}."""
    for i in range(count):
        sub = root / f"{2020 + i % 3}" / ("odd name ü" if i % 4 == 0 else "album")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"IMG_{i:04d}.jpg").write_bytes(hashlib.sha256(f"{seed}{i}".encode()).digest() * (50 + 40 * i))
    return digests(root)


def digests(root: Path) -> dict[bytes, str]:
    return {rel: hashlib.sha256(p.read_bytes()).hexdigest() for rel, p in tree(root).items()}


@pytest.fixture
def libraries(stack: ImmichStack) -> Iterator[str]:
    """Three external libraries in the live database (one deleted, one path not mounted
    from the host); their rows removed again, whatever the test did."""
    table = stack.psql("SELECT coalesce(to_regclass('public.libraries')::text, 'library')")
    stack.psql(LIBRARY_TABLE.format(table=table))
    stack.psql(ROWS.format(table=table))
    for name in ("family", "nas"):
        empty(external_dir(stack, name))
    try:
        yield table
    finally:
        for t in ("library", "libraries"):
            stack.psql(
                f"DO $$ BEGIN IF to_regclass('public.{t}') IS NOT NULL THEN "
                f"DELETE FROM \"{t}\" WHERE name LIKE 'ext-test%'; END IF; END $$"
            )
        for name in ("family", "nas"):
            empty(external_dir(stack, name))


def test_external_libraries_back_up_and_restore_byte_identical(
    env: dict, stack: ImmichStack, bucket: Bucket, libraries: str, tmp_path: Path
) -> None:
    make_library(stack.library, photos=2, odd_names=False)
    family = fill(external_dir(stack, "family"), "f", 12)
    nas = fill(external_dir(stack, "nas"), "n", 9)  # mounted read-only into immich_server
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    # the path that exists only inside the container is said, not silently left out
    assert "'ext-test NAS' (/srv/inside-only) is not mounted from the host" in r.err
    [snap] = bucket.snapshots()
    lines = bucket.manifest(snap)
    roots = {m["root"] for m in lines if m["type"] == "file"}
    assert roots == {"library", FAMILY, NAS}
    assert {m["root"] for m in lines}.isdisjoint({"external:mnt-gone", "external:srv-inside-only"})
    summary = bucket.snapshot(snap)
    assert summary["roots"][FAMILY] == str(external_dir(stack, "family"))
    assert summary["root_totals"][NAS]["files"] == len(nas)

    # nothing changed: the next backup uploads nothing of them again
    r = run_cli("backup", "--stop", "none", env=env)
    assert r.code == 0, r.err
    counts = bucket.snapshot(bucket.snapshots()[-1])["files"]
    assert counts["new"] == counts["changed"] == 0 and counts["bytes_uploaded"] == 0, counts

    # the disk is lost; the whole snapshot comes back under DIR/external/<name>
    for name in ("family", "nas"):
        empty(external_dir(stack, name))
    r = run_cli("restore", "latest", "--to", str(tmp_path / "all"), env=env)
    assert r.code == 0, r.err
    assert digests(tmp_path / "all" / "external" / "mnt-family") == family
    assert digests(tmp_path / "all" / "external" / "mnt-nas-photos") == nas
    # one root straight back into its place
    r = run_cli("restore", "latest", "--root", NAS, "--to", str(external_dir(stack, "nas")), "--overwrite", env=env)
    assert r.code == 0, r.err
    assert digests(external_dir(stack, "nas")) == nas

    r = run_cli("verify", "latest", "--read-data", env=env)
    assert r.code == 0, r.err + r.out
    r = run_cli("drill", "latest", "--files", "100", "--json", env=env)
    assert r.code == 0, r.err + r.out
    report = json.loads(r.out)["summary"]
    files = [m for m in lines if m["type"] == "file" and m["root"] != "postgres"]
    assert report["files_checked"] == len(files) < 100 and report["mismatches"] == []


def test_unmounted_external_library_is_refused_before_anything_stops(
    env: dict, stack: ImmichStack, bucket: Bucket, libraries: str
) -> None:
    make_library(stack.library, photos=1, odd_names=False)
    fill(external_dir(stack, "family"), "f", 3)  # the NAS's folder stays empty: it did not mount
    started = stack.started_at()
    r = run_cli("backup", env=env)  # --stop all: the refusal must come before the stop
    assert r.code == 4, r.err
    assert r.last_error.startswith(f"immich-stream: error: {NAS} ({external_dir(stack, 'nas')}) is empty: "), r.err
    assert "--external warn" in r.last_error
    assert running_containers() == set(CONTAINERS) and stack.started_at() == started
    assert bucket.snapshots() == []

    r = run_cli("backup", "--stop", "none", "--external", "warn", env=env)
    assert r.code == 0, r.err
    assert "'ext-test Family' (/mnt/family) at " in r.err and "is not backed up (--external warn)" in r.err
    r = run_cli("backup", "--stop", "none", "--external", "skip", env=env)
    assert r.code == 0, r.err
    assert "ext-test" not in r.err
    for snap in bucket.snapshots():
        assert not any(m["root"].startswith("external:") for m in bucket.manifest(snap))


def test_doctor_lists_external_libraries_with_their_sizes(env: dict, stack: ImmichStack, libraries: str) -> None:
    family = fill(external_dir(stack, "family"), "f", 5)
    size = format_size(sum(p.stat().st_size for p in tree(external_dir(stack, "family")).values()))
    if libraries == "library":  # Immich before StandardizeNames: the same rows in `libraries`
        stack.psql('ALTER TABLE "library" RENAME TO "libraries"')
    try:
        r = run_cli("doctor", env=env)
    finally:
        if libraries == "library":
            stack.psql('ALTER TABLE "libraries" RENAME TO "library"')
    rows = {ln.split()[1]: ln for ln in r.out.splitlines() if ln.split()[1:2]}
    family_row = rows[FAMILY]
    assert family_row.startswith("ok") and f"{len(family)} files" in family_row, r.out
    assert f"-> {external_dir(stack, 'family')}: {len(family)} files, {size}" in family_row, r.out
    assert rows[NAS].startswith("FAIL") and "is empty" in rows[NAS] and "read-only" not in rows[NAS]
    assert (
        rows["external:srv-inside-only"].startswith("WARN")
        and "not mounted from the host" in rows["external:srv-inside-only"]
    )
    assert "external:mnt-gone" not in rows
