"""Progress: tqdm bars on a terminal, periodic timestamped log lines otherwise (cron), JSON
lines on stderr with --json.

Library code only calls `Reporter.phase(...)` and `Phase.update(...)`; what the user sees
is decided here, once. Every form carries the same figures: done and total (files and
bytes), percentage, rate, ETA, and how long Immich has been down while it is stopped.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from immich_stream.config import format_size

log = logging.getLogger("immich_stream")

LOG_FORMAT = "[%(asctime)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
JSON_INTERVAL = 1.0  # seconds between --json status lines of one phase


class _TqdmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines that do not tear the progress bars apart."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _JsonFormatter(logging.Formatter):
    """--json: every log line is a JSON object too, so stderr stays one JSON value a line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "message_type": "log",
                "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
                "level": record.levelname.lower(),
                "message": record.getMessage(),
            }
        )


def setup_logging(verbosity: int, interactive: bool, json_lines: bool = False) -> None:
    """verbosity: -1 quiet (warnings only), 0 normal, 1 debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler: logging.Handler = _TqdmHandler() if interactive and not json_lines else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_lines else logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("immich_stream").setLevel(level)


def format_eta(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class _Counter:
    """A stat-only walk of a root in a thread, ahead of the backup's own (which waits for
    uploads): the first backup of a library gets a total within seconds or minutes, not at
    its end. Regular files only, symlinks not followed: what the backup reads."""

    def __init__(self, root: Path, skip: tuple[str, ...] = ()) -> None:
        self._skip = {os.fsencode(os.path.join(root, name)) for name in skip}  # --exclude: markers only
        self.files = 0
        self.bytes = 0
        self.done = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(os.fsencode(root),), daemon=True, name="count")
        self._thread.start()

    def _run(self, root: bytes) -> None:
        stack = [root]
        try:
            while stack and not self._stop.is_set():
                try:
                    it = os.scandir(stack.pop())
                except OSError:
                    continue  # the backup's walk reports what it cannot read
                with it:
                    for e in it:
                        try:
                            st = e.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if stat.S_ISDIR(st.st_mode) and e.path in self._skip:
                            if os.path.isfile(os.path.join(e.path, b".immich")):
                                self.files += 1  # the one file of it a backup reads
                        elif stat.S_ISDIR(st.st_mode):
                            stack.append(e.path)
                        elif stat.S_ISREG(st.st_mode):
                            self.files += 1
                            self.bytes += st.st_size
        finally:
            self.done = not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)  # a hung file system must not hold the run: the thread is a daemon


class Phase:
    """One phase's counters; shows itself as a bar, as periodic log lines or as JSON lines.

    Totals: given (the parent snapshot's figures, an estimate), counted by a stat-only walk
    (growing until it ends), or unknown. They never fall below what is already done."""

    def __init__(
        self,
        name: str,
        total_bytes: int | None,
        mode: str,
        interval: float,
        total_files: int | None = None,
        count: Path | None = None,
        downtime: Callable[[], float | None] | None = None,
        count_skip: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.total = total_bytes
        self.total_files = total_files
        self.files = 0
        self.bytes = 0
        self._mode = mode
        self._interval = interval
        self._downtime = downtime
        self._start = time.monotonic()
        self._last_log = self._start
        self._last_tenth = 0
        self._bar: Any = None
        self._counter = _Counter(count, count_skip) if count is not None and mode != "quiet" else None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes,
                desc=name,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                leave=True,
                dynamic_ncols=True,
            )

    def _totals(self) -> tuple[int | None, int | None, str]:
        """(bytes, files, how they are known: final, counting, estimate or unknown)."""
        tb, tf, how = self.total, self.total_files, "estimate" if self.total is not None else "unknown"
        if self._counter is not None:
            tb, tf = self._counter.bytes, self._counter.files
            how = "final" if self._counter.done else "counting"
        if tb is not None:
            tb = max(tb, self.bytes)
        if tf is not None:
            tf = max(tf, self.files)
        return tb, tf, how

    def update(self, nbytes: int = 0, files: int = 0) -> None:
        self.files += files
        self.bytes += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            now = time.monotonic()
            if files or now - self._last_log >= 0.5:
                self._last_log = now
                tb, tf, _ = self._totals()
                if tb != self._bar.total and tb:
                    self._bar.total = tb
                self._bar.set_postfix_str(self._postfix(tf), refresh=False)
        elif self._mode in ("log", "json"):
            now = time.monotonic()
            tb, _, _ = self._totals()
            tenth = int(10 * self.bytes / tb) if tb else 0
            interval = JSON_INTERVAL if self._mode == "json" else self._interval
            if now - self._last_log >= interval or (self._mode == "log" and tenth > self._last_tenth):
                self._last_log, self._last_tenth = now, tenth
                self._emit()

    def _postfix(self, total_files: int | None) -> str:
        text = f"{self.files}/{total_files} files" if total_files else f"{self.files} files"
        down = self._down()
        return text + (f", Immich down {format_eta(down)}" if down is not None else "")

    def _down(self) -> float | None:
        return self._downtime() if self._downtime is not None else None

    def status(self, done: bool = False) -> dict[str, Any]:
        """The figures every form shows (restic's --json status message, plus ours)."""
        elapsed = max(time.monotonic() - self._start, 1e-6)
        tb, tf, how = self._totals()
        fraction: float | None = None
        if tb:
            fraction = min(self.bytes / tb, 1.0)
        elif tf:
            fraction = min(self.files / tf, 1.0)
        remaining: float | None = None
        if fraction is not None and 0 < fraction < 1 and not done:
            remaining = elapsed * (1 - fraction) / fraction
        return {
            "message_type": "status",
            "phase": self.name,
            "done": done,
            "seconds_elapsed": round(elapsed, 1),
            "seconds_remaining": None if remaining is None else round(remaining),
            "percent_done": None if fraction is None else round(fraction, 4),
            "files_done": self.files,
            "total_files": tf,
            "bytes_done": self.bytes,
            "total_bytes": tb,
            "totals": how,
            "bytes_per_second": round(self.bytes / elapsed),
            "downtime_seconds": None if (d := self._down()) is None else round(d, 1),
        }

    def _status(self) -> str:
        s = self.status()
        files = f"{s['files_done']} files" + (f" of {s['total_files']}" if s["total_files"] else "")
        done = format_size(self.bytes)
        if s["total_bytes"]:
            counting = " so far, still counting" if s["totals"] == "counting" else ""
            done += f" of {format_size(s['total_bytes'])}{counting} ({100 * (s['percent_done'] or 0):.0f}%)"
        text = f"{files}, {done}, {format_size(s['bytes_per_second'])}/s"
        if s["seconds_remaining"] is not None:
            text += f", ETA {format_eta(s['seconds_remaining'])}"
        if s["downtime_seconds"] is not None:
            text += f", Immich down for {format_eta(s['downtime_seconds'])}"
        return text

    def _emit(self, done: bool = False) -> None:
        if self._mode == "json":
            print(json.dumps(self.status(done)), file=sys.stderr, flush=True)
        else:
            log.info("%s: %s%s", self.name, "done, " if done else "", self._status())

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._start

    def close(self) -> None:
        if self._counter is not None:
            self._counter.stop()
        if self._bar is not None:
            tb, tf, _ = self._totals()
            if tb and tb != self._bar.total:
                self._bar.total = tb
            self._bar.set_postfix_str(self._postfix(tf), refresh=False)
            self._close_bar()
        elif self._mode in ("log", "json"):
            self._emit(done=True)

    def _close_bar(self) -> None:
        """Close the bar and move the live bars below it up by one line. tqdm prints a
        closed bar's last line where the cursor is and moves the cursor down, but goes on
        drawing the others at their old offsets (it repositions only overflowing bars): a
        library bar beside a finished dump bar would be drawn a line too low, under a
        stale copy of itself."""
        from tqdm import tqdm

        bar = self._bar
        pos = abs(bar.pos)
        bar.close()
        with tqdm.get_lock():
            for other in list(getattr(tqdm, "_instances", ())):
                if other.pos > pos:  # unfixed bars (no position= given) have pos >= 0
                    other.pos -= 1


class Reporter:
    """mode: 'bar' (terminal), 'log' (cron: a line every `interval` s or 10%), 'json'
    (--json: a status line a second on stderr), 'quiet'."""

    def __init__(self, mode: str = "quiet", interval: float = 30.0) -> None:
        self.mode = mode
        self.interval = interval
        # How long Immich has been down, None while it is up (set by backup and restore).
        self.downtime: Callable[[], float | None] | None = None

    @classmethod
    def for_terminal(cls, quiet: bool, json_lines: bool = False) -> Reporter:
        if quiet:
            return cls("quiet")
        if json_lines:
            return cls("json")
        return cls("bar" if sys.stderr.isatty() else "log")

    def phase(
        self,
        name: str,
        total_bytes: int | None = None,
        total_files: int | None = None,
        count: Path | None = None,
        count_skip: tuple[str, ...] = (),
    ) -> Phase:
        """count: a directory to count (stat only, in a thread) for the totals, when no
        earlier snapshot gives them; count_skip: its folders the backup leaves out."""
        return Phase(name, total_bytes, self.mode, self.interval, total_files, count, self.downtime, count_skip)
