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

from immich_stream.config.immich import compose_project_name, read_dotenv
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

    # IMMICH_DIR must be known before its .env can be read; environment and flags
    # then override whatever .env says.
    from_env()
    from_flags()
    dotenv_names: set[str] = set()
    if "immich_dir" in raw:
        immich_dir = _parse("immich_dir", *raw["immich_dir"])
        dotenv = read_dotenv(immich_dir / ".env", environ)
        file_values = {n: v for n, v in raw.items() if v[1].startswith("config file")}
        for spec in SETTINGS:
            if spec.dotenv and dotenv.get(spec.dotenv):
                higher = spec.name in raw and spec.name not in file_values
                if not higher:
                    raw[spec.name] = (dotenv[spec.dotenv], f"{immich_dir / '.env'} {spec.dotenv}", immich_dir)
                    dotenv_names.add(spec.name)
        if "project" not in raw:
            name = compose_project_name(immich_dir)
            if name:
                raw["project"] = (name, f"{immich_dir}/docker-compose.yml name:", None)

    short = environ.get(SHORT_DURATIONS_ENV, "") not in ("", "0")
    settings = Settings(config_file=config_file, repositories=repositories)
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
