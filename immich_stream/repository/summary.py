"""snapshot.json, typed: the summary a backup writes last (its commit marker).

Read tolerantly: a field an older version did not write gets its default, and fields a
newer version added are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from immich_stream.problems import Problems

T = TypeVar("T")


@dataclass
class FileCounts:
    """What the walk found and what the run did with it (the Stats of a backup)."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    touched: int = 0  # metadata changed, bytes the same (read and hashed, object reused)
    reuploaded: int = 0  # unchanged, but the object it had was gone from the bucket
    rechecked: int = 0  # stat unchanged but too close to when it was read to trust: read and hashed
    resumed: int = 0  # object taken from a run that was interrupted before it committed
    skipped: int = 0
    failed: int = 0
    changed_while_read: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes_total: int = 0
    bytes_read: int = 0
    bytes_uploaded: int = 0
    packs: int = 0  # pack objects uploaded (format 3: small files and the database's chunks)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunStats(FileCounts):
    """What a backup counts while it runs; its counters become snapshot.json's `files`."""

    problems: Problems = field(default_factory=Problems)
    # files and bytes per root, for the next run's shrink check
    roots: dict[str, dict[str, int]] = field(default_factory=dict)

    def count_file(self, root: str, size: int) -> None:
        self.files += 1
        self.bytes_total += size
        totals = self.roots.setdefault(root, {"files": 0, "bytes": 0})
        totals["files"] += 1
        totals["bytes"] += size

    def problem(self, text: str) -> None:
        self.problems.add(text)

    def counts(self) -> FileCounts:
        return FileCounts(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FileCounts)})


@dataclass
class RootMeta:
    """A root directory's own owner, mode and mtime (not in the manifest): Postgres refuses
    a data directory with the wrong owner or mode."""

    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ManifestInfo:
    key: str = ""  # relative to the prefix
    lines: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatabaseInfo:
    key: str = ""  # relative to the prefix
    name: str = ""
    size: int | None = None  # bytes of SQL
    compressed_size: int | None = None  # bytes of database.sql.gz
    sha256: str | None = None  # of the SQL
    compressed_sha256: str | None = None  # of database.sql.gz
    stored_size: int | None = None  # bytes of its object, when that differs (an encrypted repository)
    parts: int = 0
    seconds: float = 0.0
    # Since 0.2 (absent, i.e. None or empty, in older snapshots): what a restore needs.
    tables: dict[str, int] | None = None  # rows per table, counted in the dump's COPY blocks
    server_version: str | None = None  # the server's server_version
    server_version_num: int | None = None
    extensions: dict[str, str] = field(default_factory=dict)  # pg_extension: name -> version
    image: str | None = None  # the database container's image, as configured
    image_id: str | None = None  # and its id (sha256:...)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImmichInfo:
    """The Immich server the snapshot came from (since 0.2)."""

    version: str | None = None  # the best known: image label, image tag, or IMMICH_VERSION
    image: str | None = None  # the server container's image, as configured
    image_id: str | None = None
    env_version: str | None = None  # IMMICH_VERSION in IMMICH_DIR/.env, when set
    container: str | None = None
    # Immich's own nightly database dumps (since 0.4): enabled (None: not known), cron, keep,
    # and the files, bytes and newest name of UPLOAD_LOCATION/backups/immich-db-backup-*
    dump_job: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SnapshotSummary:
    id: str
    time: str | None = None  # ISO 8601, UTC, when it was committed
    host: str = ""
    version: str = ""
    mode: str | None = None  # --stop
    parent: str | None = None  # the snapshot this run compared against
    roots: dict[str, str] = field(default_factory=dict)  # root -> the directory it was read from
    root_meta: dict[str, RootMeta] = field(default_factory=dict)
    complete: bool = True  # False: some files could not be read
    files: FileCounts = field(default_factory=FileCounts)
    root_totals: dict[str, dict[str, int]] = field(default_factory=dict)  # root -> files, bytes
    shrink_allowed: bool = False
    problems: list[str] = field(default_factory=list)
    manifest: ManifestInfo = field(default_factory=ManifestInfo)
    database: DatabaseInfo = field(default_factory=DatabaseInfo)
    seconds: float | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    downtime_seconds: float | None = None
    # where the downtime went: stop, data_directory, stopped_pass, database_start, start
    downtime: dict[str, float] = field(default_factory=dict)
    # what the live pass (before the stack was stopped) found and uploaded; the `files`
    # counters are relative to the parent snapshot over both passes
    live_files: FileCounts | None = None
    # seconds since the run started at which its milestones were reached
    timeline: dict[str, float] = field(default_factory=dict)
    unstable_containers: list[str] = field(default_factory=list)
    # the library's folders --exclude left out (thumbs, encoded-video): Immich regenerates them
    excluded: list[str] = field(default_factory=list)
    immich: ImmichInfo = field(default_factory=ImmichInfo)
    # IMMICH_DIR's docker-compose.yml and .env (file name -> text), secret values replaced
    # by SECRET_PLACEHOLDER; config_secrets names the variables replaced.
    config_files: dict[str, str] = field(default_factory=dict)
    config_secrets: list[str] = field(default_factory=list)
    # --lock-days: {"mode", "days", "until"}: every object of the snapshot is retained until
    # at least `until` (docs/format.md, "Object Lock"); None: no Object Lock
    lock: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uploaded_bytes(self) -> int:
        """File bytes this run added to the bucket: the stopped pass's and the live pass's."""
        live: Any = self.live_files  # read back from snapshot.json, an optional field stays a dict
        live_bytes = live.get("bytes_uploaded", 0) if isinstance(live, dict) else getattr(live, "bytes_uploaded", 0)
        return self.files.bytes_uploaded + int(live_bytes or 0)

    def to_json(self) -> bytes:
        return json.dumps(to_dict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> SnapshotSummary:
        """Raises ValueError for something that is not a summary."""
        d = json.loads(text)
        if not isinstance(d, dict) or not isinstance(d.get("id"), str):
            raise ValueError("not a snapshot summary")
        return _from_dict(cls, d)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "extra"}
        out.update(getattr(obj, "extra", {}))
        return out
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def _from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Fields present in d (nested dataclasses converted), defaults for the missing ones,
    unknown ones into `extra`. A value of the wrong shape raises ValueError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        if name in names and name != "extra":
            kwargs[name] = _convert(hints[name], value)
    kwargs["extra"] = {k: v for k, v in d.items() if k not in names or k == "extra"}
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {value!r}")
        return _from_dict(hint, value)  # type: ignore[arg-type]
    if origin is dict:
        _, vt = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {value!r}")
        return {k: _convert(vt, v) for k, v in value.items()}
    if origin in (types.UnionType, typing.Union) and value is None:
        return None
    return value
