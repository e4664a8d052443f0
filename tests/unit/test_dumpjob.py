"""Immich's own dump job as doctor and snapshots report it (host/dumpjob.py)."""

from __future__ import annotations

from pathlib import Path

from immich_stream.host.dumpjob import describe, dump_files


def test_dump_files_counts_only_immich_dumps(tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / ".immich").write_bytes(b"")
    (backups / "immich-db-backup-20251119T020000-v2.3.1-pg17.6.sql.gz").write_bytes(b"x" * 100)
    (backups / "immich-db-backup-20251120T020000-v2.3.1-pg17.6.sql.gz").write_bytes(b"x" * 200)
    (backups / "immich-db-backup-20251121T020000-v2.3.1-pg17.6.sql.gz.tmp").write_bytes(b"x" * 999)  # being written
    (backups / "notes.txt").write_bytes(b"x")
    assert dump_files(tmp_path) == (2, 300, "immich-db-backup-20251120T020000-v2.3.1-pg17.6.sql.gz")
    assert dump_files(tmp_path / "absent") == (0, 0, None)
    assert dump_files(None) == (0, 0, None)


def test_describe_says_whether_it_is_on_and_what_to_do() -> None:
    on = {"enabled": True, "cron": "0 02 * * *", "keep": 14, "files": 14, "bytes": 14 << 20}
    assert describe(on).startswith("on (0 02 * * *, keeps 14); 14 files in backups/ (14.0 MiB); uploaded with")
    assert "`--exclude backups` leaves them out" in describe(on)
    assert "left out of the snapshots (--exclude backups)" in describe(on, excluded=True)
    assert describe(dict(on, enabled=False, files=0)).startswith("off; no dumps in backups/")
    assert describe({"enabled": None, "files": 0}).startswith("setting not known; ")  # not an Immich schema
    assert describe(None) == "not recorded"  # a snapshot from before 0.4


def test_describe_takes_a_recorded_dump_job_of_any_shape() -> None:
    """snapshots reads it back from snapshot.json (another version's, or a hand-edited one):
    a value of the wrong type is "not known", never an internal error that hides every snapshot."""
    assert describe({"enabled": "yes", "files": "3", "bytes": None}).startswith("setting not known; no dumps")
    assert describe(["on"]) == "not recorded"  # type: ignore[arg-type]
    assert describe({"enabled": True, "files": 2.5, "bytes": "x"}).startswith("on (None, keeps None); no dumps")
