"""Command line: the entry point. Parses the command line (the parser is assembled from the
command modules in commands/), loads the settings, runs the chosen command in the process
runtime (commands/runtime.py), and turns every error into one line on stderr and a documented
exit code (see errors.py and the README); then tells monitoring (pings, the metrics file) and,
with --json, prints the one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import sys
import time
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands import COMMANDS, build_parser, check_args
from immich_stream.commands import schedule as schedule_command
from immich_stream.commands.browse import JSON_LINES
from immich_stream.commands.common import UsageError
from immich_stream.commands.monitor import LogTail, Outcome, Pinger, document, metrics_text, outcome_of, write_metrics
from immich_stream.commands.notify import Notifier
from immich_stream.commands.runtime import exit_past_hung_threads, new_loop, run_with_signals, tune_malloc
from immich_stream.config.repositories import pointed_at
from immich_stream.errors import (
    EXIT_INCOMPLETE,
    EXIT_PRUNE_FAILED,
    EXIT_SIGINT,
    EXIT_UNSTABLE,
    EXIT_USAGE,
    ImmichStreamError,
)
from immich_stream.progress import Reporter, setup_logging

log = logging.getLogger("immich_stream")


def _usage_error(exc: UsageError, argv: list[str]) -> int:
    command = next((a for a in argv if a in (*COMMANDS, "schedule")), "")
    where = exc.prog.removeprefix("immich-stream").strip()
    line = f"{where + ': ' if where else ''}{exc}; see `immich-stream {command + ' ' if command else ''}--help`"
    print(f"immich-stream: error: {line}", file=sys.stderr, flush=True)
    options = argv[: argv.index("--")] if "--" in argv else argv  # what follows -- is schedule's command
    if "--json" in options:
        print(json.dumps(document(command, Outcome(EXIT_USAGE, error=line), time.time(), 0.0), indent=2), flush=True)
    return EXIT_USAGE


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {s.name: getattr(args, s.name) for s in cfg.SETTINGS if getattr(args, s.name, None) is not None}


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first leaf that is not a cancellation (those follow from the first failure)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for e in exc.exceptions:
                walk(e)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, ImmichStreamError):
            return leaf
    return next((e for e in leaves if not isinstance(e, asyncio.CancelledError)), leaves[0])


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    exit_past_hung_threads(code)
    return code


def _main(argv: list[str] | None = None) -> int:
    tune_malloc()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _usage_error(exc, argv)
    as_json = bool(args.json)
    verbosity = -1 if args.quiet else (1 if args.verbose else 0)
    setup_logging(verbosity, interactive=sys.stderr.isatty(), json_lines=as_json)
    tail = LogTail()  # the body of a failure ping
    logging.getLogger("immich_stream").addHandler(tail)
    reporter = Reporter.for_terminal(quiet=args.quiet, json_lines=as_json)
    started, t0 = time.time(), time.monotonic()
    settings: cfg.Settings | None = None
    pinger: Pinger | None = None
    notifier: Notifier | None = None
    try:
        settings = cfg.load(flags=_flags(args), config_path=args.config_path, missing_ok=args.command == "init")
        # schedule runs the backup that uses them, doctor checks what it needs, config shows them
        every = args.command in ("config", "doctor", "schedule")
        cfg.validate_notifiers(settings, [n for n in NOTIFIERS if every or _monitored(settings, n, args.command)])
        if getattr(args, "repo", None):
            settings = pointed_at(settings, args.repo, os.environ)
        check_args(args)
        if _monitored(settings, "ping_url", args.command):
            assert settings.ping_url is not None
            pinger = Pinger(settings.ping_url, args.command)
            pinger.start()
        notifier = Notifier(settings, args.command, {n for n in NOTIFIERS if _monitored(settings, n, args.command)})
        notifier.start()
        outcome = _run_command(args, settings, reporter, as_json)
    except ImmichStreamError as exc:
        outcome = Outcome(exc.exit_code, error=str(exc))
    except BaseExceptionGroup as group:  # from a TaskGroup: report the error that started it
        first = _first_leaf(group)
        if isinstance(first, ImmichStreamError):
            outcome = Outcome(first.exit_code, error=str(first))
        else:
            outcome = _internal_error(first, group)
    except KeyboardInterrupt:  # a signal before the loop's handlers were installed
        outcome = Outcome(EXIT_SIGINT, error="interrupted")
    except Exception as exc:  # a bug: still one line and exit 1; the traceback with -v
        outcome = _internal_error(exc, exc)
    if outcome.error:
        print(f"immich-stream: error: {outcome.error}", file=sys.stderr, flush=True)
    _report(args, settings, outcome, pinger, notifier, tail, started, time.monotonic() - t0)
    return outcome.code


def _run_command(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter, as_json: bool) -> Outcome:
    if args.command == "schedule":  # not async: a loop of child processes
        return Outcome(schedule_command.run(args))
    command = COMMANDS[args.command]
    # With --json, stdout carries the one document at the end: the human text goes nowhere.
    # (ls, find and diff print JSON lines themselves: JSON_LINES)
    quiet = as_json and args.command not in JSON_LINES
    human = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    with human, asyncio.Runner(loop_factory=new_loop) as runner:
        # A little after the stall timeout: backup's own watchdog, which names what hung, speaks first.
        outer = settings.stall_timeout + 15
        return outcome_of(runner.run(run_with_signals(lambda: command(args, settings, reporter), outer)))


# Exit codes of a backup that committed its snapshot (not clean, but not nothing either).
COMMITTED_CODES = (EXIT_INCOMPLETE, EXIT_UNSTABLE, EXIT_PRUNE_FAILED)
# Told at the end besides the ping (commands/notify.py); the same rule as the ping's.
NOTIFIERS = ("notify", "webhook", "on_success", "on_failure")


def _monitored(settings: cfg.Settings, name: str, command: str) -> bool:
    """A ping URL or metrics file from the config file or the environment is the nightly
    backup's; another command uses one only when its own command line names it."""
    if not getattr(settings, name) or command in ("config", "schedule"):
        return False
    return command == "backup" or settings.sources.get(name, "").startswith("flag")


def _headline(command: str, outcome: Outcome) -> str:
    s = outcome.summary
    if command == "backup" and "id" in s:
        files = s.get("files", {})
        text = (
            f"snapshot {s['id']} committed: {files.get('files', 0)} files, "
            f"{cfg.format_size(s.get('bytes_uploaded', files.get('bytes_uploaded', 0)))} uploaded, Immich down for "
            f"{s.get('downtime_seconds') or 0:.0f} s"
        )
        return text + (f"; exit {outcome.code}: {'; '.join(outcome.problems[-3:])}" if outcome.code else "")
    if outcome.error:
        return f"{command} failed (exit {outcome.code}): {outcome.error}"
    return f"{command} finished (exit {outcome.code})"


def _report(
    args: argparse.Namespace,
    settings: cfg.Settings | None,
    outcome: Outcome,
    pinger: Pinger | None,
    notifier: Notifier | None,
    tail: LogTail,
    started: float,
    seconds: float,
) -> None:
    """Tell monitoring (ping, metrics file) and, with --json, print the document. Never
    changes the exit code."""
    command = args.command
    error_line = [f"immich-stream: error: {outcome.error}"] if outcome.error else []
    if pinger is not None:
        committed = command == "backup" and outcome.code in COMMITTED_CODES
        pinger.finish(
            outcome.code, outcome.code != 0 and not committed, _headline(command, outcome), tail.text(error_line)
        )
    if notifier:
        committed = command == "backup" and outcome.code in COMMITTED_CODES
        doc = document(command, outcome, started, seconds)
        notifier.finish(outcome.code, committed, _headline(command, outcome), tail.text(error_line), doc)
    if settings is not None and _monitored(settings, "metrics_file", command):
        assert settings.metrics_file is not None
        ids: list[str] | None = None
        if command == "snapshots" and "snapshots" in outcome.summary:
            ids = [r["id"] for r in outcome.summary["snapshots"] if r.get("committed")]
        elif command == "backup" and "id" in outcome.summary:
            ids = _snapshot_ids(settings)
        write_metrics(
            settings.metrics_file,
            metrics_text(settings.metrics_file, command, outcome, time.time(), seconds, ids),
        )
    if args.json:
        indent = None if command in JSON_LINES else 2  # the last of the JSON lines
        print(json.dumps(document(command, outcome, started, seconds), indent=indent), flush=True)


def _snapshot_ids(settings: cfg.Settings) -> list[str] | None:
    """The committed snapshots, for the per-snapshot metrics; None when S3 does not say
    (the metrics file then keeps the figures it had)."""
    from immich_stream.repository.session import open_repo

    if settings.as_of is not None:  # a restore --as-of: what the bucket holds now is not what it read
        return None

    async def listing() -> list[str]:
        async with asyncio.timeout(60), open_repo(settings) as repo:
            return await repo.snapshot_ids()

    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(listing())
    except (ImmichStreamError, TimeoutError, OSError) as exc:
        log.warning("could not list the snapshots for the metrics file (%s): their ages are left as they were", exc)
        return None


def _internal_error(exc: BaseException, context: BaseException) -> Outcome:
    log.debug("internal error", exc_info=context)
    return Outcome(
        1,
        error=f"internal error {type(exc).__name__}: {exc} (run with -v for the traceback; please report it)",
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
