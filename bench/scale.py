"""Benchmark: an Immich-scale library of small files and a database changed night by night,
immich-stream against restic (Debian's package, 0.14) in one run, against one S3 server.

    flock -o /tmp/immich-docker.lock .venv/bin/python bench/scale.py [--files 100000]
        [--only first,nochange,restore,pg] [--pg-nights 7] [--pg-mib 170] [--keep]

(after `bash tests/run.sh --collect-only -q` made .venv and the test images; the run brings
up the test stack of docker-compose.test.yml, whose container names are fixed: hold the lock
the test runs hold; -o: a dockerd this run starts must not inherit it and hold it for
ever.) Not a test: nothing here asserts a time.

One `rclone serve s3` on loopback; in front of it a counting HTTP proxy per tool (this file's
CountingProxy: it parses the requests' framing only and passes answers through), so that
each row also says how many S3 requests the tool made. Each tool has its own bucket; restic's
S3 backend points at the same server, its password comes from RESTIC_PASSWORD_FILE.

Rows (--only):
- first, nochange, restore: `--files N` small files (200 B to 3 KB, random bytes, seed 29)
  in an Immich-like tree (library/<user>/YYYY/MM-DD/, thumbs/<user>/xx/yy/<uuid>-thumbnail.webp
  and -preview.jpeg, encoded-video, upload, profile, backups, each with its .immich marker),
  generated once into /var/tmp/immich-stream-scale-N. immich-stream runs `backup --stop none`
  (the files and a pg_dump of the stack's database: its seconds are printed beside the row),
  restic `backup DIR`; then both again with nothing changed; then `restore latest --root
  library --to DIR` and `restic restore latest --target DIR` into empty directories.
  Each: wall seconds, CPU seconds of the tool (user+system, wait4), peak RSS (VmHWM summed
  over the process tree, sampled), objects in the bucket after the row, S3 requests.
- pg: the database stored by change. A database `scalebench` in the stack's Postgres gets
  --pg-mib of rows (a table with an index); then a first backup and --pg-nights nights, each
  changing 50 rows (25 updated, 25 inserted) with psql. immich-stream runs `backup --stop all`
  (it stops the stack and reads PGDATA cold; its library is an empty Immich folder, its dump
  covers the `immich` database only); restic backs up the same PGDATA with the database
  container stopped by `docker stop` (a cold copy too). After each night: bytes stored in
  each bucket (the sum of the listed objects' sizes, whatever the repository format), with
  immich-stream's dump bytes (from its summary) shown apart.

Buckets are listed, never parsed: the figures hold for any repository format. --keep leaves
the server's directory (printed) and the stack in place for inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from run import descendants, free_port  # noqa: E402

from tests.helpers import vm_hwm_kib  # noqa: E402

BIN = Path(sys.executable).parent
RESTIC = os.environ.get("RESTIC", "/usr/bin/restic")
KEY, SECRET = "bench-key", "bench-secret"
USER = "5ca1e000-0000-4000-8000-000000000029"
MIB = 1024 * 1024
DEMO = Path(os.environ.get("IMMICH_STREAM_SCALE_STACK", "/var/tmp/immich-stream-scale-stack"))
CONTAINERS = ("immich_machine_learning", "immich_postgres", "immich_redis", "immich_server")
MARKER_DIRS = ("library", "upload", "thumbs", "encoded-video", "profile", "backups")


# --- the library ---------------------------------------------------------------------------


def make_small_library(root: Path, files: int) -> tuple[int, int]:
    """`files` small files in an Immich-like tree; deterministic; cached (a marker file says
    it is complete). Returns (files, bytes), the markers included."""
    done = root / f".complete-{files}"
    if done.exists():
        return files, int(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(29)
    total = 0
    count = 0
    made: set[str] = set()

    def put(rel: str, size: int) -> None:
        nonlocal total, count
        d = os.path.join(root, os.path.dirname(rel))
        if d not in made:
            os.makedirs(d, exist_ok=True)
            made.add(d)
        fd = os.open(os.path.join(root, rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, rng.randbytes(size))
        finally:
            os.close(fd)
        total += size
        count += 1

    for d in MARKER_DIRS:
        put(f"{d}/.immich", 0)
    put(f"profile/{USER}/{USER}.jpg", rng.randint(200, 3000))
    i = 0
    while count < files:
        uuid = f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-8{rng.getrandbits(12):03x}-{rng.getrandbits(48):012x}"
        year, month, day = 2010 + i % 15, 1 + i // 7 % 12, 1 + i % 28
        xx, yy = uuid[:2], uuid[2:4]
        if i % 50 == 49:  # an upload still being processed
            put(f"upload/{USER}/{xx}/{yy}/{uuid}.heic", rng.randint(200, 3000))
        else:
            put(f"library/{USER}/{year}/{year}-{month:02d}-{day:02d}/IMG_{i:06d}.jpg", rng.randint(200, 3000))
        put(f"thumbs/{USER}/{xx}/{yy}/{uuid}-thumbnail.webp", rng.randint(200, 3000))
        put(f"thumbs/{USER}/{xx}/{yy}/{uuid}-preview.jpeg", rng.randint(200, 3000))
        if i % 20 == 19:
            put(f"encoded-video/{USER}/{xx}/{yy}/{uuid}.mp4", rng.randint(200, 3000))
        if i % 5000 == 4999:
            put(f"backups/immich-db-backup-{i}.sql.gz", rng.randint(200, 3000))
        i += 1
    # The racy-timestamp guard (3 s) re-reads files whose ctime is that close to a run's
    # start: files written just before the first run are read again by the next; a real
    # library's files are older than that.
    time.sleep(4)
    done.write_text(str(total))
    return count, total


# --- the counting proxy --------------------------------------------------------------------


class CountingProxy:
    """Counts the HTTP requests on their way to the S3 server, by method. Bytes are forwarded
    as they come; only the requests' framing is parsed (head, Content-Length or chunked body),
    the answers pass through untouched. Runs in a thread of this process."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.counts: collections.Counter[str] = collections.Counter()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def total(self) -> int:
        return sum(self.counts.values())

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection, one server connection. When the server closes its side (an
        idle keep-alive connection, say), the client's is closed too: a client left with a
        half-closed connection would send its next request into it and wait forever."""
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        answers = asyncio.create_task(self._pump(up_r, writer))
        requests = asyncio.create_task(self._requests(reader, up_w))
        done, _ = await asyncio.wait({answers, requests}, return_when=asyncio.FIRST_COMPLETED)
        if answers in done:
            requests.cancel()
        else:  # the client is done sending: its last answers still come
            try:
                up_w.write_eof()
            except OSError:
                pass
            try:
                await asyncio.wait_for(asyncio.shield(answers), 30)
            except (TimeoutError, ConnectionError, OSError):
                answers.cancel()
        await asyncio.gather(answers, requests, return_exceptions=True)
        for w in (up_w, writer):
            w.close()

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(1 << 18):
            dst.write(data)
            await dst.drain()

    def new_framer(self) -> Framer:
        return Framer(self.counts)

    async def _requests(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter) -> None:
        """Forward the client's bytes as they come; count the requests in them on the side (a
        framing the parser does not follow is counted as `unparsed` and never stops the bytes)."""
        framer = self.new_framer()
        while data := await reader.read(1 << 18):
            up.write(data)
            await up.drain()
            try:
                framer.feed(data)
            except (ValueError, IndexError):
                self.counts["unparsed"] += 1
                framer = self.new_framer()


class Framer:
    """HTTP/1.1 request framing: heads counted by method, bodies (Content-Length or chunked) skipped."""

    def __init__(self, counts: collections.Counter[str]) -> None:
        self.counts = counts
        self.buf = b""
        self.state, self.left = "head", 0

    def count(self, request_line: str, headers: dict[str, str]) -> None:
        self.counts[request_line.split(" ", 1)[0]] += 1

    def feed(self, data: bytes) -> None:
        buf = self.buf + data
        state, left = self.state, self.left
        while buf:
            if state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head, buf = buf[:end].decode("latin-1"), buf[end + 4 :]
                lines = head.split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
                self.count(lines[0], headers)
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    state = "size"
                elif int(headers.get("content-length", "0") or 0) > 0:
                    state, left = "body", int(headers["content-length"])
            elif state in ("body", "chunk"):
                take = min(left, len(buf))
                buf, left = buf[take:], left - take
                if left == 0:
                    state = "head" if state == "body" else "size"
            elif state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(buf[:end].split(b";")[0], 16)
                buf = buf[end + 2 :]
                state, left = ("trailer", 0) if size == 0 else ("chunk", size + 2)
            else:  # trailer: header lines up to an empty one
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                line, buf = buf[:end], buf[end + 2 :]
                if not line:
                    state = "head"
        self.buf, self.state, self.left = buf, state, left


# --- the server, the stack, the tools ------------------------------------------------------


class Server:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(BIN / "rclone"), "serve", "s3", str(directory), "--addr", f"127.0.0.1:{self.port}",
             "--config", "/dev/null", "--auth-key", f"{KEY},{SECRET}"],
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

    def bucket(self, name: str) -> str:
        self.s3.create_bucket(Bucket=name)
        return name

    def stored(self, bucket: str) -> tuple[int, int]:
        """(objects, bytes) in the bucket, by listing it."""
        n = size = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                n += 1
                size += o["Size"]
        return n, size

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def compose_cmd(base: Path) -> list[str]:
    return [str(BIN / "docker-compose"), "--project-directory", str(base), "-f", str(base / "docker-compose.yml")]


def stack_up(base: Path) -> None:
    """The test stack (docker-compose.test.yml, seeded `immich` database) with its own
    folder, set up as tests/conftest.py does."""
    (base / "library").mkdir(parents=True, exist_ok=True)
    (base / ".env").write_text(
        f"UPLOAD_LOCATION={base / 'library'}\nDB_DATA_LOCATION=./postgres\nDB_PASSWORD=scale-db-password\n"
        f"DB_USERNAME=postgres\nDB_DATABASE_NAME=immich\nIMMICH_TEST_SEED_DIR={ROOT}/tests/stack/initdb\n"
    )
    shutil.copy(ROOT / "docker-compose.test.yml", base / "docker-compose.yml")
    subprocess.run([*compose_cmd(base), "down", "--remove-orphans"], capture_output=True)
    subprocess.run(["docker", "rm", "-f", *CONTAINERS], capture_output=True)
    subprocess.run([*compose_cmd(base), "up", "-d"], check=True, capture_output=True)
    wait_db()


def wait_db(timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = subprocess.run(
            ["docker", "exec", "immich_postgres", "pg_isready", "-h", "127.0.0.1", "-U", "postgres"],
            capture_output=True,
        )
        if ready.returncode == 0:
            return
        time.sleep(0.5)
    raise SystemExit("the stack's database did not become ready")


def psql(sql: str, db: str = "scalebench") -> str:
    out = subprocess.run(
        ["docker", "exec", "-i", "immich_postgres", "psql", "-v", "ON_ERROR_STOP=1", "-qAt", "-U", "postgres",
         "-d", db],
        input=sql, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"psql failed: {out.stderr}")
    return out.stdout.strip()


def du(path: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs)


class Row:
    def __init__(self, name: str) -> None:
        self.name = name
        self.tools: dict[str, dict] = {}
        self.note = ""


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Wall time, CPU seconds (wait4), peak RSS of the process tree (sum of VmHWM, sampled)
    and the exit code: a tool that fails is reported, the run goes on."""
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
        time.sleep(0.05)
    wall = time.monotonic() - start
    reader.join()
    return {
        "wall": wall,
        "rss_mib": sum(peaks.values()) / 1024,
        "cpu": usage.ru_utime + usage.ru_stime,
        "code": os.waitstatus_to_exitcode(status),
        "output": out[0].decode(errors="replace"),
    }


def run_tool(tool: str, cmd: list[str], env: dict[str, str], proxy: CountingProxy, server: Server,
             bucket: str) -> dict:  # fmt: skip
    """measure() (wall, CPU, peak RSS) plus the requests the proxy counted and the bucket's
    objects and bytes afterwards. The disk is synced first: no tool pays for the one before."""
    os.sync()
    before = proxy.counts.copy()
    own = resource.getrusage(resource.RUSAGE_SELF)
    r = measure(cmd, env)
    if r["code"]:
        tail = [ln for ln in r["output"].splitlines() if not ln.startswith("[")][-12:]
        print(f"{tool} exited with code {r['code']}:\n  " + "\n  ".join(tail), flush=True)
    after = resource.getrusage(resource.RUSAGE_SELF)
    r["proxy_cpu"] = after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime
    counted = proxy.counts - before
    r["requests"] = sum(counted.values())
    r["by_method"] = dict(counted)
    r["objects"], r["bytes"] = server.stored(bucket)
    return r


def summary_doc(output: str) -> dict:
    """immich-stream's --json document (stderr's JSON log lines come before it)."""
    at = output.rfind('{\n  "message_type": "summary"')
    try:
        return dict(json.JSONDecoder().raw_decode(output[at:])[0]) if at >= 0 else {}
    except ValueError:
        return {}


def dump_seconds(output: str) -> str:
    """The database and time lines of immich-stream's summary."""
    lines = [ln for ln in output.splitlines() if ln.startswith(("database", "time"))]
    return "; ".join(" ".join(ln.split()) for ln in lines)


def print_rows(rows: list[Row]) -> None:
    print(
        f"\n{'row':<18} {'tool':<14} {'wall s':>8} {'CPU s':>7} {'RSS MiB':>8} {'objects':>9} {'MiB stored':>10} "
        f"{'requests':>9}  by method"
    )
    for row in rows:
        for tool, r in row.tools.items():
            methods = " ".join(f"{k} {v}" for k, v in sorted(r["by_method"].items()))
            print(
                f"{row.name:<18} {tool:<14} {r['wall']:>8.1f} {r['cpu']:>7.1f} {r['rss_mib']:>8.0f} {r['objects']:>9} "
                f"{r['bytes'] / MIB:>10.1f} {r['requests']:>9}  {methods}"
            )
        if len(row.tools) == 2:
            a, b = row.tools["immich-stream"], row.tools["restic"]

            def q(x: float, y: float) -> str:
                return f"{x / y:.2f}" if y else "-"

            print(
                f"{'':<18} {'ratio is/restic':<14} {q(a['wall'], b['wall']):>8} {q(a['cpu'], b['cpu']):>7} "
                f"{q(a['rss_mib'], b['rss_mib']):>8} {q(a['objects'], b['objects']):>9} {q(a['bytes'], b['bytes']):>10} "
                f"{q(a['requests'], b['requests']):>9}"
            )
        failed = [f"{tool} exited with code {r['code']}" for tool, r in row.tools.items() if r["code"]]
        if failed:
            print(f"{'':<18} FAILED: {', '.join(failed)}")
        if row.note:
            print(f"{'':<18} {row.note}")


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--only", default="first,nochange,restore,pg")
    ap.add_argument("--pg-nights", type=int, default=7)
    ap.add_argument("--pg-mib", type=int, default=170, help="rows loaded into the scalebench database, in MiB")
    ap.add_argument("--keep", action="store_true", help="keep the buckets (the server's directory) and the stack")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if not Path(RESTIC).exists():
        raise SystemExit(f"{RESTIC} not found: apt-get install restic (Debian's package)")
    restic_version = subprocess.run([RESTIC, "version"], capture_output=True, text=True).stdout.strip()
    print("reproduce with:")
    print("  bash tests/run.sh --collect-only -q   # .venv and the test images")
    print(
        f"  flock -o /tmp/immich-docker.lock .venv/bin/python bench/scale.py --files {args.files} --only {args.only} "
        f"--pg-nights {args.pg_nights} --pg-mib {args.pg_mib}"
    )
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(
        f"commit {head.stdout.strip()}, {restic_version}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    load = os.getloadavg()
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")

    work = Path(tempfile.mkdtemp(prefix="immich-stream-scale-run-", dir="/var/tmp"))
    server = Server(work / "s3")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "IMMICH_", "RCLONE_", "RESTIC_"))}
    env["IMMICH_STREAM_TEST_AUTO_INIT"] = "1"  # fresh buckets: backup creates the repository (no `init`)
    env.update(
        {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
         "AWS_REGION": "us-east-1", "HOME": str(work)}
    )  # fmt: skip
    (work / "restic-password").write_text("scale-bench-restic-password\n")
    os.chmod(work / "restic-password", 0o600)
    ist_proxy, restic_proxy = CountingProxy(server.port), CountingProxy(server.port)

    def ienv(bucket: str, **extra: str) -> dict[str, str]:
        return dict(
            env,
            IMMICH_DIR=str(DEMO),
            S3_ENDPOINT_URL=ist_proxy.endpoint,
            S3_PATH_STYLE="true",
            S3_BUCKET=bucket,
            IMMICH_STREAM_STATE_DIR=str(work / f"state-{bucket}"),
            **extra,
        )

    def renv(bucket: str) -> dict[str, str]:
        return dict(
            env,
            RESTIC_REPOSITORY=f"s3:{restic_proxy.endpoint}/{bucket}",
            RESTIC_PASSWORD_FILE=str(work / "restic-password"),
            RESTIC_CACHE_DIR=str(work / f"restic-cache-{bucket}"),
        )

    ist = [sys.executable, "-m", "immich_stream"]
    rows: list[Row] = []
    try:
        stack_up(DEMO)
        if only & {"first", "nochange", "restore"}:
            library = Path(f"/var/tmp/immich-stream-scale-{args.files}")
            started = time.monotonic()
            n, size = make_small_library(library, args.files)
            print(f"library: {n} files, {size / MIB:.0f} MiB at {library} ({time.monotonic() - started:.0f} s)")
            subprocess.run(["bash", "-c", 'find "$0" -type f -exec cat {} + > /dev/null', str(library)], check=True)
            ib, rb = server.bucket("is-files"), server.bucket("restic-files")
            ie = ienv(ib, LIBRARY_DIR=str(library))
            re_ = renv(rb)
            subprocess.run([RESTIC, "init", "-q"], env=re_, check=True, capture_output=True)
            restic_config = subprocess.run([RESTIC, "cat", "config"], env=re_, capture_output=True, text=True)
            print(f"restic's repository config (its defaults): {' '.join(restic_config.stdout.split())}")
            ibackup = [*ist, "backup", "--stop", "none"]
            rbackup = [RESTIC, "backup", "-q", "--host", "scale", str(library)]
            for name in ("first", "nochange"):
                if name not in only and not (name == "first" and only & {"nochange", "restore"}):
                    continue
                row = Row("first backup" if name == "first" else "no-change backup")
                row.tools["immich-stream"] = run_tool("immich-stream", ibackup, ie, ist_proxy, server, ib)
                row.tools["restic"] = run_tool("restic", rbackup, re_, restic_proxy, server, rb)
                row.note = "immich-stream's own summary: " + dump_seconds(row.tools["immich-stream"]["output"])
                if name in only:
                    rows.append(row)
                print_rows([row])
            if "restore" in only:
                row = Row("restore library")
                dest = work / "restore-is"
                row.tools["immich-stream"] = run_tool(
                    "immich-stream", [*ist, "restore", "latest", "--root", "library", "--to", str(dest)], ie,
                    ist_proxy, server, ib,
                )  # fmt: skip
                restored = sum(len(fs) for _, _, fs in os.walk(dest))
                shutil.rmtree(dest)
                dest = work / "restore-restic"
                row.tools["restic"] = run_tool(
                    "restic", [RESTIC, "restore", "-q", "latest", "--target", str(dest)], re_, restic_proxy, server, rb
                )
                restored_r = sum(len(fs) for _, _, fs in os.walk(dest))
                shutil.rmtree(dest)
                row.note = f"files restored: immich-stream {restored}, restic {restored_r}"
                rows.append(row)
                print_rows([row])
        if "pg" in only:
            pg_nights(args, server, work, ist, ienv, renv, ist_proxy, restic_proxy, rows)
    finally:
        if not args.keep:
            subprocess.run([*compose_cmd(DEMO), "down", "--remove-orphans"], capture_output=True)
        server.stop()
        if args.keep:
            print(f"\nkept: the server's directory {work / 's3'} and the stack in {DEMO}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if rows:
        print("\n== all rows ==")
        print_rows(rows)
        proxy_cpu = sum(r["proxy_cpu"] for row in rows for r in row.tools.values())
        print(
            f"\nCPU s: the tool's own (wait4). RSS: peak, VmHWM summed over the tool's processes. objects, MiB stored:"
            f"\nthe bucket after the row (listed). requests: counted by the proxy in front of the server (its CPU and"
            f"\nthe sampling's, in this process, {proxy_cpu:.0f} s over all rows, share the machine's cores with both tools)."
        )


def pg_nights(args, server, work, ist, ienv, renv, ist_proxy, restic_proxy, rows) -> None:  # type: ignore[no-untyped-def]
    """The database stored by change: see the module's docstring."""
    pgdata = DEMO / "postgres"
    empty = work / "empty-library"
    for d in MARKER_DIRS:
        (empty / d).mkdir(parents=True, exist_ok=True)
        (empty / d / ".immich").touch()
    rows_wanted = args.pg_mib * MIB // 600
    psql("DROP DATABASE IF EXISTS scalebench", db="postgres")
    psql("CREATE DATABASE scalebench", db="postgres")
    started = time.monotonic()
    psql(
        "CREATE TABLE assets (id bigserial PRIMARY KEY, owner int NOT NULL, taken timestamptz NOT NULL, "
        "payload text NOT NULL);\n"
        f"INSERT INTO assets (owner, taken, payload) SELECT g % 97, now() - g * interval '1 minute', "
        "md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text) || "
        "md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text) || "
        "md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text) || "
        "md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text) "
        f"FROM generate_series(1, {rows_wanted}) g;\n"
        "CREATE INDEX assets_owner_taken ON assets (owner, taken);\nCHECKPOINT;"
    )
    db_size = int(psql("SELECT pg_database_size('scalebench')"))
    print(
        f"\npg: scalebench loaded, {rows_wanted} rows, database {db_size / MIB:.0f} MiB, "
        f"PGDATA {du(pgdata) / MIB:.0f} MiB, of it pg_wal {du(pgdata / 'pg_wal') / MIB:.0f} MiB "
        f"({time.monotonic() - started:.0f} s)"
    )
    ib, rb = server.bucket("is-pg"), server.bucket("restic-pg")
    ie = ienv(ib, LIBRARY_DIR=str(empty))
    re_ = renv(rb)
    subprocess.run([RESTIC, "init", "-q"], env=re_, check=True, capture_output=True)
    rng = random.Random(7)
    dumps = 0
    table = []
    print(
        f"{'night':<6} {'changed':>8} {'is MiB':>9} {'+MiB':>7} {'dumps MiB':>10} {'restic MiB':>11} {'+MiB':>7} {'ratio':>6}  wall s is/restic"
    )
    prev_is = prev_r = 0
    for night in range(args.pg_nights + 1):
        if night:
            ids = ",".join(str(rng.randint(1, rows_wanted)) for _ in range(25))
            psql(
                f"UPDATE assets SET payload = md5(random()::text) || payload WHERE id IN ({ids});\n"
                "INSERT INTO assets (owner, taken, payload) SELECT g % 97, now(), repeat(md5(random()::text), 16) "
                "FROM generate_series(1, 25) g;"
            )
        a = run_tool("immich-stream", [*ist, "backup", "--stop", "all", "--json"], ie, ist_proxy, server, ib)
        doc = summary_doc(a["output"])
        db = doc.get("summary", {}).get("database", {})
        dumps += int(db.get("compressed_size") or 0)
        summ = doc.get("summary", {})
        live = (summ.get("live_files") or {}).get("bytes_uploaded") or 0
        a["dump"] = (
            f"dump {db.get('seconds', 0):.1f} s; files uploaded {(summ.get('files') or {}).get('bytes_uploaded', 0) / MIB:.1f} "
            f"MiB with Postgres stopped, {live / MIB:.1f} MiB while it ran"
        )
        subprocess.run(["docker", "stop", "immich_postgres"], check=True, capture_output=True)
        b = run_tool("restic", [RESTIC, "backup", "-q", "--host", "scale", str(pgdata)], re_, restic_proxy, server, rb)
        subprocess.run(["docker", "start", "immich_postgres"], check=True, capture_output=True)
        wait_db()
        table.append((night, a, b))
        print(
            f"{night:<6} {'50 rows' if night else 'load':>8} {a['bytes'] / MIB:>9.1f} {(a['bytes'] - prev_is) / MIB:>7.1f} "
            f"{dumps / MIB:>10.1f} {b['bytes'] / MIB:>11.1f} {(b['bytes'] - prev_r) / MIB:>7.1f} "
            f"{a['bytes'] / max(b['bytes'], 1):>6.2f}  {a['wall']:.1f}/{b['wall']:.1f} ({a.get('dump', '')})"
        )
        prev_is, prev_r = a["bytes"], b["bytes"]
    first_a, first_b = table[0][1]["bytes"], table[0][2]["bytes"]
    last_a, last_b = table[-1][1]["bytes"], table[-1][2]["bytes"]
    print(
        f"after {args.pg_nights} nights: immich-stream {last_a / MIB:.1f} MiB stored ({dumps / MIB:.1f} MiB of it dumps), "
        f"restic {last_b / MIB:.1f} MiB: ratio {last_a / max(last_b, 1):.2f} "
        f"(without the dumps {(last_a - dumps) / max(last_b, 1):.2f}); growth over the nights: "
        f"immich-stream {(last_a - first_a) / MIB:.1f} MiB, restic {(last_b - first_b) / MIB:.1f} MiB"
    )
    row = Row(f"pg {args.pg_nights} nights")
    row.tools["immich-stream"], row.tools["restic"] = table[-1][1], table[-1][2]
    row.note = "(the last night's run; MiB stored: after all nights)"
    rows.append(row)


if __name__ == "__main__":
    main()
