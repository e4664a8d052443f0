"""What a snapshot records about where it came from: the Immich and Postgres images and
versions, and IMMICH_DIR's docker-compose.yml and .env with their secrets removed, so
that a restore can be checked before it starts and a lost machine rebuilt.

`collect` runs during a backup's preflight (Docker inspect and two small files: no
downtime); `record` copies it and the dump's facts into the summary.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker

from immich_stream.config import Settings, read_dotenv
from immich_stream.postgres import DumpResult
from immich_stream.stack import PROJECT_LABEL
from immich_stream.summary import ImmichInfo, SnapshotSummary

log = logging.getLogger(__name__)

SECRET_PLACEHOLDER = "immich-stream-removed-secret"
CONFIG_FILES = ("docker-compose.yml", "docker-compose.yaml", "compose.yml", "compose.yaml", ".env")
SERVICE_LABEL = "com.docker.compose.service"
VERSION_LABEL = "org.opencontainers.image.version"
SERVER_SERVICE, SERVER_CONTAINER = "immich-server", "immich_server"
MAX_CONFIG_FILE = 256 * 1024  # a compose file or .env larger than this is not one


def is_secret(name: str) -> bool:
    upper = name.upper()
    return upper == "DB_PASSWORD" or any(word in upper for word in ("PASSWORD", "SECRET", "KEY"))


_ENV_LINE = re.compile(r"^(\s*(?:export\s+)?)([A-Za-z_][A-Za-z0-9_.-]*)(\s*=\s*)(.*)$")
# `NAME: value` or `- NAME=value` in a compose file
_YAML_MAP = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_.-]*)(\s*:\s+)(\S.*)$")
_YAML_LIST = re.compile(r"^(\s*-\s*['\"]?)([A-Za-z_][A-Za-z0-9_.-]*)(=)([^'\"]*)(['\"]?\s*)$")
_REFERENCE = re.compile(r"^['\"]?\$\{?[A-Za-z_][A-Za-z0-9_]*(?::?-[^}]*)?\}?['\"]?$")  # ${DB_PASSWORD}


def redact(name: str, text: str) -> tuple[str, list[str]]:
    """The file's text with every secret value replaced; the names replaced. References to
    variables (`${DB_PASSWORD}`) stay: they are no secret, and the rebuilt stack needs them."""
    out: list[str] = []
    removed: list[str] = []
    dotenv = name == ".env"
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        end = line[len(body) :]
        m = (_ENV_LINE.match(body) if dotenv else None) or (
            None if dotenv or body.lstrip().startswith("#") else (_YAML_LIST.match(body) or _YAML_MAP.match(body))
        )
        if m and is_secret(m.group(2)) and m.group(4).strip() and not _REFERENCE.match(m.group(4).strip()):
            tail = m.group(5) if m.re is _YAML_LIST else ""
            body = f"{m.group(1)}{m.group(2)}{m.group(3)}{SECRET_PLACEHOLDER}{tail}"
            if m.group(2) not in removed:
                removed.append(m.group(2))
        out.append(body + end)
    return "".join(out), removed


@dataclass
class ImageInfo:
    image: str | None = None  # as the container was configured (name:tag)
    image_id: str | None = None
    label_version: str | None = None


@dataclass
class SourceInfo:
    database: ImageInfo = field(default_factory=ImageInfo)
    immich: ImmichInfo = field(default_factory=ImmichInfo)
    config_files: dict[str, str] = field(default_factory=dict)
    config_secrets: list[str] = field(default_factory=list)


async def _inspect(docker: aiodocker.Docker, name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(container, image) inspect data; None for what does not exist."""
    try:
        c = (await docker.containers.get(name))._container
    except aiodocker.DockerError:
        return None, None
    try:
        image = await docker.images.inspect(c.get("Image", ""))
    except aiodocker.DockerError:
        image = None
    return c, image


def _image_info(container: dict[str, Any] | None, image: dict[str, Any] | None) -> ImageInfo:
    if container is None:
        return ImageInfo()
    labels = ((image or {}).get("Config") or {}).get("Labels") or {}
    return ImageInfo((container.get("Config") or {}).get("Image"), container.get("Image"), labels.get(VERSION_LABEL))


def image_tag(image: str | None) -> str | None:
    if not image:
        return None
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else None


async def _server_container(docker: aiodocker.Docker, project: str) -> str:
    try:
        found = await docker.containers.list(
            all=True, filters=json.dumps({"label": [f"{PROJECT_LABEL}={project}", f"{SERVICE_LABEL}={SERVER_SERVICE}"]})
        )
    except aiodocker.DockerError:
        found = []
    for c in found:
        names = c._container.get("Names") or []
        if names:
            return str(names[0]).lstrip("/")
    return SERVER_CONTAINER


def read_config_files(immich_dir: Path | None) -> tuple[dict[str, str], list[str]]:
    files: dict[str, str] = {}
    secrets: list[str] = []
    if immich_dir is None:
        return files, secrets
    for name in CONFIG_FILES:
        path = immich_dir / name
        try:
            if not path.is_file() or path.stat().st_size > MAX_CONFIG_FILE:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            log.warning("%s not recorded in the snapshot: %s", path, exc.strerror)
            continue
        files[name], removed = redact(name, text)
        secrets += [s for s in removed if s not in secrets]
    return files, secrets


async def collect(docker: aiodocker.Docker, settings: Settings) -> SourceInfo:
    """Images, versions and config files of the stack being backed up. Nothing here may
    fail a backup: what cannot be found is left out (None)."""
    info = SourceInfo()
    info.database = _image_info(*await _inspect(docker, settings.db_container))
    name = await _server_container(docker, settings.project)
    server = _image_info(*await _inspect(docker, name))
    env_version = read_dotenv(settings.immich_dir / ".env").get("IMMICH_VERSION") if settings.immich_dir else None
    tag = image_tag(server.image)
    tag_version = tag if tag and re.match(r"^v?\d+\.\d+", tag) else None
    info.immich = ImmichInfo(
        version=server.label_version or tag_version or env_version or None,
        image=server.image,
        image_id=server.image_id,
        env_version=env_version or None,
        container=name if server.image else None,
    )
    info.config_files, info.config_secrets = read_config_files(settings.immich_dir)
    return info


def record(summary: SnapshotSummary, source: SourceInfo, dump: DumpResult | None) -> None:
    """Put what a restore needs into the summary (before it is committed)."""
    db = summary.database
    db.image, db.image_id = source.database.image, source.database.image_id
    if dump is not None:
        db.tables = dict(dump.tables)
        db.server_version, db.server_version_num = dump.server.version, dump.server.version_num
        db.extensions = dict(dump.server.extensions)
    summary.immich = source.immich
    summary.config_files = source.config_files
    summary.config_secrets = source.config_secrets


def came_from(summary: SnapshotSummary) -> str:
    """`Immich v1.2 (ghcr.io/...), PostgreSQL 14.10 (ghcr.io/immich-app/postgres:14...)`, or ""."""
    parts = []
    im = summary.immich
    if im.version or im.image:
        parts.append(f"Immich {im.version or '?'}" + (f" ({im.image})" if im.image else ""))
    db = summary.database
    if db.server_version or db.image:
        parts.append(f"PostgreSQL {db.server_version or '?'}" + (f" ({db.image})" if db.image else ""))
    return ", ".join(parts)
