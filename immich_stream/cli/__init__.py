"""Command line: argparse subcommands, each mapped to one async function.

Commands parse options and call into the library; errors become one line on stderr and a
documented exit code (see errors.py and the README).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from immich_stream import __version__, cleanup
from immich_stream import config as cfg
from immich_stream.cli.monitor import LogTail, Outcome, Pinger, document, metrics_text, outcome_of, plain, write_metrics
from immich_stream.errors import (
    EXIT_INCOMPLETE,
    EXIT_PARTIAL,
    EXIT_PRUNE_FAILED,
    EXIT_SIGHUP,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_THAWING,
    EXIT_UNSTABLE,
    EXIT_USAGE,
    AfterCommitError,
    ConfigError,
    ImmichStreamError,
    Interrupted,
    ProblemsFound,
    StallError,
    backup_exit_code,
)
from immich_stream.progress import Reporter, format_eta, setup_logging

log = logging.getLogger("immich_stream")


# Flags that belong to some commands only (added by those commands' parsers).
LOCAL_FLAGS = {
    "stop",
    "exclude",
    "live_pass",
    "max_shrink",
    "max_downtime",
    "jobs",
    "part_size",
    "max_memory",
    "lock_wait",
    "stale_after",
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
}


class UsageError(Exception):
    """argparse's complaint about the command line, to be said in one line (not 31 of usage)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is raised for main() to print as one line (and, under
    --json, as the JSON document too) instead of the usage text and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def _usage_error(exc: UsageError, argv: list[str]) -> int:
    command = next((a for a in argv if a in (*COMMANDS, "schedule")), "")
    where = exc.prog.removeprefix("immich-stream").strip()
    line = f"{where + ': ' if where else ''}{exc}; see `immich-stream {command + ' ' if command else ''}--help`"
    print(f"immich-stream: error: {line}", file=sys.stderr, flush=True)
    options = argv[: argv.index("--")] if "--" in argv else argv  # what follows -- is schedule's command
    if "--json" in options:
        print(json.dumps(document(command, Outcome(EXIT_USAGE, error=line), time.time(), 0.0), indent=2), flush=True)
    return EXIT_USAGE


def _flag(p: argparse.ArgumentParser | Any, name: str) -> None:
    spec = cfg.SPECS[name]
    assert spec.flag is not None
    if spec.parse is cfg.parse_bool:
        p.add_argument(spec.flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=spec.help)
        return
    p.add_argument(
        spec.flag, dest=name, default=None, metavar=name.upper().replace("_", "-").removeprefix("KEEP-"), help=spec.help
    )


def _policy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retention policy (restic's rules; any snapshot one rule keeps is kept)")
    for name in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly", "keep_within"):
        _flag(g, name)


def _common_parser() -> _Parser:
    """Options every command takes; each maps to a setting in config.SETTINGS."""
    p = _Parser(add_help=False)
    g = p.add_argument_group("settings (override the config file, Immich's .env and the environment)")
    g.add_argument(
        "--config",
        dest="config_path",
        metavar="PATH",
        help="TOML config file (default: $IMMICH_STREAM_CONFIG, ~/.config/immich-stream/config.toml, "
        "/etc/immich-stream/config.toml)",
    )
    for spec in cfg.SETTINGS:
        if spec.flag and spec.name not in LOCAL_FLAGS:
            kwargs: dict[str, Any] = {"dest": spec.name, "help": spec.help, "default": None}
            if spec.parse is cfg.parse_bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["metavar"] = spec.name.upper()
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


def _transfer_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transfer")
    for name in ("jobs", "part_size", "max_memory"):
        _flag(g, name)


def _thaw_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("archived objects (GLACIER, DEEP_ARCHIVE): thawed before they are read")
    _flag(g, "thaw_days")
    _flag(g, "thaw_tier")
    g.add_argument(
        "--no-wait",
        dest="no_wait",
        action="store_true",
        help=f"request the thaws, then exit {EXIT_THAWING} instead of waiting; the same command run again "
        "later carries on (thaws in progress are not requested twice)",
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common_parser()
    parser = _Parser(
        prog="immich-stream",
        description="Back up a self-hosted Immich server straight into S3: nothing staged on local disk, "
        "only changes uploaded, the stack always started again.",
    )
    parser.add_argument("--version", action="version", version=f"immich-stream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("config", parents=[common], help="print the effective settings and where each came from")

    b = sub.add_parser(
        "backup",
        parents=[common],
        help="back up the library and the database into S3",
        description="Stop the Immich stack, stream the library, the Postgres data directory and "
        "a pg_dump into S3, start the stack again (always).",
    )
    b.add_argument(
        "--stop",
        dest="stop",
        choices=cfg.STOP_MODES,
        default=None,
        help="all: stop everything, cold copy of the DB directory (default); app: stop the app, dump "
        "the running DB; none: no downtime, dump first then files",
    )
    b.add_argument("--prune", action="store_true", help="after a successful backup, prune with the configured policy")
    b.add_argument(
        "--allow-shrink",
        action="store_true",
        help="back up a library that lost more than --max-shrink of its files or bytes, or lacks Immich's "
        ".immich marker files (a deliberate mass deletion); --prune is then skipped",
    )
    b.add_argument(
        "--exclude",
        dest="exclude",
        action="append",
        default=None,
        metavar="FOLDER",
        help=cfg.SPECS["exclude"].help,
    )
    _flag(b, "live_pass")
    _flag(b, "max_shrink")
    _flag(b, "max_downtime")
    _flag(b, "lock_wait")
    _transfer_options(b)
    g = b.add_argument_group("storage class of file data")
    for name in ("storage_class", "storage_class_library", "storage_class_postgres"):
        _flag(g, name)
    _policy_options(b)

    pr = sub.add_parser(
        "prune",
        parents=[common],
        help="remove snapshots a retention policy drops, then garbage",
        description="Remove the snapshots the retention policy drops, then every data object no "
        "remaining snapshot references, stale incomplete snapshots and unfinished "
        "multipart uploads.",
    )
    pr.add_argument("--dry-run", action="store_true", help="say what would be removed; change nothing")
    _flag(pr, "lock_wait")
    _flag(pr, "stale_after")
    _policy_options(pr)

    un = sub.add_parser("unlock", parents=[common], help="remove stale repository locks")
    un.add_argument("--force", action="store_true", help="remove every lock, stale or not (say whose first)")

    sn = sub.add_parser("snapshots", parents=[common], help="list the committed snapshots, newest last")
    sn.add_argument(
        "--check-age",
        metavar="AGE",
        help="exit 1 with one line when the newest committed snapshot is older than AGE (e.g. 36h, 2d)",
    )
    sn.add_argument("--all", dest="all_", action="store_true", help="also list incomplete snapshot directories")

    r = sub.add_parser(
        "restore",
        parents=[common],
        help="restore files (--to DIR) or the database (--database)",
        description="Restore a snapshot's files into a directory, or its database into the "
        "database container (the app containers are stopped meanwhile).",
    )
    r.add_argument("snapshot", nargs="?", default="latest", help="a snapshot id (or a unique prefix), or latest")
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", metavar="DIR", help="restore files under DIR (DIR/library, DIR/postgres)")
    what.add_argument("--database", action="store_true", help="restore the database into DB_CONTAINER with psql")
    what.add_argument(
        "--dump-to", metavar="FILE", help="write the dump (database.sql.gz as stored) to FILE, - for stdout"
    )
    r.add_argument("--root", choices=("library", "postgres"), help="only this root, straight into DIR")
    r.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only paths matching GLOB, relative to their root (* also matches /); repeatable",
    )
    r.add_argument("--overwrite", action="store_true", help="restore into a non-empty directory")
    r.add_argument(
        "--from-file",
        metavar="PATH",
        help="with --database: restore this pg_dump or pg_dumpall file (plain or gzip; - for stdin) instead "
        "of a snapshot's dump, e.g. one of Immich's own backups/ files",
    )
    r.add_argument(
        "--config-files",
        action="store_true",
        help="with --to DIR: write the docker-compose.yml and .env the snapshot recorded (secrets left as "
        "placeholders) into DIR, to rebuild a lost machine",
    )
    _transfer_options(r)
    _thaw_options(r)

    d = sub.add_parser(
        "drill",
        parents=[common],
        help="prove a snapshot restores: its dump into a throwaway PostgreSQL container, rows compared",
        description="Restore a snapshot's database dump into a throwaway PostgreSQL container (the "
        "database container's image, no network, a temporary volume; the live database is never "
        "touched), compare every table's row count with snapshot.json, run an earthdistance query, "
        "optionally re-hash N library files from S3. The container and its volume are always removed.",
    )
    d.add_argument("snapshot", nargs="?", default="latest", help="a snapshot id (or a unique prefix), or latest")
    d.add_argument("--image", metavar="IMAGE", help="PostgreSQL image to drill with (default: DB_CONTAINER's image)")
    d.add_argument("--files", type=int, default=0, metavar="N", help="also re-hash N random library files from S3")
    d.add_argument("--from-file", metavar="PATH", help="drill this pg_dump or pg_dumpall file (- for stdin) instead")
    _thaw_options(d)

    v = sub.add_parser("verify", parents=[common], help="check that snapshots can be restored")
    v.add_argument("snapshot", nargs="?", default=None, help="a snapshot id, or latest (default)")
    v.add_argument("--all", dest="all_", action="store_true", help="every snapshot")
    v.add_argument("--read-data", action="store_true", help="download everything and check every sha256")
    v.add_argument("--read-data-subset", metavar="N%", help="download and check a random N%% of the files")
    _transfer_options(v)
    _thaw_options(v)

    sub.add_parser(
        "doctor",
        parents=[common],
        help="check everything a backup needs, and what the S3 server verifies",
        description="Configuration, Docker and the containers, the directories, S3 (credentials, bucket, "
        "clock, write/read/delete, multipart, Content-MD5 and checksum checks, listing), the repository "
        "and its locks. Exit 0 only when a backup would work.",
    )

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
    _flag(k, "lock_wait")
    _transfer_options(k)

    sc = sub.add_parser(
        "schedule",
        parents=[common],
        help="run a command at fixed times of day, forever (for a container; on a host use cron or systemd)",
        description="Sleep until the next --at time (local time; set TZ), run `immich-stream ARGS` as its own "
        "process, repeat. SIGTERM is passed on to a running backup, which starts the stack again first.",
    )
    sc.add_argument("--at", action="append", required=True, metavar="HH:MM", help="a time of day; repeatable")
    sc.add_argument("--run-now", action="store_true", help="run once right away, then keep the schedule")
    sc.add_argument("run", nargs=argparse.REMAINDER, metavar="-- ARGS", help="the command to run, e.g. -- backup")
    return parser


async def cmd_config(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> dict[str, Any]:
    settings.check_dirs()
    rows = cfg.describe(settings)
    from immich_stream.s3.store import describe_credentials

    rows.append(("credentials", *describe_credentials(settings)))
    width = max(len(r[0]) for r in rows)
    vwidth = min(max(len(r[1]) for r in rows), 48)
    print(f"config file: {settings.config_file or '(none found)'}")
    for name, value, source in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {source}")
    return {
        "config_file": str(settings.config_file or ""),
        "settings": {n: {"value": v, "source": s} for n, v, s in rows},
    }


async def cmd_backup(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.backup.run import run_backup
    from immich_stream.repository.prune import apply_policy, parse_within

    if args.prune:  # the whole policy is checked before the stack is touched
        policy = _policy(settings)
        apply_policy([], policy)
        if policy.within:
            parse_within(policy.within)
    result = await run_backup(settings, reporter, allow_shrink=args.allow_shrink)
    st = result.stats
    d = result.dump
    fs = cfg.format_size
    lines = [
        f"snapshot {result.snapshot_id} committed (stop: {result.mode})"
        + (f" INCOMPLETE: {st.failed} files could not be read" if st.failed else ""),
        f"files     {st.files} in all: {st.new} new, {st.changed} changed, {st.unchanged} unchanged, "
        f"{st.moved} moved, {st.touched} touched (bytes unchanged), {st.skipped} skipped, {st.failed} failed"
        + (f", {st.resumed} taken from an interrupted run" if st.resumed else ""),
        f"bytes     {fs(st.bytes_total)} in the snapshot, {fs(st.bytes_read)} read, {fs(result.summary.uploaded_bytes)} uploaded",
    ]
    lines.append(f"database  {fs(d.raw_bytes)} dumped, {fs(d.gz_bytes)} compressed, {d.seconds:.1f} s")
    live = result.summary.live_files
    if live is not None:
        lines.append(
            f"live      {live.files - live.unchanged - live.resumed} files read, {fs(live.bytes_uploaded)} uploaded "
            "while Immich ran; the stopped pass read what changed since"
        )
    phases = ", ".join(f"{name} {sec:.1f} s" for name, sec in result.summary.phase_seconds.items())
    lines.append(f"time      {result.seconds:.1f} s in all ({phases})")
    spent = ", ".join(f"{name.replace('_', ' ')} {sec:.1f} s" for name, sec in result.summary.downtime.items())
    lines.append(f"downtime  Immich down for {result.downtime:.1f} s" + (f" ({spent})" if spent else ""))
    if st.reuploaded:
        lines.append(
            f"warning   {st.reuploaded} unchanged files were uploaded again: their objects were missing "
            "from the bucket (a lifecycle rule or a manual deletion?)"
        )
    if st.changed_while_read:
        lines.append(f"warning   {st.changed_while_read} files changed while being read")
    for problem in st.problems.kept[:10]:
        lines.append(f"problem   {problem}")
    if len(st.problems) > 10:
        lines.append(f"problem   ... and {len(st.problems) - 10} more (see the log above and snapshot.json)")
    print("\n".join(lines), flush=True)
    if result.unstable:
        print(
            f"immich-stream: error: snapshot {result.snapshot_id} committed, but {', '.join(result.unstable)} did "
            f"not stay running after the restart: check `docker logs {result.unstable[0]}`",
            file=sys.stderr,
        )
    code = backup_exit_code(complete=not st.failed, unstable=bool(result.unstable))
    out = Outcome(code, json.loads(result.summary.to_json()), list(st.problems.kept))
    out.summary["shrunk"] = result.shrunk
    out.summary["bytes_uploaded"] = result.summary.uploaded_bytes  # both passes
    if result.unstable:
        out.problems.append(f"{', '.join(result.unstable)} did not stay running after the restart")
    if not args.prune:
        return out
    if result.shrunk:
        log.warning(
            "not pruning after a backup of a library that shrank (--allow-shrink): run prune by hand "
            "once the library is as it should be"
        )
    elif st.failed:
        log.warning("not pruning after an incomplete snapshot: it must not push a complete one out")
    else:
        try:
            out.summary["prune"] = await _run_prune(settings, reporter, dry_run=False)
        except asyncio.CancelledError:  # a signal during the prune: the snapshot stands
            raise AfterCommitError(
                f"snapshot {result.snapshot_id} committed, then prune was interrupted by "
                f"{cleanup.signal_name() or 'a signal'}"
            ) from None
        except ImmichStreamError as exc:
            print(
                f"immich-stream: error: snapshot {result.snapshot_id} committed, but prune failed: {exc}",
                file=sys.stderr,
            )
            out.code = code or EXIT_PRUNE_FAILED
            out.problems.append(f"prune failed: {exc}")
    return out


async def cmd_snapshots(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.repository.session import open_repo
    from immich_stream.repository.summary import _to_dict

    async with open_repo(settings) as repo:
        dirs = await repo.snapshot_dirs()
        rows: list[dict[str, Any]] = []
        for sid, committed in dirs.items():
            if not committed:
                if args.all_:
                    rows.append({"id": sid, "complete": False, "committed": False})
                continue
            s = (await repo.load_snapshot(sid)).summary
            rows.append(
                {
                    "id": sid,
                    "committed": True,
                    "time": s.time,
                    "mode": s.mode,
                    "complete": s.complete,
                    "files": s.files.files,
                    "bytes": s.files.bytes_total,
                    "bytes_new": s.uploaded_bytes,
                    "dump_bytes": s.database.compressed_size,
                    "seconds": s.seconds,
                    "downtime_seconds": s.downtime_seconds,
                    "immich_version": s.immich.version,
                    "postgres_version": s.database.server_version,
                    "immich": _to_dict(s.immich),
                    "database": {k: v for k, v in _to_dict(s.database).items() if k != "tables"},
                    "tables": s.database.tables,
                    "config_files": sorted(s.config_files),
                    "config_secrets": s.config_secrets,
                }
            )
    summary = {"snapshots": rows}
    if args.check_age:
        return _check_age(args.check_age, [r for r in rows if r["committed"]], summary)
    fs = cfg.format_size
    print(
        f"{'id':<25} {'date (UTC)':<19} {'mode':<4} {'files':>8} {'size':>10} {'new':>10} {'dump':>10} {'took':>7}"
        f"  {'immich':<10} {'postgres':<8}"
    )
    for r in rows:
        if not r["committed"]:
            print(f"{r['id']:<25} {'(incomplete: no snapshot.json; ignored, removed by prune)'}")
            continue
        date = (r["time"] or "")[:19].replace("T", " ")
        flag = "" if r["complete"] else "  (some files missing)"
        print(
            f"{r['id']:<25} {date:<19} {r['mode'] or '':<4} {r['files'] or 0:>8} {fs(r['bytes'] or 0):>10} "
            f"{fs(r['bytes_new'] or 0):>10} {fs(r['dump_bytes'] or 0):>10} {r['seconds'] or 0:>6.0f}s"
            f"  {r['immich_version'] or '-':<10} {(r['postgres_version'] or '-').split(' ')[0]:<8}{flag}"
        )
    print(f"{len([r for r in rows if r['committed']])} snapshots")
    return Outcome(0, summary)


def _check_age(limit_text: str, committed: list[dict[str, Any]], summary: dict[str, Any]) -> Outcome:
    """For monitoring that runs a command (Nagios, Zabbix, Uptime Kuma's command checks):
    one line, exit 1 when the newest committed snapshot is too old."""
    import datetime as dt

    from immich_stream.cli.monitor import snapshot_time

    limit = cfg.parse_duration(limit_text)
    if not committed:
        return Outcome(1, summary, error="no committed snapshot in the repository: run a backup, check its log")
    newest = committed[-1]
    try:
        taken = dt.datetime.fromisoformat(newest["time"]).timestamp()
    except (TypeError, ValueError):
        taken = snapshot_time(newest["id"]) or 0.0
    age = time.time() - taken
    summary["newest"], summary["newest_age_seconds"] = newest["id"], round(age)
    if age > limit:
        return Outcome(
            1,
            summary,
            error=f"the newest snapshot {newest['id']} is {format_eta(age)} old, older than --check-age "
            f"{limit_text}: check the backup's log (cron mail, journalctl -u immich-stream)",
        )
    print(f"ok: the newest snapshot {newest['id']} is {format_eta(age)} old (limit {limit_text})")
    return Outcome(0, summary)


async def cmd_restore(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from pathlib import Path

    from immich_stream.restore import files as restore

    fs = cfg.format_size
    if args.from_file and not args.database:
        raise ConfigError("--from-file goes with --database: restore --database --from-file PATH")
    if args.config_files:
        from immich_stream.host.metadata import SECRET_PLACEHOLDER

        if not args.to:
            raise ConfigError("--config-files needs --to DIR: restore latest --config-files --to DIR")
        snap, written, secrets = await restore.write_config_files(settings, args.snapshot, Path(args.to))
        print(f"wrote {', '.join(str(p) for p in written)} from snapshot {snap.id}")
        if secrets:
            print(
                f"secrets were not recorded: set {', '.join(secrets)} (now "
                f"{SECRET_PLACEHOLDER}) in those files before `docker compose up`"
            )
        return Outcome(0, {"snapshot": snap.id, "written": [str(p) for p in written], "secrets": secrets})
    if args.dump_to:
        snap, size = await restore.dump_to(settings, args.snapshot, args.dump_to)
        if args.dump_to != "-":
            print(f"wrote the dump of snapshot {snap.id} to {args.dump_to} ({fs(size)}, sha256 checked)")
        return Outcome(0, {"snapshot": snap.id, "dump_to": args.dump_to, "bytes": size})
    if args.database:
        restored, info = await restore.restore_database(settings, reporter, args.snapshot, args.from_file)
        print(
            f"restored database {settings.db_name} from "
            f"{f'snapshot {restored.id}' if restored else f'file {args.from_file}'}: {fs(info.bytes)} of SQL in "
            f"{info.seconds:.1f} s; Immich was down for {info.downtime:.1f} s"
        )
        return Outcome(0, {"snapshot": restored.id if restored else None, "database": settings.db_name, **plain(info)})
    snap, st = await restore.restore_files(
        settings,
        reporter,
        args.snapshot,
        Path(args.to),
        [args.root] if args.root else None,
        args.include,
        args.overwrite,
        wait=not args.no_wait,
    )
    print(
        f"restored snapshot {snap.id} into {args.to}: {st.files} files ({st.restored} downloaded, {st.skipped} "
        f"already in place, {st.failed} failed), {st.dirs} directories, {st.symlinks} symlinks, "
        f"{fs(st.bytes_downloaded)} downloaded in {st.seconds:.1f} s"
    )
    if snap.summary.excluded and args.root in (None, "library"):
        print(
            f"snapshot {snap.id} was taken with --exclude {','.join(snap.summary.excluded)}: those folders hold only their "
            "markers; once Immich runs, regenerate them in Administration > Jobs (thumbnails, transcoding)"
        )
    for problem in st.problems.kept[:10]:
        print(f"problem   {problem}")
    out = Outcome(
        0, {"snapshot": snap.id, "to": args.to, "excluded": snap.summary.excluded, **plain(st)}, list(st.problems.kept)
    )
    out.summary.pop("problems")
    out.summary.pop("first_failure")
    if st.files and st.restored + st.skipped == 0:  # not "partial": nothing of it came back
        out.code = ProblemsFound.exit_code
        out.error = (
            f"none of the {st.files} files could be restored (each named above, with the snapshots that hold another "
            f"copy; the first: {st.first_failure}): nothing is in place; run the same command again once the cause "
            "is fixed (it resumes)"
        )
    elif st.failed:
        out.code = EXIT_PARTIAL
        out.error = (
            f"{st.failed} files could not be restored (each named above, with the snapshots that hold another "
            "copy); the rest is in place; run the same command again to retry them, and `verify --read-data`"
        )
    return out


async def cmd_verify(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.checks.verify import verify

    fraction = 0.0
    if args.read_data:
        fraction = 1.0
    elif args.read_data_subset:
        try:
            fraction = float(args.read_data_subset.rstrip("%")) / 100
            if not 0 < fraction <= 1:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"--read-data-subset {args.read_data_subset!r} is not a percentage: give one like 10%"
            ) from None
    report = await verify(settings, reporter, args.snapshot, args.all_, fraction, wait=not args.no_wait)
    what = "read and checked" if fraction else "checked (sizes; add --read-data to check contents)"
    print(
        f"{len(report.snapshots)} snapshots, {report.objects} file references {what}, "
        f"{cfg.format_size(report.bytes_read)} read, {report.seconds:.1f} s: "
        + ("no problems" if not report.problems else f"{len(report.problems)} PROBLEMS")
    )
    for problem in report.problems:
        print(f"problem   {problem}")
    out = Outcome(0, {**plain(report), "read_fraction": fraction}, list(report.problems))
    out.summary.pop("problems")
    if report.problems:
        out.code = ProblemsFound.exit_code
        out.error = f"{len(report.problems)} problems found (listed above)"
    return out


async def cmd_drill(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    import json

    from immich_stream.restore.drill import run_drill

    if args.files < 0:
        raise ConfigError(f"--files {args.files}: give a number of files, 0 or more")
    report = await run_drill(
        settings, reporter, args.snapshot, args.image, args.files, args.from_file, wait=not args.no_wait
    )
    # the human report (swallowed under --json, whose document carries the same)
    total = sum(t.restored or 0 for t in report.tables.values())
    lines = [
        f"drill of {report.source}" + (f" ({report.came_from})" if report.came_from else ""),
        f"database  restored into a throwaway {report.image} (PostgreSQL {report.server_version or '?'}): "
        f"{cfg.format_size(report.sql_bytes)} of SQL, {len(report.tables)} tables, {total} rows, "
        f"compared with {report.expected_from}",
        f"geo       {report.earthdistance or 'no earthdistance extension in the dump'}",
    ]
    if args.files:
        lines.append(
            f"files     {report.files_checked} of {args.files} library files re-hashed from S3, "
            f"{cfg.format_size(report.files_bytes)}"
        )
    lines.append(f"time      {report.seconds:.1f} s; the container and its volume were removed")
    print("\n".join(lines))
    for m in report.mismatches:
        print(f"mismatch  {m}")
    out = Outcome(0, json.loads(report.to_json()), list(report.mismatches))
    if report.mismatches:
        out.code = ProblemsFound.exit_code
        out.error = f"the drill found {len(report.mismatches)} mismatches (listed above)"
    return out


def _policy(settings: cfg.Settings) -> Any:
    from immich_stream.repository.prune import Policy

    return Policy(
        settings.keep_last,
        settings.keep_hourly,
        settings.keep_daily,
        settings.keep_weekly,
        settings.keep_monthly,
        settings.keep_yearly,
        settings.keep_within,
    )


async def _run_prune(settings: cfg.Settings, reporter: Reporter, dry_run: bool) -> dict[str, Any]:
    from immich_stream.repository.prune import prune

    rep = await prune(settings, _policy(settings), dry_run, settings.stale_after, settings.lock_wait)
    fs = cfg.format_size
    would = "would remove" if dry_run else "removed"
    lines = [
        f"prune {'(dry run, nothing changed)' if dry_run else 'done'}: policy {_policy(settings).describe()}",
        f"snapshots  {len(rep.kept)} kept, {len(rep.removed)} {would}"
        + (f": {', '.join(rep.removed)}" if rep.removed else ""),
        f"data       {rep.objects_deleted} objects, {fs(rep.bytes_freed)} {'to free' if dry_run else 'freed'}",
        f"garbage    {len(rep.incomplete_removed)} incomplete snapshots, {rep.uploads_aborted} unfinished "
        f"uploads {would}",
        f"time       {rep.seconds:.1f} s",
    ]
    print("\n".join(lines), flush=True)
    return {"dry_run": dry_run, "policy": _policy(settings).describe(), **plain(rep)}


async def cmd_prune(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> dict[str, Any]:
    return await _run_prune(settings, reporter, args.dry_run)


async def cmd_unlock(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> dict[str, Any]:
    from immich_stream.repository.layout import run_dirs
    from immich_stream.repository.locks import unlock
    from immich_stream.repository.session import open_repo

    async with open_repo(settings, check=False) as repo:  # whatever is there: unlock must always work
        removed, forced, kept = await unlock(repo, args.force, settings.tuning.lock_stale)
    for lk in removed + forced:
        # Without its lock a run cannot commit, and prune no longer spares its uploads.
        endangers = (
            (
                f": run {lk.run} can no longer commit; its uploads ({', '.join(run_dirs(lk.run))}) "
                "that no committed snapshot uses become collectable by the next prune"
            )
            if lk.run
            else ""
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


# A command returns its exit code, its summary dict, or an Outcome (monitor.py): the --json
# document, the pings and the metrics are made from that, the same way for every command.
CommandResult = int | dict[str, Any] | Outcome


async def cmd_doctor(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.checks.doctor import run_doctor, table

    doc = await run_doctor(settings)
    print("\n".join(table(doc)), flush=True)
    rows = [{"check": c.name, "status": c.status, "detail": c.detail} for c in doc.checks]
    failed = [f"{c.name}: {c.detail}" for c in doc.checks if c.status == "FAIL"]
    if failed:
        return Outcome(
            1, {"checks": rows}, failed, error=f"doctor: {len(failed)} of {len(rows)} checks failed (listed above)"
        )
    return Outcome(0, {"checks": rows})


async def cmd_key(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> dict[str, Any]:
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


COMMANDS: dict[str, Callable[[argparse.Namespace, cfg.Settings, Reporter], Awaitable[Any]]] = {
    "config": cmd_config,
    "backup": cmd_backup,
    "snapshots": cmd_snapshots,
    "restore": cmd_restore,
    "verify": cmd_verify,
    "drill": cmd_drill,
    "prune": cmd_prune,
    "unlock": cmd_unlock,
    "doctor": cmd_doctor,
    "key": cmd_key,
}


def _check_writable(path: Path, what: str, named: Path | None = None) -> None:
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


def _is_stream(path: str) -> bool:
    """A character device or a pipe (/dev/null, a FIFO): written as a stream, never replaced."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _check_args(args: argparse.Namespace) -> None:
    """Local paths a command will write, checked before it touches S3 or the stack."""
    from immich_stream.host.hoststate import state_dir

    if args.command == "backup" or (args.command == "restore" and args.database):
        _check_writable(state_dir(), "state directory (IMMICH_STREAM_STATE_DIR)")
    if args.command == "restore" and args.to:
        _check_writable(Path(args.to), "restore --to")
    from_file = getattr(args, "from_file", None)
    if args.command in ("restore", "drill") and from_file and from_file != "-" and not Path(from_file).is_file():
        raise ConfigError(f"--from-file {args.from_file} is not a file: give the path of a pg_dump or pg_dumpall file")
    if args.command == "backup" and not args.prune:
        policy = [cfg.SPECS[n].flag for n in cfg.SPECS if n.startswith("keep_") and getattr(args, n, None) is not None]
        if policy:
            raise ConfigError(
                f"backup {policy[0]} does nothing without --prune: add --prune to prune after the backup, "
                f"or run `prune {policy[0]} ...` on its own"
            )
    if args.command == "restore" and (args.database or args.dump_to):
        files_only = [
            flag
            for flag, given in (
                ("--include", args.include),
                ("--root", args.root),
                ("--overwrite", args.overwrite),
                ("--config-files", args.config_files),
            )
            if given
        ]
        if files_only:
            what = "--database" if args.database else "--dump-to"
            raise ConfigError(
                f"restore {what} restores the database dump; {', '.join(files_only)} only apply to files "
                "(restore --to DIR): drop them, or restore the files in a run of their own"
            )
    if args.command == "restore" and args.dump_to == "-" and args.json:
        raise ConfigError("restore --dump-to - writes the dump to stdout, where --json writes its document: drop one")
    if getattr(args, "check_age", None):
        try:
            cfg.parse_duration(args.check_age)
        except ValueError as exc:
            raise ConfigError(f"--check-age: {exc}") from None
    if args.command == "restore" and args.dump_to and args.dump_to != "-" and not _is_stream(args.dump_to):
        dest = Path(args.dump_to)
        if dest.is_dir():
            raise ConfigError(
                f"restore --dump-to {dest} is a directory: give a file name, e.g. {dest / 'immich.sql.gz'}"
            )
        if not dest.absolute().parent.is_dir():
            raise ConfigError(
                f"restore --dump-to {dest}: directory {dest.absolute().parent} does not exist: "
                "create it first or choose another path"
            )
        _check_writable(dest.absolute().parent, "restore --dump-to", dest)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {s.name: getattr(args, s.name) for s in cfg.SETTINGS if getattr(args, s.name, None) is not None}


class _BoundedExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's thread pool (file reads, hashing). A read that hangs (a dead NFS server,
    a FIFO) must not keep a failed run alive: shutting down waits a few seconds at most,
    and main() then exits without joining such a thread."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)
        if wait:
            deadline = time.monotonic() + 3.0
            for thread in list(self._threads):
                thread.join(max(0.0, deadline - time.monotonic()))


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop = asyncio.new_event_loop()
    loop.set_default_executor(_BoundedExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)))
    return loop


def _exit_past_hung_threads(code: int) -> None:
    """Python joins every worker thread at exit: one stuck in a read would keep the
    process (and its host lock) alive forever. The stack is already running again."""
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if stuck:
        log.warning("exiting with %d file operations still hanging (a dead network filesystem?)", len(stuck))
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


SIGNAL_EXIT = {"SIGHUP": EXIT_SIGHUP, "SIGINT": EXIT_SIGINT, "SIGTERM": EXIT_SIGTERM}


async def _with_s3_hang_watch(fn: Callable[[], Awaitable[Any]], stall: float) -> Any:
    """Every command fails when S3 answers nothing at all (timeouts and retries included)
    for the stall timeout while requests wait: a frozen server must not keep a restore, a
    prune or a verify alive for hours. (Backup has its own, finer watchdog as well.)"""
    from immich_stream.s3.store import OPEN_STORES

    async def watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            for store in list(OPEN_STORES):
                if what := store.hung(stall):
                    raise StallError(f"{what}: stopped; check S3 and run again")

    async with asyncio.TaskGroup() as tg:
        dog = tg.create_task(watch())
        try:
            return await fn()
        finally:
            dog.cancel()


async def _run_with_signals(fn: Callable[[], Awaitable[Any]], stall: float = 600.0) -> Any:
    """Run fn. A first SIGINT/SIGTERM/SIGHUP cancels it (its finally blocks start the stack
    again); a second one skips the cleanup still to come (aborting uploads, releasing the
    lock: prune collects those) but never the restart, and the run exits right after it."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[str] = []

    def on_signal(name: str) -> None:
        if received:
            log.warning("%s received again: exiting as soon as the Immich stack is started again", name)
            cleanup.hurry()
            return
        received.append(name)
        cleanup.signalled(name)
        log.warning("%s received: stopping, starting the Immich stack again, cleaning up", name)
        task.cancel()

    def dump_tasks() -> None:  # kill -USR1 <pid>: what is every task waiting for?
        for t in asyncio.all_tasks(loop):
            print(f"--- task {t.get_name()}", file=sys.stderr)
            t.print_stack(limit=12, file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    try:
        return await _with_s3_hang_watch(fn, stall)
    except asyncio.CancelledError:
        if not received:
            raise
        raise Interrupted(received[0], SIGNAL_EXIT[received[0]]) from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)


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


def _tune_malloc() -> None:
    """Part buffers are large and short-lived; glibc's dynamic mmap threshold would move
    them onto the heap after the first free, where fragmentation holds on to memory.
    A fixed threshold keeps every buffer in its own mapping, returned on free."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    _exit_past_hung_threads(code)
    return code


def _main(argv: list[str] | None = None) -> int:
    _tune_malloc()
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
    try:
        settings = cfg.load(flags=_flags(args), config_path=args.config_path)
        _check_args(args)
        if _monitored(settings, "ping_url", args.command):
            assert settings.ping_url is not None
            pinger = Pinger(settings.ping_url, args.command)
            pinger.start()
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
    _report(args, settings, outcome, pinger, tail, started, time.monotonic() - t0)
    return outcome.code


def _run_command(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter, as_json: bool) -> Outcome:
    if args.command == "schedule":  # not async: a loop of child processes
        from immich_stream.cli.schedule import parse_times, run_schedule

        run = args.run[1:] if args.run[:1] == ["--"] else args.run
        if not run:
            raise ConfigError("schedule: give the command to run after --, e.g. `schedule --at 03:00 -- backup`")
        if run[0] not in COMMANDS:
            raise ConfigError(
                f"schedule: {run[0]!r} is not an immich-stream command: give one of {', '.join(COMMANDS)} "
                "after --, e.g. `schedule --at 03:00 -- backup`"
            )
        try:  # a typo in the command's flags is found now, not at 03:00
            build_parser().parse_args(run)
        except UsageError as exc:
            raise ConfigError(f"schedule -- {' '.join(run)}: {exc}; see `immich-stream {run[0]} --help`") from None
        return Outcome(run_schedule(parse_times(args.at), run, args.run_now))
    command = COMMANDS[args.command]
    # With --json, stdout carries the one document at the end: the human text goes nowhere.
    human = contextlib.redirect_stdout(io.StringIO()) if as_json else contextlib.nullcontext()
    with human, asyncio.Runner(loop_factory=_new_loop) as runner:
        # A little after the stall timeout: backup's own watchdog, which names what hung, speaks first.
        outer = settings.stall_timeout + 15
        return outcome_of(runner.run(_run_with_signals(lambda: command(args, settings, reporter), outer)))


# Exit codes of a backup that committed its snapshot (not clean, but not nothing either).
COMMITTED_CODES = (EXIT_INCOMPLETE, EXIT_UNSTABLE, EXIT_PRUNE_FAILED)


def _monitored(settings: cfg.Settings, name: str, command: str) -> bool:
    """A ping URL or metrics file from the config file or the environment is the nightly
    backup's; another command uses one only when its own command line names it."""
    if getattr(settings, name) is None or command in ("config", "schedule"):
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
        print(json.dumps(document(command, outcome, started, seconds), indent=2), flush=True)


def _snapshot_ids(settings: cfg.Settings) -> list[str] | None:
    """The committed snapshots, for the per-snapshot metrics; None when S3 does not say
    (the metrics file then keeps the figures it had)."""
    from immich_stream.repository.session import open_repo

    async def listing() -> list[str]:
        async with asyncio.timeout(60), open_repo(settings) as repo:
            return await repo.snapshot_ids()

    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
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
