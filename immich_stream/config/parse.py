"""The settings' value types: parsing what a user writes (config file, .env, environment,
flag) into a value, and formatting values back for messages. Every parser raises
ValueError with a message that says what to write instead; load() adds the setting's name
and where the value came from. Also the units and bounds the settings are checked against.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
# S3 refuses parts under 5 MiB (but the last). Servers that accept smaller parts can be
# tested with smaller ones through IMMICH_STREAM_MIN_PART_SIZE.
S3_MIN_PART_SIZE = 5 * MIB

STOP_MODES = ("all", "app", "none")
# What --exclude may leave out: the folders Immich regenerates from the originals (its admin
# UI's jobs), and backups/, Immich's own nightly dumps, which each snapshot's dump supersedes
REGENERABLE = ("thumbs", "encoded-video")
EXCLUDABLE = (*REGENERABLE, "backups")
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
LOCK_MODES = ("governance", "compliance")

# Bounds of the numeric settings: outside them a value is a typo or a unit mistake, and
# one noticed only after the stack was stopped costs downtime.
MAX_JOBS = 256
MAX_RETRIES = 20
MAX_PART_SIZE = 1024 * MIB  # parts are buffered in memory; files needing more grow it themselves
MAX_MEMORY = 8 * 1024 * MIB
DAY = 86400.0
# Tests of the stall watchdog and of prune's garbage need durations of seconds: with
# IMMICH_STREAM_TEST_SHORT_DURATIONS, a duration's floor is this instead.
SHORT_DURATIONS_ENV = "IMMICH_STREAM_TEST_SHORT_DURATIONS"
TRUST_BUCKET_ENV = "IMMICH_STREAM_TRUST_BUCKET"  # the user says the bucket is trusted (repository/auth.py)
RELAXED_FLOOR = 1.0


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


def parse_share(text: str | int | float) -> float:
    """parse_percent that also takes 0% (prune's --max-unused 0: repack every partly used pack)."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*%?", str(text).strip())
    if m and not isinstance(text, bool) and float(m.group(1)) == 0:
        return 0.0
    return parse_percent(text)


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
                    f"{name!r} cannot be excluded: only Immich's regenerable folders {' and '.join(REGENERABLE)}, "
                    "and backups (its own database dumps), can"
                )
            names.add(name)
    return tuple(n for n in EXCLUDABLE if n in names)


def parse_path(text: str) -> Path:
    if not _text(text, "a path").strip():
        raise ValueError("empty path")
    return Path(os.path.expanduser(text))


def parse_paths(value: str | Path | list[Any] | tuple[Any, ...]) -> tuple[Path, ...]:
    """A path or a list of them (TOML, repeated flags; COMPOSE_FILE is split by config/resolve.py)."""
    items = [value] if isinstance(value, (str, Path)) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{value!r} is not a list of paths: write a path, or a list of them")
    return tuple(p if isinstance(p, Path) else parse_path(p) for p in items)


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


EXTERNAL_MODES = ("include", "warn", "skip")


def parse_external(text: str) -> str:
    if text not in EXTERNAL_MODES:
        raise ValueError(f"{text!r} is not one of {', '.join(EXTERNAL_MODES)}")
    return str(text)


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


def parse_lock_mode(text: str) -> str:
    low = _text(text, "an Object Lock mode").strip().lower()
    if low not in LOCK_MODES:
        raise ValueError(f"{text!r} is not one of {', '.join(LOCK_MODES)}")
    return low


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


def _secret_text(value: Any, what: str) -> str:
    """Text that may hold a credential (a notification URL): checked like _text, but never echoed."""
    if not isinstance(value, str):
        raise ValueError(f"{type(value).__name__} is not {what} (write it as a quoted string)")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("contains a control character: write it on one line")
    return value


def parse_notify_urls(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Apprise URLs (json://host/path, discord://id/token, mailtos://...): a list (TOML,
    repeated --notify), or text with several separated by spaces (the environment). Each is
    a credential: a message names its position and scheme, never its text."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{type(value).__name__} is not a list of URLs: write one Apprise URL, or a list of them")
    urls: list[str] = []
    for item in items:
        for url in _secret_text(item, "an Apprise URL").split():
            n = len(urls) + 1
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", url):
                raise ValueError(
                    f"URL {n} is not an Apprise URL: write scheme://..., e.g. json://host/path or "
                    "ntfys://host/topic (https://github.com/caronc/apprise/wiki)"
                )
            if url not in urls:
                urls.append(url)
    if not urls:
        raise ValueError("no URL is given: write one Apprise URL, or remove the setting")
    return tuple(urls)


def parse_webhook_url(text: str) -> str:
    """An http(s) URL that receives the run's JSON summary as a POST (a credential: never echoed)."""
    text = _secret_text(text, "a URL").strip()
    if any(c.isspace() for c in text):
        raise ValueError("the URL contains a space: give one http:// or https:// URL")
    url = urllib.parse.urlsplit(text)
    try:
        port = url.port
    except ValueError:
        port = -1
    if url.scheme not in ("http", "https") or not url.hostname or (port is not None and not 1 <= port <= 65535):
        raise ValueError("not an http:// or https:// URL with a host (and a port from 1 to 65535): fix it")
    return text


SHELL_OPERATORS = ("|", "||", "&", "&&", ";", ">", ">>", "<", "<<", "2>", "2>&1", "$(", "`")


def parse_hook_command(text: str) -> str:
    """A command line split as a shell would (shlex), but run without one: no pipes,
    redirections or variables. The text is kept; commands/notify.py splits it again."""
    import shlex

    text = _text(text, "a command line")
    try:
        argv = shlex.split(text)
    except ValueError as exc:  # "No closing quotation"
        raise ValueError(f"{text!r} cannot be split into words ({exc}): quote it as you would in a shell") from None
    if not argv:
        raise ValueError("empty command")
    if bad := next((w for w in argv if w in SHELL_OPERATORS or w.startswith(("$(", "`"))), None):
        raise ValueError(
            f"{text!r} uses the shell's {bad!r}, but it runs without a shell: put the commands in a script "
            "and give the script's path"
        )
    return text
