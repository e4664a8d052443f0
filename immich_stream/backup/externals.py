"""Immich's external libraries as roots of a backup: found in the live database and the
immich_server container's mounts (host/externals.py) before anything is stopped, named
`external:<name>` (the import path inside the container, its `/` and every character
outside A-Za-z0-9._- as `-`: /mnt/nas/photos -> external:mnt-nas-photos; two paths that
would share a name both get 8 hex digits of their path's sha256), and refused when missing,
empty or shrunk: a NAS that did not mount must not become an empty root.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from immich_stream.backup.changes import ParentInfo
from immich_stream.backup.library import count_files
from immich_stream.config import Settings, format_size
from immich_stream.errors import DumpError, SuspiciousLibrary
from immich_stream.host.externals import host_path, import_paths, server_mounts
from immich_stream.repository.layout import EXTERNAL, is_external

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class External:
    library: str  # the library's name in Immich
    path: str  # the import path, as immich_server sees it
    host: Path | None  # where it is on this host; None: not mounted from the host
    read_only: bool
    root: str  # external:<name>


def root_name(path: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", path).strip("-._")[:80] or "root"
    return EXTERNAL + slug


def named(found: list[tuple[str, str]]) -> dict[str, str]:
    """Import path -> its root name, stable whatever else the database holds."""
    paths = sorted({p for _, p in found})
    names = {p: root_name(p) for p in paths}
    taken: dict[str, int] = {}
    for n in names.values():
        taken[n] = taken.get(n, 0) + 1
    return {p: n if taken[n] == 1 else f"{n}-{hashlib.sha256(p.encode()).hexdigest()[:8]}" for p, n in names.items()}


async def discover(docker: Any, settings: Settings) -> list[External]:
    """Every external library's import path, with where it is on this host."""
    found = await import_paths(
        docker, settings.db_container, settings.db_user, settings.db_name, settings.stall_timeout
    )
    if not found:
        return []
    _, mounts = await server_mounts(docker, settings.project)
    names = named(found)
    out: list[External] = []
    seen: set[str] = set()
    for library, path in found:
        if path in seen:
            continue
        seen.add(path)
        hit = host_path(path, mounts or [])
        host, read_only = (hit[0], hit[1].read_only) if hit else (None, False)
        out.append(External(library, path, host, read_only, names[path]))
    return out


def external_roots(found: list[External], settings: Settings, roots: dict[str, Path]) -> dict[str, Path]:
    """The roots to back up (--external include), the others said: not mounted from the
    host, already under another root, or left out (--external warn)."""
    out: dict[str, Path] = {}
    for e in found:
        where = f"external library {e.library!r} ({e.path})"
        if settings.external == "skip":
            continue
        if e.host is None:
            log.warning(
                "%s is not mounted from the host (inside the immich_server container only): not backed up", where
            )
            continue
        inside = [r for r, p in roots.items() if e.host == p or p in e.host.parents]
        if inside:
            log.info("%s is on the host at %s, inside the %s root: backed up there", where, e.host, inside[0])
            continue
        if settings.external == "warn":
            log.warning("%s at %s is not backed up (--external warn)", where, e.host)
            continue
        out[e.root] = e.host
    return out


async def find_roots(docker: Any, settings: Settings, roots: dict[str, Path], before: list[str]) -> dict[str, Path]:
    """The external roots of this run (external_roots of what discover finds). `before`:
    the last snapshot's roots. The database not answering fails the run only when that
    snapshot had external roots: this run would silently lack them."""
    if settings.external == "skip":
        return {}
    had = [r for r in before if is_external(r)]
    try:
        found = await discover(docker, settings)
    except DumpError as exc:
        if had:
            raise DumpError(
                f"Immich's external libraries could not be read from the database ({exc}), and the last snapshot "
                f"has {', '.join(had)}: nothing was stopped or uploaded; run again, or leave them out with "
                "--external skip"
            ) from None
        # the cause at -v only: a database that cannot be read fails the dump with its own line
        log.warning("Immich's external libraries could not be read from the database: none backed up (-v says why)")
        log.debug("reading the external libraries: %s", exc)
        return {}
    out = external_roots(found, settings, roots)
    if gone := [r for r in had if r not in out]:
        log.warning(
            "%s of the last snapshot not backed up this time (see above, or removed from Immich)", ", ".join(gone)
        )
    return out


def missing(path: Path) -> str | None:
    """What is wrong with an external library's directory (missing, empty, ...), or None."""
    try:
        if not path.is_dir():
            return "missing" if not path.exists() else "not a directory"
        with os.scandir(path) as it:
            if next(it, None) is None:
                return "empty"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return None


async def check_externals(roots: dict[str, Path], parent: ParentInfo | None, max_shrink: float, allow: bool) -> bool:
    """The library's guards for each external root, before anything is stopped: missing
    or empty (a mount that did not happen) is refused, whatever --allow-shrink says; one
    that lost more than max_shrink since the parent is refused unless `allow`."""
    shrunk = False
    for root, path in roots.items():
        if not is_external(root):
            continue
        problem = await asyncio.to_thread(missing, path)
        if problem is not None:
            inside = " (immich-stream in a container: mount it there at the same path)" if problem == "missing" else ""
            raise SuspiciousLibrary(
                f"{root} ({path}) is {problem}: is the disk or NAS mounted?{inside} nothing was stopped or committed; "
                "mount it, or leave external libraries out with --external warn"
            )
        if parent is None or not parent.files.get(root):
            continue
        files, size = await count_files(path)
        old_files, old_bytes = parent.files[root], parent.bytes.get(root, 0)
        if files < old_files * (1 - max_shrink) or size < old_bytes * (1 - max_shrink):
            text = (
                f"{root} ({path}) holds {files} files ({format_size(size)}) where snapshot {parent.snap_id} had "
                f"{old_files} ({format_size(old_bytes)}): it lost more than {max_shrink * 100:g}%"
            )
            if not allow:
                raise SuspiciousLibrary(
                    f"{text}; nothing was stopped or committed: check the mount, or for a deliberate deletion run "
                    "again with --allow-shrink"
                )
            log.warning("%s; backing up anyway (--allow-shrink)", text)
            shrunk = True
    return shrunk
