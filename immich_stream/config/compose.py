"""Immich's compose model as docker compose builds it, for what immich-stream needs from it:
which files (`-f` / --compose-file, COMPOSE_FILE with COMPOSE_PATH_SEPARATOR, else the
default names of IMMICH_DIR and their override file), merged in order; the env file
(--env-file, else the project directory's .env) and ${VAR:-default} interpolation of the
files with it; the project name (COMPOSE_PROJECT_NAME, the last `name:`, else the project
directory's name as compose normalises it); the services' volumes (bind mounts and named
volumes, merged by target) from which UPLOAD_LOCATION and DB_DATA_LOCATION really come.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from immich_stream.config.immich import interpolate, read_dotenv
from immich_stream.errors import ConfigError

# compose-go's DefaultFileNames and DefaultOverrideFileNames, in its order of preference
DEFAULT_FILES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")
OVERRIDE_FILES = (
    "compose.override.yml",
    "compose.override.yaml",
    "docker-compose.override.yml",
    "docker-compose.override.yaml",
)
SERVER_SERVICE = "immich-server"
DATABASE_SERVICE = "database"
UPLOAD_TARGETS = ("/data", "/usr/src/app/upload")  # Immich's since v1.136, and before
PGDATA_TARGET = "/var/lib/postgresql/data"
MAX_COMPOSE_FILE = 1024 * 1024  # Immich's is 4 KiB: a larger file is not read
MAX_NODES = 100_000  # values after YAML's aliases are expanded: a "billion laughs" file stops here
MAX_DEPTH = 64


@dataclass(frozen=True)
class Volume:
    """One entry of a service's `volumes`: a bind mount (source a host path) or a named volume
    (source its Docker name: `<project>_<key>`, or its `name:`, or the external one's)."""

    kind: str  # bind, volume
    source: str
    target: str
    where: str  # the file and key it came from, for messages and `immich-stream config`


@dataclass
class Compose:
    files: tuple[Path, ...]
    project_dir: Path
    env_file: Path
    env: dict[str, str]  # the env file's values, interpolated
    name: str | None = None  # the last file's top-level `name:`
    name_from: str = ""
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    volumes: dict[str, Any] = field(default_factory=dict)  # the top-level `volumes`

    def project(self, environ: Mapping[str, str]) -> tuple[str, str]:
        """(project name, where it came from), by compose's rule: COMPOSE_PROJECT_NAME (the
        environment, then the env file), the top-level `name:`, else the project directory's
        name, lower-cased and stripped to [a-z0-9_-]."""
        for value, where in (
            (environ.get("COMPOSE_PROJECT_NAME"), "env COMPOSE_PROJECT_NAME"),
            (self.env.get("COMPOSE_PROJECT_NAME"), f"{self.env_file} COMPOSE_PROJECT_NAME"),
            (self.name, self.name_from),
        ):
            if value:
                return value, where
        return normalise_project(self.project_dir.name), f"the name of the project directory {self.project_dir}"

    def database_service(self) -> str | None:
        """Immich's `database`, else the one service that mounts Postgres's data directory,
        else the one that runs a postgres image: first among the services immich-server
        depends on (another app's Postgres in the same files is not Immich's), then among all."""
        if DATABASE_SERVICE in self.services:
            return DATABASE_SERVICE
        server = self.services.get(SERVER_SERVICE)
        deps = server.get("depends_on") if isinstance(server, dict) else None
        deps = [str(d) for d in deps] if isinstance(deps, (list, dict)) else []

        def mounts_pgdata(k: str) -> bool:
            try:
                return self.mount(k, (PGDATA_TARGET,), "") is not None
            except ConfigError:  # a ${VAR:?} in another service's volumes: not ours to refuse
                return False

        def runs_postgres(k: str) -> bool:
            v = self.services.get(k)
            return isinstance(v, dict) and "postgres" in str(v.get("image", "")).lower()

        for among in ([k for k in deps if k in self.services], list(self.services)):
            for test in (mounts_pgdata, runs_postgres):
                found = [k for k in among if test(k)]
                if len(found) == 1:
                    return found[0]
        return None

    def mount(self, service: str | None, targets: tuple[str, ...], project: str) -> Volume | None:
        """The volume of `service` mounted at one of `targets` (the first found), with a named
        volume's source its Docker name."""
        svc = self.services.get(service or "")
        if not isinstance(svc, dict):
            return None
        entries = svc.get("volumes")
        for target in targets:
            for entry in entries if isinstance(entries, list) else []:
                _resolved(entry.get("source") if isinstance(entry, dict) else entry)
                vol = _volume(entry, self.project_dir, f"{self.files[-1].name} services.{service}.volumes")
                if vol is None or vol.target.rstrip("/") != target:
                    continue
                if vol.kind == "volume":
                    vol = Volume("volume", self._volume_name(vol.source, project), vol.target, vol.where)
                return vol
        return None

    def _volume_name(self, key: str, project: str) -> str:
        top = self.volumes.get(key)
        if not isinstance(top, dict):
            return f"{project}_{key}"
        if top.get("name"):
            return str(_resolved(top["name"]))
        external = top.get("external")
        if isinstance(external, dict) and external.get("name"):  # the old form
            return str(external["name"])
        return key if external else f"{project}_{key}"


def normalise_project(name: str) -> str:
    """compose-go's NormalizeProjectName."""
    return re.sub(r"[^a-z0-9_-]", "", name.lower()).lstrip("_-")


def _volume(entry: Any, project_dir: Path, where: str) -> Volume | None:
    if isinstance(entry, dict):  # the long syntax
        kind, source, target = str(entry.get("type", "volume")), entry.get("source") or "", entry.get("target")
        if not target or kind not in ("bind", "volume") or not source or not isinstance(source, str):
            return None
    elif isinstance(entry, str):  # SOURCE:TARGET[:MODE]
        parts = entry.split(":")
        if len(parts) < 2:
            return None  # an anonymous volume
        source, target = parts[0], parts[1]
        if not source:  # an unset variable (`${DB_DATA_LOCATION}:...`): compose refuses it
            return None
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
    else:
        return None
    if kind == "bind":
        source = os.path.normpath(project_dir / os.path.expanduser(source))
    return Volume(kind, source, str(target), where)


def _target(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("target", ""))
    parts = str(entry).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


RESET = object()  # `!reset` (compose 2.24): the key is dropped from what the earlier files said


@dataclass(frozen=True)
class Override:
    """`!override` (compose 2.24): this value replaces the earlier files', unmerged."""

    value: Any


def _plain(node: Any) -> Any:
    """The tree without compose's merge tags (a file's own `!reset` drops the key)."""
    if isinstance(node, Override):
        return _plain(node.value)
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items() if v is not RESET}
    if isinstance(node, list):
        return [_plain(v) for v in node if v is not RESET]
    return None if node is RESET else node


def _merge(base: Any, over: Any, path: tuple[str, ...] = ()) -> Any:
    """compose's merge of a later file into an earlier one: mappings key by key, a service's
    volumes by target (the later wins), other sequences and scalars replaced; `!reset` drops
    a key, `!override` replaces it whole."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if v is RESET:
                out.pop(k, None)
            elif k in base and not isinstance(v, Override):
                out[k] = _merge(base[k], v, (*path, str(k)))
            else:
                out[k] = _plain(v)
        return out
    if isinstance(base, list) and isinstance(over, list) and len(path) == 3 and path[::2] == ("services", "volumes"):
        merged = {_target(e): e for e in base}
        merged.update({_target(e): e for e in _plain(over)})
        return list(merged.values())
    return _plain(over)


def _loader() -> Any:
    """PyYAML's safe loader, knowing compose's `!reset` and `!override` tags (a valid
    override file uses them: refusing it as not YAML would stop every command)."""
    import yaml  # type: ignore[import-untyped,unused-ignore]  # no stubs: Any

    class Loader(yaml.SafeLoader):  # type: ignore[misc,unused-ignore]
        pass

    def override(loader: Any, node: Any) -> Override:
        if isinstance(node, yaml.MappingNode):
            return Override(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return Override(loader.construct_sequence(node, deep=True))
        return Override(loader.construct_scalar(node))

    Loader.add_constructor("!reset", lambda loader, node: RESET)
    Loader.add_constructor("!override", override)
    return Loader


class Unresolved(str):
    """A string whose interpolation compose would refuse (`${VAR:?}` unset here): empty, and
    a ConfigError only when it is used (a volume or name we read). Elsewhere in the files it
    is no concern of ours: the variable may well be set where `docker compose` runs."""

    message: str

    def __new__(cls, message: str) -> Unresolved:
        self = super().__new__(cls, "")
        self.message = message
        return self


def _resolved(value: Any) -> Any:
    if isinstance(value, Unresolved):
        raise ConfigError(value.message)
    return value


def _interpolate_tree(node: Any, lookup: Any, where: str, budget: list[int] | None = None, depth: int = 0) -> Any:
    """The tree with every string interpolated; aliases are expanded as they are walked, so the
    walk is bounded (MAX_NODES, MAX_DEPTH): a YAML bomb or a self-referencing alias is one line."""
    budget = [MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise ConfigError(
            f"{where} is too large or too deeply nested once its aliases are expanded: not a compose file"
        )
    if isinstance(node, str):
        try:
            return interpolate(node, lookup)
        except ValueError as exc:
            return Unresolved(f"{where}: {exc}")
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, lookup, where, budget, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v, lookup, where, budget, depth + 1) for v in node]
    if isinstance(node, Override):
        return Override(_interpolate_tree(node.value, lookup, where, budget, depth + 1))
    return node


def default_files(directory: Path) -> list[Path]:
    """The file docker compose reads in `directory` without -f, and its override file."""
    found = [directory / n for n in DEFAULT_FILES if (directory / n).is_file()][:1]
    if found:
        found += [directory / n for n in OVERRIDE_FILES if (directory / n).is_file()][:1]
    return found


def load_compose(
    immich_dir: Path | None,
    files: tuple[Path, ...],
    env_file: Path | None,
    environ: Mapping[str, str],
) -> Compose | None:
    """The model docker compose would build run in `immich_dir` with `-f` files and
    --env-file; None when there is no compose file. The env file (default: the project
    directory's .env) may itself name the files (COMPOSE_FILE) as compose reads it."""
    import yaml  # type: ignore[import-untyped,unused-ignore]  # no stubs: Any

    env_path = env_file or (immich_dir / ".env" if immich_dir else None)
    env = read_dotenv(env_path, environ) if env_path else {}
    if not files:
        listed = environ.get("COMPOSE_FILE") or env.get("COMPOSE_FILE")
        if listed:
            sep = environ.get("COMPOSE_PATH_SEPARATOR") or env.get("COMPOSE_PATH_SEPARATOR") or os.pathsep
            base = immich_dir or Path.cwd()
            files = tuple(base / os.path.expanduser(p) for p in listed.split(sep) if p)
        elif immich_dir is not None:
            files = tuple(default_files(immich_dir))
    if not files:
        return None
    project_dir = files[0].parent
    if env_file is None and project_dir != immich_dir:
        env_path = project_dir / ".env"
        env = read_dotenv(env_path, environ)
    assert env_path is not None

    def lookup(name: str) -> str | None:
        return environ[name] if name in environ else env.get(name)

    loader = _loader()
    model: dict[str, Any] = {}
    name, name_from = None, ""
    for path in files:
        try:
            if path.stat().st_size > MAX_COMPOSE_FILE:
                raise ConfigError(f"compose file {path} is over {MAX_COMPOSE_FILE // 1024} KiB: not a compose file")
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            raise ConfigError(f"compose_file {path} does not exist: fix --compose-file / COMPOSE_FILE") from None
        except OSError as exc:
            raise ConfigError(f"compose file {path} cannot be read ({exc.strerror}): check its permissions") from None
        try:
            data = yaml.load(text, Loader=loader) or {}  # a SafeLoader, with two tags more
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"compose file {path}{at} is not valid YAML: `docker compose config` shows why") from None
        except RecursionError:  # PyYAML's composer recurses: nesting thousands deep
            raise ConfigError(f"compose file {path} is nested too deeply: not a compose file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"compose file {path} is not a compose file (no mapping at its top)")
        data = _interpolate_tree(data, lookup, f"compose file {path}")
        if _resolved(data.get("name")):
            name, name_from = str(data["name"]), f"{path} name:"
        model = _merge(model, data)
    services = model.get("services") or {}
    volumes = model.get("volumes") or {}
    return Compose(
        files=tuple(files),
        project_dir=project_dir,
        env_file=env_path,
        env=env,
        name=name,
        name_from=name_from,
        services=services if isinstance(services, dict) else {},
        volumes=volumes if isinstance(volumes, dict) else {},
    )
