"""Storage classes, thawing archived objects, and server-side encryption.

Storage classes and RestoreObject: moto's server, which keeps an object's class, refuses a
GET of a GLACIER/DEEP_ARCHIVE object until it is thawed, and answers x-amz-restore. How
fast a thaw finishes is moto's "s3::keyrestore" state transition (set over its HTTP API):
`manual` with times=1 moves a thaw one step (none -> in progress -> done) per HEAD.

SSE-C: of the three test servers only SeaweedFS honours it (a GET without the key is
refused); moto and rclone serve s3 accept the headers and ignore them. SSE-S3 (AES256):
moto and SeaweedFS answer x-amz-server-side-encryption.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from immich_stream import config
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store
from immich_stream.s3.writers import MultipartUpload
from tests.conftest import KEY, SECRET, ImmichStack, S3Server, base_env, moto_env
from tests.faultproxy import FaultProxy
from tests.helpers import Bucket, file_digest, make_library, make_settings, run_cli, tree

MIB = 1024 * 1024
EXIT_THAWING = 75


def set_restore_speed(moto: S3Server, transition: dict[str, object] | None) -> None:
    """How moto's server finishes thaws (None: its default, at once)."""
    path = "set-transition" if transition else "unset-transition"
    body: dict[str, object] = {"model_name": "s3::keyrestore"}
    if transition:
        body["transition"] = transition
    req = urllib.request.Request(
        f"{moto.endpoint}/moto-api/state-manager/{path}", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=10):
        pass


@pytest.fixture
def slow_thaws(moto_s3: S3Server) -> Iterator[None]:
    set_restore_speed(moto_s3, {"progression": "manual", "times": 1})
    try:
        yield
    finally:
        set_restore_speed(moto_s3, None)


def classes(bucket: Bucket) -> dict[str, str]:
    out = {}
    for page in bucket.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket.name, Prefix=bucket.prefix + "/"):
        for item in page.get("Contents", []):
            out[item["Key"][len(bucket.prefix) + 1 :]] = item.get("StorageClass", "STANDARD")
    return out


def digests(root: Path) -> dict[bytes, str]:
    return {rel: file_digest(p) for rel, p in tree(root).items() if b".immich-stream" not in rel}


def restore_posts(proxy: FaultProxy) -> int:
    return sum(1 for method, path, _ in proxy.requests if method == "POST" and "restore" in path)


def test_file_data_gets_its_class_metadata_stays_standard_and_archived_restore_waits_for_thaws(
    env: dict, stack: ImmichStack, moto_s3: S3Server, slow_thaws: None, tmp_path: Path
) -> None:
    make_library(stack.library, photos=8, large=[6 * MIB])  # the large file goes up in parts
    env = moto_env(env, moto_s3)
    env.update({"IMMICH_STREAM_PART_SIZE": "5MiB", "IMMICH_STREAM_STORAGE_CLASS": "STANDARD_IA"})
    r = run_cli("backup", "--storage-class-library", "deep_archive", "--sse", "AES256", env=env)
    assert r.code == 0, r.err
    bucket = Bucket(env["S3_ENDPOINT_URL"], env["S3_BUCKET"], KEY, SECRET)
    listed = classes(bucket)
    [sid] = bucket.snapshots()
    roots_of: dict[str, set[str]] = {}  # an object, a pack or a chunk's pack -> the roots whose files are in it
    for m in bucket.manifest(sid):
        for k in {c[0] for c in m.get("chunks") or []} | ({m["key"]} if m.get("key") else set()):
            roots_of.setdefault(k, set()).add(m["root"])
    library = {k: c for k, c in listed.items() if k.startswith("data/") and roots_of.get(k) == {"library"}}
    postgres = {k: c for k, c in listed.items() if k.startswith("data/") and roots_of.get(k) == {"postgres"}}
    assert any("%pack" in k for k in library) and all("%pack" in k for k in postgres)  # packs take their root's class
    rest = {k: c for k, c in listed.items() if not k.startswith("data/")}
    assert library and set(library.values()) == {"DEEP_ARCHIVE"}
    assert postgres and set(postgres.values()) == {"STANDARD_IA"}  # from the environment
    assert any(k.endswith("/snapshot.json") for k in rest) and any(k.endswith("database.sql.gz") for k in rest)
    assert set(rest.values()) == {"STANDARD"}, rest  # listing and verify never need a thaw
    big = next(k for k in library if k.endswith("large-0.mp4"))
    for key in (big, next(k for k in rest if k.endswith("snapshot.json"))):
        assert bucket.s3.head_object(Bucket=bucket.name, Key=f"immich-backup/{key}")["ServerSideEncryption"] == "AES256"

    r = run_cli("verify", env=env)  # sizes from the listing: no GET of an archived object
    assert r.code == 0, r.err
    assert "no problems" in r.out

    target = tmp_path / "restored"
    env["IMMICH_STREAM_THAW_POLL"] = "1s"
    r = run_cli("restore", "--root", "library", "--to", str(target), "--thaw-tier", "bulk", env=env)
    assert r.code == 0, r.err
    n = len(library)
    assert f"0 of {n} archived objects thawed ({n} thaws requested now, tier Bulk, kept 7 days)" in r.err
    assert f"{n} of {n} archived objects thawed" in r.err
    assert digests(target) == digests(stack.library)


def test_no_wait_exits_and_the_same_command_later_restores(
    env: dict, stack: ImmichStack, moto_s3: S3Server, slow_thaws: None, proxy_factory: type[FaultProxy], tmp_path: Path
) -> None:
    make_library(stack.library, photos=5)
    env = moto_env(env, moto_s3)
    assert run_cli("backup", "--stop", "none", "--storage-class", "GLACIER", env=env).code == 0
    proxy = proxy_factory(env["S3_ENDPOINT_URL"])
    env["S3_ENDPOINT_URL"] = proxy.endpoint
    target = tmp_path / "restored"
    args = ("restore", "--root", "library", "--to", str(target), "--no-wait", "--thaw-days", "2")

    r = run_cli(*args, env=env)
    assert r.code == EXIT_THAWING, r.err
    assert "archived objects are still being thawed" in r.last_error
    assert "run the same command again later" in r.last_error
    requested = restore_posts(proxy)
    assert requested > 0
    assert not [p for p in tree(target) if b".immich-stream" not in p]  # nothing downloaded yet

    r = run_cli(*args, env=env)  # the thaws are in progress: not requested again
    assert r.code == EXIT_THAWING, r.err
    assert restore_posts(proxy) == requested

    set_restore_speed(moto_s3, None)  # the thaws finish
    r = run_cli(*args, env=env)
    assert r.code == 0, r.err
    assert restore_posts(proxy) == requested
    assert digests(target) == digests(stack.library)

    r = run_cli("verify", "--read-data", env=env)  # thawed: the contents can be read
    assert r.code == 0, r.err


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, extra, message",
    [
        (["--storage-class", "GLACEIR"], {}, "storage_class from flag --storage-class is invalid: 'GLACEIR'"),
        ([], {"IMMICH_STREAM_STORAGE_CLASS_LIBRARY": "cold"}, "storage_class_library from env"),
        (["--sse", "aes"], {}, "sse from flag --sse is invalid"),
        (["--sse-kms-key-id", "alias/x"], {}, "needs --sse aws:kms"),
    ],
)
def test_bad_storage_settings_are_one_line_errors_before_anything_runs(
    tmp_path: Path, args: list[str], extra: dict[str, str], message: str
) -> None:
    env = base_env(tmp_path) | extra | {"S3_BUCKET": "b", "S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    r = run_cli("backup", *args, env=env)
    assert r.code == 2, r.err
    assert message in r.last_error
    assert len(r.err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sse_c_key_file_must_be_32_private_bytes(tmp_path: Path) -> None:
    env = base_env(tmp_path) | {"S3_BUCKET": "b", "S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    key = tmp_path / "sse.key"
    key.write_bytes(os.urandom(31))
    key.chmod(0o600)
    r = run_cli("snapshots", "--sse-c-key-file", str(key), env=env)
    assert r.code == 2 and "must hold exactly 32 raw bytes, not 31" in r.last_error
    key.write_bytes(os.urandom(32))
    key.chmod(0o640)
    r = run_cli("snapshots", "--sse-c-key-file", str(key), env=env)
    assert r.code == 2 and "readable by group or others (mode 640): chmod 600" in r.last_error
    r = run_cli("snapshots", "--sse-c-key-file", str(key), "--sse", "AES256", env=env)
    assert r.code == 2 and "exclude each other" in r.last_error


@pytest.mark.parametrize("path", ["direct", "botocore"])
async def test_sse_c_round_trip_on_seaweedfs_and_refusal_without_the_key(
    path: str, seaweed_s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request for bytes carries the key (single PUT, multipart, threaded GET, streamed
    GET, HEAD): SeaweedFS stores the object encrypted and serves it only with the key."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    botocore_only = path == "botocore"  # IMMICH_STREAM_BOTOCORE_ONLY: every request through aiobotocore
    key_file = tmp_path / "sse.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o600)
    bucket = seaweed_s3.new_bucket()
    small, parts = os.urandom(300_000), [os.urandom(5 * MIB), os.urandom(MIB)]
    budget = ByteBudget(64 * MIB)
    async with Store(
        replace(
            StoreOptions.from_settings(
                make_settings(
                    endpoint=seaweed_s3.endpoint,
                    bucket=bucket,
                    home=tmp_path,
                    IMMICH_STREAM_RETRIES="2",
                    IMMICH_STREAM_SSE_C_KEY_FILE=str(key_file),
                )
            ),
            botocore_only=botocore_only,
        )
    ) as store:
        await store.put("p/small.jpg", small)
        async with MultipartUpload(store, "p/video.mp4", budget) as mp:
            for part in parts:
                await budget.acquire(len(part))
                await mp.add(part)
            await mp.complete()
        got: list[bytes] = []
        await store.download("p/video.mp4", lambda view: got.append(bytes(view)), 6 * MIB)
        assert b"".join(got) == b"".join(parts)
        assert await store.get("p/small.jpg") == small
        assert await store.head("p/video.mp4") == 6 * MIB

    # the server honours it: no key, no bytes (for this tool, and for any other client)
    raw = Bucket(seaweed_s3.endpoint, bucket, KEY, SECRET, "p")
    with pytest.raises(Exception, match=r"InvalidArgument|customer"):
        raw.get("small.jpg")
    async with Store(
        replace(
            StoreOptions.from_settings(
                make_settings(endpoint=seaweed_s3.endpoint, bucket=bucket, home=tmp_path, IMMICH_STREAM_RETRIES="2")
            ),
            botocore_only=botocore_only,
        )
    ) as store:
        with pytest.raises(Exception, match="--sse-c-key-file") as caught:
            await store.get("p/small.jpg")
        assert "\n" not in str(caught.value)
        with pytest.raises(Exception, match="--sse-c-key-file"):
            await store.download("p/video.mp4", lambda view: None, 6 * MIB)


def test_sse_c_backup_and_restore_with_the_cli(
    env: dict, stack: ImmichStack, seaweed_s3: S3Server, tmp_path: Path
) -> None:
    make_library(stack.library, photos=4)
    env = dict(env, S3_ENDPOINT_URL=seaweed_s3.endpoint, S3_BUCKET=seaweed_s3.new_bucket())
    key_file = tmp_path / "sse.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o600)
    keyed = dict(env, IMMICH_STREAM_SSE_C_KEY_FILE=str(key_file))
    r = run_cli("backup", "--stop", "none", env=keyed)
    assert r.code == 0, r.err
    assert "did not confirm" not in r.err  # SeaweedFS answers the SSE-C algorithm
    r = run_cli("restore", "--root", "library", "--to", str(tmp_path / "a"), env=keyed)
    assert r.code == 0, r.err
    assert digests(tmp_path / "a") == digests(stack.library)
    r = run_cli("restore", "--root", "library", "--to", str(tmp_path / "b"), env=env)
    assert r.code == 1, r.err
    assert "--sse-c-key-file" in r.last_error


async def test_which_requests_carry_the_class_and_the_sse_c_headers(
    moto_s3: S3Server, proxy_factory: type[FaultProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only file data gets the class: its PUT and CreateMultipartUpload, not its parts (S3
    refuses them there), nor any metadata object. The SSE-C key rides on every request for
    bytes (PUT, multipart start, parts, completion, the threaded GET, HEAD)."""
    from immich_stream.repository.repo import Repo

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    key_file = tmp_path / "sse.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o600)
    proxy = proxy_factory(moto_s3.endpoint)
    seen = proxy.add(lambda m, p, q: True)  # forwards everything, records the headers
    settings = make_settings(
        endpoint=proxy.endpoint,
        bucket=moto_s3.new_bucket(),
        home=tmp_path,
        IMMICH_STREAM_RETRIES="2",
        IMMICH_STREAM_SSE_C_KEY_FILE=str(key_file),
    )
    settings.storage_class, settings.storage_class_postgres = "GLACIER_IR", "ONEZONE_IA"
    budget = ByteBudget(64 * MIB)
    async with Store(StoreOptions.from_settings(settings)) as store:
        repo = Repo(store, "r")
        data = repo.object_key(repo.data_key("2030-01-01T000000Z-abcd", "library", "a.jpg"))
        pg = repo.object_key(repo.data_key("2030-01-01T000000Z-abcd", "postgres", "base/1"))
        big = repo.object_key(repo.data_key("2030-01-01T000000Z-abcd", "library", "v.mp4"))
        meta = repo.summary_key("2030-01-01T000000Z-abcd")
        await repo.store.put(data, b"photo")
        await repo.store.put(pg, b"page")
        await repo.store.put(meta, b"{}")
        async with repo.store.multipart(big, budget) as mp:
            for part in (os.urandom(5 * MIB), b"end"):
                await budget.acquire(len(part))
                await mp.add(part)
            await mp.complete()
        await store.download(data, lambda view: None, 5)
        assert await store.head(big) == 5 * MIB + 3
    sent = seen.requests_seen

    def of(method: str, needle: str) -> list[dict[str, str]]:
        return [h for m, p, h in sent if m == method and needle in p]

    assert [h.get("x-amz-storage-class") for h in of("PUT", "/a.jpg")] == ["GLACIER_IR"]
    assert [h.get("x-amz-storage-class") for h in of("PUT", "/base/1")] == ["ONEZONE_IA"]
    assert [h.get("x-amz-storage-class") for h in of("PUT", "/snapshot.json")] == [None]
    assert [h.get("x-amz-storage-class") for h in of("POST", "v.mp4?uploads")] == ["GLACIER_IR"]
    parts = of("PUT", "partNumber=")
    assert len(parts) == 2 and all("x-amz-storage-class" not in h for h in parts)
    bodies = [h for m, p, h in sent if "/r/" in p and not (m == "GET" and "list-type" in p)]
    assert len(bodies) >= 8  # 3 PUTs, start, 2 parts, completion, GET, HEAD
    for h in bodies:
        assert h.get("x-amz-server-side-encryption-customer-algorithm") == "AES256", h
        assert h.get("x-amz-server-side-encryption-customer-key-md5")
        assert len(base64.b64decode(h["x-amz-server-side-encryption-customer-key"])) == 32


async def test_thaw_requests_once_then_waits_or_stops(
    moto_s3: S3Server,
    slow_thaws: None,
    proxy_factory: type[FaultProxy],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The thaw step on its own (what restore, drill and verify --read-data run first),
    against moto's RestoreObject and x-amz-restore: GLACIER objects are thawed before they
    are read, a thaw is requested once, --no-wait stops with ThawPending (exit 75), waiting
    polls until every object is readable."""
    from immich_stream.errors import EXIT_THAWING, ThawPending
    from immich_stream.progress import Reporter
    from immich_stream.repository.repo import Repo
    from immich_stream.repository.thaw import archived_digests, thaw

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    proxy = proxy_factory(moto_s3.endpoint)
    settings = make_settings(
        endpoint=proxy.endpoint, bucket=moto_s3.new_bucket(), home=tmp_path, IMMICH_STREAM_RETRIES="2"
    )
    settings.storage_class, settings.thaw_poll, settings.thaw_days = "GLACIER", 0.2, 3
    bodies = {f"p{i}.jpg": os.urandom(1000 + i) for i in range(3)}
    async with Store(StoreOptions.from_settings(settings)) as store:
        repo = Repo(store, "r")
        keys = {repo.object_key(repo.data_key("2030-01-01T000000Z-abcd", "library", n)): b for n, b in bodies.items()}
        for key, body in keys.items():
            await repo.store.put(key, body)
        await repo.store.put(repo.summary_key("2030-01-01T000000Z-abcd"), b"{}")
        assert len(await archived_digests(repo)) == 3  # from the listing: the summary is not archived
        with pytest.raises(Exception, match=r"archived .* not thawed"):
            await store.get(next(iter(keys)))  # S3 refuses a GET before the thaw

        with pytest.raises(ThawPending, match="3 of 3 archived objects are still being thawed") as caught:
            await thaw(store, keys, settings, Reporter(), wait=False)
        assert caught.value.exit_code == EXIT_THAWING
        assert restore_posts(proxy) == 3
        with pytest.raises(ThawPending):  # later: in progress, nothing requested twice
            await thaw(store, keys, settings, Reporter(), wait=False)
        assert restore_posts(proxy) == 3

        caplog.set_level("INFO", "immich_stream")
        report = await thaw(store, keys, settings, Reporter(), wait=True)
        assert (report.archived, report.thawed, report.requested) == (3, 3, 0)
        assert restore_posts(proxy) == 3
        assert "3 of 3 archived objects thawed" in caplog.text
        for key, body in keys.items():
            assert await store.get(key) == body

        # never asked before, and waited for: requested, polled until done (moto: two polls)
        fresh = {repo.object_key(repo.data_key("2030-01-02T000000Z-abcd", "postgres", f"f{i}")): b"x" for i in range(2)}
        for key, body in fresh.items():
            await repo.store.put(key, body)
        report = await thaw(store, fresh, settings, Reporter(), wait=True)
        assert (report.archived, report.thawed, report.requested) == (2, 2, 2)
        assert "0 of 2 archived objects thawed (2 thaws requested now, tier Standard, kept 3 days)" in caplog.text
        assert report.seconds >= 2 * settings.thaw_poll
        assert [await store.get(key) for key in fresh] == [b"x", b"x"]

        # drill's way (a few sampled keys, no listing): HEAD tells which are archived
        mixed = [repo.summary_key("2030-01-01T000000Z-abcd"), *keys]
        report = await thaw(store, mixed, settings, Reporter(), wait=True, check_class=True)
        assert (report.archived, report.thawed, report.requested) == (3, 3, 0)


async def synthetic_snapshot(settings: config.Settings, files: dict[str, bytes], packed: bool = False) -> str:
    """A committed snapshot of `files` (library paths -> bytes) written through the
    repository code, as a backup would, without Docker: the file data in the settings'
    storage class, everything else STANDARD. `packed` (format 3, docs/format.md): the first
    half of the files as blobs of one pack, the others as chunks (of 4 KiB) in another."""
    import datetime as dt
    import gzip

    from immich_stream.repository.layout import new_snapshot_id
    from immich_stream.repository.manifest import Chunk, ManifestLine, ManifestWriter
    from immich_stream.repository.repo import Repo
    from immich_stream.repository.summary import DatabaseInfo, ManifestInfo, SnapshotSummary

    budget = ByteBudget(64 * MIB)
    async with Store(StoreOptions.from_settings(settings)) as store:
        repo = Repo(store, settings.prefix)
        await repo.ensure_config()
        sid = new_snapshot_id()
        lines = []
        blobs, chunks = (repo.pack_key(sid), bytearray()), (repo.pack_key(sid), bytearray())
        for n, (path, body) in enumerate(sorted(files.items())):
            sha = hashlib.sha256(body).hexdigest()
            line = ManifestLine("library", path, "file", len(body), 10**18, 0o644, 0, 0, 1, sha)
            if not packed:
                line.key = repo.data_key(sid, "library", path)
                await repo.store.put(repo.object_key(line.key), body)
            elif n < len(files) // 2:
                line.key, line.offset = blobs[0], len(blobs[1])
                blobs[1].extend(body)
            else:
                line.chunks = []
                for i in range(0, len(body), 4096):
                    block = body[i : i + 4096]
                    line.chunks.append(
                        Chunk(chunks[0], len(chunks[1]), len(block), len(block), hashlib.sha256(block).hexdigest())
                    )
                    chunks[1].extend(block)
            lines.append(line)
        if packed:
            for key, buf in (blobs, chunks):
                await store.put(repo.object_key(key), bytes(buf), storage_class=settings.storage_class)
        async with ManifestWriter(repo.store, repo.manifest_key(sid), budget, settings.part_size) as mw:
            for line in lines:
                await mw.add(line)
            await mw.finish()
        sql = b"-- an empty dump\n"
        dump = gzip.compress(sql)
        await store.put(repo.dump_key(sid), dump)
        database = DatabaseInfo(
            repo.relative_key(repo.dump_key(sid)),
            "immich",
            len(sql),
            len(dump),
            hashlib.sha256(sql).hexdigest(),
            hashlib.sha256(dump).hexdigest(),
        )
        summary = SnapshotSummary(
            id=sid,
            time=dt.datetime.now(dt.UTC).isoformat(),
            roots={"library": "/photos"},
            manifest=ManifestInfo(repo.relative_key(repo.manifest_key(sid)), len(lines)),
            database=database,
        )
        await repo.commit(summary)
    return sid


@pytest.mark.slow
async def test_cli_restore_and_verify_of_a_glacier_snapshot_without_docker(
    moto_s3: S3Server,
    slow_thaws: None,
    proxy_factory: type[FaultProxy],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """restore --no-wait (exit 75), again (nothing requested twice), restore waiting for the
    thaws, verify with and without --read-data: the CLI against archived objects."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    bucket = moto_s3.new_bucket()
    proxy = proxy_factory(moto_s3.endpoint)
    settings = make_settings(endpoint=proxy.endpoint, bucket=bucket, home=tmp_path, IMMICH_STREAM_RETRIES="2")
    settings.storage_class = "GLACIER"
    files = {f"u/2024/IMG_{i}.jpg": os.urandom(20_000 + i) for i in range(4)}
    await synthetic_snapshot(settings, files)
    listed = classes(Bucket(moto_s3.endpoint, bucket, KEY, SECRET))
    assert {c for k, c in listed.items() if k.startswith("data/")} == {"GLACIER"}
    assert {c for k, c in listed.items() if not k.startswith("data/")} == {"STANDARD"}

    env = base_env(tmp_path) | {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "S3_ENDPOINT_URL": proxy.endpoint,
        "S3_BUCKET": bucket,
        "S3_PATH_STYLE": "true",
        "IMMICH_STREAM_THAW_POLL": "1s",
    }
    r = run_cli("verify", env=env)  # sizes from the listing: no thaw, no GET
    assert r.code == 0 and "no problems" in r.out, r.err
    assert restore_posts(proxy) == 0

    target = tmp_path / "restored"
    args = ("restore", "--root", "library", "--to", str(target))
    r = run_cli(*args, "--no-wait", env=env)
    assert r.code == EXIT_THAWING, r.err
    assert r.last_error == (
        "immich-stream: error: 4 of 4 archived objects are still being thawed (tier Standard: Expedited takes "
        "minutes, Standard hours, Bulk up to two days): run the same command again later"
    )
    assert restore_posts(proxy) == 4 and not target.exists()
    r = run_cli(*args, "--no-wait", env=env)
    assert r.code == EXIT_THAWING and restore_posts(proxy) == 4  # in progress: not asked again
    r = run_cli(*args, env=env)  # waits (moto: the next poll finds them thawed)
    assert r.code == 0, r.err
    assert "4 of 4 archived objects thawed" in r.err
    assert restore_posts(proxy) == 4
    assert {os.fsdecode(rel): p.read_bytes() for rel, p in tree(target).items()} == files

    r = run_cli("verify", "--read-data", env=env)  # thawed: the contents can be checked
    assert r.code == 0 and "no problems" in r.out, r.err


@pytest.mark.slow
async def test_restore_and_verify_thaw_archived_packs_of_blobs_and_chunks(
    moto_s3: S3Server,
    slow_thaws: None,
    proxy_factory: type[FaultProxy],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Format 3 in an archived class: what restore and verify --read-data thaw first is a
    blob's pack and every chunk's pack (each once), then the files come back."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    bucket = moto_s3.new_bucket()
    proxy = proxy_factory(moto_s3.endpoint)
    settings = make_settings(endpoint=proxy.endpoint, bucket=bucket, home=tmp_path, IMMICH_STREAM_RETRIES="2")
    settings.storage_class = "GLACIER"
    files = {f"u/2024/IMG_{i}.jpg": os.urandom(9_000 + i) for i in range(6)}
    await synthetic_snapshot(settings, files, packed=True)
    listed = classes(Bucket(moto_s3.endpoint, bucket, KEY, SECRET))
    assert sorted(c for k, c in listed.items() if k.startswith("data/")) == ["GLACIER", "GLACIER"]  # two packs
    env = base_env(tmp_path) | {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "S3_ENDPOINT_URL": proxy.endpoint,
        "S3_BUCKET": bucket,
        "S3_PATH_STYLE": "true",
        "IMMICH_STREAM_THAW_POLL": "1s",
    }
    target = tmp_path / "restored"
    args = ("restore", "--root", "library", "--to", str(target))
    r = run_cli(*args, "--no-wait", env=env)
    assert r.code == EXIT_THAWING, r.err
    assert "2 of 2 archived objects are still being thawed" in r.last_error, r.err
    assert restore_posts(proxy) == 2
    r = run_cli(*args, env=env)
    assert r.code == 0, r.err
    assert {os.fsdecode(rel): p.read_bytes() for rel, p in tree(target).items()} == files
    r = run_cli("verify", "--read-data", env=env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err
    assert restore_posts(proxy) == 2  # thawed already: nothing asked twice


def test_drill_thaws_the_files_it_re_hashes(env: dict, stack: ImmichStack, moto_s3: S3Server, slow_thaws: None) -> None:
    make_library(stack.library, photos=6, odd_names=False)
    env = moto_env(env, moto_s3) | {"IMMICH_STREAM_THAW_POLL": "1s"}
    assert run_cli("backup", "--stop", "none", "--storage-class-library", "GLACIER", env=env).code == 0
    r = run_cli("drill", "latest", "--files", "3", "--json", env=env)
    assert r.code == 0, r.err + r.out
    report = json.loads(r.out)["summary"]
    assert report["ok"] and report["files_checked"] == 3, report
    # the 3 files' objects (small ones share packs): each thawed once
    thawed = re.search(r"0 of (\d+) archived objects thawed \((\d+) thaws requested now", r.err)
    assert thawed and thawed[1] == thawed[2] and 1 <= int(thawed[1]) <= 3, r.err


@pytest.mark.slow
def test_restore_of_one_album_thaws_only_that_albums_objects(
    moto_s3: S3Server, slow_thaws: None, proxy_factory: type[FaultProxy], tmp_path: Path
) -> None:
    """Issue 26 on an archived class: `restore --album` asks S3 to thaw the album's objects
    and no other (a whole library in DEEP_ARCHIVE is days and money to thaw), then brings
    back exactly the album's files."""
    from tests.test_catalog_find import ALBUM, body, snapshot

    bucket = moto_s3.new_bucket()
    proxy = proxy_factory(moto_s3.endpoint)
    env = base_env(tmp_path) | {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "S3_ENDPOINT_URL": proxy.endpoint,
        "S3_BUCKET": bucket,
        "S3_PATH_STYLE": "true",
        "IMMICH_STREAM_STORAGE_CLASS": "GLACIER",
        "IMMICH_STREAM_THAW_POLL": "1s",
    }
    sid, assets = snapshot(env)  # every library file an object of its own, in GLACIER
    listed = classes(Bucket(moto_s3.endpoint, bucket, KEY, SECRET))
    data = [k for k in listed if k.startswith("data/")]
    assert data and {listed[k] for k in data} == {"GLACIER"}
    album = {p for a in assets if ALBUM in a["albums"] for root, p, _ in a["files"] if root == "library"}
    assert 2 <= len(album) < len(data) // 4

    target = tmp_path / "album"
    args = ("restore", sid, "--album", ALBUM, "--to", str(target))
    r = run_cli(*args, "--no-wait", env=env)
    assert r.code == EXIT_THAWING, r.err
    assert f"{len(album)} of {len(album)} archived objects are still being thawed" in r.last_error, r.err
    assert restore_posts(proxy) == len(album), "only the album's objects are thawed"
    r = run_cli(*args, env=env)
    assert r.code == 0, r.err
    assert {os.fsdecode(rel): p.read_bytes() for rel, p in tree(target).items()} == {p: body(p) for p in album}
    assert restore_posts(proxy) == len(album)
