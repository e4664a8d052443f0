"""Benchmark: how long Immich is down, on a bandwidth-limited path to S3 (issue 11).

    flock /tmp/immich-docker-tests.lock .venv/bin/python bench/downtime.py [--size-gib 1.5] [--mib-s 20]

(the flock keeps it apart from a test run: both use the stack's fixed container names.)

Brings up the test stack like the demo (tests/stack/demo.sh), the bench library of
bench/run.py, `rclone serve s3`, and in front of it a TCP proxy that forwards uploads at
--mib-s (a home uplink). Then, in one run, for `--stop all` with the live pass (today's
default) and without it (`--no-live-pass`: the whole upload with the stack stopped, the
behaviour before it), each to its own bucket: a first backup, a run with nothing
changed, and a run after adding 200 MiB of new photos. Downtime is read from outside,
from Docker's own events for immich_server (die -> start). Last, a first backup killed
at 80% of the library's bytes and the run after it: how many bytes that run uploads.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import BENCH, DEMO, KEY, MIB, SECRET, free_port, make_library  # noqa: E402

ADDED = "upload/bench-added"


class Throttle:
    """A TCP proxy: client -> server bytes at `rate` bytes/s in all (one token bucket for
    every connection, like one uplink); the answers pass freely. It counts what it sent."""

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.port = free_port()
        self.sent = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._tokens = 0.0
        self._last = time.monotonic()
        self._lock = asyncio.Lock()
        server = self._loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _take(self, n: int) -> None:
        async with self._lock:  # one uplink: requests share it in turn
            while True:
                now = time.monotonic()
                self._tokens = min(self.rate / 10, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= n:
                    self._tokens -= n
                    return
                await asyncio.sleep((n - self._tokens) / self.rate)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, throttled: bool) -> None:
        try:
            while data := await r.read(64 << 10):
                if throttled:
                    await self._take(len(data))
                    self.sent += len(data)
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(self._pipe(cr, sw, True), self._pipe(sr, cw, False))

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


def downtime_from_events(since: float, until: float) -> float:
    """Seconds immich_server was not running between `since` and `until`, from Docker's events."""
    out = subprocess.run(
        [
            "docker",
            "events",
            "--since",
            f"{since:.3f}",
            "--until",
            f"{until:.3f}",
            "--filter",
            "container=immich_server",
            "--filter",
            "event=die",
            "--filter",
            "event=start",
            "--format",
            "{{.TimeNano}} {{.Action}}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    down, died = 0.0, None
    for line in filter(None, out):
        ns, action = line.split()
        t = int(ns) / 1e9
        if action == "die" and died is None:
            died = t
        elif action == "start" and died is not None:
            down += t - died
            died = None
    return down


def backup(env: dict[str, str], *args: str) -> tuple[float, float, str]:
    """One backup: (wall seconds, downtime seconds from Docker's events, its summary lines)."""
    start = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "immich_stream", "backup", *args], env=env, capture_output=True, text=True
    )
    end = time.time() + 0.5
    if r.returncode != 0:
        raise SystemExit(f"backup failed ({r.returncode}): {r.stderr[-2000:]}")
    time.sleep(0.6)
    summary = "\n  ".join(ln for ln in r.stdout.splitlines() if ln.startswith(("downtime", "live", "bytes")))
    return end - 0.5 - start, downtime_from_events(start, end), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.5)
    ap.add_argument("--mib-s", type=float, default=20.0, help="the uplink's rate")
    ap.add_argument("--added-mib", type=int, default=200)
    ap.add_argument("--only-kill", action="store_true", help="only the killed-at-80%% run and the one after it")
    args = ap.parse_args()

    subprocess.run(["bash", str(ROOT / "tests" / "stack" / "demo.sh"), "config"], check=True, stdout=subprocess.DEVNULL)
    library = BENCH / "library"
    size = make_library(library, args.size_gib)
    shutil.rmtree(library / ADDED, ignore_errors=True)
    pg = DEMO / "immich" / "postgres"
    pg_size = sum(p.stat().st_size for p in pg.rglob("*") if p.is_file()) if pg.is_dir() else 0
    first = size + pg_size  # what a first --stop all backup reads (and the dump besides)
    print(f"library: {size / MIB:.0f} MiB at {library}; uplink {args.mib_s:g} MiB/s")

    s3dir = BENCH / "s3-downtime"
    shutil.rmtree(s3dir, ignore_errors=True)
    s3dir.mkdir(parents=True)
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "rclone"),
            "serve",
            "s3",
            str(s3dir),
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{KEY},{SECRET}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    throttle = Throttle(port, args.mib_s * MIB)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "IMMICH_", "RCLONE_"))}
    env["IMMICH_STREAM_TEST_AUTO_INIT"] = "1"  # fresh buckets: backup creates the repository (no `init`)
    env.update(
        {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "IMMICH_DIR": str(DEMO / "immich"),
            "LIBRARY_DIR": str(library),
            "S3_ENDPOINT_URL": f"http://127.0.0.1:{throttle.port}",
            "S3_PATH_STYLE": "true",
            "IMMICH_STREAM_STATE_DIR": str(BENCH / "state"),
        }
    )
    for b in ("live", "stopped", "killed"):
        (s3dir / b).mkdir()
    rows: list[tuple[str, str, float, float, str]] = []
    try:
        modes = {"live": [], "stopped": ["--no-live-pass"]}
        for name, extra in modes.items() if not args.only_kill else []:
            benv = dict(env, S3_BUCKET=name)
            for run in ("first backup", "nothing changed"):
                wall, down, summary = backup(benv, *extra)
                rows.append((name, run, wall, down, summary))
        rng = random.Random(11)
        added = 0
        while added < args.added_mib * MIB and not args.only_kill:
            n = rng.randint(2 * MIB, 6 * MIB)
            path = library / ADDED / f"{added // MIB:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(n))
            added += n
        for name, extra in modes.items() if not args.only_kill else []:
            wall, down, summary = backup(dict(env, S3_BUCKET=name), *extra)
            rows.append((name, f"+{args.added_mib} MiB new", wall, down, summary))
        shutil.rmtree(library / ADDED, ignore_errors=True)

        # a first backup killed at 80% of the library's bytes, then the next run
        kenv = dict(env, S3_BUCKET="killed")
        before = throttle.sent
        proc = subprocess.Popen(
            [sys.executable, "-m", "immich_stream", "backup"],
            env=kenv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while throttle.sent - before < 0.8 * first and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run([sys.executable, "-m", "immich_stream", "unlock"], env=kenv, capture_output=True)
        killed_at = throttle.sent - before
        before = throttle.sent
        k_wall, k_down, k_summary = backup(kenv)
        resumed = throttle.sent - before
    finally:
        throttle.stop()
        server.terminate()
        server.wait()
        shutil.rmtree(s3dir, ignore_errors=True)

    print(f"\n{'--stop all':<24} {'run':<20} {'wall s':>8} {'Immich down s':>14}")
    for name, run, wall, down, _ in rows:
        label = "live pass (default)" if name == "live" else "--no-live-pass"
        print(f"{label:<24} {run:<20} {wall:>8.1f} {down:>14.1f}")
    print(
        f"\nfirst backup reads {first / MIB:.0f} MiB (library {size / MIB:.0f}, data directory {pg_size / MIB:.0f}); "
        f"killed at {killed_at / MIB:.0f} MiB sent ({killed_at / first:.0%}); the next run sent "
        f"{resumed / MIB:.0f} MiB ({resumed / first:.0%}) in {k_wall:.1f} s, Immich down {k_down:.1f} s\n  {k_summary}"
    )
    for name, run, _, _, summary in rows:
        print(f"{name}, {run}:\n  {summary}")


if __name__ == "__main__":
    main()
