"""Where Immich's external libraries are on this host: their import paths as the live
database holds them (the `library` table, `libraries` before Immich's StandardizeNames
migration), and the immich_server container's mounts (what docker compose made of the
compose file's volumes) that map each path to a host directory.
"""

from __future__ import annotations

import asyncio
import json
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path

import aiodocker

from immich_stream.errors import DumpError
from immich_stream.host.metadata import server_container
from immich_stream.host.postgres import psql_query

# the table's name in both eras; jsonb's text form keeps a path's tab or newline escaped
_TABLE = "SELECT coalesce(to_regclass('public.library')::text, to_regclass('public.libraries')::text, '')"
_PATHS = (
    "SELECT coalesce(jsonb_agg(jsonb_build_array(name, p) ORDER BY p)::text, '[]') "
    'FROM {table} l, unnest(l."importPaths") p WHERE l."deletedAt" IS NULL'
)


@dataclass(frozen=True)
class Mount:
    source: str  # on the host (a bind mount's directory, a named volume's _data)
    destination: str  # in the container
    read_only: bool
    kind: str  # bind, volume


async def import_paths(
    docker: aiodocker.Docker, container: str, user: str, dbname: str, deadline: float = math.inf
) -> list[tuple[str, str]]:
    """(library name, import path) of every external library not deleted, by path; none
    when the database has no library table (an Immich before external libraries, or none).
    A database that does not answer within `deadline` seconds is a DumpError."""
    limit = deadline if math.isfinite(deadline) else None
    try:
        async with asyncio.timeout(limit):
            rows = await psql_query(docker, container, user, dbname, _TABLE, limit)
            table = rows[0][0] if rows and rows[0] else ""
            if table not in ("library", "libraries", "public.library", "public.libraries"):
                return []
            paths = _PATHS.format(table=f'"{table.split(".")[-1]}"')
            out = await psql_query(docker, container, user, dbname, paths, limit)
    except TimeoutError:
        raise DumpError(f"the database in {container} did not answer within {deadline:.0f} s") from None
    try:
        found = json.loads(out[0][0]) if out and out[0] else []
        return [(str(name), str(path)) for name, path in found if path]
    except (ValueError, TypeError) as exc:
        raise DumpError(f"the library table's import paths could not be read ({exc})") from None


async def server_mounts(docker: aiodocker.Docker, project: str) -> tuple[str, list[Mount] | None]:
    """The immich-server service's container (by its compose labels) and its mounts; None
    when there is no such container."""
    name = await server_container(docker, project)
    try:
        raw = (await docker.containers.get(name))._container
    except aiodocker.DockerError:
        return name, None
    mounts = [
        Mount(str(m.get("Source") or ""), str(m.get("Destination") or ""), not m.get("RW", True), str(m.get("Type")))
        for m in raw.get("Mounts") or []
        if m.get("Source") and m.get("Destination") and m.get("Type") in ("bind", "volume")
    ]
    return name, mounts


def host_path(path: str, mounts: list[Mount]) -> tuple[Path, Mount] | None:
    """Where the container's `path` is on the host: through the mount with the longest
    destination that holds it; None when no mount does (inside the container only)."""
    path = posixpath.normpath(path)
    best: Mount | None = None
    for m in mounts:
        dest = posixpath.normpath(m.destination)
        if (path == dest or path.startswith(dest.rstrip("/") + "/")) and (
            best is None or len(dest) > len(best.destination)
        ):
            best = m
    if best is None:
        return None
    rel = posixpath.relpath(path, posixpath.normpath(best.destination))
    return (Path(best.source) if rel == "." else Path(best.source) / rel), best
