"""`copy --to NAME`: copy snapshots of this repository into a named one (repository/copy.py);
print what was copied; the destination is then a repository of its own (`--repo NAME`)."""

from __future__ import annotations

import argparse
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers, flag, transfer_options
from immich_stream.commands.monitor import Outcome, plain
from immich_stream.errors import ConfigError
from immich_stream.progress import Reporter


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    c = sub.add_parser(
        "copy",
        parents=[common],
        help="copy snapshots into a named repository (a second copy: another bucket, endpoint, provider)",
        description="Copy snapshots into the repository [repositories.NAME] of the config file: only the "
        "objects it does not hold yet, snapshot.json last; run again after an interruption, it goes on.",
    )
    c.add_argument(
        "--to", required=True, metavar="NAME", help="the destination: [repositories.NAME] in the config file"
    )
    c.add_argument("snapshot", nargs="*", help="snapshot ids (or unique prefixes) to copy (default: all)")
    c.add_argument("--latest", action="store_true", help="only the newest snapshot")
    flag(c, "lock_wait")
    transfer_options(c)


def check(args: argparse.Namespace) -> None:
    if args.latest and args.snapshot:
        raise ConfigError("copy --latest and snapshot ids exclude each other: give one or the other")


def lines(stats: Any) -> list[str]:
    """The summary lines of a copy (also under backup --copy-to)."""
    fs = cfg.format_size
    how = f", {stats.server_side} server-side (CopyObject)" if stats.server_side else ""
    out = [
        f"copy to {stats.destination}: {len(stats.copied)} snapshots copied"
        + (f" ({len(stats.present)} there already)" if stats.present else "")
        + f", {stats.objects} objects ({fs(stats.bytes)}){how}, {stats.held} held already"
        + (" (repository created with this one's config.json)" if stats.created else "")
    ]
    out += [f"copied    {sid}" for sid in stats.copied]
    return out


def summary(name: str, stats: Any) -> dict[str, Any]:
    return {"repository": name, "last_snapshot": stats.last, **plain(stats), "ok": True}


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.repository.copy import copy_snapshots

    which = ["latest"] if args.latest else list(args.snapshot)
    stats = await copy_snapshots(settings, args.to, which)
    print("\n".join(lines(stats)), flush=True)
    return Outcome(0, {"copies": [summary(args.to, stats)]})
