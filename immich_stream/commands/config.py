"""`config`: print the effective settings and where each came from (no S3, no Docker)."""

from __future__ import annotations

import argparse
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands.common import Subparsers
from immich_stream.progress import Reporter


def add_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    sub.add_parser("config", parents=[common], help="print the effective settings and where each came from")


async def run(args: argparse.Namespace, settings: cfg.Settings, reporter: Reporter) -> dict[str, Any]:
    settings.check_dirs()
    rows = cfg.describe(settings)
    from immich_stream.s3.classify import describe_credentials

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
