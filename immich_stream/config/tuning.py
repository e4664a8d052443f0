"""Tuning: the knobs for tests and experts (IMMICH_STREAM_LOCK_STALE, ..._JOURNAL_INTERVAL,
..._DOCKER_DEADLINE, ..._BOTOCORE_ONLY, ..._MIN_PART_SIZE, ..._TEST_SHORT_DURATIONS,
..._TEST_AUTO_INIT). They are
not settings (no config file key, no flag, not in `immich-stream config`): load() reads them
once from the environment and the Settings carry them down.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from immich_stream.config.parse import (
    RELAXED_FLOOR,
    S3_MIN_PART_SIZE,
    SHORT_DURATIONS_ENV,
    TRUST_BUCKET_ENV,
    format_duration,
    parse_duration,
    parse_size,
)
from immich_stream.errors import ConfigError

AUTO_INIT_ENV = "IMMICH_STREAM_TEST_AUTO_INIT"


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
    lock_day: float | None = None  # IMMICH_STREAM_LOCK_DAY: the length of a --lock-days day (tests)
    # IMMICH_STREAM_TEST_AUTO_INIT=1 (tests only): backup and copy create a missing repository, as
    # versions before `init` did, so the suite's hundreds of fresh buckets need no init each
    auto_init: bool = False

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
            lock_day=duration("IMMICH_STREAM_LOCK_DAY", 86400, 86400, "a day of --lock-days"),
            auto_init=environ.get(AUTO_INIT_ENV) == "1",  # exactly: "false" or "no" must not switch it on
        )


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
