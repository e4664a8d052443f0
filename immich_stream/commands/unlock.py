"""`unlock`: remove stale repository locks (every lock with --force), saying whose each was and
what removing a live one endangers."""

from __future__ import annotations

import argparse
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers
from immich_stream.progress import Reporter


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    un = sub.add_parser("unlock", parents=[common], help="remove stale repository locks")
    un.add_argument("--force", action="store_true", help="remove every lock, stale or not (say whose first)")


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> dict[str, Any]:
    from immich_stream.repository.locks import unlock
    from immich_stream.repository.session import open_repo

    async with open_repo(settings, check=False, deletes="unlock") as repo:  # whatever is there: unlock must always work
        removed, forced, kept = await unlock(repo, args.force, settings.tuning.lock_stale)
    for lk in removed + forced:
        # Without its lock a run cannot commit, and prune no longer spares its uploads.
        endangers = ""
        if lk.run:
            data = repo.relative_key(repo.data_prefix()) + lk.run + "/"
            snapshot = repo.relative_key(repo.snapshot_prefix(lk.run))
            endangers = (
                f": run {lk.run} can no longer commit; its uploads ({data}, {snapshot}) "
                "that no committed snapshot uses become collectable by the next prune"
            )
        live = " (it was live)" if lk in forced else ""
        print(f"removed lock of {lk.describe()}{live}{endangers}")
    for lk in kept:
        print(f"kept live lock of {lk.describe()} (--force removes it)")
    if not removed and not forced and not kept:
        print("no locks")
    return {
        "removed": [lk.describe() for lk in removed],
        "forced": [lk.describe() for lk in forced],
        "kept": [lk.describe() for lk in kept],
    }
