"""`doctor`: check everything a backup needs, and what the S3 server verifies (checks/doctor.py);
print the table, exit 0 only when a backup would work."""

from __future__ import annotations

import argparse

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers
from immich_stream.commands.monitor import Outcome
from immich_stream.progress import Reporter


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    sub.add_parser(
        "doctor",
        parents=[common],
        help="check everything a backup needs, and what the S3 server verifies",
        description="Configuration, Docker and the containers, the directories, S3 (credentials, bucket, "
        "clock, write/read/delete, multipart, Content-MD5 and checksum checks, listing), the repository "
        "and its locks. Exit 0 only when a backup would work.",
    )


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> Outcome:
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
