"""Benchmark: what Object Lock (`--lock-days`) and a second copy (`--copy-to`) cost a
nightly backup, and what versioning stores after a month of nights (issue 24, "Measure").

    flock -o /tmp/immich-docker-o.lock .venv/bin/python bench/immutability.py
        [--only requests,nights] [--assets 80] [--nights 30] [--lock-days 30] [--day 8]

(after `bash tests/run.sh --collect-only -q` made .venv and the test images; the run brings
up the test stack of docker-compose.test.yml, whose container names are fixed: hold the lock
the test runs hold.) Not a test: nothing here asserts anything.

The main repository is on a moto server (`moto_server`, in memory, AWS-shaped, enforces
Object Lock) whose buckets are created with Object Lock enabled (which turns versioning on);
a second copy goes to `rclone serve s3` (another server, so `copy` streams through memory).
In front of each server a counting proxy (bench/scale.py's CountingProxy) counts every
request by S3 operation (from the method, the query and x-amz-copy-source), the request body
bytes by operation, and all bytes sent to and received from the server.

The library: --assets Immich-like assets (a photo of 520 KiB to 1.5 MiB, an object of its
own; a thumbnail and a preview, packed; every tenth a video of 2-4 MiB), random bytes,
seed 24, in library/, thumbs/, encoded-video/ with Immich's .immich markers. A night adds 3
assets and deletes 1 (its three files), then the runs start at least 4 s later (the 3 s
racy-timestamp guard). Every backup is `backup --stop none` (a pg_dump of the stack's
seeded database, no downtime).

--only requests: four repositories, each with a first backup, then one night's changes and
the nightly run that is measured: plain; --lock-days N; --copy-to offsite; both.
--only nights: --nights nights of `backup --stop none --prune --keep-last 7` into two
repositories, one on a bucket without versioning (a bucket of its own on the same moto
server, created without Object Lock), one with --lock-days N (prune with the same
--lock-days). One day of --lock-days is --day seconds (IMMICH_STREAM_LOCK_DAY, honoured with
IMMICH_STREAM_TEST_SHORT_DURATIONS=1), and night k starts at k days after the first: a
night is a day. keep-daily counts real UTC days, which all these nights share, so the policy
is --keep-last 7 (the same as --keep-daily 7 when there is one snapshot a day). After the
last night: the bytes of every version (ListObjectVersions) against the current objects'
and against the bucket without versioning.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from run import free_port  # noqa: E402
from scale import CountingProxy, Framer, compose_cmd, measure, stack_up  # noqa: E402
from scale import Server as RcloneServer  # noqa: E402

BIN = Path(sys.executable).parent
KEY, SECRET = "bench-key", "bench-secret"
USER = "b0b0b0b0-0000-4000-8000-000000000024"
KIB, MIB = 1024, 1024 * 1024
STACK = Path(os.environ.get("IMMICH_STREAM_IMMUT_STACK", "/var/tmp/immich-stream-immut-stack"))
MARKER_DIRS = ("library", "upload", "thumbs", "encoded-video", "profile", "backups")


# --- requests by S3 operation -----------------------------------------------------------------


def s3_operation(request_line: str, headers: dict[str, str]) -> str:
    """The S3 operation of a path-style request, from its method, query and headers."""
    method, target = [*request_line.split(" "), "", ""][:2]
    path, _, query = target.partition("?")
    q = {p.partition("=")[0] for p in query.split("&") if p}
    bucket_and_key = path.lstrip("/").split("/", 1)
    if path in ("", "/"):
        return "ListBuckets" if method == "GET" else f"{method} /"
    key = len(bucket_and_key) == 2 and bucket_and_key[1] != ""
    copy = "x-amz-copy-source" in headers
    if method == "PUT":
        if "retention" in q:
            return "PutObjectRetention"
        if "partNumber" in q:
            return "UploadPartCopy" if copy else "UploadPart"
        if copy:
            return "CopyObject"
        return "PutObject" if key else "PUT bucket?" + ",".join(sorted(q))
    if method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadId" in q:
            return "CompleteMultipartUpload"
        if "delete" in q:
            return "DeleteObjects"
        return "POST?" + ",".join(sorted(q))
    if method == "GET":
        for sub, name in (
            ("versions", "ListObjectVersions"),
            ("versioning", "GetBucketVersioning"),
            ("object-lock", "GetObjectLockConfiguration"),
            ("retention", "GetObjectRetention"),
            ("uploadId", "ListParts"),
            ("uploads", "ListMultipartUploads"),
            ("location", "GetBucketLocation"),
        ):
            if sub in q:
                return name
        if not key:
            return "ListObjectsV2" if "list-type" in q else "ListObjects"
        return "GetObject(version)" if "versionId" in q else "GetObject"
    if method == "HEAD":
        return ("HeadObject(version)" if "versionId" in q else "HeadObject") if key else "HeadBucket"
    if method == "DELETE":
        if "uploadId" in q:
            return "AbortMultipartUpload"
        if key:
            return "DeleteObject(version)" if "versionId" in q else "DeleteObject"
        return "DeleteBucket"
    return method


def shape(request_line: str) -> str:
    """The key of a request (a listing's prefix) with the bucket left out and run ids, pack
    names, file names and lock names replaced by placeholders, to group requests by what they
    touch."""
    target = request_line.split(" ")[1] if " " in request_line else request_line
    path, _, query = target.partition("?")
    params = dict(p.partition("=")[::2] for p in query.split("&") if p)
    path = urllib.parse.unquote(path).lstrip("/").partition("/")[2]
    if not path:
        path = "list " + urllib.parse.unquote(params.pop("prefix", ""))
    for pattern, placeholder in (
        (r"\d{4}-\d\d-\d\dT\d{6}Z-[0-9a-f]{4}", "<id>"),
        (r"%pack/[0-9a-f]{16}", "%pack/<pack>"),
        (r"/(library|postgres)/.+", r"/\1/<file>"),
        (r"(locks|preflight|doctor)/.+", r"\1/<name>"),
    ):
        path = re.sub(pattern, placeholder, path)
    q = ",".join(sorted(k for k in params if k not in ("continuation-token", "list-type", "encoding-type")))
    return path + (f"?{q}" if q else "")


class OpFramer(Framer):
    def __init__(self, proxy: OpProxy) -> None:
        super().__init__(proxy.counts)
        self.proxy = proxy

    def count(self, request_line: str, headers: dict[str, str]) -> None:
        op = s3_operation(request_line, headers)
        self.counts[op] += 1
        self.proxy.log.append((op, shape(request_line)))
        self.proxy.body[op] += int(headers.get("content-length", "0") or 0)


class OpProxy(CountingProxy):
    """CountingProxy by S3 operation, with the bytes each way (sent: everything the client
    sent, heads included; received: everything the server answered)."""

    def __init__(self, upstream_port: int) -> None:
        self.body: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str]] = []
        self.sent = self.received = 0
        super().__init__(upstream_port)

    def new_framer(self) -> Framer:
        return OpFramer(self)

    async def _requests(self, reader, up) -> None:  # type: ignore[no-untyped-def]
        counted = _CountingReader(reader, self, "sent")
        await super()._requests(counted, up)  # type: ignore[arg-type]

    async def _pump(self, src, dst) -> None:  # type: ignore[no-untyped-def,override]
        while data := await src.read(1 << 18):
            self.received += len(data)
            dst.write(data)
            await dst.drain()

    def snapshot(self) -> dict:
        return {
            "counts": self.counts.copy(), "body": self.body.copy(), "sent": self.sent, "received": self.received,
            "log": len(self.log),
        }  # fmt: skip

    def since(self, before: dict) -> dict:
        return {
            "counts": self.counts - before["counts"],
            "body": self.body - before["body"],
            "sent": self.sent - before["sent"],
            "received": self.received - before["received"],
            "log": self.log[before["log"] :],
        }


class _CountingReader:
    def __init__(self, reader, proxy: OpProxy, attr: str) -> None:  # type: ignore[no-untyped-def]
        self.reader, self.proxy, self.attr = reader, proxy, attr

    async def read(self, n: int) -> bytes:
        data: bytes = await self.reader.read(n)
        setattr(self.proxy, self.attr, getattr(self.proxy, self.attr) + len(data))
        return data


# --- servers ----------------------------------------------------------------------------------


class Moto:
    """moto's server in a process of its own (the proxies run in this one)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        import boto3
        from botocore.config import Config

        self.s3 = boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{self.port}", region_name="us-east-1",
            aws_access_key_id=KEY, aws_secret_access_key=SECRET,
            config=Config(s3={"addressing_style": "path"}),
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                self.s3.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def bucket(self, name: str, lock: bool) -> str:
        self.s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=lock)
        return name

    def current(self, bucket: str) -> tuple[int, int]:
        n = size = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                n += 1
                size += o["Size"]
        return n, size

    def snapshots(self, bucket: str) -> int:
        n = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="immich-backup/snapshots/"):
            n += sum(1 for o in page.get("Contents", []) if o["Key"].endswith("/snapshot.json"))
        return n

    def versions(self, bucket: str) -> dict[str, int]:
        """Every version: count and bytes, of them the current ones; delete markers."""
        out = collections.Counter[str]()
        for page in self.s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for v in page.get("Versions", []):
                out["versions"] += 1
                out["version_bytes"] += v["Size"]
                if v["IsLatest"]:
                    out["current"] += 1
                    out["current_bytes"] += v["Size"]
            out["markers"] += len(page.get("DeleteMarkers", []))
        return dict(out)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the library ------------------------------------------------------------------------------


class Library:
    """Immich-like assets, deterministic (seed 24): add() and delete() are the nights' changes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rng = random.Random(24)
        self.assets: list[list[Path]] = []
        self.n = 0
        shutil.rmtree(root, ignore_errors=True)
        for d in MARKER_DIRS:
            (root / d).mkdir(parents=True)
            (root / d / ".immich").touch()

    def _put(self, rel: str, size: int) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.rng.randbytes(size))
        return path

    def add(self, count: int) -> None:
        for _ in range(count):
            i, r = self.n, self.rng
            self.n += 1
            uuid = f"{r.getrandbits(32):08x}-{r.getrandbits(16):04x}-4{r.getrandbits(12):03x}-8{r.getrandbits(12):03x}-{r.getrandbits(48):012x}"
            year, month, day = 2015 + i % 10, 1 + i // 7 % 12, 1 + i % 28
            files = [
                self._put(f"library/{USER}/{year}/{year}-{month:02d}-{day:02d}/IMG_{i:05d}.jpg", r.randint(520 * KIB, 1536 * KIB)),
                self._put(f"thumbs/{USER}/{uuid[:2]}/{uuid[2:4]}/{uuid}-thumbnail.webp", r.randint(5 * KIB, 15 * KIB)),
                self._put(f"thumbs/{USER}/{uuid[:2]}/{uuid[2:4]}/{uuid}-preview.jpeg", r.randint(60 * KIB, 200 * KIB)),
            ]  # fmt: skip
            if i % 10 == 9:
                files.append(
                    self._put(f"encoded-video/{USER}/{uuid[:2]}/{uuid[2:4]}/{uuid}.mp4", r.randint(2 * MIB, 4 * MIB))
                )
            self.assets.append(files)

    def delete(self, count: int) -> None:
        for _ in range(count):
            for f in self.assets.pop(self.rng.randrange(len(self.assets))):
                f.unlink()

    def night(self) -> None:
        self.add(3)
        self.delete(1)

    def size(self) -> tuple[int, int]:
        files = [p for p in self.root.rglob("*") if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)


# --- runs -------------------------------------------------------------------------------------


def run(cmd: list[str], env: dict[str, str], proxies: dict[str, OpProxy]) -> dict:
    before = {name: p.snapshot() for name, p in proxies.items()}
    r = measure(cmd, env)
    r["servers"] = {name: p.since(before[name]) for name, p in proxies.items()}
    if r["code"]:
        tail = [ln for ln in r["output"].splitlines() if not ln.startswith("[")][-12:]
        print(f"{' '.join(cmd[2:])} exited with code {r['code']}:\n  " + "\n  ".join(tail), flush=True)
    return r


def describe(r: dict, name: str) -> str:
    s = r["servers"][name]
    ops = " ".join(f"{k} {v}" for k, v in sorted(s["counts"].items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{sum(s['counts'].values())} requests ({ops}); sent {s['sent'] / KIB:.0f} KiB, received {s['received'] / KIB:.0f} KiB"


def wait_racy() -> None:
    time.sleep(4)  # files changed less than 3 s before a run are read again by the next


def requests_rows(args, work, env, moto, rclone, proxies, library) -> None:  # type: ignore[no-untyped-def]
    ist = [sys.executable, "-m", "immich_stream", "backup", "--stop", "none"]
    days = lock_days(args)[0]
    configs = {
        "plain": [],
        f"--lock-days {days}": ["--lock-days", str(days)],
        "--copy-to offsite": ["--copy-to", "offsite"],
        f"--lock-days {days} --copy-to offsite": ["--lock-days", str(days), "--copy-to", "offsite"],
    }
    envs = {}
    for i, name in enumerate(configs):
        bucket = moto.bucket(f"req-{i}", lock=True)
        dest = rclone.bucket(f"offsite-{i}")
        config = work / f"config-{i}.toml"
        config.write_text(
            f'[repositories.offsite]\nbucket = "{dest}"\nendpoint_url = "{proxies["copy"].endpoint}"\npath_style = true\n'
        )
        envs[name] = dict(
            env,
            S3_BUCKET=bucket,
            IMMICH_STREAM_CONFIG=str(config),
            IMMICH_STREAM_STATE_DIR=str(work / f"state-req-{i}"),
        )
    library.add(args.assets)
    files, size = library.size()
    print(f"library: {files} files, {size / MIB:.1f} MiB")
    wait_racy()
    first = {name: run([*ist, *flags], envs[name], proxies) for name, flags in configs.items()}
    for name, r in first.items():
        print(f"first backup, {name}: {r['wall']:.1f} s; main: {describe(r, 'main')}")
        if r["servers"]["copy"]["counts"]:
            print(f"   copy: {describe(r, 'copy')}")
    library.night()
    files, size = library.size()
    print(f"\na night: 3 assets added, 1 deleted; library now {files} files, {size / MIB:.1f} MiB")
    wait_racy()
    nightly = {name: run([*ist, *flags], envs[name], proxies) for name, flags in configs.items()}
    print(
        f"\n{'nightly backup --stop none':<36} {'wall s':>6} {'server':>6} {'requests':>8} {'sent KiB':>9} {'recv KiB':>9}  by operation (request body KiB)"
    )
    for name, r in nightly.items():
        for server in ("main", "copy"):
            s = r["servers"][server]
            if not s["counts"]:
                continue
            ops = " ".join(
                f"{k} {v}" + (f" ({s['body'][k] / KIB:.0f})" if s["body"][k] >= KIB else "")
                for k, v in sorted(s["counts"].items(), key=lambda kv: (-kv[1], kv[0]))
            )
            label = name if server == "main" else ""
            wall = f"{r['wall']:.1f}" if server == "main" else ""
            print(
                f"{label:<36} {wall:>6} {server:>6} {sum(s['counts'].values()):>8} {s['sent'] / KIB:>9.0f} "
                f"{s['received'] / KIB:>9.0f}  {ops}"
            )
    for name, r in nightly.items():
        for server in ("main", "copy"):
            if r["servers"][server]["counts"]:
                print(f"\n  {name}, {server} server: each request of the nightly run (<id>: a run's id)")
                print_trace(r, server)


def print_trace(r: dict, server: str) -> None:
    """Each distinct (operation, key shape) a run sent, with how many times."""
    for (op, what), n in sorted(collections.Counter(r["servers"][server]["log"]).items()):
        print(f"      {n:>4} {op:<28} {what}")


def nights_rows(args, work, env, moto, proxies, library) -> None:  # type: ignore[no-untyped-def]
    ist = [sys.executable, "-m", "immich_stream", "backup", "--stop", "none", "--prune", "--keep-last", "7"]
    short = {"IMMICH_STREAM_TEST_SHORT_DURATIONS": "1", "IMMICH_STREAM_LOCK_DAY": f"{args.day:g}s"}
    configs = {"no versioning": ([], dict(env, S3_BUCKET=moto.bucket("nights-plain", lock=False), **short))}
    for days in lock_days(args):
        e = dict(env, S3_BUCKET=moto.bucket(f"nights-lock-{days}", lock=True), **short)
        configs[f"--lock-days {days}"] = (["--lock-days", str(days)], e)
    for _flags, e in configs.values():
        e["IMMICH_STREAM_STATE_DIR"] = str(work / f"state-{e['S3_BUCKET']}")
    library.add(args.assets)
    wait_racy()
    print(
        f"\na day (of --lock-days, and between nights) is {args.day:g} s; per repository: wall s, requests, current MiB, all versions MiB"
    )
    print(f"{'night':>5} {'library MiB':>11}  " + "  ".join(f"{n:<32}" for n in configs), flush=True)
    start = time.monotonic()
    starts = []
    per_night: dict[str, list[dict]] = {n: [] for n in configs}
    for night in range(args.nights + 1):
        if night:
            library.night()  # changed files are racy for 3 s: read and hashed again next night, not stored again
            time.sleep(max(0.0, start + night * args.day - time.monotonic()))
        starts.append(time.monotonic())
        cols = []
        for name, (flags, e) in configs.items():
            r = run([*ist, *flags], e, proxies)
            bucket = e["S3_BUCKET"]
            r["current"] = moto.current(bucket)
            r["versions"] = moto.versions(bucket)
            per_night[name].append(r)
            n = sum(r["servers"]["main"]["counts"].values())
            cols.append(
                f"{r['wall']:>5.1f} {n:>6} {r['current'][1] / MIB:>8.1f} {r['versions'].get('version_bytes', 0) / MIB:>8.1f}"
                + (" FAILED" if r["code"] else "")
            )
        print(f"{night:>5} {library.size()[1] / MIB:>11.1f}  " + "  ".join(f"{c:<32}" for c in cols), flush=True)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    print(
        f"\nnights began {min(gaps):.1f} to {max(gaps):.1f} s apart (a day: {args.day:g} s); "
        f"{args.nights} nights took {(starts[-1] - starts[0]) / args.day:.1f} days"
    )
    files, size = library.size()
    print(f"after {args.nights} nights (night 0 is the first backup): library {files} files, {size / MIB:.1f} MiB")
    print(
        f"{'repository':<18} {'snapshots':>9} {'current objects':>15} {'current MiB':>11} {'versions':>8} "
        f"{'all versions MiB':>16} {'delete markers':>14} {'x no versioning':>15}"
    )
    base = per_night["no versioning"][-1]["current"][1]
    for name, rows in per_night.items():
        last = rows[-1]
        v = last["versions"]
        allb = v.get("version_bytes", last["current"][1])
        print(
            f"{name:<18} {moto.snapshots(configs[name][1]['S3_BUCKET']):>9} {last['current'][0]:>15} "
            f"{last['current'][1] / MIB:>11.1f} {v.get('versions', 0):>8} {allb / MIB:>16.1f} {v.get('markers', 0):>14} "
            f"{allb / max(base, 1):>15.2f}"
        )
    for name, rows in per_night.items():
        counts = [sum(r["servers"]["main"]["counts"].values()) for r in rows[1:]]
        ops = collections.Counter[str]()
        for r in rows[1:]:
            ops.update(r["servers"]["main"]["counts"])
        peak = max(range(len(counts)), key=lambda i: counts[i]) + 1
        print(
            f"{name}: requests a night (backup --prune) median {sorted(counts)[len(counts) // 2]}, max {max(counts)}, "
            f"night {peak}: {describe(rows[peak], 'main')}"
        )
        print("   all nights: " + " ".join(f"{k} {n}" for k, n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))))


def lock_days(args) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(x) for x in str(args.lock_days).split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="requests,nights")
    ap.add_argument("--assets", type=int, default=80)
    ap.add_argument("--nights", type=int, default=30)
    ap.add_argument("--lock-days", default="30", help="README's example value; nights: a comma list, a repository each")
    ap.add_argument("--day", type=float, default=8.0, help="seconds of a --lock-days day and of a night (nights)")
    ap.add_argument("--keep", action="store_true", help="leave the stack running")
    args = ap.parse_args()
    only = set(args.only.split(","))
    print("reproduce with:")
    print("  bash tests/run.sh --collect-only -q   # .venv and the test images")
    print(
        f"  flock -o /tmp/immich-docker-o.lock .venv/bin/python bench/immutability.py --only {args.only} "
        f"--assets {args.assets} --nights {args.nights} --lock-days {args.lock_days} --day {args.day:g}"
    )
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    moto_version = subprocess.run(
        [sys.executable, "-c", "import moto; print(moto.__version__)"], capture_output=True, text=True
    )
    load = os.getloadavg()
    print(
        f"commit {head.stdout.strip()}, moto {moto_version.stdout.strip()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )
    work = Path(tempfile.mkdtemp(prefix="immich-stream-immut-", dir="/var/tmp"))
    moto = Moto()
    rclone = RcloneServer(work / "s3")
    proxies = {"main": OpProxy(moto.port), "copy": OpProxy(rclone.port)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "IMMICH_", "RCLONE_"))}
    env["IMMICH_STREAM_TEST_AUTO_INIT"] = "1"  # fresh buckets: backup creates the repository (no `init`)
    env.update(
        {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
         "AWS_REGION": "us-east-1", "HOME": str(work), "XDG_CONFIG_HOME": str(work / ".config"),
         "IMMICH_DIR": str(STACK), "S3_ENDPOINT_URL": proxies["main"].endpoint, "S3_PATH_STYLE": "true",
         "IMMICH_STREAM_REPO_OFFSITE_ACCESS_KEY_ID": KEY, "IMMICH_STREAM_REPO_OFFSITE_SECRET_ACCESS_KEY": SECRET}
    )  # fmt: skip
    try:
        stack_up(STACK)
        if "requests" in only:
            library = Library(work / "library-requests")
            requests_rows(args, work, dict(env, LIBRARY_DIR=str(library.root)), moto, rclone, proxies, library)
        if "nights" in only:
            library = Library(work / "library-nights")
            nights_rows(args, work, dict(env, LIBRARY_DIR=str(library.root)), moto, proxies, library)
    finally:
        if not args.keep:
            subprocess.run([*compose_cmd(STACK), "down", "--remove-orphans"], capture_output=True)
        moto.stop()
        rclone.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
