"""`prune`: remove the snapshots the retention policy drops, then garbage (repository/prune.py).

`backup --prune` runs the same prune after a committed snapshot (run_prune)."""

from __future__ import annotations

import argparse
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers, flag, policy_options
from immich_stream.commands.monitor import Outcome, plain
from immich_stream.errors import ProblemsFound
from immich_stream.progress import Reporter


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    pr = sub.add_parser(
        "prune",
        parents=[common],
        help="remove snapshots a retention policy drops, then garbage",
        description="Remove the snapshots the retention policy drops, then every data object no "
        "remaining snapshot references, stale incomplete snapshots and unfinished "
        "multipart uploads.",
    )
    pr.add_argument("--dry-run", action="store_true", help="say what would be removed; change nothing")
    flag(pr, "lock_wait")
    flag(pr, "stale_after")
    flag(pr, "max_unused")
    policy_options(pr)


def policy(settings: cfg.Settings) -> Any:
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


async def run_prune(settings: cfg.Settings, reporter: Reporter, dry_run: bool) -> dict[str, Any]:
    from immich_stream.repository.prune import prune

    rep = await prune(
        settings, policy(settings), dry_run, settings.stale_after, settings.lock_wait, settings.max_unused
    )
    fs = cfg.format_size
    would = "would remove" if dry_run else "removed"
    lines = [
        f"prune {'(dry run, nothing changed)' if dry_run else 'done'}: policy {policy(settings).describe()}",
        f"snapshots  {len(rep.kept)} kept, {len(rep.removed)} {would}"
        + (f": {', '.join(rep.removed)}" if rep.removed else ""),
        f"data       {rep.objects_deleted} objects, {fs(rep.bytes_freed)} {'to free' if dry_run else 'freed'}",
        f"repack     {rep.repack.packs_repacked} packs {'to repack' if dry_run else 'repacked'}"
        + (
            ""
            if dry_run
            else f" into {rep.repack.packs_written} ({fs(rep.repack.bytes_copied)} copied, "
            f"{rep.repack.manifests_rewritten} manifests written again)"
        )
        + f", {fs(rep.repack.bytes_freed)} {'to free' if dry_run else 'freed'}"
        + (f"; not tried: {rep.repack_skipped}" if rep.repack_skipped else "")
        + (f"; {len(rep.repack.damaged)} left as they are, damaged" if rep.repack.damaged else "")
        + (
            f"; {len(rep.repack.unreadable)} left as they are, could not be read (the next prune tries again)"
            if rep.repack.unreadable
            else ""
        ),
        f"packs      {rep.packs_partly_used} kept partly used: {fs(rep.pack_bytes_unused)} in them no kept "
        f"snapshot needs (--max-unused {settings.max_unused:.0%})",
        f"garbage    {len(rep.incomplete_removed)} incomplete snapshots, {rep.uploads_aborted} unfinished "
        f"uploads {would}",
        f"time       {rep.seconds:.1f} s",
    ]
    if rep.lock is not None:
        lk = rep.lock
        lines.insert(
            -1,
            f"lock       {lk.extended} of {lk.checked} objects' retention extended (lock extend); "
            f"{lk.kept_locked} objects kept until their retention ends"
            + (f" (snapshots {', '.join(lk.snapshots_locked)})" if lk.snapshots_locked else "")
            + f"; {lk.versions_deleted} old versions deleted",
        )
    print("\n".join(lines), flush=True)
    return {"dry_run": dry_run, "policy": policy(settings).describe(), **plain(rep)}


def damage(summary: dict[str, Any]) -> str | None:
    """The one-line error of a prune that finished but found packs kept snapshots need
    damaged (missing, short, or bytes that do not match their sha256), else None."""
    damaged = summary["repack"]["damaged"]
    if not damaged:
        return None
    return (
        f"{len(damaged)} packs hold bytes kept snapshots need that are missing or do not match their sha256 "
        f"(first {damaged[0]}), left as they are: run `verify --all --read-data` to name the files"
    )


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
    summary = await run_prune(settings, reporter, args.dry_run)
    out = Outcome(0, summary)
    if (error := damage(summary)) is not None:
        out.code, out.error, out.problems = ProblemsFound.exit_code, error, [error]
    return out
