"""Manifests (docs/format.md): one JSON line per walked entry, in walk order, gzipped and
streamed both ways (no whole manifest in memory); in an authenticated repository each block
of lines is followed by its MAC line (auth.py), and a reader acts on a block only once its
MAC matched. Journals (repo.py) are manifest lines too; gunzip_stream reads both.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import json.encoder
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from immich_stream.errors import RepoError
from immich_stream.repository.auth import MAX_BLOCK, ManifestMac, forged, is_auth_line
from immich_stream.repository.layout import escape_path, root_order, unescape_path
from immich_stream.repository.sealed import SealedStore
from immich_stream.s3.budget import ByteBudget

T = TypeVar("T")
THREAD_MIN = 64 << 10  # bytes to (de)compress at least for a trip to a worker thread


class WalkedEntry(Protocol):
    """What a manifest line records of an entry the walk found (backup/walk.py's Entry)."""

    relpath: bytes
    type: str
    size: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    inode: int
    target: bytes | None
    ctime_ns: int
    dev: int


def path_order(relpath: bytes) -> bytes:
    """The walk's order (backup/walk.py): depth first, each directory's names by their
    bytes, a directory before its contents; the walk and a manifest merge by it. The path
    with each "/" as a NUL byte compares as the tuple of its names would (a name holds
    neither, and NUL sorts before any byte of a name: "a" < "a/b" < "a!"), for a fifth
    of the cost (it is computed per file, and per line of each manifest read beside)."""
    return relpath.replace(b"/", b"\0")


_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_quote = json.encoder.encode_basestring  # a JSON string, non-ASCII as is (ensure_ascii=False)


def _loads(text: str) -> Any:
    """json.loads of one manifest line, without its two Python layers above the C scanner
    (a line is parsed per file and per run); anything unusual (white space around it,
    trailing text, not JSON) goes through json.loads, which accepts or refuses it as ever."""
    try:
        value, end = _scan_once(text, 0)
    except (StopIteration, ValueError):
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


class Chunk(NamedTuple):
    """A piece of a file in a pack (format 3): its bytes are [offset, offset + length) of
    the pack `key`'s plaintext, zlib data when length < size (else the bytes as they are),
    `size` bytes once opened, whose sha256 is `sha256` (the deduplication key)."""

    key: str
    offset: int
    length: int
    size: int
    sha256: str

    @staticmethod
    def valid(c: object) -> bool:
        return (
            isinstance(c, list)
            and len(c) == 5
            and isinstance(c[0], str)
            and all(type(v) is int and v >= 0 for v in c[1:4])
            and c[2] <= c[3]
            and isinstance(c[4], str)
            and len(c[4]) == 64
        )

    @property
    def compressed(self) -> bool:
        return self.length < self.size


@dataclass(slots=True)
class ManifestLine:
    root: str
    path: str  # escaped
    type: str
    size: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    inode: int
    sha256: str | None = None
    key: str | None = None  # relative to the prefix
    target: str | None = None  # escaped symlink target
    # None in manifests written before they were recorded: such lines are compared by
    # size, mtime and inode alone, once; the next manifest has them.
    ctime_ns: int | None = None
    dev: int | None = None
    # bytes of the object in the bucket when that differs from size (encrypted: an age file)
    stored: int | None = None
    # format 3 (packs.py): the file's bytes are [offset, offset + size) of the pack `key`
    # (its plaintext, when the pack is an age file)
    offset: int | None = None
    # format 3: the file is these chunks in order, `key` None (the postgres root's files,
    # deduplicated and compressed: see Chunk)
    chunks: list[Chunk] | None = None
    _order: tuple[tuple[int, str], bytes] | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> str:
        """The line as written (keys in this order, no spaces, non-ASCII as is): what
        json.dumps(..., ensure_ascii=False, separators=(",", ":")) of its dict gives, built
        directly (a fifth of the time: a manifest line is written per file and per run).
        An integer field that holds no int (a float, a string) raises ValueError."""
        q = _quote
        out = (
            f'{{"root":{q(self.root)},"path":{q(self.path)},"type":{q(self.type)},"size":{self.size:d},'
            f'"mtime_ns":{self.mtime_ns:d},"mode":{self.mode:d},"uid":{self.uid:d},'
            f'"gid":{self.gid:d},"inode":{self.inode:d}'
        )
        if self.sha256 is not None:
            out += f',"sha256":{q(self.sha256)}'
        if self.key is not None:
            out += f',"key":{q(self.key)}'
        if self.target is not None:
            out += f',"target":{q(self.target)}'
        if self.ctime_ns is not None:
            out += f',"ctime_ns":{self.ctime_ns:d}'
        if self.dev is not None:
            out += f',"dev":{self.dev:d}'
        if self.stored is not None:
            out += f',"stored":{self.stored:d}'
        if self.offset is not None:
            out += f',"offset":{self.offset:d}'
        if self.chunks is not None:
            out += ',"chunks":' + json.dumps([list(c) for c in self.chunks], ensure_ascii=False, separators=(",", ":"))
        return out + "}"

    @classmethod
    def from_json(cls, text: str | bytes) -> ManifestLine:
        d = _loads(text.decode() if isinstance(text, bytes) else text)
        if type(d) is not dict:  # the readers' rule: a line of the wrong shape is a TypeError or a KeyError
            raise TypeError(f"a manifest line is a JSON object, not {type(d).__name__}")
        get = d.get
        # by position: cls(**d) cost 2.3 µs a line (keyword matching), this 0.7; an older
        # line without some fields takes the defaults, a newer one's extra fields are left
        line = cls(
            d["root"],
            d["path"],
            d["type"],
            get("size", 0),
            d["mtime_ns"],
            d["mode"],
            get("uid", 0),
            get("gid", 0),
            get("inode", 0),
            get("sha256"),
            get("key"),
            get("target"),
            get("ctime_ns"),
            get("dev"),
            get("stored"),
            get("offset"),
        )
        chunks = get("chunks")
        if chunks is not None:
            line.chunks = [Chunk(*c) for c in chunks]
        return line

    @classmethod
    def parse(cls, raw: bytes, damaged: bool) -> ManifestLine:
        """from_json; with `damaged`, a line of the wrong shape is a DamagedLine instead of
        an exception (a reader that can go on without that entry: restore, verify)."""
        if not damaged:
            return cls.from_json(raw)
        try:
            d = json.loads(raw)
        except ValueError:
            return DamagedLine("?", "?", "damaged", 0, 0, 0, 0, 0, 0, damage="not JSON")
        if not isinstance(d, dict):
            return DamagedLine("?", "?", "damaged", 0, 0, 0, 0, 0, 0, damage="not a JSON object")
        wrong = [n for n in ("root", "path", "type") if not isinstance(d.get(n), str)]
        wrong += [n for n in ("mtime_ns", "mode") if type(d.get(n)) is not int]
        # optional fields may be absent or null (as older versions may have written them)
        wrong += [
            n
            for n in ("size", "uid", "gid", "inode", "ctime_ns", "dev", "stored", "offset")
            if d.get(n) is not None and (type(d[n]) is not int or d[n] < 0)
        ]
        if d.get("chunks") is not None and not (
            isinstance(d["chunks"], list) and all(Chunk.valid(c) for c in d["chunks"])
        ):
            wrong.append("chunks")
        wrong += [n for n in ("sha256", "key", "target") if d.get(n) is not None and not isinstance(d[n], str)]
        if not wrong:
            return cls.from_json(raw)
        root, path = (v if isinstance(v := d.get(n), str) else "?" for n in ("root", "path"))
        what = ", ".join(f"{n} {d[n]!r}" if n in d else f"no {n}" for n in wrong)
        return DamagedLine(root, path, "damaged", 0, 0, 0, 0, 0, 0, damage=what[:200])

    @classmethod
    def from_entry(cls, root: str, e: WalkedEntry) -> ManifestLine:
        return cls(
            root,
            escape_path(e.relpath),
            e.type,
            e.size,
            e.mtime_ns,
            e.mode,
            e.uid,
            e.gid,
            e.inode,
            target=escape_path(e.target) if e.target is not None else None,
            ctime_ns=e.ctime_ns,
            dev=e.dev,
            _order=(root_order(root), path_order(e.relpath)),
        )

    @property
    def object_size(self) -> int:
        """The size of the object in the bucket (a listing shows it); of a file in a pack
        (offset), its own size."""
        return self.size if self.stored is None else self.stored

    @property
    def stored_whole(self) -> bool:
        """The file is one object of its own (formats 1 and 2, and large files in 3)."""
        return self.key is not None and self.offset is None and self.chunks is None

    @property
    def has_object(self) -> bool:
        """The line says where its bytes are (a file's line written by any version)."""
        return self.sha256 is not None and (self.key is not None or self.chunks is not None)

    def object_refs(self) -> list[tuple[str, int | None]]:
        """(key, size in the bucket) of every object the file's bytes are in; None for a
        pack, whose size is not recorded (packs are named once, never rewritten)."""
        if self.chunks is not None:
            return [(c.key, None) for c in self.chunks]
        if self.key is None:
            return []
        return [(self.key, None if self.offset is not None else self.object_size)]

    @property
    def first_key(self) -> str | None:
        """The key of the (first) object its bytes are in: whose run uploaded them."""
        if self.chunks:
            return self.chunks[0].key
        return self.key

    def same_object(self, other: ManifestLine) -> bool:
        """Both lines name the same stored bytes."""
        return (self.key, self.offset, self.chunks) == (other.key, other.offset, other.chunks)

    def take_object(self, src: ManifestLine) -> None:
        """Point this line at src's stored bytes (a reuse: the same file content)."""
        self.key, self.sha256, self.stored = src.key, src.sha256, src.stored
        self.offset, self.chunks = src.offset, src.chunks

    @property
    def relpath(self) -> bytes:
        return unescape_path(self.path)

    def order(self) -> tuple[tuple[int, str], bytes]:
        """Where the line sorts in a manifest (computed once: merges compare it often)."""
        o = self._order
        if o is None:
            o = self._order = (root_order(self.root), path_order(self.relpath))
        return o


@dataclass(slots=True)
class DamagedLine(ManifestLine):
    """A manifest line of the wrong shape (ManifestLine.parse): its root and path where
    readable ("?" otherwise), type "damaged", and what is wrong with it."""

    damage: str = ""


class ManifestWriter:
    """Gzipped JSON lines streamed to S3 as they come (no whole manifest in memory); in an
    authenticated repository each flushed block is followed by its MAC line (auth.py)."""

    def __init__(
        self, store: SealedStore, key: str, budget: ByteBudget, part_size: int, mac: ManifestMac | None = None
    ) -> None:
        self._out = store.stream(key, budget, part_size)
        self._mac = mac
        self._z = zlib.compressobj(3, zlib.DEFLATED, 31)  # 6 cost 12 µs a line, 3 a third of it
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._compressing = asyncio.Lock()
        self.lines = 0

    async def __aenter__(self) -> ManifestWriter:
        return self

    async def add(self, line: ManifestLine) -> None:
        raw = line.to_json().encode() + b"\n"
        self.lines += 1
        if self._mac is not None:
            self._mac.add(raw)
        self._pending.append(raw)
        self._pending_size += len(raw)
        if self._pending_size >= 1 << 20:
            await self._flush()

    async def _flush(self, end: bool = False) -> None:
        if self._mac is not None and (self._pending or end):
            self._pending.append(self._mac.seal_line(end))
        pending = b"".join(self._pending)
        self._pending, self._pending_size = [], 0
        # in a worker thread (zlib lets go of the GIL): the walk goes on meanwhile (a
        # manifest of 300,000 lines is ~1 s of compression); one block at a time, in order
        async with self._compressing:
            data = await asyncio.to_thread(self._z.compress, pending)
            await self._out.write(data)

    async def finish(self) -> None:
        await self._flush(end=True)
        await self._out.write(self._z.flush())
        await self._out.finish()

    async def __aexit__(self, *exc: Any) -> None:
        await self._out.__aexit__(*exc)


async def gunzip_stream(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Decompress a (possibly multi-member) gzip stream chunk by chunk; raise if truncated."""
    z = zlib.decompressobj(31)
    fed = False  # has the current member received any input?
    async for chunk in chunks:
        while chunk:
            fed = True
            try:
                # a large chunk in a worker thread (zlib lets go of the GIL): the reader's
                # parsing goes on meanwhile
                out = await asyncio.to_thread(z.decompress, chunk) if len(chunk) >= THREAD_MIN else z.decompress(chunk)
            except zlib.error as exc:
                raise RepoError(f"a gzip stream is corrupt ({exc}): run `verify --read-data`") from None
            if out:
                yield out
            if z.eof:
                chunk = z.unused_data
                z = zlib.decompressobj(31)
                fed = False
            else:
                chunk = b""
    if fed and not z.eof:
        raise RepoError("a gzip stream ends early: the object is truncated; run `verify --read-data`")


def key_digest(key: str) -> bytes:
    """A compact stand-in for an object key in sets of a whole repository's keys
    (10 bytes: collisions are out of reach for any library)."""
    return hashlib.blake2b(key.encode(), digest_size=10).digest()


def read_lines(
    chunks: AsyncIterator[bytes],
    mac: ManifestMac | None = None,
    hold: bool = False,
    where: str = "",
    damaged: bool = False,
) -> AsyncIterator[ManifestLine]:
    """The lines of a manifest-like gzip stream. With `mac` (an authenticated repository)
    MAC lines are checked; with `hold` a block's lines come only once its MAC matched
    (without, during a set-up under way, lines pass at once), and are parsed only then: a
    forged line is forged, whatever its shape. Read unchecked (no MAC key, TRUST_BUCKET), a
    MAC line is no entry. `damaged`: see ManifestLine.parse."""
    parse = functools.partial(ManifestLine.parse, damaged=True) if damaged else ManifestLine.from_json
    return read_lines_as(chunks, parse, mac, hold, where)


async def read_lines_as(
    chunks: AsyncIterator[bytes],
    parse: Callable[[bytes], T],
    mac: ManifestMac | None = None,
    hold: bool = False,
    where: str = "",
) -> AsyncIterator[T]:
    """read_lines, each line (its bytes, checked as read_lines checks them) given to
    `parse`: a reader that needs a few fields of most lines parses only those."""
    rest = b""
    block: list[bytes] = []
    async for data in gunzip_stream(chunks):
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        for raw in lines:
            if not raw:
                continue
            if mac is None:
                if not is_auth_line(raw):
                    yield parse(raw)
            elif is_auth_line(raw):
                mac.check_line(raw, where)
                for held in block:
                    yield parse(held)
                block.clear()
            else:
                if mac.ended:
                    raise forged(f"{where}: lines after its last authenticated block")
                mac.add(raw + b"\n")
                if not hold:
                    yield parse(raw)
                    continue
                if mac.block_bytes > MAX_BLOCK:
                    raise forged(f"{where}: {mac.block_bytes} bytes of lines without a MAC")
                block.append(raw)
    if rest:
        if mac is not None:
            raise forged(f"{where}: its last line has no end")
        if not is_auth_line(rest):
            yield parse(rest)
    if mac is not None and not mac.ended and (hold or mac.seq):
        raise forged(f"{where}: it ends without its last authenticated block (truncated or forged)")
