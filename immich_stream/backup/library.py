"""Is this still Immich's library, and its database? Refuse one that looks unmounted,
emptied, re-initialised or shrunk, before anything is stopped and again before committing:
retention would otherwise age the good snapshots out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncGenerator, Awaitable, Collection, Mapping
from pathlib import Path
from typing import Any

from immich_stream.backup.changes import MARKER, MARKER_DIRS, ParentInfo, followed, walk_filter
from immich_stream.backup.walk import Entry, walk_batches
from immich_stream.config import format_size
from immich_stream.errors import DumpError, SuspiciousLibrary
from immich_stream.host.postgres import count_rows_up_to

log = logging.getLogger(__name__)


def library_walk(root: Path, exclude: Collection[str] = ()) -> AsyncGenerator[list[Entry], None]:
    """The library's entries as the backup's walk sees them (--exclude folders: markers
    only), a batch at a time; problems are the backup walk's to report."""
    prune, keep = walk_filter("library", exclude)
    return walk_batches(os.fsencode(root), lambda p: None, prune, keep, followed("library"))


async def count_files(root: Path, exclude: Collection[str] = ()) -> tuple[int, int]:
    """(files, bytes) under root: a stat-only walk, run before anything is stopped; the
    library's --exclude folders count as the backup's walk sees them (markers only)."""
    files = size = 0
    batches = library_walk(root, exclude)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for e in batch:
                if e.type == "file":
                    files += 1
                    size += e.size
    return files, size


async def check_library(
    library: Path,
    parent: ParentInfo | None,
    max_shrink: float,
    allow: bool,
    exclude: Collection[str] = (),
    counted: Awaitable[tuple[int, int]] | None = None,
) -> bool:
    """Refuse a library that looks unmounted, empty or shrunk before anything is stopped
    (retention would otherwise age the good snapshots out). True when it looks shrunk
    but `allow` lets it through. With --exclude, `parent` must have been scanned with the
    same exclude: both sides then leave those folders out. `counted`: count_files of the
    library with that exclude, started beside the parent's scan."""
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
        files, size = await (counted if counted is not None else count_files(library, exclude))
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
    """The same rule on what the (stopped) walk really found, before committing: the
    library's and each external library's (external:<name>) this run walked."""
    if allow or parent is None:
        return
    for root in ["library", *sorted(r for r in totals if r.startswith("external:"))]:
        if not parent.files.get(root):
            continue
        now = totals.get(root, {"files": 0, "bytes": 0})
        old_files, old_bytes = parent.files[root], parent.bytes.get(root, 0)
        if now["files"] < old_files * (1 - max_shrink) or now["bytes"] < old_bytes * (1 - max_shrink):
            what = "the library" if root == "library" else root
            raise SuspiciousLibrary(
                f"{what} walked {now['files']} files ({format_size(now['bytes'])}) where snapshot {parent.snap_id} "
                f"had {old_files} ({format_size(old_bytes)}): it lost more than {max_shrink * 100:g}% during the "
                "run; nothing was committed: check the mount, or run again with --allow-shrink"
            )


# Tables smaller than this in the parent snapshot are left out of the database's shrink
# check: sessions, jobs and such come and go by the handful.
MIN_TABLE_ROWS = 100


def shrunk_tables(now: Mapping[str, int | None], before: Mapping[str, int], max_shrink: float) -> list[str]:
    """The tables (`name old -> new`) that lost more than max_shrink of their rows since the
    parent snapshot. A table that is gone counts as emptied, unless tables new since then
    hold about as many rows (Immich renaming its tables in an upgrade)."""
    out: list[str] = []
    gone: list[str] = []
    for name, old in sorted(before.items()):
        if old < MIN_TABLE_ROWS:
            continue
        new = now.get(name)
        if new is None:
            gone.append(name)
        elif new < old * (1 - max_shrink):
            out.append(f"{name} {old} -> {new}")
    if gone:
        lost = sum(before[t] for t in gone)
        added = sum(n or 0 for t, n in now.items() if t not in before)
        if added < lost * (1 - max_shrink):
            out += [f"{t} {before[t]} -> gone" for t in gone]
    return out


def _database_refusal(tables: list[str], snap_id: str, max_shrink: float, when: str, what: str) -> str:
    return (
        f"the database lost more than {max_shrink * 100:g}% of the rows of {', '.join(tables)} since snapshot "
        f"{snap_id}{when}: an emptied or re-initialised database (a fresh Immich?); {what}: check DB_CONTAINER "
        "and DB_NAME, or for a deliberate deletion run again with --allow-shrink"
    )


async def check_database(
    docker: Any,
    container: str,
    user: str,
    dbname: str,
    before: Mapping[str, int] | None,
    snap_id: str,
    max_shrink: float,
    allow: bool,
    deadline: float = math.inf,
) -> bool:
    """The library's shrink rule for the database, before anything is stopped: each table
    the parent snapshot counted (snapshot.json's rows per table) against the live one,
    counted only as far as the rule needs. True when it shrank and `allow` let it through.
    A count that takes longer than `deadline` (a table locked by another session) fails the
    run: the backup must not wait forever holding its repository lock."""
    if not before:
        return False
    limits = {t: math.ceil(n * (1 - max_shrink)) for t, n in before.items() if n >= MIN_TABLE_ROWS}
    if not limits:
        return False
    try:
        async with asyncio.timeout(deadline if math.isfinite(deadline) else None):
            # the server ends the query a little later by itself: nothing is left queued on the lock
            now = await count_rows_up_to(
                docker, container, user, dbname, limits, deadline + 5 if math.isfinite(deadline) else None
            )
    except TimeoutError:
        raise DumpError(
            f"the database in {container} did not count its rows within {deadline:.0f} s (a table locked by another "
            "session?): nothing was stopped or uploaded; check pg_stat_activity, then run again "
            "(IMMICH_STREAM_STALL_TIMEOUT sets the limit)"
        ) from None
    except DumpError as exc:  # the dump's own counts still decide before the commit
        log.warning("could not count the database's rows before stopping anything (%s): checking the dump instead", exc)
        return False
    # Tables not there now are judged at the end, from the dump (a rename shows there).
    seen = {t: n for t, n in now.items() if n is not None}
    tables = shrunk_tables(seen, {t: before[t] for t in seen}, max_shrink)
    if not tables:
        return False
    if allow:
        log.warning(
            "the database lost rows of %s since snapshot %s; backing up anyway (--allow-shrink)",
            ", ".join(tables),
            snap_id,
        )
        return True
    raise SuspiciousLibrary(_database_refusal(tables, snap_id, max_shrink, "", "nothing was stopped or committed"))


def check_database_at_end(
    dumped: Mapping[str, int], before: Mapping[str, int] | None, snap_id: str, max_shrink: float, allow: bool
) -> bool:
    """The same rule on what pg_dump really wrote, before committing. True when it shrank
    and `allow` let it through."""
    if not before:
        return False
    tables = shrunk_tables(dumped, before, max_shrink)
    if not tables:
        return False
    if allow:
        log.warning("the database lost rows of %s; backing up anyway (--allow-shrink)", ", ".join(tables))
        return True
    raise SuspiciousLibrary(
        _database_refusal(tables, snap_id, max_shrink, " (in the dump)", "nothing was committed, the stack runs again")
    )
