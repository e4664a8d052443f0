"""Unit tests of immich_stream/backup/walk.py: the directory walk."""

from __future__ import annotations

import os
from pathlib import Path

from immich_stream.backup.walk import walk


async def test_walk_marks_special_files_as_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo")
    problems = []
    entries = [e.relpath async for e in walk(os.fsencode(tmp_path), problems.append)]
    assert entries == [b"a.jpg"]
    assert [(p.relpath, p.skipped) for p in problems] == [(b"fifo", True)]
