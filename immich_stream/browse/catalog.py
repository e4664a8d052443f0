"""The Immich catalog of a snapshot: each asset with its owner, original file name, taken-at
time, albums, people and every file that belongs to it, read from pg_dump's COPY blocks.

pg_dump's plain format writes each table's rows as `COPY schema.table (col, ...) FROM stdin;`
then one row a line in COPY's text format (fields split by tabs, `\\N` for NULL, backslash
escapes) and `\\.`. CatalogBuilder reads that stream in any chunking, keeps only the columns
it needs of the tables it needs (as raw bytes: a few hundred bytes an asset) and skips every
other block without parsing it; `lines()` then joins them into one JSON line per asset.

Immich's tables have two naming eras (docs/format.md, "The Immich catalog"): before its
StandardizeNames migration (v1.137, mid-2025) `users`, `assets`, `exif`, `albums`,
`albums_assets_assets`, `asset_faces`, `asset_files`, `libraries`; since then `user`, `asset`,
`asset_exif`, `album`, `album_asset`, `asset_face`, `asset_file`, `library`. A dump of
neither (or of both) raises CatalogError: never a wrong answer.

Paths: relative to Immich's working directory (`upload/library/...`, before the
ConvertToAbsolutePaths migration) or absolute inside immich_server (`/usr/src/app/upload/...`,
`/data/...`): each is mapped to the snapshot root holding it (`library`, the upload location;
`external:<name>` for an external library's import path, named as backups name them).
"""

from __future__ import annotations

import bisect
import json
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from immich_stream.errors import ImmichStreamError

FORMAT = 1

# where immich_server sees UPLOAD_LOCATION: Immich's compose file before and since v1.136;
# "upload/" is the relative form of the first (the server's working directory is /usr/src/app)
LIBRARY_MOUNTS = ("/usr/src/app/upload", "/data", "upload")

# role -> (old name, new name)
TABLES = {
    "user": ("users", "user"),
    "asset": ("assets", "asset"),
    "exif": ("exif", "asset_exif"),
    "album": ("albums", "album"),
    "album_asset": ("albums_assets_assets", "album_asset"),
    "person": ("person", "person"),
    "face": ("asset_faces", "asset_face"),
    "file": ("asset_files", "asset_file"),
    "library": ("libraries", "library"),
}
# role -> the columns read; a tuple is alternatives (the first present is taken)
COLUMNS: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "user": ("id", "email", "name"),
    "asset": (
        "id",
        "ownerId",
        "type",
        "originalPath",
        "originalFileName",
        "fileCreatedAt",
        "localDateTime",
        "encodedVideoPath",
        "sidecarPath",
        "livePhotoVideoId",
        "deletedAt",
    ),
    "exif": ("assetId", "dateTimeOriginal"),
    "album": ("id", "albumName", "deletedAt"),
    "album_asset": (("assetsId", "assetId"), ("albumsId", "albumId")),  # each table of assets: its id first
    "person": ("id", "name"),
    "face": ("assetId", "personId", "deletedAt"),
    "file": ("assetId", "type", "path"),
    "library": ("importPaths", "id"),
}
REQUIRED = ("user", "asset", "album", "album_asset")  # the tables an era's dump must hold
_BY_NAME = {
    name: (role, era) for role, names in TABLES.items() for era, name in zip(("old", "new"), names, strict=True)
}
_IDENT = re.compile(rb'"((?:[^"]|"")*)"|([^\s".,()]+)')
_ESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.S)
_SIMPLE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
# The longest row of a table read (and line between blocks) held while it is cut across
# batches: a longer one stops the catalog (not the dump); rows of tables not read, and lines
# between blocks not needed, are never held at all, whatever their length.
MAX_ROW = 16 << 20
_ROW_COST = 41  # a bytes object's own size and its place in a list, beyond its bytes


class CatalogError(ImmichStreamError):
    """A dump whose tables are not Immich's (neither naming era): no catalog, one line."""


def _unescape_match(m: re.Match[str]) -> str:
    if m.group(1):
        return chr(int(m.group(1), 8))
    if m.group(2):
        return chr(int(m.group(2), 16))
    c = m.group(3)
    return _SIMPLE.get(c, c)


def field_text(raw: bytes) -> str | None:
    """One COPY text-format field: None for \\N, else its backslash escapes undone."""
    if raw == b"\\N":
        return None
    text = raw.decode("utf-8", "surrogateescape")
    return _ESCAPE.sub(_unescape_match, text) if "\\" in text else text


def parse_array(text: str | None) -> list[str]:
    """A one-dimensional text[] literal ({a,"b c",NULL}) -> its elements (NULLs dropped)."""
    if not text or not text.startswith("{"):
        return []
    out: list[str] = []
    i, n = 1, len(text) - 1
    while i < n:
        if text[i] == '"':
            j, buf = i + 1, []
            while text[j] != '"':
                if text[j] == "\\":
                    j += 1
                buf.append(text[j])
                j += 1
            out.append("".join(buf))
            i = j + 1
        else:
            j = text.find(",", i)
            j = n if j < 0 else j
            item = text[i:j]
            if item != "NULL":
                out.append(item)
            i = j
        i += 1  # the comma
    return out


def _idents(text: bytes) -> list[str]:
    return [
        (q.replace(b'""', b'"') if q is not None and m.group(0).startswith(b'"') else p).decode("utf-8", "replace")
        for m in _IDENT.finditer(text)
        for q, p in [m.groups()]
    ]


def parse_copy(line: bytes) -> tuple[str, list[str]] | None:
    """`COPY public."user" (id, "createdAt") FROM stdin;` -> ("user", ["id", "createdAt"])."""
    head, sep, rest = line[5:].partition(b" (")
    names = _idents(head)
    if not sep or not names:
        return None
    return names[-1], _idents(rest.rsplit(b") FROM stdin;", 1)[0])


@dataclass
class Roots:
    """Where a path of the database is in a snapshot: (root, path relative to it)."""

    mounts: list[tuple[str, str]]  # (a prefix as Immich writes paths, its root), longest first

    @classmethod
    def for_library(cls, extra: tuple[str, ...] = ()) -> Roots:
        return cls(sorted(((m.rstrip("/"), "library") for m in (*LIBRARY_MOUNTS, *extra)), key=_longest))

    def add_externals(self, import_paths: list[str]) -> None:
        from immich_stream.backup.externals import named  # the names backups give those roots

        names = named([("", p) for p in import_paths])
        self.mounts = sorted([*self.mounts, *((p.rstrip("/"), r) for p, r in names.items())], key=_longest)

    def locate(self, path: str) -> tuple[str, str]:
        """("library", "library/u1/a.jpg"), or ("", path) when no root holds it."""
        for prefix, root in self.mounts:
            if path.startswith(prefix + "/"):
                return root, path[len(prefix) + 1 :]
        return "", path


def _longest(item: tuple[str, str]) -> int:
    return -len(item[0])


class CatalogBuilder:
    """Fed pg_dump's SQL in any chunking (feed), then `lines()` gives the catalog. In a
    pg_dumpall, only the COPY blocks of `database` count (after its \\connect)."""

    def __init__(self, database: str = "", library_mounts: tuple[str, ...] = (), max_kept: int | None = None) -> None:
        self.database = database
        self.max_kept = max_kept  # bytes of rows kept at most (None: no limit); past it CatalogError
        self.kept = 0
        self.library_mounts = library_mounts
        self.cluster = False
        self._db = ""
        self.seen: dict[str, str] = {}  # role -> the table name read
        self.rows: dict[str, list[bytes]] = {role: [] for role in TABLES}  # the columns picked, tab-joined
        self._role: str | None = None
        self._getter: Callable[[list[bytes]], tuple[bytes, ...]] = operator.itemgetter(0, 0)  # the columns picked
        self._fill = False  # the current block lacks a column picked
        self._cut = -1  # split a row at this many tabs (-1: all)
        self._skip = False  # inside a block of no interest
        self._carry = b""
        self._junk = False  # skip to the next newline first
        self.error: CatalogError | None = None  # what stopped feed_safely

    # -- reading --------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        buf = self._carry + data if self._carry else data
        self._carry = b""
        pos, n = 0, len(buf)
        if self._junk:  # the rest of a line not needed (a long row of a block skipped)
            eol = buf.find(b"\n")
            if eol < 0:
                return
            self._junk = False
            pos = eol + 1
        while pos < n:
            if self._role is not None:  # whole lines of a block read at once, in C as far as can be
                if buf.startswith(b"\\.\n", pos):
                    self._role = None
                    pos += 3
                    continue
                end = buf.find(b"\n\\.\n", pos)
                if end >= 0:
                    self._rows(buf[pos:end])
                    self._role = None
                    pos = end + 4
                    continue
                last = buf.rfind(b"\n", pos)
                if last >= 0:
                    if last > pos:
                        self._rows(buf[pos:last])
                    pos = last + 1
                self._keep(buf, pos, n)
                return
            if self._skip:
                if buf.startswith(b"\\.\n", pos):
                    self._skip = False
                    pos += 3
                    continue
                end = buf.find(b"\n\\.\n", pos)
                if end >= 0:
                    self._skip = False
                    pos = end + 4
                    continue
                last = buf.rfind(b"\n", pos)
                tail = buf[last + 1 :] if last >= 0 else buf[pos:]
                if len(tail) < 3:  # it may yet be the block's end (\\.)
                    self._carry = tail
                else:  # a row's start: none of it is needed
                    self._junk = True
                return
            eol = buf.find(b"\n", pos)
            if eol < 0:
                self._keep(buf, pos, n)
                return
            line = buf[pos:eol]
            pos = eol + 1
            if line.startswith(b"COPY ") and line.endswith(b" FROM stdin;"):
                self._copy(line)
            elif line.startswith(b"-- PostgreSQL database cluster dump"):
                self.cluster = True
            elif line.startswith(b"\\connect "):
                m = re.search(rb"dbname='((?:[^']|'')*)'", line)
                raw = m.group(1).replace(b"''", b"'") if m else line.split()[-1].strip(b'"')
                self._db = raw.decode("utf-8", "replace")

    def _keep(self, buf: bytes, pos: int, n: int) -> None:
        """Hold a line cut by the batch's end till the next batch: a row of a block read,
        or a line between blocks; one longer than MAX_ROW is never held (and copied again
        each batch): a row stops the catalog, a line between blocks that is no COPY line is
        let go (skipped to its end)."""
        if n - pos <= MAX_ROW:
            self._carry = buf[pos:]
        elif self._role is None and not buf.startswith(b"COPY ", pos):
            self._junk = True
        else:
            where = f"a row of the dump's table {self.seen[self._role]}" if self._role else "a COPY line of the dump"
            raise CatalogError(
                f"{where} is longer than {MAX_ROW >> 20} MiB: not Immich's; no catalog was made "
                "(the dump itself is stored whole)"
            )

    def _rows(self, block: bytes) -> None:
        """Rows of the current block (whole lines, without the last newline): the columns
        picked of each; a column the table lacks reads as NULL (a \\N put after each row)."""
        assert self._role is not None
        if self._fill:
            block = block.replace(b"\n", b"\t\\N\n") + b"\t\\N"
        try:
            cut = self._cut  # fields past the last one picked are left unsplit
            picked = map(self._getter, (line.split(b"\t", cut) for line in block.split(b"\n")))
            new = list(map(b"\t".join, picked))  # one object a row: the least memory
        except IndexError:
            raise CatalogError(
                f"a row of the dump's table {self.seen[self._role]} has fewer fields than its COPY line names: "
                "the dump is damaged; no catalog was made"
            ) from None
        self.kept += sum(map(len, new)) + _ROW_COST * len(new)
        if self.max_kept is not None and self.kept > self.max_kept:
            raise CatalogError(
                f"the catalog's rows passed {self.max_kept >> 20} MiB (a library of more than about "
                f"{self.max_kept // 850:,} assets): none is stored with this snapshot; `find` reads its dump instead "
                "(a backup keeps at most --max-memory of them: raise it to store one)"
            )
        self.rows[self._role].extend(new)

    def feed_safely(self, data: bytes) -> None:
        """feed, for a backup: whatever goes wrong (a dump not Immich's, a bug here) stops
        the catalog only, never the dump; lines() then raises it."""
        if self.error is not None:
            return
        try:
            self.feed(data)
        except CatalogError as exc:
            self.error = exc.with_traceback(None)  # its frames would keep the batch's rows
        except Exception as exc:  # the dump goes on whatever this reader meets
            self.error = CatalogError(f"reading the catalog failed: {exc!r}")
        if self.error is not None:
            self.rows.clear()
            self._carry = b""

    def _copy(self, line: bytes) -> None:
        parsed = parse_copy(line)
        hit = _BY_NAME.get(parsed[0]) if parsed else None
        if parsed is None or hit is None or (self.cluster and self._db != self.database):
            self._skip = True
            return
        table, cols = parsed
        role, era = hit
        if TABLES[role][0] != TABLES[role][1]:  # person: the same name in both eras
            self.seen.setdefault("era:" + era, table)
        pick = []
        for want in COLUMNS[role]:
            options = (want,) if isinstance(want, str) else want
            pick.append(next((cols.index(o) for o in options if o in cols), -1))
        if pick[0] < 0 or (role == "asset" and (pick[3] < 0 or pick[1] < 0)):
            raise CatalogError(
                f"the dump's table {table} lacks the columns Immich's {role} table has ({', '.join(cols[:6])}...): "
                "not an Immich database this version knows; no catalog was made"
            )
        self.seen[role] = table
        self._role = role
        self._fill = -1 in pick
        self._cut = -1 if self._fill else max(pick) + 1
        self._getter = operator.itemgetter(*(i if i >= 0 else len(cols) for i in pick))

    # -- the catalog ----------------------------------------------------------------------
    @property
    def era(self) -> str:
        eras = [e for e in ("old", "new") if "era:" + e in self.seen]
        missing = [TABLES[r][1] for r in REQUIRED if r not in self.seen]
        if len(eras) != 1 or missing:
            found = ", ".join(sorted(v for k, v in self.seen.items() if not k.startswith("era:"))) or "none"
            both = " (tables of both naming eras)" if len(eras) > 1 else ""
            raise CatalogError(
                f"the dump is not an Immich database of a known schema{both}: Immich's tables found: {found}; "
                "expected assets/users/albums (before v1.137) or asset/user/album (since): no catalog was made"
            )
        return eras[0]

    def lines(self) -> Iterator[bytes]:
        """The catalog: a header line, then one JSON line per asset (newline-terminated).
        The rows of each table about assets are sorted by asset id in place (each row starts
        with it: a tab sorts below any character of an id) and found by bisection: no index
        of its own is built, whatever the library's size."""
        if self.error is not None:
            raise self.error
        era = self.era
        rows = self.rows
        roots = Roots.for_library(self.library_mounts)
        roots.add_externals([p for r in rows["library"] for p in parse_array(_text(_cols(r)[0]))])
        users = {c[0]: (_text(c[1]) or "", _text(c[2]) or "") for c in map(_cols, rows["user"])}
        albums = {c[0]: _text(c[1]) or "" for c in map(_cols, rows["album"]) if c[2] == NULL}
        people = {c[0]: _text(c[1]) or "" for c in map(_cols, rows["person"])}
        assets = rows["asset"]
        for role in ("asset", "exif", "album_asset", "face", "file"):
            rows[role].sort()
        header = {
            "catalog": FORMAT,
            "era": era,
            "tables": {k: v for k, v in self.seen.items() if not k.startswith("era:")},
            "assets": len(assets),
            "users": sorted([e, n] for e, n in users.values()),
            "albums": sorted(set(albums.values())),
            "people": sorted({n for n in people.values() if n}),
        }
        yield _dump(header)

        def own_files(asset_id: bytes, row: list[bytes], tag: str) -> list[list[str]]:
            out: list[list[str]] = []
            for kind, raw in (("video" if tag else "original", row[3]), ("encoded-video", row[7]), ("sidecar", row[8])):
                if path := _text(raw):
                    out.append([*roots.locate(path), tag + kind])
            for _, kind_raw, raw in _of(rows["file"], asset_id):
                if path := _text(raw):
                    out.append([*roots.locate(path), tag + (_text(kind_raw) or "file")])
            return out

        for raw_row in assets:
            row = _cols(raw_row)
            asset_id, live = row[0], row[9]
            out = own_files(asset_id, row, "")
            if live != NULL and (video := _of(assets, live)):
                out += own_files(live, video[0], "live-")
            owner = users.get(row[1], ("", ""))
            exif = _of(rows["exif"], asset_id)
            when = next((w for w in (exif[0][1] if exif else NULL, row[5], row[6]) if w != NULL), NULL)
            in_albums = {albums[c[1]] for c in _of(rows["album_asset"], asset_id) if c[1] in albums}
            faces = [people[c[1]] for c in _of(rows["face"], asset_id) if c[2] == NULL and people.get(c[1])]
            yield _dump(
                {
                    "id": _text(asset_id),
                    "user": owner[0],
                    "owner": owner[1],
                    "name": _text(row[4]) or "",
                    "type": _text(row[2]) or "",
                    "taken": _iso(_text(when)),
                    "albums": sorted(in_albums),
                    "people": list(dict.fromkeys(faces)),
                    "files": out,
                    **({"trashed": True} if row[10] != NULL else {}),
                }
            )


NULL = b"\\N"
TAB = b"\t"


def _cols(row: bytes) -> list[bytes]:
    return row.split(TAB)


def _text(raw: bytes) -> str | None:
    return None if raw == NULL else field_text(raw)


def _of(rows: list[bytes], asset_id: bytes) -> list[list[bytes]]:
    """The rows (sorted) whose first column is asset_id, split."""
    prefix = asset_id + TAB
    i = bisect.bisect_left(rows, prefix)
    out = []
    while i < len(rows) and rows[i].startswith(prefix):
        out.append(rows[i].split(TAB))
        i += 1
    return out


def _iso(text: str | None) -> str | None:
    """pg's `2023-07-01 12:00:00+00` -> `2023-07-01T12:00:00+00:00`."""
    if not text:
        return None
    text = text.replace(" ", "T", 1)
    if re.search(r"[+-]\d\d$", text):
        text += ":00"
    return text


def _dump(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogateescape") + b"\n"
