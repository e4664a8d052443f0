"""Is this still Immich's library? Refuse one that looks unmounted, emptied or shrunk,
before anything is stopped and again before committing: retention would otherwise age the
good snapshots out."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection
from pathlib import Path

from immich_stream.changes import MARKER, MARKER_DIRS, ParentInfo, walk_filter
from immich_stream.config import format_size
from immich_stream.errors import SuspiciousLibrary
from immich_stream.walk import walk

log = logging.getLogger(__name__)


async def count_files(root: Path, exclude: Collection[str] = ()) -> tuple[int, int]:
    """(files, bytes) under root: a stat-only walk, run before anything is stopped; the
    library's --exclude folders count as the backup's walk sees them (markers only)."""
    files = size = 0
    async for e in walk(os.fsencode(root), lambda p: None, *walk_filter("library", exclude)):
        if e.type == "file":
            files += 1
            size += e.size
    return files, size


async def check_library(
    library: Path, parent: ParentInfo | None, max_shrink: float, allow: bool, exclude: Collection[str] = ()
) -> bool:
    """Refuse a library that looks unmounted, empty or shrunk before anything is stopped
    (retention would otherwise age the good snapshots out). True when it looks shrunk
    but `allow` lets it through. With --exclude, `parent` must have been scanned with the
    same exclude: both sides then leave those folders out."""
    fs = format_size
    missing = await asyncio.to_thread(lambda: [d for d in MARKER_DIRS if not os.path.isfile(library / d / MARKER)])
    suspicious: list[str] = []
    if missing:
        had = [d for d in missing if parent is None or d in parent.markers]
        if had:
            suspicious.append(
                f"library_dir {library} lacks Immich's marker files ({', '.join(f'{d}/{MARKER}' for d in had)}"
                "): is the disk mounted, and is this Immich's UPLOAD_LOCATION?"
            )
        else:
            log.warning(
                "library_dir %s has no %s marker in %s (nor had the last snapshot: an old Immich?)",
                library,
                MARKER,
                ", ".join(missing),
            )
    if parent is not None and parent.files.get("library"):
        files, size = await count_files(library, exclude)
        old_files, old_bytes = parent.files["library"], parent.bytes.get("library", 0)
        if files < old_files * (1 - max_shrink) or size < old_bytes * (1 - max_shrink):
            suspicious.append(
                f"the library holds {files} files ({fs(size)}) where snapshot {parent.snap_id} had "
                f"{old_files} ({fs(old_bytes)}): it lost more than {max_shrink * 100:g}%"
            )
    if not suspicious:
        return False
    if allow:
        for text in suspicious:
            log.warning("%s; backing up anyway (--allow-shrink)", text)
        return True
    raise SuspiciousLibrary(
        f"{'; '.join(suspicious)}; nothing was stopped or committed: check the mount, or for a "
        "deliberate deletion run again with --allow-shrink"
    )


def check_shrink_at_end(
    totals: dict[str, dict[str, int]], parent: ParentInfo | None, max_shrink: float, allow: bool
) -> None:
    """The same rule on what the (stopped) walk really found, before committing."""
    if allow or parent is None or not parent.files.get("library"):
        return
    now = totals.get("library", {"files": 0, "bytes": 0})
    old_files, old_bytes = parent.files["library"], parent.bytes.get("library", 0)
    if now["files"] < old_files * (1 - max_shrink) or now["bytes"] < old_bytes * (1 - max_shrink):
        raise SuspiciousLibrary(
            f"the library walked {now['files']} files ({format_size(now['bytes'])}) where snapshot {parent.snap_id} "
            f"had {old_files} ({format_size(old_bytes)}): it lost more than {max_shrink * 100:g}% during the run; "
            "nothing was committed: check the mount, or run again with --allow-shrink"
        )
