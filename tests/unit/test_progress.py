"""Unit tests of immich_stream/progress.py: the count ahead."""

from __future__ import annotations

from pathlib import Path


def test_the_count_ahead_leaves_out_excluded_folders_but_their_markers(tmp_path: Path) -> None:
    """A first backup with --exclude thumbs reaches 100%: the stat-only count counts what
    the backup reads, the excluded folder's .immich marker and nothing else of it."""
    from immich_stream.progress import _Counter

    (tmp_path / "thumbs" / "u").mkdir(parents=True)
    (tmp_path / "thumbs" / ".immich").write_bytes(b"")
    (tmp_path / "thumbs" / "u" / "a.webp").write_bytes(b"x" * 100)
    (tmp_path / "upload").mkdir()
    (tmp_path / "upload" / "p.jpg").write_bytes(b"y" * 10)
    counts = {}
    for skip in ((), ("thumbs",)):
        c = _Counter(tmp_path, skip)
        c._thread.join(10)
        counts[skip] = (c.files, c.bytes, c.done)
    assert counts[()] == (3, 110, True)
    assert counts[("thumbs",)] == (2, 10, True)
