"""Test helpers: run the real CLI, look into the bucket, make Immich-shaped libraries."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from immich_stream import config

REPO_ROOT = Path(__file__).resolve().parent.parent
USER_ID = "a1b2c3d4-0000-4000-8000-000000000001"  # the Immich user of generated libraries


@dataclass
class Result:
    code: int
    out: str
    err: str
    written_bytes: int  # bytes the process wrote to local storage (rusage ru_oublock)
    maxrss_kib: int  # peak RSS (VmHWM, sampled every 50 ms)

    @property
    def last_error(self) -> str:
        lines = [ln for ln in self.err.splitlines() if ln.startswith("immich-stream: error:")]
        return lines[-1] if lines else ""


def run_cli(*args: str, env: dict[str, str], timeout: float = 240, cwd: str | None = None) -> Result:
    """Run `python -m immich_stream ARGS` as a user would; measure what this one process
    wrote to local storage and its peak memory (wait4's rusage, not all children's)."""
    proc = start_cli(*args, env=env, cwd=cwd)
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: out.append(proc.stdout.read())),  # type: ignore[union-attr]
        threading.Thread(target=lambda: err.append(proc.stderr.read())),
    ]  # type: ignore[union-attr]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout
    peak_kib = 0
    while True:
        peak_kib = max(peak_kib, vm_hwm_kib(proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"immich-stream {' '.join(args)} ran past {timeout}s")
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    return Result(proc.returncode, out[0], err[0], usage.ru_oublock * 512, peak_kib)


def vm_hwm_kib(pid: int) -> int:
    """The process's peak RSS so far. Not rusage's ru_maxrss: after fork+exec that still
    holds the forking parent's (pytest's) high-water mark."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def start_cli(*args: str, env: dict[str, str], cwd: str | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "immich_stream", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def make_settings(
    env: Mapping[str, str] | None = None,
    *,
    endpoint: str | None = None,
    bucket: str | None = None,
    home: Path | None = None,
    export_credentials: bool = False,
    **variables: str,
) -> config.Settings:
    """The one way tests build `Settings`: what `config.load` makes of a CLI run's environment.

    `env` is that environment (the `s3_env` fixture, say); without it, one is made for
    `endpoint` and `bucket` with the test credentials and path-style addressing. `variables`
    add or replace environment variables (IMMICH_STREAM_RETRIES="2", ...). `home` keeps the
    user's own config file out (XDG_CONFIG_HOME under it). `export_credentials` also puts the
    AWS keys into os.environ, where botocore reads them when a Store opens.
    """
    from tests.conftest import KEY, SECRET

    environ = (
        dict(env)
        if env is not None
        else {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "IMMICH_STREAM_TEST_AUTO_INIT": "1"}
    )
    if endpoint is not None:
        environ["S3_ENDPOINT_URL"] = endpoint
    if bucket is not None:
        environ["S3_BUCKET"] = bucket
    if env is None:
        environ["S3_PATH_STYLE"] = "true"
    if home is not None:
        environ["HOME"] = str(home)
        environ["XDG_CONFIG_HOME"] = str(home / ".config")
    environ.update(variables)
    if export_credentials:
        os.environ.update({k: environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    return config.load(environ=environ)


class Bucket:
    """A synchronous view of the test bucket (boto3), independent of the code under test."""

    def __init__(self, endpoint: str, name: str, key: str, secret: str, prefix: str = "immich-backup") -> None:
        self.name = name
        self.prefix = prefix
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def keys(self, under: str = "") -> dict[str, int]:
        out: dict[str, int] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=f"{self.prefix}/{under}"
        ):
            for item in page.get("Contents", []):
                out[item["Key"][len(self.prefix) + 1 :]] = item["Size"]
        return out

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.name, Key=f"{self.prefix}/{key}")["Body"].read()

    def read(self, line: dict[str, Any], open_object: Callable[[bytes], bytes] | None = None) -> bytes:
        """A file's bytes as its manifest line says they are stored (docs/format.md), read
        here independently of the code under test: an object of its own, a blob of a pack
        (a ranged GET of a plain pack), or chunks (zlib when shorter than their size).
        `open_object`: how an encrypted object opens (age): then packs are read whole."""

        def blob(key: str, offset: int, length: int) -> bytes:
            if open_object is not None:
                return open_object(self.get(key))[offset : offset + length]
            if length == 0:
                return b""
            rng = f"bytes={offset}-{offset + length - 1}"
            return self.s3.get_object(Bucket=self.name, Key=f"{self.prefix}/{key}", Range=rng)["Body"].read()

        if line.get("chunks") is not None:
            out = []
            for key, offset, length, size, sha in line["chunks"]:
                stored = blob(key, offset, length)
                data = zlib.decompress(stored) if length < size else stored
                assert len(data) == size and hashlib.sha256(data).hexdigest() == sha, f"chunk of {line['path']}"
                out.append(data)
            return b"".join(out)
        if line.get("offset") is not None:
            return blob(line["key"], line["offset"], line["size"])
        whole = self.get(line["key"])
        return open_object(whole) if open_object is not None else whole

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.name, Key=f"{self.prefix}/{key}", Body=data)

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.name, Key=f"{self.prefix}/{key}")

    def snapshots(self, complete_only: bool = True) -> list[str]:
        ids: dict[str, bool] = {}
        for key in self.keys("snapshots/"):
            sid, _, name = key[len("snapshots/") :].partition("/")
            ids[sid] = ids.get(sid, False) or name == "snapshot.json"
        return sorted(s for s, done in ids.items() if done or not complete_only)

    def snapshot(self, sid: str) -> dict[str, Any]:
        return json.loads(self.get(f"snapshots/{sid}/snapshot.json"))

    def manifest(self, sid: str) -> list[dict[str, Any]]:
        raw = gzip.decompress(self.get(f"snapshots/{sid}/manifest.jsonl.gz"))
        return [json.loads(line) for line in raw.splitlines() if line]

    def open_multipart_uploads(self) -> list[str]:
        resp = self.s3.list_multipart_uploads(Bucket=self.name)
        return [u["Key"] for u in resp.get("Uploads", [])]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[bytes, Path]:
    """Every regular file under root by its relative path as bytes."""
    out: dict[bytes, Path] = {}
    rb = os.fsencode(root)
    for dirpath, _dirs, files in os.walk(rb):
        for f in files:
            full = os.path.join(dirpath, f)
            if os.path.isfile(full) and not os.path.islink(full):
                out[os.path.relpath(full, rb)] = Path(os.fsdecode(full))
    return out


def make_library(
    root: Path, seed: int = 1, photos: int = 40, odd_names: bool = True, large: list[int] | None = None
) -> dict[bytes, bytes]:
    """An Immich-shaped library: library/, upload/, thumbs/, encoded-video/, profile/, backups/.

    Returns {relative path: sha256 hex} of every file written. Sizes are scaled down from
    real ones (photos of tens to hundreds of KiB, thumbnails of a few KiB) to keep tests fast.
    """
    rng = random.Random(seed)
    user = USER_ID
    written: dict[bytes, bytes] = {}

    def put(rel: bytes, size: int) -> None:
        path = os.path.join(os.fsencode(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = rng.randbytes(size)
        with open(path, "wb") as fh:
            fh.write(data)
        written[rel] = hashlib.sha256(data).hexdigest().encode()

    for i in range(photos):
        year = 2015 + i % 8
        put(
            f"library/{user}/{year}/{year}-0{1 + i % 9}-1{i % 10}/IMG_{1000 + i}.jpg".encode(),
            rng.randint(20_000, 400_000),
        )
        put(f"thumbs/{user}/{i:02x}/{i * 7 % 256:02x}/asset{i}-thumbnail.webp".encode(), rng.randint(2_000, 12_000))
        put(f"thumbs/{user}/{i:02x}/{i * 7 % 256:02x}/asset{i}-preview.jpeg".encode(), rng.randint(20_000, 60_000))
    for i in range(photos // 10 + 1):
        put(f"upload/{user}/{i:02x}/{i:02x}/upload-{i}.heic".encode(), rng.randint(50_000, 300_000))
        put(f"encoded-video/{user}/{i:02x}/{i:02x}/video{i}.mp4".encode(), rng.randint(100_000, 900_000))
    put(f"profile/{user}/avatar.jpg".encode(), 30_000)
    put(b"backups/immich-db-backup-1700000000000.sql.gz", 5_000)
    for marker in (b"library", b"upload", b"thumbs", b"encoded-video", b"profile", b"backups"):
        put(marker + b"/.immich", 0)
    if odd_names:
        put(f"library/{user}/odd/with space and 'quotes'.jpg".encode(), 1234)
        put(f"library/{user}/odd/ünïcødé 写真 📷.jpg".encode(), 2345)
        put(f"library/{user}/odd/new\nline.jpg".encode(), 345)
        put(f"library/{user}/odd/".encode() + b"invalid-\xff\xfe-utf8.jpg", 456)
        put(f"library/{user}/odd/100% real #1 & co.jpg".encode(), 567)
    for n, size in enumerate(large or []):
        put(f"encoded-video/{user}/big/large-{n}.mp4".encode(), size)
    return written


def wait_for(predicate: Any, timeout: float = 60, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
