"""What went wrong without failing the run: files that could not be read or restored,
objects missing or corrupt. One collector for backup, restore and verify: each problem is
logged once, counted, and kept (up to a limit) for the summary and snapshot.json."""

from __future__ import annotations

import logging
from collections.abc import Iterator

log = logging.getLogger("immich_stream")

MAX_KEPT = 200  # problems kept for the summary; all of them are logged and counted


class Problems:
    def __init__(self, level: int = logging.WARNING, limit: int | None = MAX_KEPT) -> None:
        self.level = level
        self.limit = limit
        self.kept: list[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        log.log(self.level, "%s", text)
        self.count += 1
        if self.limit is None or len(self.kept) < self.limit:
            self.kept.append(text)

    def __bool__(self) -> bool:
        return self.count > 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        return iter(self.kept)
