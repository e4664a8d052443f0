"""Unit tests of immich_stream/progress.py: the count ahead."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
from pathlib import Path

import pytest

from immich_stream.progress import Reporter
from tests.test_image import image  # noqa: F401 - the fixture that builds the project's image


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


class _Screen(io.StringIO):
    """A terminal as tqdm drives it: characters overwrite, \\r, \\n, ESC[nA moves up, ESC[K clears."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = [[]]
        self.row = self.col = 0

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        for m in re.finditer(r"\x1b\[(\d*)([A-Za-z])|(.)", text, re.S):
            while len(self.rows) <= self.row:
                self.rows.append([])
            line = self.rows[self.row]
            if m.group(2) == "A":
                self.row = max(0, self.row - int(m.group(1) or 1))
            elif m.group(2) == "K":
                del line[self.col :]
            elif m.group(3) == "\r":
                self.col = 0
            elif m.group(3) == "\n":
                self.row, self.col = self.row + 1, 0
            elif m.group(3) is not None:
                line.extend(" " * (self.col - len(line) + 1))
                line[self.col] = m.group(3)
                self.col += 1
        return len(text)

    def lines(self) -> list[str]:
        return ["".join(r).rstrip() for r in self.rows if "".join(r).strip()]


def test_a_finished_bar_leaves_no_stale_copy_of_the_live_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from immich_stream.progress import Reporter

    screen = _Screen()
    monkeypatch.setattr(sys, "stderr", screen)
    reporter = Reporter("bar")
    dump = reporter.phase("database dump", 1000)
    lib = reporter.phase("library files", 5000, 10)
    for _ in range(3):
        time.sleep(0.12)  # past tqdm's mininterval: each update is drawn
        dump.update(300)
        lib.update(300, files=1)
    dump.update(100)
    dump.close()
    for _ in range(3):
        time.sleep(0.12)
        lib.update(1000, files=2)
    lib.close()
    lines = screen.lines()
    assert [ln.split(":")[0] for ln in lines] == ["database dump", "library files"], lines
    assert "100%" in lines[0]


def test_progress_lines_have_totals_percent_and_eta(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(20):
        (tmp_path / f"f{i}").write_bytes(b"x" * 1000)
    reporter = Reporter("log", interval=0)
    reporter.downtime = lambda: 65.0
    with caplog.at_level(logging.INFO, logger="immich_stream"):
        phase = reporter.phase("library files", count=tmp_path)  # no parent: counted ahead
        time.sleep(0.3)  # the counting thread is done in milliseconds
        time.sleep(0.01)
        phase.update(5000, files=5)
        phase.close()
    first, done = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(
        r"library files: 5 files of 20, 4\.9 KiB of 19\.5 KiB \(25%\), .*/s, ETA \d+s, Immich down for 1m05s", first
    ), first
    assert done.startswith("library files: done, 5 files of 20")

    json_reporter = Reporter("json")
    phase = json_reporter.phase("database dump", total_bytes=4000)  # the last dump's size: an estimate
    phase.update(1000)
    time.sleep(1.05)
    phase.update(1000)
    phase.close()
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert events[0]["percent_done"] == 0.5 and events[0]["totals"] == "estimate"
    assert events[0]["seconds_remaining"] is not None and events[0]["total_bytes"] == 4000
    assert events[-1]["done"] is True and events[-1]["bytes_done"] == 2000
