"""`ls`, `find` and `diff`: look inside snapshots from their manifests alone
(browse/listing.py, browse/diff.py), printing each entry as it is read: memory stays
bounded whatever the library size. With --json each entry is one JSON line as it comes,
and the summary document ends the output on a line of its own (JSON_LINES in cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands import catalog
from immich_stream.commands.common import Subparsers, root_arg
from immich_stream.commands.monitor import Outcome, plain
from immich_stream.errors import ConfigError, NothingMatched
from immich_stream.progress import Reporter
from immich_stream.repository.manifest import ManifestLine

# Commands whose --json output is JSON lines: one per entry while it is read, then the
# summary document on one line (not collected into the document: memory stays bounded).
JSON_LINES = ("ls", "find", "diff")


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    ls = sub.add_parser(
        "ls",
        parents=[common],
        help="list a directory of a snapshot (type, size, mtime, name)",
        description="List a directory of a snapshot from its manifest (nothing is downloaded but the manifest).",
    )
    ls.add_argument(
        "snapshot",
        nargs="?",
        default="latest",
        help="a snapshot id (or a unique prefix), or latest (the default; a lone argument that does not start "
        "with a digit is a PATH in the latest snapshot)",
    )
    ls.add_argument("path", nargs="?", default="", help="a directory inside the root (default: the root), or a file")
    ls.add_argument(
        "--root", type=root_arg, default="library", metavar="ROOT", help="library (default), postgres or external:NAME"
    )
    ls.add_argument("-l", "--long", action="store_true", help="also mode, uid, gid and the sha256's first 12 digits")
    f = sub.add_parser(
        "find",
        parents=[common],
        help="which snapshots hold a path or file name (newest first), or a snapshot's Immich assets by user, "
        "album, person, date or original file name",
        description="With a PATTERN: search the snapshots' manifests for paths or file names matching a glob, newest "
        "snapshot first. With the catalog's selectors: list the assets of one snapshot (--snapshot, default latest) "
        "that Immich's catalog (read from the snapshot's database dump) selects, each with every file that belongs "
        "to it.",
    )
    add_find_arguments(f)
    catalog.add_catalog_selectors(f)
    d = sub.add_parser(
        "diff",
        parents=[common],
        help="what changed between two snapshots: added, removed, changed, moved",
        description="Compare two snapshots' manifests: entries added, removed, changed (other bytes), and files "
        "moved (the same bytes at another path).",
    )
    d.add_argument("first", metavar="ID1", help="the older snapshot (an id, a unique prefix, or latest)")
    d.add_argument("second", metavar="ID2", help="the newer snapshot")
    d.add_argument("--root", type=root_arg, action="append", metavar="ROOT", help="only this root; repeatable")


def add_find_arguments(parser: argparse.ArgumentParser) -> None:
    """find's manifest arguments (PATTERN, --snapshot/--all, --root)."""
    parser.add_argument(
        "pattern",
        nargs="?",
        metavar="PATTERN",
        help="a glob matched against each whole path (relative to its root) and against its base name "
        "(* also matches /); quote it for the shell",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--snapshot",
        metavar="ID",
        help="only this snapshot (an id, a unique prefix, or latest; with the catalog's selectors: the one "
        "snapshot to look in, default latest)",
    )
    which.add_argument("--all", dest="all_", action="store_true", help="every snapshot (the default for a PATTERN)")
    parser.add_argument("--root", type=root_arg, action="append", metavar="ROOT", help="only this root; repeatable")


def check_find(args: argparse.Namespace) -> None:
    """A PATTERN (paths, over the manifests) or the catalog's selectors (assets, from one
    snapshot's catalog): one of the two."""
    if catalog.selected(args):
        if args.pattern:
            raise ConfigError(
                f"find takes a PATTERN or the catalog's selectors, not both: for an original file name use "
                f"--name {args.pattern!r} with the others"
            )
        if args.all_ or args.root:
            raise ConfigError(
                "find with the catalog's selectors looks in one snapshot: drop --all/--root, use --snapshot ID"
            )
        catalog.check(args)
        return
    if not args.pattern:
        raise ConfigError(
            "find needs a PATTERN (a glob such as 'IMG_4411*') or a catalog selector (--album, --user, --person, "
            "--taken, --name): see `immich-stream find --help`"
        )


def _when(ns: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 1_000_000_000))
    except (OverflowError, OSError, ValueError):
        return "?"


def _entry(line: ManifestLine, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        **extra,
        "root": line.root,
        "path": line.path,
        "type": line.type,
        "size": line.size,
        "mtime": _when(line.mtime_ns).replace(" ", "T") + "Z",
        "mtime_ns": line.mtime_ns,
        "mode": line.mode,
        "uid": line.uid,
        "gid": line.gid,
    }
    if line.sha256 is not None:
        out["sha256"] = line.sha256
    if line.target is not None:
        out["target"] = line.target
    return out


def _json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")


def _size(line: ManifestLine) -> str:
    return str(line.size) if line.type == "file" else "-"


_TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}


def _ls_line(line: ManifestLine, name: str, long: bool) -> str:
    shown = name + "/" if line.type == "dir" else name
    if line.type == "symlink":
        shown += f" -> {line.target}"
    if not long:
        return f"{line.type:<7} {_size(line):>12}  {_when(line.mtime_ns)}  {shown}"
    mode = stat.filemode(_TYPE_BITS.get(line.type, 0) | (line.mode & 0o7777))
    sha = (line.sha256 or "-")[:12]
    return f"{mode} {line.uid:>6} {line.gid:>6} {_size(line):>12}  {_when(line.mtime_ns)}  {sha:<12}  {shown}"


def _quiet_stdout() -> None:
    """The reader of our output has gone (`ls | head`): what is left goes nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


async def run_ls(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.browse.listing import Counts, clean_path, list_path, parse
    from immich_stream.repository.session import open_reader

    which, path_text = args.snapshot, args.path
    if not path_text and which != "latest" and not which[:1].isdigit():
        which, path_text = "latest", which  # `ls upload/x`: ids (and their prefixes) start with a digit
    path = clean_path(path_text)
    counts = Counts()
    async with open_reader(settings, "ls") as (repo, _lock):
        snap = await repo.resolve(which)
        prefix = path + b"/" if path else b""
        try:
            async for line in list_path(repo.read_manifest_as(snap.id, parse), snap.id, args.root, path, counts):
                rel = line.path
                if line.relpath.startswith(prefix) and line.relpath != path:
                    rel = rel.rpartition("/")[2]
                if args.json:
                    _json(_entry(line, message_type="entry", name=rel))
                else:
                    sys.stdout.write(_ls_line(line, rel, args.long) + "\n")
        except BrokenPipeError:
            _quiet_stdout()
    summary = {"snapshot": snap.id, "root": args.root, "path": os.fsdecode(path), **plain(counts)}
    return Outcome(
        0, summary, [f"{counts.damaged} damaged manifest lines skipped: run `verify`"] if counts.damaged else []
    )


async def run_find(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    """find PATTERN over the manifests (the catalog's selectors are answered elsewhere)."""
    from immich_stream.browse.listing import Counts, find_in, matcher, parse
    from immich_stream.repository.session import open_reader, still_reading

    check_find(args)
    if catalog.selected(args):
        return await catalog.run(args, settings, reporter)
    match = matcher(args.pattern)
    roots = set(args.root) if args.root else None
    counts = Counts()
    searched = 0
    async with open_reader(settings, "find") as (repo, lock):
        ids = [(await repo.resolve(args.snapshot)).id] if args.snapshot else list(reversed(await repo.snapshot_ids()))
        try:
            for sid in ids:
                still_reading(lock)
                searched += 1
                async for line in find_in(repo.read_manifest_as(sid, parse), match, roots, counts):
                    if args.json:
                        _json(_entry(line, message_type="match", snapshot=sid))
                    else:
                        shown = line.path + "/" if line.type == "dir" else line.path
                        sys.stdout.write(f"{sid}  {line.root:<8} {_size(line):>12}  {_when(line.mtime_ns)}  {shown}\n")
        except BrokenPipeError:
            _quiet_stdout()
    summary = {"pattern": args.pattern, "snapshots": searched, **plain(counts)}
    problems = [f"{counts.damaged} damaged manifest lines skipped: run `verify`"] if counts.damaged else []
    if not counts.entries:
        n = f"{searched} snapshot" + ("" if searched == 1 else "s")
        return Outcome(NothingMatched.exit_code, summary, problems, f"nothing matched {args.pattern} in {n}")
    return Outcome(0, summary, problems)


async def run_diff(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.browse.diff import Change, DiffTotals, diff
    from immich_stream.browse.listing import parse
    from immich_stream.repository.session import open_reader

    totals = DiffTotals()
    async with open_reader(settings, "diff") as (repo, _lock):
        first, second = await repo.resolve(args.first), await repo.resolve(args.second)
        roots = set(args.root) if args.root else None

        def where(line: ManifestLine) -> str:
            return f"{line.root}:{line.path}" + ("/" if line.type == "dir" else "")

        def human(c: Change) -> str:
            if c.kind == "moved":
                assert c.old is not None
                return f">  {where(c.old)} -> {where(c.line)}  ({c.line.size})"
            if c.kind == "changed":
                assert c.old is not None
                sizes = f"  ({c.old.size} -> {c.line.size})" if c.line.type == "file" else ""
                kind = "" if c.old.type == c.line.type else f"  ({c.old.type} -> {c.line.type})"
                return f"M  {where(c.line)}{sizes}{kind}"
            size = f"  ({c.line.size})" if c.line.type == "file" else ""
            return f"{'+' if c.kind == 'added' else '-'}  {where(c.line)}{size}"

        try:
            async for c in diff(
                lambda: repo.read_manifest_as(first.id, parse),
                lambda: repo.read_manifest_as(second.id, parse),
                totals,
                roots,
            ):
                if args.json:
                    extra: dict[str, Any] = {"message_type": "change", "kind": c.kind}
                    if c.old is not None:
                        extra.update(from_root=c.old.root, from_path=c.old.path, from_size=c.old.size)
                        if c.old.sha256 is not None:
                            extra["from_sha256"] = c.old.sha256
                    _json(_entry(c.line, **extra))
                else:
                    sys.stdout.write(human(c) + "\n")
            if not args.json:
                fs = cfg.format_size
                t = totals
                print(f"added:   {t.added.entries} entries, {t.added.files} files, {fs(t.added.bytes)}")
                print(f"removed: {t.removed.entries} entries, {t.removed.files} files, {fs(t.removed.bytes)}")
                print(
                    f"changed: {t.changed.entries} entries, {t.changed.files} files, "
                    f"{fs(t.changed_old_bytes)} -> {fs(t.changed.bytes)}"
                )
                print(f"moved:   {t.moved.files} files, {fs(t.moved.bytes)}")
        except BrokenPipeError:
            _quiet_stdout()
    summary = {"first": first.id, "second": second.id, **plain(totals)}
    problems = [f"{totals.damaged} damaged manifest lines skipped: run `verify`"] if totals.damaged else []
    return Outcome(0, summary, problems)
