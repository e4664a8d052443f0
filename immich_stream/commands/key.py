"""`key`: the age keys of an encrypted repository: show, rotate, reencrypt (repository/keys.py)."""

from __future__ import annotations

import argparse
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers, flag, transfer_options
from immich_stream.commands.monitor import plain
from immich_stream.progress import Reporter


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    k = sub.add_parser(
        "key",
        parents=[common],
        help="the age keys of an encrypted repository: show, rotate, reencrypt",
        description="show: the recipients every object is encrypted to. rotate: a new identity (written first "
        "in the identity file, above the old ones, which keep opening older objects) and config.json's "
        "recipients (the identity's and IMMICH_STREAM_AGE_RECIPIENTS); --reencrypt then rewrites every "
        "object for them. reencrypt: that rewrite alone (it continues where an interrupted one stopped); "
        "afterwards the old identities can be deleted from the file.",
    )
    k.add_argument("action", choices=("show", "rotate", "reencrypt"))
    k.add_argument("--reencrypt", action="store_true", help="rotate: rewrite every object for the new keys")
    k.add_argument(
        "--drop-recipient",
        action="append",
        default=[],
        metavar="AGE1...",
        help="rotate: stop encrypting to this recipient of the repository (repeatable); without it, a recipient "
        "IMMICH_STREAM_AGE_RECIPIENTS no longer names is refused",
    )
    k.add_argument(
        "--drop-missing-recipients",
        action="store_true",
        help="rotate: drop every recipient of the repository that IMMICH_STREAM_AGE_RECIPIENTS no longer names",
    )
    flag(k, "lock_wait")
    transfer_options(k)


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> dict[str, Any]:
    from immich_stream.repository import keys

    if args.action == "show":
        report = await keys.show(settings)
    elif args.action == "rotate":
        report = await keys.rotate(
            settings, reporter, args.reencrypt, tuple(args.drop_recipient), args.drop_missing_recipients
        )
    else:
        report = await keys.reencrypt(settings, reporter)
    print("\n".join(keys.summary_lines(report)), flush=True)
    result: dict[str, Any] = plain(report)
    return result
