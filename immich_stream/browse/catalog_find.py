"""`find --user/--album/--person/--taken/--name`: a snapshot's Immich catalog (catalog.py),
read from its stored catalog object when the backup made one, else built from its stored
dump (decrypted and checked against snapshot.json as every restore reads it), filtered one
asset at a time: memory is the matches', whatever the library's size.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import difflib
import fnmatch
import hashlib
import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from immich_stream.browse.catalog import CatalogBuilder, CatalogError
from immich_stream.errors import ConfigError, ImmichStreamError, NothingMatched, ObjectNotFound
from immich_stream.repository.manifest import ManifestLine, gunzip_stream
from immich_stream.repository.repo import Repo, Snapshot

Asset = dict[str, Any]
log = logging.getLogger(__name__)


def parse_taken(text: str) -> tuple[dt.datetime | None, dt.datetime | None]:
    """`FROM..TO` (either side may be empty), each a date or a date and time (UTC unless
    it says); a date as TO means the end of that day."""
    left, sep, right = text.partition("..")
    if not sep:
        left = right = text

    def one(part: str, end: bool) -> dt.datetime | None:
        part = part.strip()
        if not part:
            return None
        try:
            when = dt.datetime.fromisoformat(part)
        except ValueError:
            raise ConfigError(
                f"--taken {text}: {part!r} is not a date: give FROM..TO as YYYY-MM-DD or YYYY-MM-DDTHH:MM "
                "(either side may be left out, e.g. 2023-07-01..2023-08-31 or 2024-01-01..)"
            ) from None
        if end and re.fullmatch(r"\d{4}-\d\d-\d\d", part):
            when += dt.timedelta(days=1) - dt.timedelta(microseconds=1)
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)

    lo, hi = one(left, False), one(right, True)
    if lo is not None and hi is not None and hi < lo:
        raise ConfigError(f"--taken {text}: the end comes before the start: give FROM..TO, earliest first")
    return lo, hi


@dataclass
class Selectors:
    """What a person asks for; every one given must match (AND); a repeated one is any of
    its values (OR). Names compare without regard to case."""

    users: list[str] = field(default_factory=list)
    albums: list[str] = field(default_factory=list)
    people: list[str] = field(default_factory=list)
    taken: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._taken = [parse_taken(t) for t in self.taken]
        self._users = {u.casefold() for u in self.users}
        self._albums = {a.casefold() for a in self.albums}
        self._people = {p.casefold() for p in self.people}
        self._names = [g.casefold() for g in self.names]  # "IMG_1.HEIC" and "img_1.heic" alike, as the docs say

    @property
    def given(self) -> bool:
        return bool(self.users or self.albums or self.people or self.taken or self.names)

    def describe(self) -> str:
        parts = [f"--{flag} {v}" for flag, vs in self._flags() for v in vs]
        return " ".join(parts)

    def _flags(self) -> list[tuple[str, list[str]]]:
        return [
            ("user", self.users),
            ("album", self.albums),
            ("person", self.people),
            ("taken", self.taken),
            ("name", self.names),
        ]

    def check_names(self, header: dict[str, Any], snap_id: str) -> None:
        """An album, person or user the catalog does not know: one line with the nearest
        names (a typo is the likeliest cause), before any asset is read."""
        known_users = [name for pair in header.get("users", []) for name in pair if name]
        for flag, wanted, known in (
            ("album", self.albums, header.get("albums", [])),
            ("person", self.people, header.get("people", [])),
            ("user", self.users, known_users),
        ):
            folded = {k.casefold() for k in known}
            for name in wanted:
                if name.casefold() in folded:
                    continue
                near = difflib.get_close_matches(name, known, n=3, cutoff=0.5) or difflib.get_close_matches(
                    name.casefold(), [k.casefold() for k in known], n=3, cutoff=0.5
                )
                hint = f"the nearest: {', '.join(repr(n) for n in near)}" if near else f"it has {len(known)} in all"
                raise NothingMatched(
                    f"nothing matched: snapshot {snap_id} has no {flag} {name!r} ({hint}); "
                    f"`find --snapshot {snap_id}` with another --{flag}"
                )

    def matches(self, asset: Asset) -> bool:
        if self._users and not (
            str(asset.get("user", "")).casefold() in self._users
            or str(asset.get("owner", "")).casefold() in self._users
        ):
            return False
        if self._albums and not any(a.casefold() in self._albums for a in asset.get("albums", [])):
            return False
        if self._people and not any(p.casefold() in self._people for p in asset.get("people", [])):
            return False
        name = str(asset.get("name", "")).casefold()
        if self._names and not any(fnmatch.fnmatchcase(name, g) for g in self._names):
            return False
        if self._taken:
            when = _when(asset.get("taken"))
            if when is None or not any(
                (lo is None or lo <= when) and (hi is None or when <= hi) for lo, hi in self._taken
            ):
                return False
        return True


def _when(text: object) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


CATALOG_SLACK = 64 * 1024  # bytes a stored catalog's size may differ from snapshot.json's (its age header)
LINES_AT_ONCE = 2000  # catalog lines made in one trip to a worker thread
UPLOAD_TARGET = re.compile(r"""\$\{?UPLOAD_LOCATION\}?:(/[^\s:'"]*)""")


def library_mounts(snap: Snapshot) -> tuple[str, ...]:
    """Where the snapshot's compose file mounts UPLOAD_LOCATION in immich_server, when it
    says (Immich's own compose files: /usr/src/app/upload, or /data since v1.136)."""
    return mounts_in(snap.summary.config_files)


def mounts_in(config_files: dict[str, str]) -> tuple[str, ...]:
    """library_mounts, from the compose files themselves (a backup's, before its snapshot.json)."""
    return tuple(sorted({m for text in config_files.values() for m in UPLOAD_TARGET.findall(text)}))


async def _stored_catalog(repo: Repo, snap: Snapshot) -> bytes | None:
    """The stored catalog (gzip, a few MiB per 100,000 assets) when snapshot.json records
    one and it matches the sha256 recorded there; else None, and the dump answers (an older
    snapshot, or a catalog damaged, altered or sealed for keys this host lacks)."""
    record = snap.summary.extra.get("catalog")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return None
    key = repo.catalog_key(snap.id)
    size = record.get("size")
    try:
        stored = await repo.store.head(key)
        if stored is None:  # a copy (`copy` carries the dump only): the dump answers
            log.debug("no stored catalog %s: reading the snapshot's dump", key)
            return None
        # never more than snapshot.json says is read into memory (a bucket writer's object of
        # any size): its size as sealed for the recipients now, give or take their number
        expected = (repo.store.stored_size(key, size) or size) if isinstance(size, int) else None
        if expected is None or abs(stored - expected) > CATALOG_SLACK:
            log.warning(
                "the stored catalog %s does not match snapshot.json (%d bytes, not %s): reading the snapshot's dump "
                "instead",
                key,
                stored,
                size,
            )
            return None
        data = await repo.store.get(key)
    except ObjectNotFound:
        log.debug("no stored catalog %s: reading the snapshot's dump", key)
        return None
    except ImmichStreamError as exc:
        log.warning("the stored catalog %s cannot be read (%s): reading the snapshot's dump instead", key, exc)
        return None
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        log.warning("the stored catalog %s does not match snapshot.json: reading the snapshot's dump instead", key)
        return None
    return data


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def catalog_lines(repo: Repo, snap: Snapshot) -> AsyncIterator[bytes]:
    """The snapshot's catalog, a line at a time (header first): its stored catalog object,
    or else built from its dump."""
    stored = await _stored_catalog(repo, snap)
    if stored is not None:
        carry = b""
        async for data in gunzip_stream(_one(stored)):
            carry += data
            *whole, carry = carry.split(b"\n")
            for line in whole:
                yield line
        if carry:
            yield carry
        return
    from immich_stream.restore.database import snapshot_sql  # reads it as restore --database does

    builder = CatalogBuilder(snap.summary.database.name, library_mounts(snap))
    async for data in snapshot_sql(repo.store, repo, snap):
        await asyncio.to_thread(builder.feed, data)
    lines = builder.lines()
    while batch := await asyncio.to_thread(lambda: list(itertools.islice(lines, LINES_AT_ONCE))):
        for line in batch:
            yield line.rstrip(b"\n")


async def find_assets(
    repo: Repo, snap: Snapshot, selectors: Selectors, each: Callable[[Asset], None] | None = None
) -> tuple[dict[str, Any], list[Asset]]:
    """The header and the assets the selectors match (each also given to `each` as found).
    NothingMatched when a name is unknown or nothing matches."""
    header: dict[str, Any] | None = None
    found: list[Asset] = []
    async for raw in catalog_lines(repo, snap):
        if header is None:
            header = json.loads(raw)
            if not isinstance(header, dict) or header.get("catalog") != 1:
                raise CatalogError(f"the catalog of snapshot {snap.id} is of an unknown format: upgrade immich-stream")
            selectors.check_names(header, snap.id)
            continue
        asset = json.loads(raw)
        if selectors.matches(asset):
            found.append(asset)
            if each is not None:
                each(asset)
    if header is None:
        raise CatalogError(f"the catalog of snapshot {snap.id} is empty: run `verify --read-data`")
    if not found:
        raise NothingMatched(f"nothing matched {selectors.describe()} in snapshot {snap.id}")
    return header, found


def wanted_files(assets: list[Asset]) -> set[tuple[str, bytes]]:
    """(root, path relative to it) of every file of these assets, as manifest lines name them."""
    return {
        (root, path.encode("utf-8", "surrogateescape")) for a in assets for root, path, _ in a.get("files", []) if root
    }


def selects(wanted: set[tuple[str, bytes]]) -> Callable[[ManifestLine], bool]:
    """A manifest line filter: exactly these files (directories are made as their files need them)."""

    def pick(line: ManifestLine) -> bool:
        return line.type != "dir" and (line.root, line.relpath) in wanted

    return pick
