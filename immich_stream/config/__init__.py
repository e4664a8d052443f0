"""Settings: defaults < config file < Immich's .env < environment < command-line flags.

Each setting is declared once in SETTINGS (where it lives in the TOML file, which
environment variables and flag set it, how to parse it); `load()` resolves them all and
remembers where each value came from, so `immich-stream config` can say so.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import ipaddress
import logging
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from immich_stream.errors import ConfigError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# S3 refuses parts under 5 MiB (but the last). Servers that accept smaller parts can be
# tested with smaller ones through IMMICH_STREAM_MIN_PART_SIZE.
S3_MIN_PART_SIZE = 5 * MIB

STOP_MODES = ("all", "app", "none")
# Immich's folders that Immich regenerates from the originals (its admin UI's jobs): --exclude
EXCLUDABLE = ("thumbs", "encoded-video")
MAX_RATE = 100_000.0  # MiB/s: more is a unit mistake (--limit-* take MiB/s, not bytes)
CHECKSUMS = ("md5", "sha256", "crc32c")
# S3's storage classes (x-amz-storage-class). GLACIER and DEEP_ARCHIVE objects must be thawed
# (RestoreObject) before they can be read; GLACIER_IR is read like STANDARD_IA.
STORAGE_CLASSES = (
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "GLACIER",
    "DEEP_ARCHIVE",
    "REDUCED_REDUNDANCY",
    "EXPRESS_ONEZONE",
    "SNOW",
    "OUTPOSTS",
)
THAW_TIERS = ("Standard", "Bulk", "Expedited")
SSE_MODES = ("AES256", "aws:kms")
SSE_C_KEY_BYTES = 32

# Bounds of the numeric settings: outside them a value is a typo or a unit mistake, and
# one noticed only after the stack was stopped costs downtime.
MAX_JOBS = 256
MAX_RETRIES = 20
MAX_PART_SIZE = 1024 * MIB  # parts are buffered in memory; files needing more grow it themselves
MAX_MEMORY = 8 * 1024 * MIB
DAY = 86400.0
# Tests of the stall watchdog and of prune's garbage need durations of seconds.
SHORT_DURATIONS_ENV = "IMMICH_STREAM_TEST_SHORT_DURATIONS"
TRUST_BUCKET_ENV = "IMMICH_STREAM_TRUST_BUCKET"  # the user says the bucket is trusted (repository/auth.py)
RELAXED_FLOOR = 1.0

# The original backup script's variables that no longer mean anything: nothing is staged
# on local disk, and snapshot ids are generated.
OBSOLETE_ENV = {
    "LOCAL_BACKUP_DIR": "nothing is staged on local disk any more",
    "BACKUP_DATE": "snapshot ids are generated from the time of the run",
}


def _text(value: Any, what: str) -> str:
    """A value that must be text: a TOML number, boolean or list is a mistake here."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not {what} (write it as a quoted string)")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{value!r} contains a control character")
    return value


def parse_size(text: str | int) -> int:
    """'8MiB', '64M', '1GiB', '1048576' -> bytes (binary units; K/M/G mean KiB/MiB/GiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not a size (try 8MiB, 512KiB or a number of bytes)")
    return int(m.group(1)) << (10 * "_KMGT".index(m.group(2).upper() or "_"))


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length and seconds % length == 0:
            return f"{seconds / length:g}{unit}"
    return f"{seconds:g}s"


def parse_bool(text: str | bool) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case); a TOML boolean. Nothing else: a
    number in the config file is more likely a count written under the wrong key."""
    if isinstance(text, bool):
        return text
    low = text.strip().lower() if isinstance(text, str) else None
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false (write true/false, yes/no, on/off or 1/0)")


def parse_int(text: str | int) -> int:
    """A whole number; never a boolean (TOML's true is not 1 here) or a fraction."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if not isinstance(text, str) or not re.fullmatch(r"\s*[+-]?\d+\s*", text):
        raise ValueError(f"{text!r} is not a whole number: give a plain count like 7, without a unit")
    return int(text)


def parse_duration(text: str | int | float) -> float:
    """'90s', '5m', '24h', '2d', or seconds -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise ValueError(f"{text!r} is not a duration (try 90s, 5m, 24h or 2d)")
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not a duration (try 90s, 5m, 24h or 2d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_within_parts(text: str) -> tuple[int, int, int, int]:
    """'1y2m3d4h' -> (years, months, days, hours): restic's --keep-within format (m is
    months). The same rules as prune.parse_within, which prune applies."""
    m = re.fullmatch(r"(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)d)?(?:(\d+)h)?", text.strip()) if isinstance(text, str) else None
    if not m or not text.strip():
        raise ValueError(f"{text!r} is not a duration: write it like 30d, 6m, 1y2m3d or 12h (m is months)")
    y, mo, d, h = (int(g or 0) for g in m.groups())
    return y, mo, d, h


def parse_keep_within(text: str) -> str:
    y, mo, d, h = parse_within_parts(text)
    # Prune subtracts it from a snapshot's time: refuse what no calendar can subtract.
    if y * 12 + mo > 12 * 1000 or d > 366 * 1000 or h > 24 * 366 * 1000:
        raise ValueError(
            f"{text!r} reaches back more than 1000 years: keep-within that long keeps everything anyway: choose a shorter one, like 1y"
        )
    return text.strip()


def parse_percent(text: str | int | float) -> float:
    """'50%' or '50' -> 0.5 (a fraction of 1). A bare number below 1 is refused: 0.5 is
    more likely meant as half (50%) than as half a percent, so that one needs its '%'."""
    hint = "write a percentage like 50% (a number from 1 to 100; 0.5% needs its %)"
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"{text!r} is not a percentage: {hint}")
    raw = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(%?)", raw)
    if not m:
        raise ValueError(f"{text!r} is not a percentage: {hint}")
    value = float(m.group(1))
    if not m.group(2) and 0 < value < 1:
        raise ValueError(f"{text!r} is ambiguous (half is 50%, not 0.5): {hint}")
    if not 0 < value <= 100:
        raise ValueError(f"{text!r} must be a percentage above 0 and at most 100, like 50%")
    return value / 100


# --limit-*: the units rclone's --bwlimit takes (binary: 500k is 500 KiB/s), and ours
# (a bare number is MiB/s). Below MIN_RATE the pacer's smallest slice (16 KiB) is more
# than a second's worth: an 8 MiB part would take minutes, which is a typo, not a limit.
RATE_UNITS = {"b": 1 / MIB, "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0**2, "p": 1024.0**3}
MIN_RATE = 16 / 1024  # MiB/s


def parse_rate(text: str | int | float) -> float:
    """'4', '2.5', '2.5MiB/s', '60M', '500k', '1G' -> MiB/s; 0 means no limit."""
    hint = "give MiB/s as a number (4, 2.5) or with a unit as rclone takes it (500k, 60M, 60MiB, 1G); 0: no limit"
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"{text!r} is not a rate: {hint}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtp])(?:i?b)?|(b))?(?:/s)?\s*", text, re.IGNORECASE)
        if not m:
            raise ValueError(f"{text!r} is not a rate: {hint}")
        value = float(m.group(1)) * RATE_UNITS[(m.group(2) or m.group(3) or "m").lower()]
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a rate: {hint}")
    if 0 < value < MIN_RATE:
        raise ValueError(
            f"{text!r} is below {MIN_RATE * 1024:g} KiB/s, too slow to move a part: give 16k or more, or 0 for no limit"
        )
    return value


def parse_exclude(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'thumbs', 'thumbs,encoded-video', or a list of them (TOML, repeated flags) -> the
    names, each once, in EXCLUDABLE's order."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{value!r} is not a list of folder names: write thumbs, encoded-video, or a list of them")
    names: set[str] = set()
    for item in items:
        for name in _text(item, "a folder name").split(","):
            name = name.strip().strip("/")
            if not name:
                continue
            if name not in EXCLUDABLE:
                raise ValueError(
                    f"{name!r} cannot be excluded: only Immich's regenerable folders {' and '.join(EXCLUDABLE)} can"
                )
            names.add(name)
    return tuple(n for n in EXCLUDABLE if n in names)


def parse_path(text: str) -> Path:
    if not _text(text, "a path").strip():
        raise ValueError("empty path")
    return Path(os.path.expanduser(text))


AGE_SECRET = "AGE-SECRET-KEY-"  # an age secret key: never echoed in a message


def _holds_secret(value: Any) -> bool:
    return AGE_SECRET in str(value).upper()


def parse_identity_path(text: str) -> Path:
    if _holds_secret(text):
        raise ValueError(
            "holds an age secret key, not a path (the key is not shown): put the key in a file of mode 0600 "
            "(age-keygen -o FILE) and give that file's path"
        )
    return parse_path(text)


def parse_recipients(value: str | list[str]) -> tuple[str, ...]:
    """age1... public keys: a TOML list, or text separated by commas or whitespace."""
    if _holds_secret(value):
        raise ValueError(
            "holds an age secret key (not shown): recipients are public keys (age1..., as `age-keygen -y FILE` "
            "prints them); the secret key belongs in the identity file alone"
        )
    items = value if isinstance(value, list) else re.split(r"[\s,]+", _text(value, "a list of age1... keys"))
    out = tuple(_text(v, "an age1... key").strip() for v in items if str(v).strip())
    for r in out:
        if not re.fullmatch(r"age1[02-9ac-hj-np-z]{58}", r):
            raise ValueError(f"{r[:70]!r} is not an age recipient (age1... as `age-keygen -y` prints it)")
    return out


def parse_stop(text: str) -> str:
    if text not in STOP_MODES:
        raise ValueError(f"{text!r} is not one of {', '.join(STOP_MODES)}")
    return str(text)


_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"


def parse_checksum(text: str) -> str:
    text = _text(text, "a checksum").strip().lower()
    if text not in CHECKSUMS:
        raise ValueError(f"{text!r} is not one of {', '.join(CHECKSUMS)}")
    return text


def parse_storage_class(text: str) -> str:
    text = _text(text, "a storage class").strip().upper().replace("-", "_")
    if text not in STORAGE_CLASSES:
        raise ValueError(f"{text!r} is not an S3 storage class: one of {', '.join(STORAGE_CLASSES)}")
    return text


def parse_thaw_tier(text: str) -> str:
    low = _text(text, "a thaw tier").strip().lower()
    for tier in THAW_TIERS:
        if tier.lower() == low:
            return tier
    raise ValueError(f"{text!r} is not one of {', '.join(THAW_TIERS)}")


def parse_sse(text: str) -> str:
    low = _text(text, "an encryption mode").strip().lower()
    for mode in SSE_MODES:
        if mode.lower() == low:
            return mode
    raise ValueError(f"{text!r} is not one of {', '.join(SSE_MODES)} (SSE-C: --sse-c-key-file)")


def parse_kms_key_id(text: str) -> str:
    text = _text(text, "a KMS key id").strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} is not a KMS key id, alias or ARN")
    return text


def parse_endpoint(text: str) -> str:
    text = _text(text, "a URL").strip()
    if "@" in text:  # never echo it: what precedes @ is a password
        raise ValueError("the URL holds user:password@: remove it and set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if any(c.isspace() for c in text):
        raise ValueError(f"{text!r} contains a space")
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    try:
        url.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise ValueError(f"{text!r} has a bad port ({exc})") from None
    host = url.hostname
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?", host):
            raise ValueError(f"{text!r} has no valid host name ({host!r})") from None
    if url.query or url.fragment:
        raise ValueError(f"{text!r} has a ?query or #fragment: give the server's base URL")
    return text.rstrip("/")


def parse_region(text: str) -> str:
    text = _text(text, "a region").strip()
    if not re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", text):
        raise ValueError(f"{text!r} is not a region name: lower-case letters, digits and '-', like eu-central-1")
    return text


def parse_bucket(text: str) -> str:
    text = _text(text, "a bucket name").strip()
    # S3's rules (3-63 lower-case) plus what older AWS buckets and self-hosted servers allow
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,253}[A-Za-z0-9])?", text):
        raise ValueError(
            f"{text!r} is not a bucket name: letters, digits, '.', '-', '_' only (no s3:// and no "
            "/: the path inside the bucket is the prefix)"
        )
    return text


def parse_project(text: str) -> str:
    text = _text(text, "a project name").strip()
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", text):
        raise ValueError(f"{text!r} is not a Docker Compose project name: lower-case letters, digits, '-' and '_'")
    return text


def parse_container(text: str) -> str:
    text = _text(text, "a container name").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]+", text):
        raise ValueError(f"{text!r} is not a container name (letters, digits, '_', '.', '-'; see `docker ps`)")
    return text


def parse_pg_name(text: str) -> str:
    """A Postgres role or database name: any text, but Postgres cuts names at 63 bytes."""
    if not _text(text, "a name").strip():
        raise ValueError("empty name")
    if len(text.encode()) > 63:
        raise ValueError(f"{text!r} is longer than Postgres's 63 bytes")
    return text


def parse_ping_url(text: str) -> str:
    """A healthchecks.io-style ping URL, an Uptime Kuma push URL, or ntfy+https://host/topic."""
    text = _text(text, "a URL").strip()
    if any(c.isspace() for c in text):
        raise ValueError("the URL contains a space")
    url = urllib.parse.urlsplit(text.removeprefix("ntfy+"))
    if url.scheme not in ("http", "https") or not url.hostname:
        # never echo it: a ping URL is a credential
        raise ValueError("not an http:// or https:// URL (or ntfy+https://host/topic for ntfy)")
    try:
        port = url.port
    except ValueError:  # not a number, or past 65535
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("has a malformed port: give a port from 1 to 65535, or none (80, 443)")
    if text.startswith("ntfy+") and not url.path.strip("/"):
        raise ValueError("an ntfy URL needs its topic: ntfy+https://ntfy.sh/your-topic")
    return text


def parse_prefix(text: str) -> str:
    prefix = _text(text, "a key prefix").strip("/")
    if not prefix:  # prune would take the whole bucket (other applications' objects too) for its own
        raise ValueError(f"{text!r} is empty: give the repository its own prefix, e.g. immich-backup")
    if any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"{text!r} has empty, '.' or '..' parts")
    return prefix


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str  # attribute of Settings
    toml: tuple[str, str]  # (section, key) in the config file
    env: tuple[str, ...]  # environment variables, first set wins
    flag: str | None  # the command-line flag (argparse dest == name)
    parse: Callable[[Any], Any]
    help: str
    dotenv: str | None = None  # the variable in Immich's .env that sets it
    low: float | None = None  # the range of a number, size or duration (inclusive)
    high: float | None = None


SETTINGS: tuple[Spec, ...] = (
    Spec(
        "immich_dir",
        ("immich", "dir"),
        ("IMMICH_DIR",),
        "--immich-dir",
        parse_path,
        "Immich's install directory (holds docker-compose.yml and .env)",
    ),
    Spec(
        "library_dir",
        ("immich", "library_dir"),
        ("LIBRARY_DIR",),
        "--library-dir",
        parse_path,
        "the photo library (Immich's UPLOAD_LOCATION)",
        dotenv="UPLOAD_LOCATION",
    ),
    Spec(
        "postgres_dir",
        ("immich", "postgres_dir"),
        ("POSTGRES_DIR",),
        "--postgres-dir",
        parse_path,
        "the Postgres data directory (Immich's DB_DATA_LOCATION)",
        dotenv="DB_DATA_LOCATION",
    ),
    Spec(
        "project",
        ("immich", "project"),
        ("COMPOSE_PROJECT_NAME",),
        "--project",
        parse_project,
        "the Docker Compose project name (default: name: in IMMICH_DIR/docker-compose.yml, else immich)",
    ),
    Spec(
        "db_container",
        ("immich", "db_container"),
        ("DB_CONTAINER",),
        "--db-container",
        parse_container,
        "the database container",
    ),
    Spec(
        "db_user",
        ("immich", "db_user"),
        ("DB_USER",),
        "--db-user",
        parse_pg_name,
        "the database user for pg_dump and psql",
        dotenv="DB_USERNAME",
    ),
    Spec(
        "db_name",
        ("immich", "db_name"),
        ("DB_NAME",),
        "--db-name",
        parse_pg_name,
        "the database name",
        dotenv="DB_DATABASE_NAME",
    ),
    Spec("bucket", ("s3", "bucket"), ("S3_BUCKET",), "--bucket", parse_bucket, "the S3 bucket"),
    Spec(
        "prefix",
        ("s3", "prefix"),
        ("S3_PREFIX",),
        "--prefix",
        parse_prefix,
        "the key prefix of the repository in the bucket",
    ),
    Spec(
        "endpoint_url",
        ("s3", "endpoint_url"),
        ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
        "--endpoint-url",
        parse_endpoint,
        "an S3-compatible server's URL (default: AWS)",
    ),
    Spec(
        "region",
        ("s3", "region"),
        ("S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
        "--region",
        parse_region,
        "the S3 region",
    ),
    Spec(
        "path_style",
        ("s3", "path_style"),
        ("S3_PATH_STYLE",),
        "--path-style",
        parse_bool,
        "path-style addressing (most self-hosted S3 servers want it)",
    ),
    Spec(
        "verify_tls",
        ("s3", "verify_tls"),
        ("S3_VERIFY_TLS",),
        None,
        parse_bool,
        "verify the S3 server's TLS certificate",
    ),
    Spec(
        "ca_bundle",
        ("s3", "ca_bundle"),
        ("S3_CA_BUNDLE", "AWS_CA_BUNDLE"),
        None,
        parse_path,
        "a CA bundle for the S3 server's certificate",
    ),
    Spec(
        "checksum",
        ("s3", "checksum"),
        ("IMMICH_STREAM_CHECKSUM",),
        "--checksum",
        parse_checksum,
        "the integrity check every upload carries, which the server verifies: md5 (Content-MD5, every server), "
        "sha256 or crc32c (x-amz-checksum-*: AWS, MinIO, SeaweedFS; not rclone serve s3)",
    ),
    Spec(
        "storage_class",
        ("s3", "storage_class"),
        ("IMMICH_STREAM_STORAGE_CLASS",),
        "--storage-class",
        parse_storage_class,
        "S3 storage class of file data (library and postgres objects), e.g. STANDARD_IA, GLACIER_IR, "
        "DEEP_ARCHIVE; manifests, snapshot.json, the dump and locks are always STANDARD",
    ),
    Spec(
        "storage_class_library",
        ("s3", "storage_class_library"),
        ("IMMICH_STREAM_STORAGE_CLASS_LIBRARY",),
        "--storage-class-library",
        parse_storage_class,
        "storage class of the library's objects (default: --storage-class)",
    ),
    Spec(
        "storage_class_postgres",
        ("s3", "storage_class_postgres"),
        ("IMMICH_STREAM_STORAGE_CLASS_POSTGRES",),
        "--storage-class-postgres",
        parse_storage_class,
        "storage class of the Postgres data directory's objects (default: --storage-class)",
    ),
    Spec(
        "thaw_days",
        ("s3", "thaw_days"),
        ("IMMICH_STREAM_THAW_DAYS",),
        "--thaw-days",
        parse_int,
        "restore, drill, verify --read-data: how many days a thawed copy of a GLACIER/DEEP_ARCHIVE object stays",
        low=1,
        high=30,
    ),
    Spec(
        "thaw_tier",
        ("s3", "thaw_tier"),
        ("IMMICH_STREAM_THAW_TIER",),
        "--thaw-tier",
        parse_thaw_tier,
        "the thaw's speed and price: Standard (3-5 h; DEEP_ARCHIVE 12 h), Bulk (cheapest, 5-12 h; 48 h), "
        "Expedited (1-5 min, GLACIER only)",
    ),
    Spec(
        "thaw_poll",
        ("s3", "thaw_poll"),
        ("IMMICH_STREAM_THAW_POLL",),
        None,
        parse_duration,
        "how often a waiting restore asks whether archived objects are thawed",
        low=60,
        high=DAY,
    ),
    Spec(
        "sse",
        ("s3", "sse"),
        ("IMMICH_STREAM_SSE",),
        "--sse",
        parse_sse,
        "server-side encryption of every object written: AES256 (SSE-S3) or aws:kms (SSE-KMS)",
    ),
    Spec(
        "sse_kms_key_id",
        ("s3", "sse_kms_key_id"),
        ("IMMICH_STREAM_SSE_KMS_KEY_ID",),
        "--sse-kms-key-id",
        parse_kms_key_id,
        "with --sse aws:kms: the KMS key (id, alias or ARN; default: the account's aws/s3 key)",
    ),
    Spec(
        "sse_c_key_file",
        ("s3", "sse_c_key_file"),
        ("IMMICH_STREAM_SSE_C_KEY_FILE",),
        "--sse-c-key-file",
        parse_path,
        "SSE-C: a file of exactly 32 random bytes (mode 600) that every request for an object's bytes carries; "
        "losing it loses the backup",
    ),
    Spec(
        "limit_upload",
        ("s3", "limit_upload"),
        ("IMMICH_STREAM_LIMIT_UPLOAD",),
        "--limit-upload",
        parse_rate,
        "upload at most this many MiB/s, all requests together, paced evenly (e.g. 2.5; 0: no limit)",
        low=0,
        high=MAX_RATE,
    ),
    Spec(
        "limit_download",
        ("s3", "limit_download"),
        ("IMMICH_STREAM_LIMIT_DOWNLOAD",),
        "--limit-download",
        parse_rate,
        "download at most this many MiB/s, all requests together, paced evenly (0: no limit)",
        low=0,
        high=MAX_RATE,
    ),
    Spec(
        "exclude",
        ("backup", "exclude"),
        ("IMMICH_STREAM_EXCLUDE",),
        "--exclude",
        parse_exclude,
        "leave out Immich's regenerable folders: thumbs, encoded-video (repeatable or a comma list; their "
        ".immich markers are kept, Immich regenerates the files after a restore)",
    ),
    Spec(
        "stop",
        ("backup", "stop"),
        ("IMMICH_STREAM_STOP",),
        "--stop",
        parse_stop,
        "what to stop: all (cold copy of the DB directory), app (keep the DB up), none",
    ),
    Spec(
        "live_pass",
        ("backup", "live_pass"),
        ("IMMICH_STREAM_LIVE_PASS",),
        "--live-pass",
        parse_bool,
        "upload new and changed files while Immich runs, then stop it only for a pass that re-reads what "
        "changed since (--no-live-pass: one pass, the whole upload with the stack stopped)",
    ),
    Spec(
        "jobs",
        ("backup", "jobs"),
        ("IMMICH_STREAM_JOBS",),
        "--jobs",
        parse_int,
        "concurrent S3 requests (small files: up to 4x as many; the memory budget bounds them all)",
        low=1,
        high=MAX_JOBS,
    ),
    Spec(
        "part_size",
        ("backup", "part_size"),
        ("IMMICH_STREAM_PART_SIZE",),
        "--part-size",
        parse_size,
        "multipart part size (grown automatically to stay under 10,000 parts)",
    ),
    Spec(
        "max_memory",
        ("backup", "max_memory"),
        ("IMMICH_STREAM_MAX_MEMORY",),
        "--max-memory",
        parse_size,
        "budget for file and part buffers in flight",
        high=MAX_MEMORY,
    ),
    Spec(
        "lock_wait",
        ("backup", "lock_wait"),
        ("IMMICH_STREAM_LOCK_WAIT",),
        "--lock-wait",
        parse_duration,
        "how long backup and prune wait for a run holding the repository lock (e.g. 90s, 5m)",
        low=0,
        high=DAY,
    ),
    Spec(
        "stall_timeout",
        ("backup", "stall_timeout"),
        ("IMMICH_STREAM_STALL_TIMEOUT",),
        None,
        parse_duration,
        "fail a backup when nothing has moved for this long (a hung connection must not keep Immich down)",
        low=30,
        high=DAY,
    ),
    Spec(
        "keep_last",
        ("prune", "keep_last"),
        ("IMMICH_STREAM_KEEP_LAST",),
        "--keep-last",
        parse_int,
        "keep the newest N snapshots",
        low=0,
    ),
    Spec(
        "keep_hourly",
        ("prune", "keep_hourly"),
        ("IMMICH_STREAM_KEEP_HOURLY",),
        "--keep-hourly",
        parse_int,
        "keep the newest snapshot of each of the last N hours that have one",
        low=0,
    ),
    Spec(
        "keep_daily",
        ("prune", "keep_daily"),
        ("IMMICH_STREAM_KEEP_DAILY",),
        "--keep-daily",
        parse_int,
        "... of each of the last N days (UTC)",
        low=0,
    ),
    Spec(
        "keep_weekly",
        ("prune", "keep_weekly"),
        ("IMMICH_STREAM_KEEP_WEEKLY",),
        "--keep-weekly",
        parse_int,
        "... of each of the last N ISO weeks",
        low=0,
    ),
    Spec(
        "keep_monthly",
        ("prune", "keep_monthly"),
        ("IMMICH_STREAM_KEEP_MONTHLY",),
        "--keep-monthly",
        parse_int,
        "... of each of the last N months",
        low=0,
    ),
    Spec(
        "keep_yearly",
        ("prune", "keep_yearly"),
        ("IMMICH_STREAM_KEEP_YEARLY",),
        "--keep-yearly",
        parse_int,
        "... of each of the last N years",
        low=0,
    ),
    Spec(
        "keep_within",
        ("prune", "keep_within"),
        ("IMMICH_STREAM_KEEP_WITHIN",),
        "--keep-within",
        parse_keep_within,
        "keep every snapshot within this long before the newest (restic's 1y2m3d4h: m is months)",
    ),
    Spec(
        "stale_after",
        ("prune", "stale_after"),
        ("IMMICH_STREAM_STALE_AFTER",),
        "--stale-after",
        parse_duration,
        "prune removes incomplete snapshots and unfinished uploads older than this",
        low=3600,
        high=365 * DAY,
    ),
    Spec(
        "retries",
        ("s3", "retries"),
        ("IMMICH_STREAM_RETRIES",),
        None,
        parse_int,
        "attempts per S3 request on transient errors",
        low=1,
        high=MAX_RETRIES,
    ),
    Spec(
        "read_timeout",
        ("s3", "read_timeout"),
        ("IMMICH_STREAM_READ_TIMEOUT",),
        None,
        parse_duration,
        "how long one S3 request may wait for the server's answer before it is retried",
        low=5,
        high=3600,
    ),
    Spec(
        "max_shrink",
        ("backup", "max_shrink"),
        ("IMMICH_STREAM_MAX_SHRINK",),
        "--max-shrink",
        parse_percent,
        "refuse a backup whose library lost more than this share of its files or bytes since the last snapshot "
        "(an unmounted disk must not become the newest snapshot); --allow-shrink overrides once",
    ),
    Spec(
        "max_downtime",
        ("backup", "max_downtime"),
        ("IMMICH_STREAM_MAX_DOWNTIME",),
        "--max-downtime",
        parse_duration,
        "start the stack again and fail the run when Immich has been down this long (default: no limit)",
        low=10,
        high=7 * DAY,
    ),
    Spec(
        "ping_url",
        ("monitor", "ping_url"),
        ("IMMICH_STREAM_PING_URL",),
        "--ping",
        parse_ping_url,
        "ping this URL when a backup starts and ends (healthchecks.io; an Uptime Kuma push URL; "
        "ntfy+https://host/topic); from the config file or the environment only backup pings",
    ),
    Spec(
        "metrics_file",
        ("monitor", "metrics_file"),
        ("IMMICH_STREAM_METRICS_FILE",),
        "--metrics-file",
        parse_path,
        "write Prometheus metrics here at the end (node_exporter's textfile collector); from the "
        "config file or the environment only backup writes it",
    ),
    Spec(
        "age_identity",
        ("encryption", "identity_file"),
        ("IMMICH_STREAM_AGE_IDENTITY",),
        "--age-identity",
        parse_identity_path,
        "encrypt the repository with age: an identity file from age-keygen (mode 0600); chosen when the "
        "repository is created, then needed by every command",
    ),
    Spec(
        "age_recipients",
        ("encryption", "recipients"),
        ("IMMICH_STREAM_AGE_RECIPIENTS",),
        None,
        parse_recipients,
        "more age public keys (age1...) every object is also encrypted to, e.g. an offline recovery key",
    ),
)
SPECS = {s.name: s for s in SETTINGS}
TOML_KEYS: dict[tuple[str, str], Spec] = {s.toml: s for s in SETTINGS}
SECTIONS = tuple(dict.fromkeys(s.toml[0] for s in SETTINGS))


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


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Knobs for tests and experts, each a documented IMMICH_STREAM_* variable, read once by
    load() and passed down with the Settings: the library below the commands never reads the
    environment for them. None means the owner's built-in default."""

    lock_stale: float | None = None  # IMMICH_STREAM_LOCK_STALE (repository/locks.py: STALE)
    journal_interval: float | None = None  # IMMICH_STREAM_JOURNAL_INTERVAL (repository/repo.py)
    docker_deadline: float | None = None  # IMMICH_STREAM_DOCKER_DEADLINE (host/stack.py)
    botocore_only: bool = False  # IMMICH_STREAM_BOTOCORE_ONLY: no direct path (s3/), for comparison
    min_part_size: int = S3_MIN_PART_SIZE  # IMMICH_STREAM_MIN_PART_SIZE, for servers with smaller parts
    short_durations: bool = False  # IMMICH_STREAM_TEST_SHORT_DURATIONS
    trust_bucket: bool = False  # IMMICH_STREAM_TRUST_BUCKET=1: an encrypted repository read unauthenticated

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Tuning:
        def duration(name: str, floor: float, ceiling: float, why: str) -> float | None:
            if not environ.get(name):
                return None
            return env_duration(name, 0.0, floor, ceiling, why, environ)

        return cls(
            lock_stale=duration(
                "IMMICH_STREAM_LOCK_STALE", 10, 7 * 86400, "a lock refreshed less often than a sixth of it goes stale"
            ),
            journal_interval=duration(
                "IMMICH_STREAM_JOURNAL_INTERVAL", 10, 3600, "how often a run's journal is written"
            ),
            docker_deadline=duration(
                "IMMICH_STREAM_DOCKER_DEADLINE", 10, 3600, "how long one Docker API request may take"
            ),
            botocore_only=environ.get("IMMICH_STREAM_BOTOCORE_ONLY", "") not in ("", "0"),
            min_part_size=min_part_size(environ),
            short_durations=environ.get(SHORT_DURATIONS_ENV, "") not in ("", "0"),
            trust_bucket=environ.get(TRUST_BUCKET_ENV, "").strip().lower() in ("1", "true", "yes"),
        )


ENCRYPTION_CHUNK = 64 * 1024  # age's chunk: an encrypted part's first chunk waits for the next part


@dataclasses.dataclass
class Settings:
    immich_dir: Path | None = None
    library_dir: Path | None = None
    postgres_dir: Path | None = None
    project: str = "immich"
    db_container: str = "immich_postgres"
    db_user: str = "postgres"
    db_name: str = "immich"
    bucket: str | None = None
    prefix: str = "immich-backup"
    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    verify_tls: bool = True
    ca_bundle: Path | None = None
    checksum: str = "md5"
    storage_class: str | None = None
    storage_class_library: str | None = None
    storage_class_postgres: str | None = None
    thaw_days: int = 7
    thaw_tier: str = "Standard"
    thaw_poll: float = 300.0
    sse: str | None = None
    sse_kms_key_id: str | None = None
    sse_c_key_file: Path | None = None
    limit_upload: float = 0.0  # MiB/s, 0: no limit
    limit_download: float = 0.0
    exclude: tuple[str, ...] = ()
    stop: str = "all"
    live_pass: bool = True
    jobs: int = 8
    part_size: int = 8 * MIB
    max_memory: int = 64 * MIB
    lock_wait: float = 300.0
    stall_timeout: float = 600.0
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: str | None = None
    stale_after: float = 86400.0
    retries: int = 6
    max_shrink: float = 0.5
    read_timeout: float = 120.0
    max_downtime: float | None = None
    ping_url: str | None = None
    metrics_file: Path | None = None
    age_identity: Path | None = None
    age_recipients: tuple[str, ...] = ()
    # where each value came from: "default", "config file PATH", ".env", "env VAR", "flag --x"
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    tuning: Tuning = dataclasses.field(default_factory=Tuning)
    config_file: Path | None = None

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


def read_dotenv(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Immich's .env as docker compose reads it: python-dotenv's parser (quotes, escapes,
    `export`, comments, values over several lines), then compose's interpolation of
    unquoted and double-quoted values: `${VAR}`, `$VAR`, `${VAR:-default}`, `${VAR-default}`,
    `${VAR:+alt}`, `${VAR:?error}`, `$$`; the environment first, then the file's earlier
    values (compose-go's order). A line compose would refuse is a ConfigError naming it."""
    from dotenv.parser import parse_stream

    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return values
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror}): check its permissions") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:  # never echo the line: it may hold a password
            raise ConfigError(
                f"{path} line {binding.original.line} is not KEY=VALUE as docker compose reads it: fix that line "
                "(quote a value with spaces or #)"
            )
        if binding.key is None or binding.value is None:
            continue  # a comment, a blank line, or a bare KEY (compose takes it from the environment)
        raw = binding.original.string.partition("=")[2].lstrip()
        if raw.startswith("'"):  # single quotes: taken literally, as compose does
            values[binding.key] = binding.value
            continue

        def lookup(name: str) -> str | None:
            return environ[name] if name in environ else values.get(name)

        try:
            values[binding.key] = interpolate(binding.value, lookup)
        except ValueError as exc:
            raise ConfigError(f"{path} line {binding.original.line}: {binding.key}: {exc}") from None
    return values


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-+?])(?P<arg>[^}]*))?\})"
)


def interpolate(value: str, lookup: Callable[[str], str | None]) -> str:
    """Docker compose's variable substitution (one level; defaults are taken as written)."""

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("bare") or m.group("name")
        found, op, arg = lookup(name), m.group("op"), m.group("arg") or ""
        empty = not found  # the ':' forms also treat an empty value as unset
        if op in (":-", "-"):
            return arg if (found is None or (op == ":-" and empty)) else found or ""
        if op in (":+", "+"):
            return "" if (found is None or (op == ":+" and empty)) else arg
        if op in (":?", "?") and (found is None or (op == ":?" and empty)):
            raise ValueError(f"${{{name}}} is required: {arg or 'set it'}")
        return found or ""

    return _INTERPOLATION.sub(sub, value)


def compose_project_name(immich_dir: Path) -> str | None:
    """The top-level `name:` of IMMICH_DIR's compose file, as docker compose would use it."""
    for fname in ("docker-compose.yml", "docker-compose.yaml", "compose.yml", "compose.yaml"):
        try:
            text = (immich_dir / fname).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        m = re.search(r"^name:\s*['\"]?([A-Za-z0-9_.-]+)['\"]?\s*(#.*)?$", text, re.MULTILINE)
        return m.group(1) if m else None
    return None


def load(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> Settings:
    """Resolve every setting from all sources. Raises ConfigError with a one-line message."""
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
        data = _read_toml(config_file)
    else:
        for candidate in default_config_paths(environ):
            if candidate.is_file():
                config_file = candidate
                data = _read_toml(candidate)
                break

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
    settings = Settings(config_file=config_file)
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


def env_duration(
    name: str, default: float, floor: float, ceiling: float, why: str, environ: Mapping[str, str] | None = None
) -> float:
    """A duration only tests and experts set, from the environment variable `name`; below
    `floor` only with IMMICH_STREAM_TEST_SHORT_DURATIONS (tests cannot wait minutes)."""
    environ = os.environ if environ is None else environ
    value = environ.get(name)
    if not value:
        return default
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{name} {value!r} is invalid: {exc}") from None
    low = RELAXED_FLOOR if environ.get(SHORT_DURATIONS_ENV, "") not in ("", "0") else floor
    if not low <= seconds <= ceiling:
        raise ConfigError(f"{name} {value!r} must be {format_duration(floor)} to {format_duration(ceiling)} ({why})")
    return seconds


def min_part_size(environ: Mapping[str, str] | None = None) -> int:
    """S3's 5 MiB part minimum, or the lower one IMMICH_STREAM_MIN_PART_SIZE sets for servers
    that accept smaller parts."""
    environ = os.environ if environ is None else environ
    value = environ.get("IMMICH_STREAM_MIN_PART_SIZE")
    if not value:
        return S3_MIN_PART_SIZE
    try:
        floor = parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"IMMICH_STREAM_MIN_PART_SIZE is invalid: {exc}") from None
    if not 1 <= floor <= S3_MIN_PART_SIZE:
        raise ConfigError(
            f"IMMICH_STREAM_MIN_PART_SIZE {value!r} is out of range: it lowers S3's 5 MiB minimum, "
            "so give 1 byte to 5MiB, or unset it"
        )
    return floor


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
        from immich_stream.repository.age import load_keys

        load_keys(s.age_identity, s.age_recipients)
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


def storage_class_for(s: Settings, root: str) -> str | None:
    """The storage class of a root's file objects: its own setting, else --storage-class."""
    own: str | None = getattr(s, f"storage_class_{root}", None)
    return own or s.storage_class


def read_sse_c_key(path: Path, source: str = "settings") -> bytes:
    """The SSE-C key: exactly 32 bytes, in a file only its owner may read (the key is the
    backup: whoever reads it reads every object, whoever loses it loses them)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"sse_c_key_file {path} (from {source}) cannot be read ({exc.strerror}): fix the path"
        ) from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise ConfigError(
                f"sse_c_key_file {path} (from {source}) is readable by group or others (mode "
                f"{st.st_mode & 0o777:o}): chmod 600 {path}"
            )
        key = os.read(fd, SSE_C_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != SSE_C_KEY_BYTES:
        raise ConfigError(
            f"sse_c_key_file {path} (from {source}) must hold exactly {SSE_C_KEY_BYTES} raw bytes, not "
            f"{'more' if len(key) > SSE_C_KEY_BYTES else len(key)}: make one with `head -c 32 /dev/urandom > FILE`"
        )
    return key


def describe(s: Settings) -> list[tuple[str, str, str]]:
    """(setting, value, source) rows for `immich-stream config`; nothing secret is in Settings."""
    rows = []
    for spec in SETTINGS:
        value = getattr(s, spec.name)
        if value is None:
            shown = "(not set)"
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
        elif spec.parse is parse_exclude:
            shown = ", ".join(value) if value else "(nothing)"
        else:
            shown = str(value)
        rows.append((spec.name, shown, s.sources.get(spec.name, "default")))
    return rows
