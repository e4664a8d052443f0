"""`backup`: stop the stack, stream the library, PGDATA and a pg_dump into S3, start the stack
again (backup/run.py); print the run's figures; with --prune, prune after a committed snapshot.
The exit code says whether the snapshot is complete and the stack stayed up (errors.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from immich_stream import cleanup
from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers, check_state_dir, flag, policy_options, transfer_options
from immich_stream.commands.monitor import Outcome
from immich_stream.commands.prune import damage, policy, run_prune
from immich_stream.errors import (
    EXIT_PRUNE_FAILED,
    AfterCommitError,
    ConfigError,
    ImmichStreamError,
    ProblemsFound,
    backup_exit_code,
)
from immich_stream.progress import Reporter

log = logging.getLogger("immich_stream")


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
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
    b.add_argument(
        "--copy-to",
        dest="copy_to",
        action="append",
        default=None,
        metavar="NAME",
        help=cfg.SPECS["copy_to"].help,
    )
    flag(b, "live_pass")
    flag(b, "append_only")
    flag(b, "max_shrink")
    flag(b, "max_downtime")
    flag(b, "lock_wait")
    transfer_options(b)
    g = b.add_argument_group("storage class of file data")
    for name in ("storage_class", "storage_class_library", "storage_class_postgres"):
        flag(g, name)
    policy_options(b)


def check(args: argparse.Namespace) -> None:
    """Before anything starts: the state directory is writable, a policy flag comes with --prune."""
    check_state_dir()
    if not args.prune:
        given = [cfg.SPECS[n].flag for n in cfg.SPECS if n.startswith("keep_") and getattr(args, n, None) is not None]
        if given:
            raise ConfigError(
                f"backup {given[0]} does nothing without --prune: add --prune to prune after the backup, "
                f"or run `prune {given[0]} ...` on its own"
            )


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    from immich_stream.backup.run import run_backup
    from immich_stream.repository.prune import apply_policy, parse_within

    if args.prune and settings.append_only:  # prune needs a key that can delete: it could only fail
        raise ConfigError(
            f"backup --prune with append_only (from {settings.sources.get('append_only', 'settings')}): "
            "prune needs an S3 key that can delete; run `prune` elsewhere with one, or drop append_only"
        )
    if args.prune:  # the whole policy is checked before the stack is touched
        keep = policy(settings)
        apply_policy([], keep)
        if keep.within:
            parse_within(keep.within)
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
    if settings.copy_to:
        await _copies(settings, result.snapshot_id, out, code)
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
            out.summary["prune"] = await run_prune(settings, reporter, dry_run=False)
            if (error := damage(out.summary["prune"])) is not None:
                raise ProblemsFound(error)
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


async def _copies(settings: cfg.Settings, snapshot_id: str, out: Outcome, code: int) -> None:
    """backup --copy-to: the new snapshot copied to each named repository, the stack already
    started again. A failed copy leaves the snapshot committed: exit 6 (unless the backup's
    own code says more), one line each, and the summary's `copies` says which."""
    from immich_stream.commands.copy import lines, summary
    from immich_stream.repository.copy import copy_snapshots

    out.summary["copies"] = []
    for name in settings.copy_to:
        try:
            stats = await copy_snapshots(settings, name, [snapshot_id])
        except asyncio.CancelledError:  # a signal during the copy: the snapshot stands
            raise AfterCommitError(
                f"snapshot {snapshot_id} committed, then the copy to {name} was interrupted by "
                f"{cleanup.signal_name() or 'a signal'}"
            ) from None
        except ImmichStreamError as exc:
            print(
                f"immich-stream: error: snapshot {snapshot_id} committed, but the copy to {name} failed: {exc}",
                file=sys.stderr,
                flush=True,
            )
            out.code = out.code or code or EXIT_PRUNE_FAILED
            out.problems.append(f"copy to {name} failed: {exc}")
            out.summary["copies"].append({"repository": name, "ok": False, "error": str(exc)})
            continue
        print("\n".join(lines(stats)), flush=True)
        out.summary["copies"].append(summary(name, stats))
