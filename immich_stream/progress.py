"""Progress: tqdm bars on a terminal, periodic timestamped log lines otherwise (cron).

Library code only calls `Reporter.phase(...)` and `Phase.update(...)`; what the user sees
is decided here, once.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from immich_stream.config import format_size

log = logging.getLogger("immich_stream")

LOG_FORMAT = "[%(asctime)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _TqdmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines that do not tear the progress bars apart."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(verbosity: int, interactive: bool) -> None:
    """verbosity: -1 quiet (warnings only), 0 normal, 1 debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler: logging.Handler = _TqdmHandler() if interactive else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("immich_stream").setLevel(level)


class Phase:
    """One phase's counters; shows itself as a bar or as periodic log lines."""

    def __init__(self, name: str, total_bytes: int | None, mode: str, interval: float) -> None:
        self.name = name
        self.total = total_bytes
        self.files = 0
        self.bytes = 0
        self._mode = mode
        self._interval = interval
        self._start = time.monotonic()
        self._last_log = self._start
        self._last_tenth = 0
        self._bar: Any = None
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

    def update(self, nbytes: int = 0, files: int = 0) -> None:
        self.files += files
        self.bytes += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            if files:
                self._bar.set_postfix_str(f"{self.files} files", refresh=False)
        elif self._mode == "log":
            now = time.monotonic()
            tenth = int(10 * self.bytes / self.total) if self.total else 0
            if now - self._last_log >= self._interval or tenth > self._last_tenth:
                self._last_log, self._last_tenth = now, tenth
                log.info("%s: %s", self.name, self._status())

    def _status(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        done = format_size(self.bytes)
        if self.total:
            done += f" of {format_size(self.total)} ({100 * self.bytes / self.total:.0f}%)"
        return f"{self.files} files, {done}, {format_size(self.bytes / elapsed)}/s"

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._start

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._mode == "log":
            log.info("%s: done, %s", self.name, self._status())


class Reporter:
    """mode: 'bar' (terminal), 'log' (cron: a line every `interval` s or 10%), 'quiet'."""

    def __init__(self, mode: str = "quiet", interval: float = 30.0) -> None:
        self.mode = mode
        self.interval = interval

    @classmethod
    def for_terminal(cls, quiet: bool) -> Reporter:
        if quiet:
            return cls("quiet")
        return cls("bar" if sys.stderr.isatty() else "log")

    def phase(self, name: str, total_bytes: int | None = None) -> Phase:
        return Phase(name, total_bytes, self.mode, self.interval)
