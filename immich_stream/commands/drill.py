"""`drill`: prove a snapshot restores: its dump into a throwaway PostgreSQL container, every
table's rows compared, optionally library files re-hashed (restore/drill.py); exit 1 on a
mismatch."""

from __future__ import annotations

import argparse
import json

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers, check_from_file, thaw_options
from immich_stream.commands.monitor import Outcome
from immich_stream.errors import ConfigError, ProblemsFound
from immich_stream.progress import Reporter


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
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
    thaw_options(d)


def check(args: argparse.Namespace) -> None:
    check_from_file(args)


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
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
