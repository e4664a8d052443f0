"""Unit tests of immich_stream/problems.py: problems counted and kept to a limit."""

from __future__ import annotations

import logging

import pytest

from immich_stream.problems import Problems


def test_problems_are_counted_all_and_kept_to_a_limit(caplog: pytest.LogCaptureFixture) -> None:
    p = Problems(limit=2)
    for i in range(5):
        p.add(f"p{i}")
    assert len(p) == 5 and list(p) == ["p0", "p1"] and bool(p)
    assert [r.message for r in caplog.records] == [f"p{i}" for i in range(5)]
    everything = Problems(logging.ERROR, limit=None)
    for i in range(300):
        everything.add(str(i))
    assert len(everything.kept) == 300 and not Problems()
