"""load(): every setting resolved from its sources, defaults < config file < Immich's .env <
environment < command-line flags, each value remembering where it came from (so
`immich-stream config` can say so); then checked as a whole, before anything is stopped.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import tomllib
import urllib.parse
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from immich_stream.config.compose import (
    PGDATA_TARGET,
    SERVER_SERVICE,
    UPLOAD_TARGETS,
    Compose,
    load_compose,
)
from immich_stream.config.immich import read_dotenv
from immich_stream.config.keys import read_age_keys, read_sse_c_key
from immich_stream.config.parse import (
    MAX_PART_SIZE,
    RELAXED_FLOOR,
    SHORT_DURATIONS_ENV,
    format_duration,
    format_size,
    parse_duration,
    parse_exclude,
    parse_percent,
    parse_rate,
    parse_size,
)
from immich_stream.config.repositories import credentials, parse_names, parse_repositories, target
from immich_stream.config.settings import SECTIONS, SETTINGS, SPECS, TOML_KEYS, Settings, Spec
from immich_stream.config.tuning import Tuning, min_part_size
from immich_stream.errors import ConfigError

log = logging.getLogger("immich_stream.config")

# The original backup script's variables that no longer mean anything: nothing is staged
# on local disk, and snapshot ids are generated.
OBSOLETE_ENV = {
    "LOCAL_BACKUP_DIR": "nothing is staged on local disk any more",
    "BACKUP_DATE": "snapshot ids are generated from the time of the run",
}


def _check_section(path: Path, section: str, table: Any) -> dict[str, Any]:
    """The [section]'s table, or a ConfigError naming the unknown section or key and the
    nearest valid one: a typo (kep_daily) must not silently leave the default in force."""
    import difflib

    if not isinstance(table, dict):
        home = [s.toml[0] for s in SETTINGS if s.toml[1] == section]
        where = f"put it under [{home[0]}]" if home else f"move it under one of [{'], ['.join(SECTIONS)}]"
        raise ConfigError(f"config file {path}: {section} is outside any [section]: {where}")
    if section not in SECTIONS:
        near = difflib.get_close_matches(section, SECTIONS, n=1)
        hint = f"did you mean [{near[0]}]? " if near else ""
        raise ConfigError(
            f"config file {path}: unknown section [{section}]: {hint}the sections are [{'], ['.join(SECTIONS)}]"
        )
    keys = [k for (sec, k) in TOML_KEYS if sec == section]
    for key in table:
        if key in keys:
            continue
        elsewhere = [sec for (sec, k) in TOML_KEYS if k == key]
        if elsewhere:
            raise ConfigError(f"config file {path}: {key} belongs in [{elsewhere[0]}], not [{section}]: move it there")
        near = difflib.get_close_matches(key, keys, n=1)
        other = [] if near else difflib.get_close_matches(key, [k for (_, k) in TOML_KEYS], n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        if other:
            hint = f"did you mean {other[0]} (in [{next(sec for (sec, k) in TOML_KEYS if k == other[0])}])? "
        raise ConfigError(
            f"config file {path}: unknown key {key!r} in [{section}]: {hint}the README's Configuration section "
            "lists every key"
        )
    return table


ENCRYPTION_CHUNK = 64 * 1024  # age's chunk: an encrypted part's first chunk waits for the next part


def default_config_paths(environ: Mapping[str, str]) -> list[Path]:
    xdg = environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return [Path(xdg) / "immich-stream" / "config.toml", Path("/etc/immich-stream/config.toml")]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: fix --config / IMMICH_STREAM_CONFIG") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror}): check its permissions") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}; fix that line") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None


def load(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | None = None,
    missing_ok: bool = False,
) -> Settings:
    """Resolve every setting from all sources. Raises ConfigError with a one-line message.
    missing_ok: a config file named (--config, IMMICH_STREAM_CONFIG) that does not exist yet
    is no error: `init` writes it (settings.config_file names it)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    raw: dict[str, tuple[Any, str, Path | None]] = {}  # name -> (value, source, base dir for relative paths)

    for var, why in OBSOLETE_ENV.items():
        if var in environ:
            log.info("%s is set but no longer used: %s", var, why)

    explicit = config_path or environ.get("IMMICH_STREAM_CONFIG")
    config_file: Path | None = None
    data: dict[str, Any] = {}
    if explicit:
        config_file = Path(os.path.expanduser(explicit))
        if not (missing_ok and not config_file.exists()):
            data = _read_toml(config_file)
    else:
        for candidate in default_config_paths(environ):
            if candidate.is_file():
                config_file = candidate
                data = _read_toml(candidate)
                break

    repositories = {}
    if "repositories" in data:
        assert config_file is not None
        repositories = parse_repositories(config_file, data.pop("repositories"))
    for section, table in data.items():
        assert config_file is not None
        for key, value in _check_section(config_file, section, table).items():
            spec = TOML_KEYS[(section, key)]
            raw[spec.name] = (value, f"config file {config_file}", config_file.parent)

    def from_env() -> None:
        for spec in SETTINGS:
            for var in spec.env:
                if environ.get(var, "") != "":
                    raw[spec.name] = (environ[var], f"env {var}", None)
                    break

    def from_flags() -> None:
        for spec in SETTINGS:
            if spec.name in flags:
                raw[spec.name] = (flags[spec.name], f"flag {spec.flag}", None)

    # IMMICH_DIR and the compose files must be known before the .env can be read;
    # environment and flags then override whatever .env and the compose files say.
    from_env()
    from_flags()
    compose = _compose_model(raw, environ)
    settings = Settings(config_file=config_file, repositories=repositories)
    if compose is not None:
        _from_compose(compose, raw, settings, environ)

    short = environ.get(SHORT_DURATIONS_ENV, "") not in ("", "0")
    for spec in SETTINGS:
        if spec.name in raw:
            value = _parse(spec.name, *raw[spec.name], short_durations=short)
            setattr(settings, spec.name, value)
            settings.sources[spec.name] = raw[spec.name][1]
        else:
            settings.sources[spec.name] = "default"
    settings.tuning = Tuning.from_env(environ)
    _validate(settings, environ)
    return settings


def _compose_model(raw: dict[str, tuple[Any, str, Path | None]], environ: Mapping[str, str]) -> Compose | None:
    """The compose model of IMMICH_DIR (or of --compose-file / COMPOSE_FILE), None without
    compose files; COMPOSE_FILE is split as compose splits it (COMPOSE_PATH_SEPARATOR)."""
    immich_dir = _parse("immich_dir", *raw["immich_dir"]) if "immich_dir" in raw else None
    files: tuple[Path, ...] = ()
    if "compose_file" in raw:
        value, source, base = raw["compose_file"]
        if source == "env COMPOSE_FILE":
            sep = environ.get("COMPOSE_PATH_SEPARATOR") or os.pathsep
            value, base = [p for p in str(value).split(sep) if p], immich_dir
        files = tuple((base or Path.cwd()) / p for p in _parse("compose_file", value, source, base))
    env_file = _parse("env_file", *raw["env_file"]) if "env_file" in raw else None
    if immich_dir is None and not files:
        return None
    compose = load_compose(immich_dir, files, env_file, environ)
    if compose is not None and compose.files:  # as found: absolute, split
        where = raw["compose_file"][1] if "compose_file" in raw else f"the default names in {compose.project_dir}"
        raw["compose_file"] = (compose.files, where, None)
        if env_file is None and compose.env_file.is_file():  # shown by `config`, recorded in snapshots
            raw["env_file"] = (str(compose.env_file), f"the .env of {compose.project_dir}", None)
    if compose is None and immich_dir is not None:  # no compose file: IMMICH_DIR's .env alone
        env_path = env_file or immich_dir / ".env"
        return Compose(files=(), project_dir=immich_dir, env_file=env_path, env=read_dotenv(env_path, environ))
    return compose


def _from_compose(
    compose: Compose, raw: dict[str, tuple[Any, str, Path | None]], settings: Settings, environ: Mapping[str, str]
) -> None:
    """The settings the env file and the compose files give, below the environment and the
    flags (a config file's value gives way to them, as to Immich's .env): the .env's DB_*,
    the project name, and UPLOAD_LOCATION and DB_DATA_LOCATION as the volumes of the
    immich-server and database services really mount them (a variable's default included)."""
    weak = {n for n, v in raw.items() if v[1].startswith("config file")}

    def give(name: str, value: Any, source: str, base: Path | None) -> bool:
        if name in raw and name not in weak:
            return False
        raw[name] = (value, source, base)
        weak.add(name)  # the compose files' volumes say better where the .env's paths go
        return True

    for spec in SETTINGS:
        if spec.dotenv and compose.env.get(spec.dotenv):
            give(spec.name, compose.env[spec.dotenv], f"{compose.env_file} {spec.dotenv}", compose.project_dir)
    if not compose.files:
        return
    if "project" not in raw:
        name, where = compose.project(environ)
        raw["project"] = (name, where, None)
    project = _parse("project", *raw["project"])
    upload = compose.mount(SERVER_SERVICE, UPLOAD_TARGETS, project)
    if upload is not None and upload.kind == "bind":
        give("library_dir", upload.source, upload.where, None)
    elif upload is not None and "library_dir" in raw and raw["library_dir"][1].startswith(str(compose.env_file)):
        # UPLOAD_LOCATION=library (no ./) is a named volume to compose: the directory of that
        # name beside the compose file is not Immich's library, and must not be backed up as it
        raw.pop("library_dir")
    settings.db_service = compose.database_service()
    pgdata = compose.mount(settings.db_service, (PGDATA_TARGET,), project)
    if pgdata is not None and pgdata.kind == "bind":
        give("postgres_dir", pgdata.source, pgdata.where, None)
    elif pgdata is not None and ("postgres_dir" not in raw or raw["postgres_dir"][1].startswith(str(compose.env_file))):
        raw.pop("postgres_dir", None)  # DB_DATA_LOCATION names the volume, not a directory
        settings.postgres_volume = pgdata.source


def _shown(spec: Spec, value: float) -> str:
    if spec.parse is parse_size:
        return format_size(value)
    if spec.parse is parse_duration:
        return format_duration(value)
    if spec.parse is parse_rate:
        return f"{value:g} MiB/s"
    return str(value)


def _parse(name: str, value: Any, source: str, base: Path | None, short_durations: bool = False) -> Any:
    spec = SPECS[name]
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{name} from {source} is empty: give a value, or remove it to get the default")
    try:
        parsed = spec.parse(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{name} from {source} is invalid: {exc}") from None
    low, high = spec.low, spec.high
    if short_durations and spec.parse is parse_duration and low is not None:
        low = min(low, RELAXED_FLOOR)
    if (low is not None and parsed < low) or (high is not None and parsed > high):
        if high is None:
            allowed = f"{_shown(spec, low)} or more"  # type: ignore[arg-type]
        elif low is None:
            allowed = f"at most {_shown(spec, high)}"
        else:
            allowed = f"{_shown(spec, low)} to {_shown(spec, high)}"
        raise ConfigError(f"{name} {_shown(spec, parsed)} (from {source}) is out of range: choose {allowed}")
    if isinstance(parsed, Path) and not parsed.is_absolute():
        parsed = (base or Path.cwd()) / parsed
    return parsed


def _validate(s: Settings, environ: Mapping[str, str]) -> None:
    floor = min_part_size(environ)
    if not floor <= s.part_size <= MAX_PART_SIZE:
        raise ConfigError(
            f"part_size {format_size(s.part_size)} (from {s.sources['part_size']}) is out of range: choose "
            f"{format_size(floor)} (S3's smallest part) to {format_size(MAX_PART_SIZE)} (parts are held in memory)"
        )
    if s.max_memory < 2 * s.part_size:
        raise ConfigError(
            f"max_memory {format_size(s.max_memory)} must hold at least two parts of {format_size(s.part_size)}: "
            "raise --max-memory or lower --part-size"
        )
    if s.age_identity is not None and s.part_size < floor + ENCRYPTION_CHUNK:
        raise ConfigError(
            f"part_size {format_size(s.part_size)} is too small with encryption: an encrypted part is up to "
            f"64 KiB shorter than its plaintext; choose at least {format_size(floor + ENCRYPTION_CHUNK)}"
        )
    if s.age_identity is not None or s.age_recipients:  # a missing or open key: before anything starts
        read_age_keys(s.age_identity, s.age_recipients)
    if s.checksum == "crc32c" and importlib.util.find_spec("crc32c") is None:
        raise ConfigError(
            f"checksum crc32c (from {s.sources['checksum']}) needs the crc32c package: "
            "pip install 'immich-stream[crc32c]', or choose md5 or sha256"
        )
    if s.ca_bundle is not None and not s.ca_bundle.is_file():
        raise ConfigError(f"ca_bundle {s.ca_bundle} (from {s.sources['ca_bundle']}) is not a file: fix the path")
    if s.immich_dir is not None:
        s.require_dir("immich_dir")
    if s.env_file is not None and not s.env_file.is_file():  # compose refuses a missing --env-file too
        raise ConfigError(f"env_file {s.env_file} (from {s.sources['env_file']}) is not a file: fix the path")
    if s.sse_kms_key_id is not None and s.sse != "aws:kms":
        raise ConfigError(
            f"sse_kms_key_id (from {s.sources['sse_kms_key_id']}) needs --sse aws:kms: add it, or drop the key id"
        )
    if s.sse_c_key_file is not None:
        if s.sse is not None:
            raise ConfigError(
                f"sse {s.sse} (from {s.sources['sse']}) and sse_c_key_file (from {s.sources['sse_c_key_file']}) "
                "exclude each other: choose SSE-S3/KMS or SSE-C"
            )
        read_sse_c_key(s.sse_c_key_file, s.sources["sse_c_key_file"])
    for name in s.copy_to:  # a typo must not be found after the night's backup
        credentials(target(s, name, "copy_to"), environ)  # only one of its two variables set
    if s.metrics_file is not None:  # found out at the end of a night's backup would be too late
        where = s.sources["metrics_file"]
        if s.metrics_file.is_dir():
            raise ConfigError(
                f"metrics_file {s.metrics_file} (from {where}) is a directory: give a file name ending in .prom"
            )
        if not s.metrics_file.parent.is_dir():
            raise ConfigError(
                f"metrics_file {s.metrics_file} (from {where}): directory {s.metrics_file.parent} does not "
                "exist: create it (node_exporter's --collector.textfile.directory) or fix the path"
            )


def validate_notifiers(s: Settings, names: Collection[str]) -> None:
    """--notify needs Apprise and URLs it knows; a hook's program must exist: found out at
    the end of a night's backup would be too late. No message echoes a URL (a credential).
    Only `names`, those the command will use (cli.py): a restore on a new machine must not
    refuse over the nightly backup's hook or a missing Apprise."""
    if s.notify and "notify" in names:
        from immich_stream.config.notify import unknown_apprise_urls

        where = s.sources["notify"]
        bad = unknown_apprise_urls(s.notify)
        if bad is None:
            raise ConfigError(f"notify (from {where}) needs the apprise package: pip install 'immich-stream[notify]'")
        if bad:
            n, scheme = bad[0]
            raise ConfigError(
                f"notify URL {n} ({scheme}://..., from {where}) is not a URL Apprise can send to: check it "
                "against https://github.com/caronc/apprise/wiki"
            )
    for name in ("on_success", "on_failure"):
        text = getattr(s, name)
        if text is None or name not in names:
            continue
        program = shlex.split(text)[0]
        found = shutil.which(program)
        if found is None:
            what = "is not an executable file" if "/" in program else "is not found on PATH"
            raise ConfigError(f"{name} (from {s.sources[name]}): {program!r} {what}: give the program's full path")


def storage_class_for(s: Settings, root: str) -> str | None:
    """The storage class of a root's file objects: its own setting, else --storage-class."""
    own: str | None = getattr(s, f"storage_class_{root}", None)
    return own or s.storage_class


def describe(s: Settings) -> list[tuple[str, str, str]]:
    """(setting, value, source) rows for `immich-stream config`; nothing secret is in Settings."""
    rows = []
    for spec in SETTINGS:
        value = getattr(s, spec.name)
        if value is None:
            shown = "(not set)"
        elif spec.name == "notify":  # each a credential: its scheme only
            shown = ", ".join(f"{u.split(':', 1)[0]}://..." for u in value) + " (hidden)" if value else "(nothing)"
        elif spec.name == "webhook":
            shown = f"{value[: value.index(':')]}://{urllib.parse.urlsplit(value).hostname}/... (hidden)"
        elif spec.name == "ping_url":  # whoever holds it can ping: show where it goes only
            url = urllib.parse.urlsplit(value.removeprefix("ntfy+"))
            shown = f"{value[: value.index(':')]}://{url.hostname}/... (hidden)"
        elif spec.name in ("part_size", "max_memory"):
            shown = format_size(value)
        elif spec.parse is parse_duration:
            shown = f"{value:g} s"
        elif spec.parse is parse_percent:
            shown = f"{value * 100:g}%"
        elif spec.parse is parse_rate:
            shown = f"{value:g} MiB/s" if value else "no limit"
        elif spec.parse is parse_exclude or spec.parse is parse_names:
            shown = ", ".join(value) if value else "(nothing)"
        else:
            shown = str(value)
        rows.append((spec.name, shown, s.sources.get(spec.name, "default")))
    return rows
