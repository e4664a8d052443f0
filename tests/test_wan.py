"""Through a wide-area link (tests/wanproxy.py): a round trip per connection, a shared rate,
a bounded window. Functional only: the bench (bench/wan.py) times it, no test here does."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.test_restore import snapshot_of_tree
from tests.wanproxy import WanProxy

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


@pytest.fixture
def wan(s3_env: dict[str, str]) -> Iterator[WanProxy]:
    # a small window for its RTT: a connection carries at most 256 KiB / 20 ms = 12.5 MiB/s,
    # so the window, the pacing and the delay are all in the path
    proxy = WanProxy(s3_env["S3_ENDPOINT_URL"], rtt_ms=20, rate_mib=40, window_kib=256).start()
    yield proxy
    proxy.stop()


def make_tree(root: Path) -> int:
    """A Postgres-like tree of small files, a few packs' worth, and two multipart files."""
    rng = random.Random(5)
    total = 0
    for i in range(400):
        p = root / "base" / str(i % 4) / f"{1200 + i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(8192 * rng.choice((1, 2, 3))))
        total += p.stat().st_size
    for i in range(2):
        p = root / "pg_wal" / f"00000001000000000000000{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(6 * MIB + 17 * i))
        total += p.stat().st_size
    (root / "PG_VERSION").write_text("16\n")
    os.chmod(root / "PG_VERSION", 0o600)
    return total


@pytest.mark.slow  # subprocesses through a paced link: the full suite runs it, scripts/check does not
def test_backup_and_restore_through_a_wan_link_are_byte_identical(
    s3_env: dict[str, str], wan: WanProxy, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    size = make_tree(src)
    env = dict(s3_env, S3_ENDPOINT_URL=wan.endpoint)
    backup = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "files_stage.py"), str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert "failed 0" in backup.stdout
    up = wan.stats.up.bytes
    assert up >= size  # every byte crossed the link (not around it)
    assert wan.stats.peak_open > 1  # requests in flight at once, each behind its own window

    wan.reset()
    dest = tmp_path / "restored"
    r = run_cli("restore", "latest", "--to", str(dest), env=env, timeout=120)
    assert r.code == 0, r.err
    assert snapshot_of_tree(dest / "library") == snapshot_of_tree(src)
    assert wan.stats.down.bytes >= size


def test_the_window_bounds_one_connection_and_the_rate_is_shared(tmp_path: Path) -> None:
    """The proxy itself, against a plain TCP sink: bytes arrive complete and in order across
    a window far smaller than the payload (what the link model rests on)."""
    import asyncio
    import hashlib

    received: dict[int, bytes] = {}

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)
        received[len(received)] = data
        writer.write(hashlib.sha256(data).digest())
        await writer.drain()
        writer.close()

    async def run() -> list[bytes]:
        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proxy = WanProxy(f"127.0.0.1:{port}", rtt_ms=4, rate_mib=64, window_kib=64)
        await proxy.listen()

        async def one(payload: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            answer = await reader.read(-1)
            writer.close()
            return answer

        payloads = [os.urandom(MIB + i) for i in range(4)]
        answers = await asyncio.gather(*(one(p) for p in payloads))
        assert proxy.stats.up.bytes == sum(len(p) for p in payloads)
        assert proxy.stats.connections == 4
        server.close()
        return [hashlib.sha256(p).digest() == a for p, a in zip(payloads, answers, strict=True)]

    assert asyncio.run(run()) == [True] * 4
    assert sorted(len(v) for v in received.values()) == [MIB + i for i in range(4)]


@pytest.mark.slow
def test_a_run_under_slowdown_finishes_with_fewer_requests_at_once(
    s3_env: dict[str, str], proxy_factory, tmp_path: Path
) -> None:
    """503 SlowDown: the run lowers how many requests it has in flight (not just waits and
    sends as many again), and still finishes with every byte."""
    src = tmp_path / "src"
    rng = random.Random(9)
    for i in range(48):  # files of their own (not packs), each one of --jobs' slots
        p = src / "library" / f"IMG_{i:03d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(MIB + 1000 * i))
    proxy = proxy_factory(s3_env["S3_ENDPOINT_URL"])

    def data_put(method: str, path: str, query: dict[str, str]) -> bool:
        return method == "PUT" and "/data/" in path

    seen = [0]

    def refuse(method: str, path: str, query: dict[str, str]) -> bool:
        """The 17th to 22nd upload: after the run has had its 8 in flight a while."""
        if not data_put(method, path, query):
            return False
        seen[0] += 1
        return 16 < seen[0] <= 22

    refused = proxy.add(refuse, status=503, code="SlowDown", delay=0.05)
    proxy.add(data_put, delay=0.15)  # every upload takes a while: 8 would be in flight at once
    env = dict(s3_env, S3_ENDPOINT_URL=proxy.endpoint, IMMICH_STREAM_JOBS="8", IMMICH_STREAM_RETRIES="8")
    backup = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "files_stage.py"), str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert refused.hits == 6
    puts = [n for m, p, n in proxy.arrivals if m == "PUT" and "/data/" in p]
    assert max(puts[:16]) >= 7, puts  # before the refusals: its 8 in flight
    # once the refused and those already sent are answered: half as many, climbing back by one a round
    assert max(puts[30:36]) <= 5, puts
    dest = tmp_path / "restored"
    r = run_cli("restore", "latest", "--to", str(dest), env=dict(s3_env), timeout=120)
    assert r.code == 0, r.err
    assert snapshot_of_tree(dest / "library") == snapshot_of_tree(src)
