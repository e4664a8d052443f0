"""Unit tests of immich_stream/repository/summary.py: snapshot.json and the run's file counts."""

from __future__ import annotations

import json

import pytest

from immich_stream.repository.summary import DatabaseInfo, FileCounts, RunStats, SnapshotSummary

# -- snapshot.json -----------------------------------------------------------------------------


def test_summary_round_trips() -> None:
    s = SnapshotSummary(
        id="2024-01-31T020000Z-1a2b",
        mode="all",
        roots={"library": "/lib"},
        files=FileCounts(new=3, bytes_total=99),
        database=DatabaseInfo(key="snapshots/x/database.sql.gz", size=5, sha256="b" * 64),
        phase_seconds={"library files": 1.5},
    )
    back = SnapshotSummary.from_json(s.to_json())
    assert back == s
    d = json.loads(s.to_json())
    assert d["files"]["new"] == 3 and d["database"]["size"] == 5 and "extra" not in d and "extra" not in d["files"]


def test_summary_of_an_older_version_gets_defaults() -> None:
    old = SnapshotSummary.from_json(b'{"id": "2024-01-31T020000Z-1a2b", "database": {"sha256": "abc"}}')
    assert old.complete is True and old.files.files == 0 and old.root_meta == {} and old.database.size is None
    assert old.database.sha256 == "abc" and old.problems == [] and old.mode is None


def test_summary_keeps_fields_of_a_newer_version() -> None:
    newer = {"id": "2024-01-31T020000Z-1a2b", "encryption": {"kind": "age"}, "files": {"new": 1, "sparse": 2}}
    s = SnapshotSummary.from_json(json.dumps(newer))
    assert s.extra == {"encryption": {"kind": "age"}} and s.files.new == 1
    again = json.loads(s.to_json())
    assert again["encryption"] == {"kind": "age"} and again["files"]["sparse"] == 2


@pytest.mark.parametrize("text", [b"[]", b"{}", b'{"id": "x", "files": 3}', b"not json"])
def test_summary_refuses_what_is_not_one(text: bytes) -> None:
    with pytest.raises(ValueError):
        SnapshotSummary.from_json(text)


def test_run_stats_become_the_file_counts() -> None:
    stats = RunStats()
    stats.count_file("library", 10)
    stats.count_file("library", 5)
    stats.new += 2
    assert stats.counts() == FileCounts(new=2, files=2, bytes_total=15)
    assert stats.roots == {"library": {"files": 2, "bytes": 15}}
