"""`restore --config-files`: the docker-compose.yml and .env a snapshot recorded, written
into a directory (never over an existing file), secrets left as placeholders.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from immich_stream.config import Settings
from immich_stream.errors import ConfigError, RepoError
from immich_stream.host.metadata import is_env_file
from immich_stream.repository.repo import Snapshot
from immich_stream.repository.session import open_repo, reader


async def write_config_files(settings: Settings, which: str, target: Path) -> tuple[Snapshot, list[Path], list[str]]:
    """The snapshot's recorded docker-compose.yml and .env into target (never over an
    existing file); returns the files written and the secrets left as placeholders."""
    async with open_repo(settings, lock=reader(settings, "restore")) as repo:
        snap = await repo.resolve(which)
    files = snap.summary.config_files
    if not files:
        raise RepoError(
            f"snapshot {snap.id} records no config files (made by an older version, or IMMICH_DIR was not "
            "set): take them from Immich's release page"
        )
    for name in files:
        if "/" in name or name in ("", ".", ".."):
            raise RepoError(f"snapshot {snap.id} records a config file named {name!r}: snapshot.json is damaged")

    def write() -> list[Path]:
        target.mkdir(parents=True, exist_ok=True)
        existing = [name for name in files if os.path.lexists(target / name)]
        if existing:
            raise ConfigError(f"{target} already holds {', '.join(existing)}: choose an empty directory")
        written = []
        for name, text in files.items():
            path = target / name
            # .env will hold DB_PASSWORD again: only its owner may read it
            mode = 0o600 if is_env_file(name) else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            with open(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            written.append(path)
        return written

    written = await asyncio.to_thread(write)
    return snap, written, snap.summary.config_secrets
