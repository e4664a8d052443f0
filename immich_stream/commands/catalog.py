"""`find --user/--album/--person/--taken/--name` (a snapshot's assets by what Immich knows of
them, from its catalog: browse/catalog_find.py) and `restore --album ... --to DIR` (exactly
those assets' files: browse/catalog_restore.py): the selectors and what they print."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers
from immich_stream.commands.monitor import Outcome, plain
from immich_stream.errors import EXIT_PARTIAL, ConfigError
from immich_stream.progress import Reporter

SELECTORS = (
    ("user", "users", "EMAIL|NAME", "assets of this user (email or name)"),
    ("album", "albums", "NAME", "assets in this album"),
    ("person", "people", "NAME", "assets showing this person (a named face)"),
    ("taken", "taken", "FROM..TO", "assets taken in this span (dates or date-times, UTC; either side may be empty)"),
    ("name", "names", "GLOB", "assets whose original file name matches GLOB (e.g. 'IMG_44*.HEIC')"),
)


def add_catalog_selectors(parser: argparse.ArgumentParser) -> None:
    """The selectors find and restore share: each repeatable (any of its values), all
    given must match."""
    group = parser.add_argument_group("Immich catalog selectors (combinable: all must match)")
    for flag, dest, metavar, text in SELECTORS:
        group.add_argument(f"--{flag}", dest=f"select_{dest}", action="append", default=[], metavar=metavar, help=text)


def selectors_of(args: argparse.Namespace) -> Any:
    from immich_stream.browse.catalog_find import Selectors

    return Selectors(**{dest: list(getattr(args, f"select_{dest}", []) or []) for _, dest, _, _ in SELECTORS})


def selected(args: argparse.Namespace) -> bool:
    return any(getattr(args, f"select_{dest}", None) for _, dest, _, _ in SELECTORS)


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    f = sub.add_parser(
        "find",
        parents=[common],
        help="list a snapshot's assets by user, album, person, date or file name, with their files",
        description="List the assets of a snapshot that Immich's catalog (read from the snapshot's "
        "database dump) selects, each with every file that belongs to it.",
    )
    f.add_argument("--snapshot", default="latest", metavar="ID", help="the snapshot to look in (default: latest)")
    add_catalog_selectors(f)


def check(args: argparse.Namespace) -> None:
    if not selected(args):
        raise ConfigError("find needs a selector: --user, --album, --person, --taken or --name (see find --help)")
    selectors_of(args)  # --taken parsed now: a bad date is a usage error before S3 is asked


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\udc80-\udcff]")


def _shown(text: object) -> str:
    """A name from the database as a terminal shows it: control characters (a newline that
    would forge a line of this output, an escape sequence) and bytes not UTF-8 as \\xNN."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()) & 0xFF:02x}", str(text))


def _line(asset: dict[str, Any]) -> str:
    taken = str(asset.get("taken") or "?")[:16].replace("T", " ")
    extra = [f"album {', '.join(asset['albums'])}"] if asset.get("albums") else []
    extra += [f"people {', '.join(asset['people'])}"] if asset.get("people") else []
    extra += ["in the trash"] if asset.get("trashed") else []
    tail = f"  ({'; '.join(extra)})" if extra else ""
    return _shown(f"{taken}  {asset.get('name')!s}  {asset.get('user')}{tail}")


def _files(asset: dict[str, Any]) -> list[str]:
    return [
        _shown(f"    {kind:<15} {root + '/' if root else '(no root) '}{path}")
        for root, path, kind in asset.get("files", [])
    ]


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.browse.catalog_find import find_assets
    from immich_stream.repository.session import open_reader

    selectors = selectors_of(args)
    count = 0

    def show(asset: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        if args.json:  # JSON lines (find is one of cli's JSON_LINES): one per asset, the summary last
            print(json.dumps({"message_type": "asset", **asset}, default=str))
            return
        print(_line(asset))
        for line in _files(asset):
            print(line)

    async with open_reader(settings, "find") as (repo, _):
        snap = await repo.resolve(getattr(args, "snapshot", None) or "latest")
        _, assets = await find_assets(repo, snap, selectors, show)
    files = sum(len(a.get("files", [])) for a in assets)
    if not args.json:
        print(f"{count} assets, {files} files in snapshot {snap.id} ({selectors.describe()})")
        return Outcome(0, {"snapshot": snap.id, "assets": assets, "files": files})
    return Outcome(0, {"snapshot": snap.id, "assets": count, "files": files})


def add_restore_options(parser: argparse.ArgumentParser) -> None:
    add_catalog_selectors(parser)
    parser.add_argument(
        "--layout",
        choices=("library", "names"),
        default=None,
        help="with a selector: library (default: paths as under UPLOAD_LOCATION) or names (album/original-file-name)",
    )


def check_restore(args: argparse.Namespace) -> None:
    if args.layout and not selected(args):
        raise ConfigError("--layout goes with a selector (--album, --user, --person, --taken, --name)")
    if not selected(args):
        return
    if not args.to or args.include or args.root or args.config_files:
        raise ConfigError(
            "restore with --album/--user/--person/--taken/--name restores those assets' files: it needs --to DIR "
            "and takes no --include, --root or --config-files"
        )
    selectors_of(args)


async def run_restore(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.browse.catalog_restore import restore_selected

    fs = cfg.format_size
    layout = args.layout or "library"
    selectors = selectors_of(args)
    snap_id, assets, picked, st = await restore_selected(
        settings, reporter, args.snapshot, Path(args.to), selectors, layout, args.overwrite, not args.no_wait
    )
    print(
        f"restored {len(assets)} assets ({selectors.describe()}) of snapshot {snap_id} into {args.to}: {st.files} "
        f"files ({st.restored} downloaded, {st.skipped} already in place, {st.failed} failed), "
        f"{fs(st.bytes_downloaded)} in {st.seconds:.1f} s"
    )
    if picked.missing:
        print(
            f"{picked.missing} of their files are not in the snapshot (thumbnails or encoded videos of a backup "
            "with --exclude, or an external library not backed up): Immich regenerates derived files"
        )
    if picked.unmapped:
        print(f"{picked.unmapped} of their files are outside every root of the snapshot (paths `find` shows)")
    if layout == "names":
        print(
            "to bring them back into Immich: upload the folders with the Immich CLI (`immich upload --recursive "
            f"--album {args.to}`), which makes new assets with albums named by the folders"
        )
    else:
        print(
            f"to bring them back into Immich: with the database restored to snapshot {snap_id} (`restore "
            f"{snap_id} --database`), copy the files back in place under UPLOAD_LOCATION (`cp -a`, keeping the "
            f"paths under {args.to}); or upload the originals as new assets with the Immich CLI (`immich upload`)"
        )
    for problem in st.problems.kept[:10]:
        print(f"problem   {problem}")
    out = Outcome(
        0, {"snapshot": snap_id, "to": args.to, "assets": len(assets), "missing": picked.missing, **plain(st)}
    )
    out.summary.pop("problems")
    out.summary.pop("first_failure")
    if st.failed:
        out.code = EXIT_PARTIAL
        out.error = (
            f"{st.failed} files could not be restored (each named above); the rest is in place; run the same "
            "command again to retry them"
        )
    return out
