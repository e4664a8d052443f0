"""Benchmark: what encryption costs, plain against age in the same run.

    .venv/bin/python bench/encryption.py [--rounds 3] [--gib 1.2] [--jobs 8] [--server rclone|seaweedfs]

Against one local S3 server (`rclone serve s3` on loopback by default), each round, in turn
plain then encrypted (an age identity and one extra recipient, as the README sets up):

- backup: an Immich-shaped library (bench/run.py's, photos, thumbnails and videos) uploaded
  by the backup's files stage (bench/files_stage.py) into a new repository;
- restore: that snapshot restored with `immich-stream restore --to` (sha256 checked).

Prints wall seconds, MiB/s, CPU seconds (user+system, from wait4) and peak RSS of each, and
the ratios encrypted / plain (the target: within 1.15). Not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from run import make_library, measure  # noqa: E402
from throughput import BENCH, KEY, MIB, SECRET, Server, drop_caches_of, row  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gib", type=float, default=1.2)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--server", choices=("rclone", "seaweedfs"), default="rclone")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="encryption-", dir=BENCH.parent if BENCH.parent.exists() else None))
    BENCH.mkdir(parents=True, exist_ok=True)
    library = BENCH / f"library-{args.gib}"
    size = make_library(library, args.gib)
    drop_caches_of(library)
    keys = work / "keys"
    keys.mkdir()
    for name in ("own", "offline"):
        subprocess.run(["age-keygen", "-o", str(keys / name)], check=True, capture_output=True)
        os.chmod(keys / name, 0o600)
    offline = subprocess.run(
        ["age-keygen", "-y", str(keys / "offline")], check=True, capture_output=True, text=True
    ).stdout.strip()
    server = Server(args.server, work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "IMMICH_", "RCLONE_"))}
    env["IMMICH_STREAM_TEST_AUTO_INIT"] = "1"  # fresh buckets: backup creates the repository (no `init`)
    env.update(
        {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "HOME": str(work),
            "IMMICH_STREAM_STATE_DIR": str(work / "state"),
            "S3_ENDPOINT_URL": server.endpoint,
            "S3_PATH_STYLE": "true",
            "IMMICH_STREAM_JOBS": str(args.jobs),
        }
    )
    variants = {
        "plain": {},
        "age": {"IMMICH_STREAM_AGE_IDENTITY": str(keys / "own"), "IMMICH_STREAM_AGE_RECIPIENTS": offline},
    }
    results: dict[tuple[str, str], list[dict]] = {}
    print(f"library: {size / MIB:.0f} MiB at {library}; server {args.server}; jobs {args.jobs}")
    try:
        for i in range(args.rounds):
            for name, extra in variants.items():
                bucket = server.bucket(f"{name}-{i}")
                venv = dict(env, S3_BUCKET=bucket, **extra)
                os.sync()  # no run pays for writing back what the one before wrote
                up = measure(
                    f"{name} backup", [sys.executable, str(ROOT / "bench" / "files_stage.py"), str(library)], venv
                )
                dest = work / f"restore-{name}-{i}"
                os.sync()
                down = measure(
                    f"{name} restore",
                    [sys.executable, "-m", "immich_stream", "restore", "latest", "--to", str(dest)],
                    venv,
                )
                shutil.rmtree(dest)
                server.drop(bucket)
                results.setdefault((name, "backup"), []).append(up)
                results.setdefault((name, "restore"), []).append(down)
                print(row(f"{name} backup (round {i + 1})", up, size) + "\n" + row(f"{name} restore", down, size))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmedians of {args.rounds} rounds, {size / MIB:.0f} MiB; ratio = age / plain")
    print(
        f"{'job':<8} {'plain s':>8} {'age s':>8} {'ratio':>6} {'plain CPU s':>12} {'age CPU s':>10} {'CPU ratio':>10}"
    )
    for job in ("backup", "restore"):
        plain, sealed = results[("plain", job)], results[("age", job)]
        wall_p = statistics.median(r["wall"] for r in plain)
        wall_a = statistics.median(r["wall"] for r in sealed)
        cpu_p = statistics.median(r["cpu"] for r in plain)
        cpu_a = statistics.median(r["cpu"] for r in sealed)
        ratios = [a["wall"] / p["wall"] for p, a in zip(plain, sealed, strict=True)]
        print(
            f"{job:<8} {wall_p:>8.2f} {wall_a:>8.2f} {wall_a / wall_p:>6.2f} {cpu_p:>12.1f} {cpu_a:>10.1f} "
            f"{cpu_a / cpu_p:>10.2f}  (round ratios {', '.join(f'{r:.2f}' for r in ratios)})"
        )


if __name__ == "__main__":
    main()
