"""What a snapshot records about where it came from: the Immich and Postgres images and
versions, and IMMICH_DIR's docker-compose.yml and .env with their secrets removed, so
that a restore can be checked before it starts and a lost machine rebuilt.

`collect` runs during a backup's preflight (Docker inspect and two small files: no
downtime); the backup copies it and the dump's facts into the summary (backup/run.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import aiodocker

from immich_stream.config import Settings, read_dotenv
from immich_stream.errors import ConfigError
from immich_stream.host.dumpjob import dump_job
from immich_stream.host.stack import PROJECT_LABEL

log = logging.getLogger(__name__)

SECRET_PLACEHOLDER = "immich-stream-removed-secret"
CONFIG_FILES = ("docker-compose.yml", "docker-compose.yaml", "compose.yml", "compose.yaml", ".env")
SERVICE_LABEL = "com.docker.compose.service"
VERSION_LABEL = "org.opencontainers.image.version"
SERVER_SERVICE, SERVER_CONTAINER = "immich-server", "immich_server"
MAX_CONFIG_FILE = 256 * 1024  # a compose file or .env larger than this is not one


# Redaction is deny-by-default: a value is recorded only when it is known to be harmless,
# by its name (Immich's documented non-secret variables, compose's structural keys) or by
# its shape (a path, a port or volume mapping, a number, a boolean, a reference to a
# variable). Everything else (DB_URL, REDIS_URL, *_PASS, *_TOKEN, a command line, a block
# scalar, free text) becomes SECRET_PLACEHOLDER, named in config_secrets.
KNOWN_ENV = frozenset(
    {
        # docker compose (Immich's docs: "Docker Compose", "General", "Workers", "Ports")
        "UPLOAD_LOCATION", "DB_DATA_LOCATION", "IMMICH_VERSION", "TZ", "IMMICH_ENV", "IMMICH_LOG_LEVEL",
        "IMMICH_MEDIA_LOCATION", "IMMICH_CONFIG_FILE", "NO_COLOR", "CPU_CORES", "IMMICH_API_METRICS_PORT",
        "IMMICH_MICROSERVICES_METRICS_PORT", "IMMICH_PROCESS_INVALID_IMAGES", "IMMICH_WORKERS_INCLUDE",
        "IMMICH_WORKERS_EXCLUDE", "IMMICH_HOST", "IMMICH_PORT", "IMMICH_TRUSTED_PROXIES", "COMPOSE_PROJECT_NAME",
        # database and redis, without their passwords and URLs
        "DB_HOSTNAME", "DB_PORT", "DB_USERNAME", "DB_DATABASE_NAME", "DB_VECTOR_EXTENSION", "DB_SKIP_MIGRATIONS",
        "DB_STORAGE_TYPE", "REDIS_HOSTNAME", "REDIS_PORT", "REDIS_DBINDEX", "REDIS_SOCKET", "REDIS_USERNAME",
        "POSTGRES_USER", "POSTGRES_DB", "POSTGRES_INITDB_ARGS",
        # reverse geocoding, machine learning, metrics, service addresses
        "DISABLE_REVERSE_GEOCODING", "REVERSE_GEOCODING_PRECISION", "IMMICH_METRICS", "IMMICH_API_METRICS",
        "IMMICH_HOST_METRICS", "IMMICH_IO_METRICS", "IMMICH_JOB_METRICS", "IMMICH_WEB_URL", "IMMICH_SERVER_URL",
        "IMMICH_MACHINE_LEARNING_URL", "IMMICH_API_URL_EXTERNAL",
    }
)  # fmt: skip
KNOWN_ENV_PREFIXES = ("MACHINE_LEARNING_",)
# compose keys whose plain values are names, policies, sizes or times
KNOWN_COMPOSE = frozenset(
    {
        "name", "container_name", "hostname", "restart", "shm_size", "stop_signal", "stop_grace_period",
        "network_mode", "platform", "pull_policy", "driver", "external", "disable", "interval", "timeout",
        "retries", "start_period", "start_interval", "condition", "service", "file", "type", "source", "target",
        "read_only", "init", "privileged", "tty", "stdin_open", "mem_limit", "cpus", "user", "working_dir",
        "version", "env_file",
    }
)  # fmt: skip
# lists whose items are names, paths or mappings
KNOWN_LISTS = frozenset(
    {"volumes", "ports", "depends_on", "env_file", "networks", "profiles", "devices", "cap_add", "cap_drop"}
)
# Values Immich's own compose files carry (the database's command and health check of the
# pgvecto.rs era, redis's health check): known, and needed for a working rebuild.
KNOWN_VALUES = frozenset(
    {
        "redis-cli ping || exit 1", "--data-checksums", "postgres", "-c", "shared_preload_libraries=vectors.so",
        "'search_path=\"$$user\", public, vectors'", "search_path=\"$$user\", public, vectors",
        "-c shared_preload_libraries=vectors.so", "-c 'search_path=\"$$user\", public, vectors'",
        "-c logging_collector=on", "-c max_wal_size=2GB", "-c shared_buffers=512MB", "-c wal_compression=on",
        "logging_collector=on", "max_wal_size=2GB", "shared_buffers=512MB", "wal_compression=on",
        "pg_isready --dbname=\"$${POSTGRES_DB}\" --username=\"$${POSTGRES_USER}\" || exit 1;",
        "Chksum=\"$$(psql --dbname=\"$${POSTGRES_DB}\" --username=\"$${POSTGRES_USER}\" --tuples-only --no-align",
        "--command='SELECT COALESCE(SUM(checksum_failures), 0) FROM pg_stat_database')\";",
        "echo \"checksum failure count is $$Chksum\";", "[ \"$$Chksum\" = '0' ] || exit 1",
    }
)  # fmt: skip
_SECRET_WORDS = ("PASS", "PWD", "SECRET", "TOKEN", "KEY", "AUTH", "CRED", "PRIVATE", "SALT", "SESSION", "COOKIE")
_VAR = r"\$(?:\$|[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?+][^}]*)?\})"
_REFERENCES = re.compile(rf"(?:{_VAR})+")  # ${DB_PASSWORD}: a reference is no secret
_BOOLEAN = re.compile(r"(?i)(true|false|yes|no|on|off|null|~)")
_PATH = re.compile(rf"(?:~|\.{{1,2}})?/(?:[\w.@%+=,/-]|{_VAR})*")
_VERSION = re.compile(r"v?\d+(?:\.\d+)+(?:[-+][\w.]+)?|release")
# a volume or port mapping: paths, names, ports and references joined by ':'
_MAPPING_PART = rf"(?:[\w./~@-]|{_VAR})*"
_MAPPING = re.compile(rf"{_MAPPING_PART}(?::{_MAPPING_PART}){{1,3}}|{_MAPPING_PART}")
_IMAGE = re.compile(
    rf"(?:[\w.-]|{_VAR})+(?::\d+)?(?:/(?:[\w.-]|{_VAR})+)*(?::(?:[\w.-]|{_VAR})+)?(?:@sha256:[0-9a-f]{{64}})?"
)


def is_secret(name: str) -> bool:
    """A name that says it holds a secret: its value is never kept, whatever it looks like."""
    upper = name.upper()
    return not upper.endswith("_FILE") and any(word in upper for word in _SECRET_WORDS)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _known(key: str) -> bool:
    upper = key.upper()
    return key in KNOWN_COMPOSE or upper in KNOWN_ENV or upper.startswith(KNOWN_ENV_PREFIXES)


def harmless(key: str | None, value: str, *, item_of: str | None = None) -> bool:
    """May this value be recorded? Only when known to be harmless; see the comment above.
    A number is not harmless by itself (a PIN is a number): only under a known name."""
    text = _unquote(value)
    if not text or text in KNOWN_VALUES or value.strip() in KNOWN_VALUES:
        return True
    if "@" in text and not text.startswith(("/", "./")) and not (key == "image" and _IMAGE.fullmatch(text)):
        return False  # user:password@host
    if _REFERENCES.fullmatch(text):
        return True
    if key is not None and is_secret(key):
        return False
    if key is not None and key.upper().endswith("_FILE") and _PATH.fullmatch(text):
        return True  # DB_PASSWORD_FILE=/run/secrets/...: the path, not the secret
    if _BOOLEAN.fullmatch(text) or _PATH.fullmatch(text) or _VERSION.fullmatch(text):
        return True
    if key == "image":
        return bool(_IMAGE.fullmatch(text))
    if item_of in ("volumes", "ports", "devices") or key in ("source", "target", "file"):
        return bool(_MAPPING.fullmatch(text))
    if item_of in KNOWN_LISTS:
        return bool(re.fullmatch(r"[\w./-]+", text))
    if key is not None and key.upper().endswith("_PORT"):
        return text.isdigit()
    if key is not None and _known(key):  # a service address, never with user:password
        return "://" not in text or bool(re.fullmatch(r"[a-z][a-z0-9+.-]*://[\w.-]+(:\d+)?(/[\w./-]*)?", text))
    return False


def _redact_env(text: str, removed: list[str]) -> str:
    """.env: python-dotenv's parser (docker compose's format) finds each assignment, also
    over several lines; comments that are assignments are judged like the others."""
    from dotenv.parser import parse_stream

    out: list[str] = []
    for binding in parse_stream(io.StringIO(text)):
        original = binding.original.string
        if binding.key is None:  # comments and blank lines (and lines that parse as nothing)
            out.append(_redact_comment(original, removed) if not binding.error else _deny(original))
            continue
        if binding.value is None or harmless(binding.key, binding.value):
            out.append(original)
            continue
        head = original[: original.index(binding.key) + len(binding.key)]
        end = "\n" if original.endswith("\n") else ""
        out.append(f"{head}={SECRET_PLACEHOLDER}{end}")
        _note(binding.key, removed)
    return "".join(out)


def _note(name: str, removed: list[str]) -> None:
    if name not in removed:
        removed.append(name)


def _deny(text: str) -> str:
    """Lines that are no assignment we understand: their text goes, indentation stays."""
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        indent = body[: len(body) - len(body.lstrip())]
        out.append(f"{indent}{SECRET_PLACEHOLDER}{line[len(body) :]}" if body.strip() else line)
    return "".join(out)


_ENV_LINE = re.compile(r"^(\s*(?:export\s+)?)([A-Za-z_][A-Za-z0-9_.-]*)(\s*=\s*)(.*)$")
_YAML_KEY = re.compile(r"^(\s*)(-\s+)?(['\"]?)([A-Za-z_<][A-Za-z0-9_.<-]*)\3(\s*:)(?:(\s+)(.*))?$")
_YAML_ITEM = re.compile(r"^(\s*-\s+)(.*)$")
_ANCHOR = re.compile(r"^(?:[&*][\w-]+\s*)+$")


def _redact_comment(line: str, removed: list[str]) -> str:
    """A comment is kept, unless it is a commented-out assignment (`# DB_PASSWORD=old`,
    `# REDIS_PASSWORD: x`) whose value is not known to be harmless. Free text stays:
    "# WARNING: ..." is documentation, so only names with '_' or a secret's name count."""
    body = line.rstrip("\r\n")
    end = line[len(body) :]
    m = re.match(r"^(\s*#+\s*)(.*)$", body)
    if not m:
        return line
    inner = m.group(2)
    e = _ENV_LINE.match(inner)
    y = _YAML_KEY.match(inner)
    key, value = (e.group(2), e.group(4)) if e else (y.group(4), y.group(7) or "") if y else (None, "")
    if key is None or not value.strip() or not ("_" in key or is_secret(key)):
        return line
    if harmless(key, value.split(" #")[0]):
        return line
    _note(key, removed)
    return f"{m.group(1)}{inner[: len(inner) - len(value)]}{SECRET_PLACEHOLDER}{end}"


def _split_flow(inner: str) -> list[str] | None:
    """The items of a flow collection's inside; None when nested or unbalanced."""
    items, quote, start = [], "", 0
    for i, c in enumerate(inner):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[]{}":
            return None
        elif c == ",":
            items.append(inner[start:i])
            start = i + 1
    if quote:
        return None
    items.append(inner[start:])
    return [i for i in items if i.strip()] if inner.strip() else []


def _redact_value(key: str, value: str, parent: str | None, removed: list[str]) -> str:
    """A YAML value after `key:` (or a list item under parent): kept, or the placeholder."""
    raw = value
    comment = ""
    if not value.lstrip().startswith(("'", '"')) and " #" in value:
        raw, comment = value.split(" #", 1)
        comment = " #" + comment
    stripped = raw.strip()
    if stripped.startswith(("[", "{")):
        closing = "]" if stripped[0] == "[" else "}"
        items = _split_flow(stripped[1:-1]) if stripped.endswith(closing) else None
        if items is None:
            _note(key, removed)
            return SECRET_PLACEHOLDER
        kept = []
        for item in items:
            if closing == "}" and ":" in item:
                k, _, v = item.partition(":")
                name = _unquote(k)
                kept.append(f"{k}:{v}" if harmless(name, v) else f"{k}: {SECRET_PLACEHOLDER}")
                if not harmless(name, v):
                    _note(name, removed)
            elif closing == "]" and "=" in item and re.match(r"\s*['\"]?[A-Za-z_][\w.]*=", item):
                name, _, v = _unquote(item).partition("=")
                ok = harmless(name, v)
                kept.append(item if ok else f" {name}={SECRET_PLACEHOLDER}")
                if not ok:
                    _note(name, removed)
            else:
                ok = harmless(None, item, item_of=key)
                kept.append(item if ok else f" {SECRET_PLACEHOLDER}")
                if not ok:
                    _note(key, removed)
        return stripped[0] + ",".join(kept).strip() + closing + comment
    if _ANCHOR.match(stripped) or harmless(key if parent is None else None, raw, item_of=parent):
        return value
    _note(key, removed)
    return SECRET_PLACEHOLDER


def _redact_compose(text: str, removed: list[str]) -> str:
    out: list[str] = []
    parents: list[tuple[int, str]] = []  # (indent, key) of the mappings around the line
    block: tuple[int, str] | None = None  # inside a block scalar of key, lines indented past int
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        end = line[len(body) :]
        indent = len(body) - len(body.lstrip())
        if block is not None:
            if not body.strip() or indent > block[0]:
                if body.strip() and body.strip() not in KNOWN_VALUES:
                    _note(block[1], removed)
                    body = " " * indent + SECRET_PLACEHOLDER
                out.append(body + end)
                continue
            block = None
        if not body.strip() or body.lstrip().startswith("#"):
            out.append(_redact_comment(line, removed))
            continue
        while parents and parents[-1][0] >= indent:
            parents.pop()
        parent = parents[-1][1] if parents else None
        m = _YAML_KEY.match(body)
        if m:
            key, value = m.group(4), m.group(7)
            if m.group(2):  # `- key: value`: a mapping inside a list
                indent += len(m.group(2))
            if value is None or not value.strip() or value.strip().startswith("#"):
                parents.append((indent, key))
                out.append(line)
                continue
            if re.fullmatch(r"[|>][+-]?\d*\s*(#.*)?", value.strip()):
                block = (indent, key)
                out.append(line)
                continue
            if _ANCHOR.match(value.strip()) and value.strip().startswith("&"):
                parents.append((indent, key))  # `x-base: &base`: a mapping follows
            new = _redact_value(key, value, None, removed)
            out.append(body[: len(body) - len(value)] + new + end)
            continue
        m = _YAML_ITEM.match(body)
        if m:
            item = m.group(2)
            env = re.match(r"^(['\"]?)([A-Za-z_][A-Za-z0-9_.-]*)=(.*?)(\1)\s*$", item)
            if env:
                if not harmless(env.group(2), env.group(3)):
                    _note(env.group(2), removed)
                    item = f"{env.group(1)}{env.group(2)}={SECRET_PLACEHOLDER}{env.group(4)}"
            else:
                item = _redact_value(parent or "-", item, parent, removed)
            out.append(m.group(1) + item + end)
            continue
        _note(parent or "(text)", removed)
        out.append(_deny(line))
    return "".join(out)


def redact(name: str, text: str) -> tuple[str, list[str]]:
    """The file's text with every value not known to be harmless replaced by
    SECRET_PLACEHOLDER; the names (variables or compose keys) whose values were replaced.
    References to variables (`${DB_PASSWORD}`) stay: they are no secret, and the rebuilt
    stack needs them."""
    removed: list[str] = []
    if is_env_file(name):
        return _redact_env(text, removed), removed
    return _redact_compose(text, removed), removed


@dataclass
class ImageInfo:
    image: str | None = None  # as the container was configured (name:tag)
    image_id: str | None = None
    label_version: str | None = None


@dataclass
class ServerInfo:
    """The Immich server found (snapshot.json's `immich`)."""

    version: str | None = None  # the best known: image label, image tag, or IMMICH_VERSION
    image: str | None = None  # the server container's image, as configured
    image_id: str | None = None
    env_version: str | None = None  # IMMICH_VERSION in IMMICH_DIR/.env, when set
    container: str | None = None


@dataclass
class SourceInfo:
    database: ImageInfo = field(default_factory=ImageInfo)
    immich: ServerInfo = field(default_factory=ServerInfo)
    config_files: dict[str, str] = field(default_factory=dict)
    config_secrets: list[str] = field(default_factory=list)
    dump_job: dict[str, Any] | None = None  # Immich's own nightly dumps (host/dumpjob.py)


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


async def server_container(docker: aiodocker.Docker, project: str) -> str:
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


def is_env_file(name: str) -> bool:
    """.env, or an env file of another name (--env-file immich.env, .env.prod): redacted as .env."""
    return name == ".env" or name.endswith(".env") or name.startswith(".env.")


def read_config_files(settings: Settings) -> tuple[dict[str, str], list[str]]:
    """IMMICH_DIR's compose files and .env, and the compose files and env file the settings
    name elsewhere (--compose-file, COMPOSE_FILE, --env-file), by file name, redacted."""
    files: dict[str, str] = {}
    secrets: list[str] = []
    # the files compose really reads first: a file of the same name left in IMMICH_DIR gives way
    paths = [*settings.compose_file, *([settings.env_file] if settings.env_file else [])]
    paths += [settings.immich_dir / n for n in CONFIG_FILES] if settings.immich_dir else []
    for path in dict.fromkeys(paths):
        name = path.name
        if name in files:  # two files of one name in two directories: the first is kept
            log.info("%s not recorded in the snapshot: a file named %s already is", path, name)
            continue
        try:
            if not path.is_file() or path.stat().st_size > MAX_CONFIG_FILE:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            log.warning("%s not recorded in the snapshot: %s", path, exc.strerror)
            continue
        # the env file compose reads is redacted as one whatever its name (--env-file prod-vars)
        files[name], removed = redact(".env" if path == settings.env_file else name, text)
        secrets += [s for s in removed if s not in secrets]
    return files, secrets


async def collect(docker: aiodocker.Docker, settings: Settings) -> SourceInfo:
    """Images, versions and config files of the stack being backed up. Nothing here may
    fail a backup: what cannot be found is left out (None)."""
    info = SourceInfo()
    info.database = _image_info(*await _inspect(docker, settings.db_container))
    name = await server_container(docker, settings.project)
    server = _image_info(*await _inspect(docker, name))
    env_version = None
    env_file = settings.env_file or (settings.immich_dir / ".env" if settings.immich_dir else None)
    if env_file:
        with contextlib.suppress(ConfigError):  # changed since the settings were read: leave it out
            env_version = read_dotenv(env_file).get("IMMICH_VERSION")
    tag = image_tag(server.image)
    tag_version = tag if tag and re.match(r"^v?\d+\.\d+", tag) else None
    info.immich = ServerInfo(
        version=server.label_version or tag_version or env_version or None,
        image=server.image,
        image_id=server.image_id,
        env_version=env_version or None,
        container=name if server.image else None,
    )
    info.config_files, info.config_secrets = read_config_files(settings)
    info.dump_job = await dump_job(
        docker, settings.db_container, settings.db_user, settings.db_name, settings.library_dir
    )
    return info
