"""The command layer: one module per command, each declaring its own flags (add_parser), the
checks of its arguments made before anything starts (check), and its run: it calls into the
library, prints its report and returns its exit code (restic's cmd_*.go). This package
assembles the parser from them; cli.py runs the chosen command.

Adding a command: a module with add_parser and run, and its lines in PARSERS and COMMANDS
(and CHECKS).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from immich_stream import __version__
from immich_stream.commands import (
    backup,
    catalog,
    config,
    copy,
    doctor,
    drill,
    init,
    key,
    prune,
    restore,
    schedule,
    snapshots,
    unlock,
    verify,
)
from immich_stream.commands.common import Command, Parser, Subparsers, common_parser

# Each command's parser, in the order --help lists them.
PARSERS: tuple[Callable[[Subparsers, argparse.ArgumentParser], None], ...] = (
    config.add_parser,
    init.add_parser,
    backup.add_parser,
    prune.add_parser,
    unlock.add_parser,
    snapshots.add_parser,
    copy.add_parser,
    restore.add_parser,
    catalog.add_parser,
    drill.add_parser,
    verify.add_parser,
    doctor.add_parser,
    key.add_parser,
    schedule.add_parser,
)

# The commands that run on the event loop (schedule is a loop of child processes of these).
COMMANDS: dict[str, Command] = {
    "config": config.run,
    "init": init.run,
    "backup": backup.run,
    "snapshots": snapshots.run,
    "copy": copy.run,
    "restore": restore.run,
    "find": catalog.run,
    "verify": verify.run,
    "drill": drill.run,
    "prune": prune.run,
    "unlock": unlock.run,
    "doctor": doctor.run,
    "key": key.run,
}

# Each command's checks of its arguments (local paths it will write, flags that do not go
# together), made once the settings are loaded and before it touches S3 or the stack.
CHECKS: dict[str, Callable[[argparse.Namespace], None]] = {
    "backup": backup.check,
    "snapshots": snapshots.check,
    "copy": copy.check,
    "restore": restore.check,
    "find": catalog.check,
    "drill": drill.check,
    "schedule": schedule.check,
}


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = Parser(
        prog="immich-stream",
        description="Back up a self-hosted Immich server straight into S3: nothing staged on local disk, "
        "only changes uploaded, the stack always started again.",
    )
    parser.add_argument("--version", action="version", version=f"immich-stream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in PARSERS:
        add_parser(sub, common)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """The chosen command's checks of its arguments, if it has any."""
    if check := CHECKS.get(args.command):
        check(args)
