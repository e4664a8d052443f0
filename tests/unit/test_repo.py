"""Unit tests of immich_stream/repository/repo.py: keys, escaped paths, manifest lines, gzip streams, and the
journal against the rclone S3 server."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import hashlib
import json
from collections.abc import AsyncIterator

import pytest

from immich_stream.config import Settings
from immich_stream.errors import RepoError
from immich_stream.repository.layout import (
    LONG_KEY_DIR,
    STOPPED_DIR,
    escape_path,
    is_snapshot_id,
    new_snapshot_id,
    run_of,
    unescape_path,
)
from immich_stream.repository.manifest import Chunk, ManifestLine, gunzip_stream, path_order
from immich_stream.repository.repo import JOURNAL_MAX_OBJECT, JournalWriter, Repo
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store
from tests.unit.lines import line

# -- keys and the repository format ------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "immich-backup", "/a/b/"])
def test_every_key_of_a_snapshot_is_built_in_repo(prefix: str) -> None:
    repo = Repo(None, prefix)  # type: ignore[arg-type]  # key building needs no bucket
    base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    sid = "2024-01-31T020000Z-1a2b"
    assert repo.manifest_key(sid) == f"{base}snapshots/{sid}/manifest.jsonl.gz"
    assert repo.dump_key(sid) == f"{base}snapshots/{sid}/database.sql.gz"
    assert repo.summary_key(sid) == f"{base}snapshots/{sid}/snapshot.json"
    assert repo.lock_key("x.json") == f"{base}locks/x.json"
    assert repo.data_prefix() == f"{base}data/"
    assert repo.relative_key(repo.dump_key(sid)) == f"snapshots/{sid}/database.sql.gz"
    if base:
        with pytest.raises(RepoError, match="outside the repository prefix"):
            repo.relative_key("elsewhere/x")


def test_data_keys_of_paths_too_long_for_s3_are_stable_digests() -> None:
    repo = Repo(None, "p")  # type: ignore[arg-type]
    assert repo.data_key("run", "library", "a/b.jpg") == "data/run/library/a/b.jpg"
    long_part = "x" * 300
    key = repo.data_key("run", "library", f"a/{long_part}")
    assert key == f"data/run/library/{LONG_KEY_DIR}/{hashlib.sha256(f'a/{long_part}'.encode()).hexdigest()}"
    assert key == repo.data_key("run", "library", f"a/{long_part}")


def test_run_ids_are_parsed_out_of_keys_only_when_ours() -> None:
    sid = new_snapshot_id(dt.datetime(2024, 1, 31, 2, 0, tzinfo=dt.UTC))
    assert is_snapshot_id(sid) and not is_snapshot_id("2024-13-31T020000Z-1a2b") and not is_snapshot_id("x")
    assert run_of(f"data/{sid}/library/a.jpg") == sid
    assert run_of(f"snapshots/{sid}/snapshot.json") == sid
    assert run_of("data/") is None and run_of(f"data/{sid}") is None and run_of("data/other/x") is None
    assert run_of(f"locks/{sid}/x") is None


@pytest.mark.parametrize(
    "raw", [b"plain/name.jpg", b"100%/x", b"new\nline", b"\xff\xfe invalid utf-8", "ünïcode/名前".encode(), b"tab\tq"]
)
def test_escaped_paths_round_trip(raw: bytes) -> None:
    text = escape_path(raw)
    text.encode("utf-8")  # always valid UTF-8
    assert "\n" not in text and unescape_path(text) == raw


def test_manifest_line_json_round_trip_and_old_lines() -> None:
    ln = line("a b/%c", ctime=None, dev=None)
    assert ManifestLine.from_json(ln.to_json()) == ln
    old = ManifestLine.from_json('{"root":"library","path":"x","type":"dir","mtime_ns":1,"mode":493}')
    assert old.size == 0 and old.ctime_ns is None and old.dev is None and old.key is None


def _dumps_as_before(ln: ManifestLine) -> str:
    """to_json as it was written until the f-string: json.dumps of the line's dict."""
    d: dict[str, object] = {n: getattr(ln, n) for n in ("root", "path", "type", "size", "mtime_ns", "mode")}
    d.update(uid=ln.uid, gid=ln.gid, inode=ln.inode)
    for n in ("sha256", "key", "target", "ctime_ns", "dev", "stored", "offset"):
        if getattr(ln, n) is not None:
            d[n] = getattr(ln, n)
    if ln.chunks is not None:
        d["chunks"] = [list(c) for c in ln.chunks]
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


def test_manifest_lines_are_written_byte_for_byte_as_json_dumps_wrote_them() -> None:
    lines = [
        line("a b/%c", ctime=None, dev=None),
        line('quo"te\\/ü名前 \t', sha="ab" * 32, key="data/x/p\"k"),
        ManifestLine("library", "l", "symlink", 0, 1, 0o777, 0, 0, 5, target='../"ä"\u2028', ctime_ns=2, dev=3),
        ManifestLine("postgres", "base/1", "file", 9, 1, 0o600, 999, 999, 7, "c" * 64, None, None, 4, 5, None, None,
                     [Chunk("data/r/packs/00", 0, 5, 9, "d" * 64), Chunk("data/r/packs/01", 5, 9, 9, "e" * 64)]),
        ManifestLine("library", "p", "file", 3, 1, 0o644, 0, 0, 8, "f" * 64, "data/r/packs/02", None, 1, 2, 40, 17),
    ]  # fmt: skip
    for ln in lines:
        assert ln.to_json() == _dumps_as_before(ln)
        assert ManifestLine.from_json(ln.to_json()) == ln
    bad = ManifestLine("library", "x", "file", 1.5, 1, 0o644, 0, 0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        bad.to_json()


def test_manifest_lines_parse_as_json_loads_did() -> None:
    text = line("x").to_json()
    assert ManifestLine.from_json(f" {text}\n") == ManifestLine.from_json(text)  # white space: json.loads' rule
    for wrong in (text + "x", text[:-1], "", "[1]", text + text):
        with pytest.raises((ValueError, TypeError)):
            ManifestLine.from_json(wrong)


async def test_gunzip_stream_reads_members_and_refuses_truncation() -> None:
    data = gzip.compress(b"hello ") + gzip.compress(b"world")

    async def chunks(b: bytes, n: int = 7) -> AsyncIterator[bytes]:
        for i in range(0, len(b), n):
            yield b[i : i + n]

    assert b"".join([c async for c in gunzip_stream(chunks(data))]) == b"hello world"
    with pytest.raises(RepoError, match="ends early"):
        _ = [c async for c in gunzip_stream(chunks(data[:-5]))]
    with pytest.raises(RepoError, match="corrupt"):
        _ = [c async for c in gunzip_stream(chunks(b"\x1f\x8b\x08\x00garbage-garbage-garbage"))]


async def test_journal_is_written_in_chunks_as_the_run_goes_and_read_back_in_order(s3_settings: Settings) -> None:
    run = "2026-01-01T000000Z-bbbb"
    async with Store(StoreOptions.from_settings(s3_settings)) as store:
        repo = Repo(store, "p", journal_interval=1.0)  # the test hook (IMMICH_STREAM_JOURNAL_INTERVAL=1s)
        journal = JournalWriter(repo, run, "live")
        lines = [line(f"d/{i:04d}.jpg") for i in range(300)]
        for i, ln in enumerate(lines):
            await journal.add(ln)
            if i == 99:
                assert journal.chunks == 0, "nothing is written before a second has passed"
                await asyncio.sleep(1.1)  # the next line is written with everything before it
        assert journal.chunks == 1, "one chunk after the interval"
        await journal.flush()
        await journal.flush()  # nothing new: no empty chunk
        assert journal.chunks == 2 and journal.lines == 300
        # a key that is not a chunk this program wrote, and an oversized one, are not read
        await store.put(f"p/snapshots/{run}/journal/live-notanumber.jsonl.gz", b"x")
        await store.put(repo.journal_key(run, "live", 7), b"\0" * (JOURNAL_MAX_OBJECT + 1))
        passes = await repo.journals(run)
        assert list(passes) == ["live"] and len(passes["live"]) == 2
        back = [ln async for ln in repo.read_lines(passes["live"])]
        assert [ln.path for ln in back] == [ln.path for ln in lines]
        await repo.delete_journals(run)
        assert await repo.journals(run) == {}


async def test_a_damaged_or_foreign_journal_is_skipped_not_fatal(s3_settings: Settings) -> None:
    run = "2026-01-01T000000Z-cccc"
    async with Store(StoreOptions.from_settings(s3_settings)) as store:
        repo = Repo(store, "p")
        journal = JournalWriter(repo, run, "live")
        await journal.add(line("a.jpg"))
        await journal.add(line("b.jpg", root="a-root-of-a-later-version"))
        await journal.flush()
        await store.put(repo.journal_key(run, "live", 1), b"not gzip at all")
        keys = (await repo.journals(run))["live"]
        got = [ln.path async for ln in repo.read_journal(keys, "a test journal")]
        assert got == ["a.jpg"], "the unknown root is skipped, the damaged chunk ends the journal"


def test_a_second_upload_by_the_same_run_has_a_key_of_its_own() -> None:
    repo = Repo(None, "p")  # type: ignore[arg-type]
    first = repo.data_key("run", "library", "a/b.jpg")
    again = repo.data_key("run", "library", "a/b.jpg", STOPPED_DIR)
    assert first == "data/run/library/a/b.jpg" and again == "data/run/library/%stopped/a/b.jpg"
    long_path = "x" * 300
    assert repo.data_key("run", "library", long_path, STOPPED_DIR).startswith("data/run/library/%stopped/%long/")
    assert escape_path(b"%stopped") != "%stopped", "no file name can become the reserved folder"


def test_path_order_sorts_as_the_tuple_of_names_the_walk_goes_by() -> None:
    import random

    rng = random.Random(29)
    alphabet = [b"a", b"b", b"!", b" ", b"\x01", b".", b"-", b"\xff", b"\xc3\xa9"]
    paths = {
        b"/".join(b"".join(rng.choices(alphabet, k=rng.randint(1, 3))) for _ in range(rng.randint(1, 4)))
        for _ in range(3000)
    }
    by_names = sorted(paths, key=lambda p: tuple(p.split(b"/")))
    assert sorted(paths, key=path_order) == by_names
    assert path_order(b"a") < path_order(b"a/b") < path_order(b"a!") < path_order(b"a!/b")
