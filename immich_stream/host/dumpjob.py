"""Immich's own database dump job (Immich 1.127 and later): every night at 02:00 it writes
UPLOAD_LOCATION/backups/immich-db-backup-<date>-v<version>-pg<version>.sql.gz (pg_dumpall,
gzipped) and keeps the newest 14. Whether it is on is Immich's setting `backup.database` in
system_metadata's `system-config` row (absent: Immich's defaults, on). Our own dump holds the
same database, so the files are a copy of what each snapshot already has (README, "Immich's
own database dumps").
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import aiodocker

from immich_stream.config import format_size
from immich_stream.errors import ImmichStreamError
from immich_stream.host.postgres import psql_query

log = logging.getLogger(__name__)

FOLDER = "backups"
PREFIX, SUFFIX = "immich-db-backup-", ".sql.gz"
DEFAULTS = {"enabled": True, "cronExpression": "0 02 * * *", "keepLastAmount": 14}  # Immich's own
SETTING_SQL = (
    "SELECT CASE WHEN to_regclass('public.system_metadata') IS NULL THEN 'no-table' ELSE "
    "coalesce((SELECT (value -> 'backup' -> 'database')::text FROM public.system_metadata "
    "WHERE key = 'system-config'), 'defaults') END"
)


def dump_files(library: Path | None) -> tuple[int, int, str | None]:
    """(files, bytes, newest name) of Immich's dumps under library/backups/."""
    n = size = 0
    newest: str | None = None
    if library is None:
        return n, size, newest
    try:
        with os.scandir(library / FOLDER) as it:
            for e in it:
                if e.name.startswith(PREFIX) and e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False):
                    n += 1
                    size += e.stat(follow_symlinks=False).st_size
                    newest = max(newest or e.name, e.name)
    except OSError:
        pass
    return n, size, newest


async def dump_job(
    docker: aiodocker.Docker, container: str, user: str, dbname: str, library: Path | None
) -> dict[str, Any]:
    """{"enabled": True/False/None (not known), "cron", "keep", "files", "bytes", "newest"}.
    Never fails: what cannot be found is None."""
    info: dict[str, Any] = {"enabled": None, "cron": None, "keep": None}
    try:
        rows = await psql_query(docker, container, user, dbname, SETTING_SQL)
        text = rows[0][0] if rows and rows[0] else "no-table"
        if text != "no-table":  # an Immich schema: its setting, or its defaults
            setting = dict(DEFAULTS)
            if text != "defaults":
                given = json.loads(text)
                if isinstance(given, dict):
                    setting.update(given)
            info.update(
                enabled=bool(setting["enabled"]), cron=setting.get("cronExpression"), keep=setting.get("keepLastAmount")
            )
    except (ImmichStreamError, aiodocker.DockerError, ValueError, IndexError) as exc:
        log.debug("Immich's dump job setting not read: %s", exc)
    info["files"], info["bytes"], info["newest"] = dump_files(library)
    return info


def describe(info: dict[str, Any] | None, excluded: bool = False) -> str:
    """One line: whether the job is on, what it left in backups/, and what to do about it."""
    if not isinstance(info, dict) or not info:  # snapshot.json is read back: any shape
        return "not recorded"
    enabled = info.get("enabled")
    state = (
        {True: "on", False: "off"}.get(enabled, "setting not known")
        if isinstance(enabled, bool)
        else "setting not known"
    )
    if enabled is True:
        state += f" ({info.get('cron')}, keeps {info.get('keep')})"
    files, size = (
        v if isinstance(v, int) and not isinstance(v, bool) else 0 for v in (info.get("files"), info.get("bytes"))
    )
    held = (
        f"{files} file{'' if files == 1 else 's'} in {FOLDER}/ ({format_size(size)})"
        if files
        else f"no dumps in {FOLDER}/"
    )
    if excluded:
        advice = f"left out of the snapshots (--exclude {FOLDER}): each snapshot's own dump holds the same database"
    elif files:
        advice = f"uploaded with the library; `--exclude {FOLDER}` leaves them out (each snapshot's own dump holds the same database)"
    else:
        advice = "nothing of it to upload"
    return f"{state}; {held}; {advice}"
