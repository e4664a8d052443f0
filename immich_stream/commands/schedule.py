"""`schedule`: run a command at fixed times of day, forever (the sidecar container's cron).

Each run is its own process (`python -m immich_stream ARGS`), as under cron or systemd: a
run that ends badly leaves nothing behind in the loop. SIGTERM (docker stop) is passed on
to a running backup, which starts the stack again before it exits; the loop waits for it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from types import FrameType

from immich_stream.commands.common import Subparsers, UsageError
from immich_stream.errors import ConfigError

log = logging.getLogger("immich_stream")


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    sc = sub.add_parser(
        "schedule",
        parents=[common],
        help="run a command at fixed times of day, forever (for a container; on a host use cron or systemd)",
        description="Sleep until the next --at time (local time; set TZ), run `immich-stream ARGS` as its own "
        "process, repeat. SIGTERM is passed on to a running backup, which starts the stack again first.",
    )
    sc.add_argument("--at", action="append", metavar="HH:MM", help="a time of day; repeatable")
    sc.add_argument(
        "--on",
        action="append",
        metavar="DAYS",
        help="with --at: only on these weekdays (mon-fri, sat,sun, mon,wed,fri; repeatable; default: every day)",
    )
    sc.add_argument(
        "--cron",
        metavar="EXPR",
        help="instead of --at/--on: a cron expression, minute hour day month weekday (e.g. '30 3 * * 1-5'), "
        "in local time",
    )
    sc.add_argument("--run-now", action="store_true", help="run once right away, then keep the schedule")
    sc.add_argument("run", nargs=argparse.REMAINDER, metavar="-- ARGS", help="the command to run, e.g. -- backup")


def _command(args: argparse.Namespace) -> list[str]:
    command: list[str] = args.run[1:] if args.run[:1] == ["--"] else args.run
    return command


def check(args: argparse.Namespace) -> None:
    """The command to run is one of ours and its flags parse: a typo is found now, not at 03:00."""
    from immich_stream.commands import COMMANDS, build_parser

    when(args)  # a bad --at, --on or --cron: now, not at 03:00
    command = _command(args)
    if not command:
        raise ConfigError("schedule: give the command to run after --, e.g. `schedule --at 03:00 -- backup`")
    if command[0] not in COMMANDS:
        raise ConfigError(
            f"schedule: {command[0]!r} is not an immich-stream command: give one of {', '.join(COMMANDS)} "
            "after --, e.g. `schedule --at 03:00 -- backup`"
        )
    try:
        build_parser().parse_args(command)
    except UsageError as exc:
        raise ConfigError(f"schedule -- {shown(command)}: {exc}; see `immich-stream {command[0]} --help`") from None


def run(args: argparse.Namespace) -> int:
    """Not async like the other commands: a loop of child processes."""
    return run_schedule(when(args), _command(args), args.run_now)


# Flags whose value is a credential (a receiver's URL): never in schedule's log or errors.
SECRET_FLAGS = ("--notify", "--webhook", "--ping")


def shown(command: list[str]) -> str:
    """The command line to log, each receiver URL (--notify URL, --webhook=URL) as `***`."""
    words: list[str] = []
    for word in command:
        flag, eq, _ = word.partition("=")
        if words and words[-1] in SECRET_FLAGS:
            word = "***"
        elif eq and flag in SECRET_FLAGS:
            word = f"{flag}=***"
        words.append(word)
    return " ".join(words)


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
FULL_NAMES = {d[:3]: d for d in ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")}
When = Callable[[dt.datetime], dt.datetime]  # now -> the next run after it


def when(args: argparse.Namespace) -> When:
    """--at (and --on), or --cron: the function that gives the next run after a moment."""
    if args.cron is not None:
        if args.at or args.on:
            raise ConfigError("schedule: give either --cron or --at (with --on), not both")
        return parse_cron(args.cron)
    if not args.at:
        raise ConfigError("schedule: give --at HH:MM (repeatable, with --on DAYS) or --cron '30 3 * * *'")
    times = parse_times(args.at)
    days = parse_days(args.on or [])
    return lambda now: next_run(now, times, days)


def parse_days(texts: list[str]) -> frozenset[int]:
    """'mon-fri', 'sat,sun', 'Mon' -> weekday numbers (Monday 0); nothing: every day."""
    days: set[int] = set()
    for text in texts:
        for part in text.lower().replace(" ", "").split(","):
            ends = part.split("-")
            # a day's first three letters, up to its whole name ("thurs"): "monkey" or "sunny" is no day
            if (
                not part
                or len(ends) > 2
                or any(e[:3] not in WEEKDAYS or not FULL_NAMES[e[:3]].startswith(e) or len(e) < 3 for e in ends)
            ):
                raise ConfigError(
                    f"--on {text!r} is not a list of weekdays: write them as mon-fri, sat,sun or mon,wed,fri"
                )
            first, last = (WEEKDAYS.index(e[:3]) for e in (ends[0], ends[-1]))
            days.update(range(first, last + 1) if first <= last else [*range(first, 7), *range(last + 1)])
    return frozenset(days) or frozenset(range(7))


def parse_cron(text: str) -> When:
    """A cron expression (croniter: five fields, or @daily and the like), in local time."""
    from croniter import croniter  # type: ignore[import-untyped,unused-ignore]  # no stubs: Any

    expr = text.strip()
    fields = expr.split()
    if not (len(fields) == 5 or (len(fields) == 1 and expr.startswith("@"))) or not croniter.is_valid(expr):
        raise ConfigError(
            f"--cron {text!r} is not a cron expression: five fields, minute hour day month weekday, "
            "like '30 3 * * *' (03:30 daily) or '30 3 * * 1-5' (weekdays)"
        )

    def next_after(now: dt.datetime) -> dt.datetime:
        at: dt.datetime = croniter(expr, now).get_next(dt.datetime)
        return at

    try:  # valid field by field, yet no date has it (Feb 30): now, not an internal error at 03:00
        next_after(dt.datetime.now().astimezone())
    except Exception:  # croniter's CroniterBadDateError, the search it gives up
        raise ConfigError(
            f"--cron {text!r} never comes: no date matches its day and month (February 30?); fix the day or month"
        ) from None
    return next_after


def parse_times(texts: list[str]) -> list[dt.time]:
    times = []
    for text in texts:
        m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", text.strip())
        if not m:
            raise ConfigError(f"--at {text!r} is not a time of day: write it as HH:MM, like 03:30")
        times.append(dt.time(int(m.group(1)), int(m.group(2))))
    return sorted(set(times))


def next_run(now: dt.datetime, times: list[dt.time], days: frozenset[int] = frozenset(range(7))) -> dt.datetime:
    """The first of the times after now on one of the weekdays (local time, as now is given)."""
    for n in range(8):
        day = now.date() + dt.timedelta(days=n)
        if day.weekday() not in days:
            continue
        for t in times:
            at = dt.datetime.combine(day, t, tzinfo=now.tzinfo)
            if at > now:
                return at
    raise AssertionError("unreachable: every weekday comes again within a week")


def run_schedule(times: list[dt.time] | When, command: list[str], run_now: bool = False) -> int:
    """Sleep until the next time, run the command, repeat; exit on SIGTERM/SIGINT.

    A signal can arrive at any moment, also while a child is being started (before the loop
    knows it) or between runs: whichever signal came first is passed on to a child started
    after it, at once, so no run is left going on its own and none is started for nothing.
    The handlers in place before are put back at the end."""
    if isinstance(times, list):
        daily = times
        times = lambda now: next_run(now, daily)  # noqa: E731
    upcoming: When = times
    stop = threading.Event()
    received: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()
        for proc in child:  # a backup under way starts the stack again, then exits
            if proc.poll() is None:
                proc.send_signal(signum)

    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, on_signal)
    try:
        first = run_now
        while not stop.is_set():
            if not first:
                at = upcoming(dt.datetime.now().astimezone())
                log.info("next run at %s: immich-stream %s", at.strftime("%Y-%m-%d %H:%M %Z"), shown(command))
                # wait in short steps: a suspended host or a clock change must not skip a day
                while not stop.is_set() and dt.datetime.now().astimezone() < at:
                    stop.wait(min(60.0, max(0.1, (at - dt.datetime.now().astimezone()).total_seconds())))
                if stop.is_set():
                    break
            first = False
            proc = subprocess.Popen([sys.executable, "-m", "immich_stream", *command])
            # The child exists: note it with the handlers held off, so that a signal is either
            # seen here (it came before) or passed on by the handler (it comes after), never lost.
            signal.pthread_sigmask(signal.SIG_BLOCK, signals)
            try:
                child[:] = [proc]
                missed = received[0] if received else None
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            if missed is not None and proc.poll() is None:
                log.info("a signal came while immich-stream %s was starting: passing it on", command[0])
                proc.send_signal(missed)
            code = proc.wait()
            child.clear()
            log.log(logging.INFO if code == 0 else logging.ERROR, "immich-stream %s exited with %d", command[0], code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("schedule stopped")
    return 0
