"""`verify`: check that snapshots can be restored (checks/verify.py): sizes, or with
--read-data every sha256; exit 1 with the problems listed."""

from __future__ import annotations

import argparse

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers, as_of, as_of_option, thaw_options, transfer_options
from immich_stream.commands.monitor import Outcome, plain
from immich_stream.errors import ConfigError, ProblemsFound
from immich_stream.progress import Reporter


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    v = sub.add_parser("verify", parents=[common], help="check that snapshots can be restored")
    v.add_argument("snapshot", nargs="?", default=None, help="a snapshot id, or latest (default)")
    v.add_argument("--all", dest="all_", action="store_true", help="every snapshot")
    v.add_argument("--read-data", action="store_true", help="download everything and check every sha256")
    v.add_argument("--read-data-subset", metavar="N%", help="download and check a random N%% of the files")
    transfer_options(v)
    thaw_options(v)
    as_of_option(v)


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.checks.verify import verify

    as_of(args, settings)
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
