"""`snapshots`: list the committed snapshots, newest last; with --check-age, one line and
exit 1 when the newest is too old (for monitoring that runs a command)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers, as_of, as_of_option
from immich_stream.commands.monitor import Outcome, snapshot_time
from immich_stream.errors import ConfigError
from immich_stream.progress import Reporter, format_eta


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    sn = sub.add_parser("snapshots", parents=[common], help="list the committed snapshots, newest last")
    sn.add_argument(
        "--check-age",
        metavar="AGE",
        help="exit 1 with one line when the newest committed snapshot is older than AGE (e.g. 36h, 2d)",
    )
    sn.add_argument("--all", dest="all_", action="store_true", help="also list incomplete snapshot directories")
    as_of_option(sn)


def check(args: argparse.Namespace) -> None:
    as_of(args)
    if args.check_age:
        try:
            cfg.parse_duration(args.check_age)
        except ValueError as exc:
            raise ConfigError(f"--check-age: {exc}") from None


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.host.dumpjob import describe
    from immich_stream.repository.session import open_repo
    from immich_stream.repository.summary import to_dict

    as_of(args, settings)
    async with open_repo(settings) as repo:
        encrypted = repo.store.sealing is not None
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
                    "immich": to_dict(s.immich),
                    "database": {k: v for k, v in to_dict(s.database).items() if k != "tables"},
                    "tables": s.database.tables,
                    "config_files": sorted(s.config_files),
                    "config_secrets": s.config_secrets,
                    "excluded": s.excluded,
                }
            )
    summary: dict[str, Any] = {"snapshots": rows, "encrypted": encrypted}
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
    newest = next((r for r in reversed(rows) if r["committed"]), None)
    if newest is not None:
        job = newest["immich"].get("dump_job")
        print(f"Immich's own database dumps, at {newest['id']}: {describe(job, 'backups' in newest['excluded'])}")
    print(
        "repository encrypted (age)"
        if encrypted
        else "repository NOT encrypted (created with --plaintext): whoever can read the bucket can read the photos"
    )
    return Outcome(0, summary)


def _check_age(limit_text: str, committed: list[dict[str, Any]], summary: dict[str, Any]) -> Outcome:
    """For monitoring that runs a command (Nagios, Zabbix, Uptime Kuma's command checks):
    one line, exit 1 when the newest committed snapshot is too old."""
    import datetime as dt

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
