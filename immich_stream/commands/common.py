"""What the commands share: the parser that says a bad command line in one line, the option
groups several commands take (settings, output, transfer, thaw, retention policy), and the
checks of local paths a command will write, made before it touches S3 or the stack.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from immich_stream import config as cfg
from immich_stream.commands.monitor import Outcome
from immich_stream.errors import EXIT_THAWING, ConfigError
from immich_stream.progress import Reporter

# A command returns its exit code, its summary dict, or an Outcome (monitor.py): the --json
# document, the pings and the metrics are made from that, the same way for every command.
CommandResult = int | dict[str, Any] | Outcome
Command: TypeAlias = Callable[[argparse.Namespace, cfg.Settings, Reporter], Awaitable[Any]]
Subparsers: TypeAlias = "argparse._SubParsersAction[Any]"

# Flags that belong to some commands only (added by those commands' parsers).
LOCAL_FLAGS = {
    "stop",
    "exclude",
    "live_pass",
    "append_only",
    "max_shrink",
    "max_downtime",
    "jobs",
    "part_size",
    "max_memory",
    "lock_wait",
    "stale_after",
    "max_unused",
    "keep_last",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
    "keep_within",
    "storage_class",
    "storage_class_library",
    "storage_class_postgres",
    "thaw_days",
    "thaw_tier",
    "copy_to",
}


class UsageError(Exception):
    """argparse's complaint about the command line, to be said in one line (not 31 of usage)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but an error is raised for main() to print as one line (and, under
    --json, as the JSON document too) instead of the usage text and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def help_text(spec: cfg.Spec) -> str:
    """A setting's help for argparse, which reads it as a %-format: its "5%" is a literal."""
    return spec.help.replace("%", "%%")


def flag(p: argparse.ArgumentParser | Any, name: str) -> None:
    """The flag of setting `name` (config.SETTINGS), on a command or one of its groups."""
    spec = cfg.SPECS[name]
    assert spec.flag is not None
    if spec.parse is cfg.parse_bool:
        p.add_argument(spec.flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_text(spec))
        return
    p.add_argument(
        spec.flag,
        dest=name,
        default=None,
        metavar=name.upper().replace("_", "-").removeprefix("KEEP-"),
        help=help_text(spec),
    )


def policy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retention policy (restic's rules; any snapshot one rule keeps is kept)")
    for name in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly", "keep_within"):
        flag(g, name)


def common_parser() -> Parser:
    """Options every command takes; each maps to a setting in config.SETTINGS."""
    p = Parser(add_help=False)
    g = p.add_argument_group("settings (override the config file, Immich's .env and the environment)")
    g.add_argument(
        "--config",
        dest="config_path",
        metavar="PATH",
        help="TOML config file (default: $IMMICH_STREAM_CONFIG, ~/.config/immich-stream/config.toml, "
        "/etc/immich-stream/config.toml)",
    )
    g.add_argument(
        "--repo",
        dest="repo",
        metavar="NAME",
        help="run against the named repository [repositories.NAME] of the config file (e.g. the copy that "
        "`copy` and backup --copy-to write) instead of the main one",
    )
    for spec in cfg.SETTINGS:
        if spec.flag and spec.name not in LOCAL_FLAGS:
            kwargs: dict[str, Any] = {"dest": spec.name, "help": help_text(spec), "default": None}
            if spec.parse is cfg.parse_bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["metavar"] = "URL" if spec.name in ("notify", "webhook") else spec.name.upper()
            if spec.parse in (cfg.parse_notify_urls, cfg.parse_paths):
                kwargs["action"] = "append"  # repeatable (--compose-file as compose's -f)
            g.add_argument(spec.flag, **kwargs)
    v = p.add_argument_group("output")
    v.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress")
    v.add_argument("-v", "--verbose", action="store_true", help="debug output")
    v.add_argument(
        "--json",
        action="store_true",
        help="one JSON document on stdout at the end (summary, exit code, problems); progress and log "
        "lines as JSON lines on stderr",
    )
    return p


def transfer_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transfer")
    for name in ("jobs", "part_size", "max_memory"):
        flag(g, name)


def thaw_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("archived objects (GLACIER, DEEP_ARCHIVE): thawed before they are read")
    flag(g, "thaw_days")
    flag(g, "thaw_tier")
    g.add_argument(
        "--no-wait",
        dest="no_wait",
        action="store_true",
        help=f"request the thaws, then exit {EXIT_THAWING} instead of waiting; the same command run again "
        "later carries on (thaws in progress are not requested twice)",
    )


def check_writable(path: Path, what: str, named: Path | None = None) -> None:
    """Refuse, before anything starts, a directory this process could not create or write:
    its nearest existing ancestor must be a directory we may write (os.access also says
    no for root on a read-only file system)."""
    existing = path.absolute()
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {named or path}: {existing} is not a directory: choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
        raise ConfigError(
            f"{what} {named or path}: {existing} is not writable ({why}): choose "
            "a place this user may write to, or run as a user who may"
        )


def check_state_dir() -> None:
    """The host state directory (the stack's state for a restart) is written by a backup and
    by a database restore."""
    from immich_stream.host.hoststate import state_dir

    check_writable(state_dir(), "state directory (IMMICH_STREAM_STATE_DIR)")


def check_from_file(args: argparse.Namespace) -> None:
    """restore --database and drill may read a dump file instead of a snapshot's dump."""
    from_file = getattr(args, "from_file", None)
    if from_file and from_file != "-" and not Path(from_file).is_file():
        raise ConfigError(f"--from-file {args.from_file} is not a file: give the path of a pg_dump or pg_dumpall file")


def is_stream(path: str) -> bool:
    """A character device or a pipe (/dev/null, a FIFO): written as a stream, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def as_of_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--as-of",
        metavar="TIME",
        help="see the repository as it was at TIME (ISO 8601 with a zone, e.g. 2026-05-01T03:00Z, or a duration "
        "ago, e.g. 3d): on a versioned bucket, later deletes and overwrites are ignored; read-only",
    )


def as_of(args: argparse.Namespace, settings: cfg.Settings | None = None) -> dt.datetime | None:
    """--as-of TIME as an aware datetime (ConfigError when it is none); set on settings when given."""
    text = getattr(args, "as_of", None)
    if not text:
        return None
    when: dt.datetime | None = None
    try:
        when = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=cfg.parse_duration(text))
    except OverflowError:  # a duration ago before year 1
        when = None
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
        except ValueError:
            when = None
    if when is None or when.tzinfo is None:
        raise ConfigError(
            f"--as-of {text!r} is not a time with a zone: give ISO 8601 with one (2026-05-01T03:00:00Z, "
            "2026-05-01T05:00+02:00) or a duration ago (36h, 3d)"
        )
    if settings is not None:
        settings.as_of = when
    return when


def root_arg(text: str) -> str:
    """argparse type of a --root: library, postgres or external:NAME."""
    from immich_stream.repository.layout import is_root

    if not is_root(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a root: library, postgres or external:NAME (`snapshots` lists a snapshot's roots)"
        )
    return text
