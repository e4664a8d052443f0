"""The settings, each declared once: a field of Settings made by setting(), which says where
it lives in the config file, how it is parsed, its help, its default and its bounds. Its
environment variable, flag and TOML key follow the convention (IMMICH_STREAM_<NAME>,
--<name-with-dashes>, [section] <name>) unless the declaration spells out the exception:
the original backup script's and Immich's names (IMMICH_DIR, DB_*, S3_*, AWS_*), and the
settings that have no flag. SETTINGS, SPECS, TOML_KEYS and SECTIONS are derived from it.
"""

# setting() returns a dataclasses.field (its metadata holds the declaration), not a shared default:
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from immich_stream.config.parse import (
    DAY,
    MAX_JOBS,
    MAX_MEMORY,
    MAX_RATE,
    MAX_RETRIES,
    MIB,
    parse_bool,
    parse_bucket,
    parse_checksum,
    parse_container,
    parse_duration,
    parse_endpoint,
    parse_exclude,
    parse_external,
    parse_hook_command,
    parse_identity_path,
    parse_int,
    parse_keep_within,
    parse_kms_key_id,
    parse_lock_mode,
    parse_notify_urls,
    parse_path,
    parse_paths,
    parse_percent,
    parse_pg_name,
    parse_ping_url,
    parse_prefix,
    parse_project,
    parse_rate,
    parse_recipients,
    parse_region,
    parse_share,
    parse_size,
    parse_sse,
    parse_stop,
    parse_storage_class,
    parse_thaw_tier,
    parse_webhook_url,
)
from immich_stream.config.repositories import Target, parse_names
from immich_stream.config.tuning import Tuning
from immich_stream.errors import ConfigError

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A setting as the loader, the command line and the messages see it (derived from its
    Settings field)."""

    name: str  # attribute of Settings
    toml: tuple[str, str]  # (section, key) in the config file
    env: tuple[str, ...]  # environment variables, first set wins
    flag: str | None  # the command-line flag (argparse dest == name)
    parse: Callable[[Any], Any]
    help: str
    dotenv: str | None = None  # the variable in Immich's .env that sets it
    low: float | None = None  # the range of a number, size or duration (inclusive)
    high: float | None = None
    default: Any = None  # the Settings field's default


@dataclasses.dataclass(frozen=True)
class _Declared:
    section: str
    parse: Callable[[Any], Any]
    help: str
    key: str | None
    env: tuple[str, ...] | None
    flag: str | bool
    dotenv: str | None
    low: float | None
    high: float | None


_SETTING = "immich_stream.setting"  # the metadata key of a setting's declaration


def setting(
    section: str,
    default: _T,
    parse: Callable[[Any], Any],
    help: str,
    *,
    key: str | None = None,
    env: tuple[str, ...] | None = None,
    flag: str | bool = True,
    dotenv: str | None = None,
    low: float | None = None,
    high: float | None = None,
) -> _T:
    """A Settings field that is a setting, in the config file's [section]. The exceptions to
    the convention: key= (its TOML key is not its name), env= (its variables, first set
    wins, instead of IMMICH_STREAM_<NAME>), flag= (another flag; False: none). dotenv= is
    the variable of Immich's .env that sets it; low/high its inclusive range."""
    declared = _Declared(section, parse, help, key, env, flag, dotenv, low, high)
    return dataclasses.field(default=default, metadata={_SETTING: declared})


@dataclasses.dataclass
class Settings:
    """Every setting's value, resolved by load(). The fields made by setting() are the
    settings, in the order the command line's --help and `immich-stream config` show them;
    the env= exceptions are the original backup script's names (IMMICH_DIR, DB_*, S3_*) and
    the AWS SDK's (AWS_*); key= and flag= where the config file or the command line names
    it otherwise ([immich] dir, [encryption] identity_file, --ping); flag=False: set only
    in the config file or the environment."""

    # [immich]
    immich_dir: Path | None = setting(
        "immich",
        None,
        parse_path,
        "Immich's install directory (holds docker-compose.yml and .env)",
        key="dir",
        env=("IMMICH_DIR",),
    )
    library_dir: Path | None = setting(
        "immich",
        None,
        parse_path,
        "the photo library (Immich's UPLOAD_LOCATION)",
        env=("LIBRARY_DIR",),
        dotenv="UPLOAD_LOCATION",
    )
    postgres_dir: Path | None = setting(
        "immich",
        None,
        parse_path,
        "the Postgres data directory (Immich's DB_DATA_LOCATION)",
        env=("POSTGRES_DIR",),
        dotenv="DB_DATA_LOCATION",
    )
    compose_file: tuple[Path, ...] = setting(
        "immich",
        (),
        parse_paths,
        "Immich's compose files, merged in this order as docker compose -f does (repeatable; default: "
        "COMPOSE_FILE, else IMMICH_DIR's compose.yaml or docker-compose.yml and its override file)",
        env=("COMPOSE_FILE",),
    )
    env_file: Path | None = setting(
        "immich",
        None,
        parse_path,
        "Immich's .env, as docker compose --env-file (default: .env beside the first compose file)",
    )
    project: str = setting(
        "immich",
        "immich",
        parse_project,
        "the Docker Compose project name (default: COMPOSE_PROJECT_NAME in the .env, the compose files' name:, "
        "else the compose project directory's name; immich without compose files)",
        env=("COMPOSE_PROJECT_NAME",),
    )
    db_container: str = setting(
        "immich",
        "immich_postgres",
        parse_container,
        "the database container (default: the project's container of the compose service that runs Postgres, "
        "found by its compose labels, else immich_postgres)",
        env=("DB_CONTAINER",),
    )
    db_user: str = setting(
        "immich",
        "postgres",
        parse_pg_name,
        "the database user for pg_dump and psql",
        env=("DB_USER",),
        dotenv="DB_USERNAME",
    )
    db_name: str = setting(
        "immich",
        "immich",
        parse_pg_name,
        "the database name",
        env=("DB_NAME",),
        dotenv="DB_DATABASE_NAME",
    )

    # [s3]
    bucket: str | None = setting(
        "s3",
        None,
        parse_bucket,
        "the S3 bucket",
        env=("S3_BUCKET",),
    )
    prefix: str = setting(
        "s3",
        "immich-backup",
        parse_prefix,
        "the key prefix of the repository in the bucket",
        env=("S3_PREFIX",),
    )
    endpoint_url: str | None = setting(
        "s3",
        None,
        parse_endpoint,
        "an S3-compatible server's URL (default: AWS)",
        env=("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
    )
    region: str | None = setting(
        "s3",
        None,
        parse_region,
        "the S3 region",
        env=("S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    )
    path_style: bool = setting(
        "s3",
        False,
        parse_bool,
        "path-style addressing (most self-hosted S3 servers want it)",
        env=("S3_PATH_STYLE",),
    )
    verify_tls: bool = setting(
        "s3",
        True,
        parse_bool,
        "verify the S3 server's TLS certificate",
        env=("S3_VERIFY_TLS",),
        flag=False,
    )
    ca_bundle: Path | None = setting(
        "s3",
        None,
        parse_path,
        "a CA bundle for the S3 server's certificate",
        env=("S3_CA_BUNDLE", "AWS_CA_BUNDLE"),
        flag=False,
    )
    checksum: str = setting(
        "s3",
        "md5",
        parse_checksum,
        "the integrity check every upload carries, which the server verifies: md5 (Content-MD5, every server), "
        "sha256 or crc32c (x-amz-checksum-*: AWS, MinIO, SeaweedFS; not rclone serve s3)",
    )
    storage_class: str | None = setting(
        "s3",
        None,
        parse_storage_class,
        "S3 storage class of file data (library and postgres objects), e.g. STANDARD_IA, GLACIER_IR, "
        "DEEP_ARCHIVE; manifests, snapshot.json, the dump and locks are always STANDARD",
    )
    storage_class_library: str | None = setting(
        "s3",
        None,
        parse_storage_class,
        "storage class of the library's objects (default: --storage-class)",
    )
    storage_class_postgres: str | None = setting(
        "s3",
        None,
        parse_storage_class,
        "storage class of the Postgres data directory's objects (default: --storage-class)",
    )
    thaw_days: int = setting(
        "s3",
        7,
        parse_int,
        "restore, drill, verify --read-data: how many days a thawed copy of a GLACIER/DEEP_ARCHIVE object stays",
        low=1,
        high=30,
    )
    thaw_tier: str = setting(
        "s3",
        "Standard",
        parse_thaw_tier,
        "the thaw's speed and price: Standard (3-5 h; DEEP_ARCHIVE 12 h), Bulk (cheapest, 5-12 h; 48 h), "
        "Expedited (1-5 min, GLACIER only)",
    )
    thaw_poll: float = setting(
        "s3",
        300.0,
        parse_duration,
        "how often a waiting restore asks whether archived objects are thawed",
        flag=False,
        low=60,
        high=DAY,
    )
    sse: str | None = setting(
        "s3",
        None,
        parse_sse,
        "server-side encryption of every object written: AES256 (SSE-S3) or aws:kms (SSE-KMS)",
    )
    sse_kms_key_id: str | None = setting(
        "s3",
        None,
        parse_kms_key_id,
        "with --sse aws:kms: the KMS key (id, alias or ARN; default: the account's aws/s3 key)",
    )
    sse_c_key_file: Path | None = setting(
        "s3",
        None,
        parse_path,
        "SSE-C: a file of exactly 32 random bytes (mode 600) that every request for an object's bytes carries; "
        "losing it loses the backup",
    )
    lock_days: int = setting(
        "s3",
        0,
        parse_int,
        "S3 Object Lock: every object of a snapshot is kept from deletion for at least this many days after "
        "its commit (the bucket needs versioning and Object Lock; 0: off)",
        low=0,
        high=36500,
    )
    lock_mode: str = setting(
        "s3",
        "governance",
        parse_lock_mode,
        "with --lock-days: governance (a key with s3:BypassGovernanceRetention may still delete) or "
        "compliance (nobody can, not even the account's root, until the retention ends)",
    )
    limit_upload: float = setting(
        "s3",
        0.0,
        parse_rate,
        "upload at most this many MiB/s, all requests together, paced evenly (e.g. 2.5; 0: no limit)",
        low=0,
        high=MAX_RATE,
    )
    limit_download: float = setting(
        "s3",
        0.0,
        parse_rate,
        "download at most this many MiB/s, all requests together, paced evenly (0: no limit)",
        low=0,
        high=MAX_RATE,
    )

    # [backup]
    exclude: tuple[str, ...] = setting(
        "backup",
        (),
        parse_exclude,
        "leave out Immich's regenerable folders: thumbs, encoded-video, and backups, its own database dumps "
        "(repeatable or a comma list; their .immich markers are kept, Immich regenerates the files after a restore)",
    )
    stop: str = setting(
        "backup",
        "all",
        parse_stop,
        "what to stop: all (cold copy of the DB directory), app (keep the DB up), none",
    )
    external: str = setting(
        "backup",
        "include",
        parse_external,
        "Immich's external libraries (import paths mounted into immich_server): include (back each up as a "
        "root external:NAME; a missing or empty one refuses the backup), warn (leave them out, warn), skip",
    )
    live_pass: bool = setting(
        "backup",
        True,
        parse_bool,
        "upload new and changed files while Immich runs, then stop it only for a pass that re-reads what "
        "changed since (--no-live-pass: one pass, the whole upload with the stack stopped)",
    )
    append_only: bool = setting(
        "backup",
        False,
        parse_bool,
        "the S3 key cannot delete: send no delete at all (probes, released locks and journals are left for "
        "`prune` run elsewhere with a key that can); detected by itself at the first refused delete",
    )
    jobs: int = setting(
        "backup",
        8,
        parse_int,
        "concurrent S3 requests (small files: up to 4x as many; the memory budget bounds them all)",
        low=1,
        high=MAX_JOBS,
    )
    part_size: int = setting(
        "backup",
        8 * MIB,
        parse_size,
        "multipart part size (grown automatically to stay under 10,000 parts)",
    )
    max_memory: int = setting(
        "backup",
        64 * MIB,
        parse_size,
        "budget for file and part buffers in flight",
        high=MAX_MEMORY,
    )
    lock_wait: float = setting(
        "backup",
        300.0,
        parse_duration,
        "how long backup and prune wait for a run holding the repository lock (e.g. 90s, 5m)",
        low=0,
        high=DAY,
    )
    stall_timeout: float = setting(
        "backup",
        600.0,
        parse_duration,
        "fail a backup when nothing has moved for this long (a hung connection must not keep Immich down)",
        flag=False,
        low=30,
        high=DAY,
    )

    # [prune]
    keep_last: int = setting(
        "prune",
        0,
        parse_int,
        "keep the newest N snapshots",
        low=0,
    )
    keep_hourly: int = setting(
        "prune",
        0,
        parse_int,
        "keep the newest snapshot of each of the last N hours that have one",
        low=0,
    )
    keep_daily: int = setting(
        "prune",
        0,
        parse_int,
        "... of each of the last N days (UTC)",
        low=0,
    )
    keep_weekly: int = setting(
        "prune",
        0,
        parse_int,
        "... of each of the last N ISO weeks",
        low=0,
    )
    keep_monthly: int = setting(
        "prune",
        0,
        parse_int,
        "... of each of the last N months",
        low=0,
    )
    keep_yearly: int = setting(
        "prune",
        0,
        parse_int,
        "... of each of the last N years",
        low=0,
    )
    keep_within: str | None = setting(
        "prune",
        None,
        parse_keep_within,
        "keep every snapshot within this long before the newest (restic's 1y2m3d4h: m is months)",
    )
    max_unused: float = setting(
        "prune",
        0.05,
        parse_share,
        "repack packs until at most this share of the pack bytes is unneeded by kept snapshots "
        "(restic's --max-unused: 0% repacks every partly used pack, 100% none)",
    )
    stale_after: float = setting(
        "prune",
        86400.0,
        parse_duration,
        "prune removes incomplete snapshots and unfinished uploads older than this",
        low=3600,
        high=365 * DAY,
    )

    # [s3]
    retries: int = setting(
        "s3",
        6,
        parse_int,
        "attempts per S3 request on transient errors",
        flag=False,
        low=1,
        high=MAX_RETRIES,
    )
    read_timeout: float = setting(
        "s3",
        120.0,
        parse_duration,
        "how long one S3 request may wait for the server's answer before it is retried",
        flag=False,
        low=5,
        high=3600,
    )

    # [backup]
    max_shrink: float = setting(
        "backup",
        0.5,
        parse_percent,
        "refuse a backup whose library lost more than this share of its files or bytes since the last snapshot "
        "(an unmounted disk must not become the newest snapshot); --allow-shrink overrides once",
    )
    max_downtime: float | None = setting(
        "backup",
        None,
        parse_duration,
        "start the stack again and fail the run when Immich has been down this long (default: no limit)",
        low=10,
        high=7 * DAY,
    )

    copy_to: tuple[str, ...] = setting(
        "backup",
        (),
        parse_names,
        "after a committed snapshot (and the stack started again), copy it to these named repositories "
        "([repositories.NAME]; repeatable or a comma list): the second copy of 3-2-1",
    )

    # [monitor]
    ping_url: str | None = setting(
        "monitor",
        None,
        parse_ping_url,
        "ping this URL when a backup starts and ends (healthchecks.io; an Uptime Kuma push URL; "
        "ntfy+https://host/topic); from the config file or the environment only backup pings",
        flag="--ping",
    )
    metrics_file: Path | None = setting(
        "monitor",
        None,
        parse_path,
        "write Prometheus metrics here at the end (node_exporter's textfile collector); from the "
        "config file or the environment only backup writes it",
    )
    notify: tuple[str, ...] = setting(
        "monitor",
        (),
        parse_notify_urls,
        "send the start, the end and the log's last lines to these Apprise URLs (json://, discord://, "
        "mailtos://, ... ; repeatable; pip install 'immich-stream[notify]'); from the config file or the "
        "environment only backup notifies",
    )
    webhook: str | None = setting(
        "monitor",
        None,
        parse_webhook_url,
        "POST the run's JSON summary (the --json document) to this URL at the end",
    )
    on_success: str | None = setting(
        "monitor",
        None,
        parse_hook_command,
        "run this command after a run that exits 0 (no shell: words split as a shell would; the JSON "
        "summary on its stdin)",
    )
    on_failure: str | None = setting(
        "monitor",
        None,
        parse_hook_command,
        "run this command after a run that exits non-zero (no shell; the JSON summary on its stdin)",
    )
    hook_timeout: float = setting(
        "monitor",
        300.0,
        parse_duration,
        "kill an --on-success/--on-failure command still running after this long",
        low=1,
        high=DAY,
    )
    notify_timeout: float = setting(
        "monitor",
        30.0,
        parse_duration,
        "how long the end of a run waits for --notify and --webhook receivers before it gives up on them",
        flag=False,
        low=1,
        high=600,
    )

    # [encryption]
    age_identity: Path | None = setting(
        "encryption",
        None,
        parse_identity_path,
        "encrypt the repository with age: an identity file from age-keygen (mode 0600); chosen when the "
        "repository is created, then needed by every command",
        key="identity_file",
    )
    age_recipients: tuple[str, ...] = setting(
        "encryption",
        (),
        parse_recipients,
        "more age public keys (age1...) every object is also encrypted to, e.g. an offline recovery key",
        key="recipients",
        flag=False,
    )

    # where each value came from: "default", "config file PATH", ".env", "env VAR", "flag --x"
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    tuning: Tuning = dataclasses.field(default_factory=Tuning)
    # restore/snapshots/verify --as-of: read the bucket as it was then (s3/asof.py); not a setting
    as_of: dt.datetime | None = None
    config_file: Path | None = None
    # [repositories.NAME] of the config file (config/repositories.py); with --repo NAME, the
    # named one's credentials (never shown: repr=False) and its name
    repositories: dict[str, Target] = dataclasses.field(default_factory=dict)
    credentials: tuple[str, str] | None = dataclasses.field(default=None, repr=False)
    repository_name: str | None = None
    # from the compose files (config/compose.py): the database's compose service, whose
    # container host/stack.py finds by its labels; DB_DATA_LOCATION as a named volume (its
    # Docker name: its mountpoint is asked of Docker before a cold copy)
    db_service: str | None = None
    postgres_volume: str | None = None

    def require(self, *names: str) -> None:
        """Raise ConfigError for the first of `names` that is unset."""
        for name in names:
            if getattr(self, name) is None:
                spec = SPECS[name]
                ways = [f"{e}=..." for e in spec.env[:1]]
                if spec.flag:
                    ways.append(f"{spec.flag} ...")
                ways.append(f"[{spec.toml[0]}] {spec.toml[1]} in the config file")
                if spec.dotenv:
                    ways.append(f"{spec.dotenv} in IMMICH_DIR/.env")
                raise ConfigError(f"{name} is not set ({spec.help}): set {' or '.join(ways)}")

    def require_dir(self, name: str) -> Path:
        self.require(name)
        path: Path = getattr(self, name)
        where = self.sources.get(name, "default")
        if not path.is_dir():
            what = "does not exist" if not path.exists() else "is not a directory"
            raise ConfigError(f"{name} {path} (from {where}) {what}: check the path or set {SPECS[name].env[0]}")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(f"{name} {path} (from {where}) is not readable: run as a user that can read it (root)")
        return path

    def check_dirs(self) -> None:
        """Every directory that is set must exist and be readable (config, backup)."""
        for name in ("immich_dir", "library_dir", "postgres_dir"):
            if getattr(self, name) is not None:
                self.require_dir(name)


def _spec(field: dataclasses.Field[Any]) -> Spec:
    d: _Declared = field.metadata[_SETTING]
    name = field.name
    flag = f"--{name.replace('_', '-')}" if d.flag is True else (d.flag if isinstance(d.flag, str) else None)
    return Spec(
        name=name,
        toml=(d.section, d.key or name),
        env=d.env or (f"IMMICH_STREAM_{name.upper()}",),
        flag=flag,
        parse=d.parse,
        help=d.help,
        dotenv=d.dotenv,
        low=d.low,
        high=d.high,
        default=field.default,
    )


SETTINGS: tuple[Spec, ...] = tuple(_spec(f) for f in dataclasses.fields(Settings) if _SETTING in f.metadata)
SPECS = {s.name: s for s in SETTINGS}
TOML_KEYS: dict[tuple[str, str], Spec] = {s.toml: s for s in SETTINGS}
SECTIONS = tuple(dict.fromkeys(s.toml[0] for s in SETTINGS))
