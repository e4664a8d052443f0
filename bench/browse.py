"""Benchmark: time and peak memory of `ls`, `find` and `diff` on manifests of 200,000
entries (issue 26), against the same commands on a 10-entry snapshot (the process's own
floor: Python, aioboto3), all in one run:

    .venv/bin/python bench/browse.py [--entries 200000] [--moved 0.1]

Starts `rclone serve s3` over a temporary directory (as the tests do), writes the
manifests through the repository's own ManifestWriter (no file objects: these commands
read manifests only), the second with --moved of the first's files under another
directory. Peak RSS is the CLI process's VmHWM (tests/helpers.run_cli). Not a test:
tests/test_browse.py asserts the memory bound; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from immich_stream import config  # noqa: E402

PER_DIR = 500  # files per day folder, as a busy phone's year of photos spreads them


def _paths(n: int, moved: float) -> list[tuple[str, str, int]]:
    """(path, type, file number) of an Immich-shaped library of n entries in walk order:
    library/admin/<day>/IMG_<n>.jpg; with `moved`, that share of the day folders is under
    library/moved/ instead (the storage template changed)."""
    from immich_stream.repository.manifest import path_order

    days = n // (PER_DIR + 1) + 1
    out: list[tuple[str, str, int]] = [("library", "dir", -1), ("library/admin", "dir", -1)]
    for day in range(days):
        out.append((f"library/admin/{day:05d}", "dir", -1))
        out += [
            (f"library/admin/{day:05d}/IMG_{day * PER_DIR + i:07d}.jpg", "file", day * PER_DIR + i)
            for i in range(PER_DIR)
        ]
    out = out[:n]
    cut = f"library/admin/{int(days * moved):05d}"
    if moved:
        out = [(p.replace("/admin/", "/moved/") if p < cut and p.count("/") > 1 else p, t, i) for p, t, i in out]
        out.append(("library/moved", "dir", -1))
        out.sort(key=lambda e: path_order(e[0].encode()))
    return out


async def synthetic_snapshot(settings: config.Settings, n: int, when: dt.datetime, moved: float = 0.0) -> str:
    """A committed snapshot whose manifest holds n entries (see _paths)."""
    from immich_stream.repository.layout import new_snapshot_id
    from immich_stream.repository.manifest import ManifestLine, ManifestWriter
    from immich_stream.repository.repo import Repo
    from immich_stream.repository.summary import ManifestInfo, SnapshotSummary
    from immich_stream.s3.budget import ByteBudget
    from immich_stream.s3.options import StoreOptions
    from immich_stream.s3.store import Store

    async with Store(StoreOptions.from_settings(settings)) as store:
        repo = Repo(store, settings.prefix)
        await repo.ensure_config()
        sid = new_snapshot_id(when)
        mtime = int(when.timestamp()) * 10**9
        async with ManifestWriter(repo.store, repo.manifest_key(sid), ByteBudget(64 << 20), settings.part_size) as mw:
            for inode, (path, kind, number) in enumerate(_paths(n, moved)):
                if kind == "dir":
                    await mw.add(ManifestLine("library", path, "dir", 0, mtime, 0o755, 1000, 1000, inode))
                    continue
                sha = hashlib.sha256(b"photo %d" % number).hexdigest()
                key = repo.data_key(sid, "library", path)
                size = 1_000_000 + number
                await mw.add(ManifestLine("library", path, "file", size, mtime, 0o644, 1000, 1000, inode, sha, key))
            await mw.finish()
        summary = SnapshotSummary(id=sid, time=when.isoformat(), roots={"library": "/photos"})
        summary.manifest = ManifestInfo(repo.relative_key(repo.manifest_key(sid)), mw.lines)
        await repo.commit(summary)
    return sid


def main() -> None:
    from tests.conftest import KEY, SECRET, Bucket, RcloneServer, base_env
    from tests.helpers import run_cli

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=200_000)
    ap.add_argument("--moved", type=float, default=0.1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "s3").mkdir()
        server = RcloneServer(Path(tmp) / "s3")
        try:
            bucket = "bench-browse"
            Bucket(server.endpoint, bucket, KEY, SECRET).s3.create_bucket(Bucket=bucket)
            env = base_env(Path(tmp))
            env.update(
                AWS_ACCESS_KEY_ID=KEY,
                AWS_SECRET_ACCESS_KEY=SECRET,
                S3_ENDPOINT_URL=server.endpoint,
                S3_BUCKET=bucket,
                S3_PATH_STYLE="true",
            )
            settings = config.load(environ=env)
            os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
            t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
            started = time.monotonic()
            tiny = asyncio.run(synthetic_snapshot(settings, 10, t0))
            first = asyncio.run(synthetic_snapshot(settings, args.entries, t0 + dt.timedelta(hours=1)))
            second = asyncio.run(synthetic_snapshot(settings, args.entries, t0 + dt.timedelta(hours=2), args.moved))
            whole = asyncio.run(synthetic_snapshot(settings, args.entries, t0 + dt.timedelta(hours=3), 1.0))
            print(f"4 manifests written in {time.monotonic() - started:.1f} s")
            runs = [
                ("ls of a 10-entry snapshot (the floor)", ["ls", tiny, "library/admin"]),
                (f"ls of a day folder, {args.entries:,} entries", ["ls", first, "library/admin/00200"]),
                (f"find in 4 snapshots ({3 * args.entries + 10:,} entries)", ["find", "IMG_00123*"]),
                (f"ls of the biggest folder, {args.entries:,} entries", ["ls", first, "library/admin"]),
                (f"find in one snapshot of {args.entries:,} entries", ["find", "IMG_00123*", "--snapshot", first]),
                (f"diff, {args.entries:,} entries each, {args.moved:.0%} moved", ["diff", first, second]),
                (f"diff, {args.entries:,} entries each, all moved", ["diff", first, whole]),
            ]
            print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
            print(f"| command | seconds | peak RSS MiB |\n| --- | --- | --- |")
            for name, argv in runs:
                t = time.monotonic()
                r = run_cli(*argv, env=env, timeout=600)
                assert r.code == 0, r.err
                print(f"| {name} | {time.monotonic() - t:.2f} | {r.maxrss_kib / 1024:.0f} |", flush=True)
            print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
