"""`restore`: a snapshot's files into a directory (--to), its database into the database
container (--database, also from a dump file), its dump into a file (--dump-to), or the
compose files it recorded (--config-files) (restore/files.py); print what came back. The exit
code tells a partial restore from a failed one (errors.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from immich_stream import config as cfg
from immich_stream.commands.catalog import add_restore_options, check_restore, run_restore, selected
from immich_stream.commands.common import (
    Subparsers,
    as_of,
    as_of_option,
    check_from_file,
    check_state_dir,
    check_writable,
    is_stream,
    root_arg,
    thaw_options,
    transfer_options,
)
from immich_stream.commands.monitor import Outcome, plain
from immich_stream.errors import EXIT_PARTIAL, ConfigError, ProblemsFound
from immich_stream.progress import Reporter


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser(
        "restore",
        parents=[common],
        help="restore files (--to DIR) or the database (--database)",
        description="Restore a snapshot's files into a directory, or its database into the "
        "database container (the app containers are stopped meanwhile).",
    )
    r.add_argument("snapshot", nargs="?", default="latest", help="a snapshot id (or a unique prefix), or latest")
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--to", metavar="DIR", help="restore files under DIR (DIR/library, DIR/postgres, DIR/external/NAME)"
    )
    what.add_argument("--database", action="store_true", help="restore the database into DB_CONTAINER with psql")
    what.add_argument(
        "--dump-to", metavar="FILE", help="write the dump (database.sql.gz as stored) to FILE, - for stdout"
    )
    r.add_argument(
        "--root",
        type=root_arg,
        metavar="ROOT",
        help="only this root (library, postgres, or an external library's external:NAME), straight into DIR",
    )
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
    add_restore_options(r)
    transfer_options(r)
    thaw_options(r)
    as_of_option(r)


def check(args: argparse.Namespace) -> None:
    """Local paths the restore will write or read, and flags that do not go together."""
    as_of(args)
    check_restore(args)
    if args.database:
        check_state_dir()
    if args.to:
        check_writable(Path(args.to), "restore --to")
    check_from_file(args)
    if args.database or args.dump_to:
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
    if args.dump_to == "-" and args.json:
        raise ConfigError("restore --dump-to - writes the dump to stdout, where --json writes its document: drop one")
    if args.dump_to and args.dump_to != "-" and not is_stream(args.dump_to):
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
        check_writable(dest.absolute().parent, "restore --dump-to", dest)


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream import restore

    as_of(args, settings)
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
    if selected(args):
        return await run_restore(args, settings, reporter)
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
    regenerate = [d for d in snap.summary.excluded if d != "backups"]
    if regenerate and args.root in (None, "library"):
        print(
            f"snapshot {snap.id} was taken with --exclude {','.join(regenerate)}: those folders hold only their "
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
