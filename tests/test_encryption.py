"""Client-side encryption with age: every object a standalone age file that Debian's `age`
opens, with the repository's identity or the offline recovery key; nothing readable in the
bucket without one; damage caught; and backup, verify, restore, prune and drill unchanged
from the user's side."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from immich_stream.repository import age
from immich_stream.repository.layout import unescape_path
from immich_stream.repository.sealed import SealedStore
from immich_stream.restore.restorer import PARTIAL
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store
from tests.conftest import CONTAINERS, KEY, SECRET, ImmichStack, S3Server, bucket_of, running_containers
from tests.faultproxy import FaultProxy, is_part_upload
from tests.helpers import Bucket, make_library, make_settings, run_cli, tree
from tests.test_checksum import MIB, rejected
from tests.test_restore import row_counts, snapshot_of_tree

AGE = shutil.which("age")
pytestmark = pytest.mark.skipif(AGE is None, reason="the age CLI is not installed (apt-get install age)")
INTRO = b"age-encryption.org/v1\n"
AGE_CHUNK = 64 * 1024  # of plaintext per STREAM chunk (+16 bytes of tag)


def keygen(path: Path) -> str:
    """A new age identity file (mode 0600, as age-keygen writes it); its public key."""
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    os.chmod(path, 0o600)
    return subprocess.run(["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True).stdout.strip()


def age_decrypt(data: bytes, identity: Path) -> bytes:
    p = subprocess.run([AGE or "age", "-d", "-i", str(identity)], input=data, capture_output=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def manifest_of(bucket: Bucket, sid: str, env: dict[str, str]) -> list[dict]:
    """A snapshot's manifest lines, opened with the env's identity (its MAC lines left out)."""
    raw = age_decrypt(bucket.get(f"snapshots/{sid}/manifest.jsonl.gz"), Path(env["IMMICH_STREAM_AGE_IDENTITY"]))
    return [x for x in (json.loads(ln) for ln in gzip.decompress(raw).splitlines() if ln) if "type" in x]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, str, Path, str]:
    own, offline = tmp_path / "keys" / "immich-stream.key", tmp_path / "offline.key"
    own.parent.mkdir()
    return own, keygen(own), offline, keygen(offline)


@pytest.fixture
def enc_env(env: dict[str, str], keys: tuple[Path, str, Path, str]) -> dict[str, str]:
    own, _, _, offline_pub = keys
    return dict(env, IMMICH_STREAM_AGE_IDENTITY=str(own), IMMICH_STREAM_AGE_RECIPIENTS=offline_pub)


def test_encrypted_repository_round_trip_and_age_opens_every_object(
    enc_env: dict[str, str], stack: ImmichStack, keys: tuple[Path, str, Path, str], tmp_path: Path
) -> None:
    own, own_pub, offline, offline_pub = keys
    make_library(stack.library, photos=12)
    secret = os.urandom(24).hex().encode()  # plaintext that must appear in no object
    marker = stack.library / "library" / "secret-note.txt"
    marker.write_bytes(b"family secret " + secret * 50)
    video = stack.library / "encoded-video" / "big.mp4"  # several parts at 6 MiB
    video.parent.mkdir(exist_ok=True)
    video.write_bytes(os.urandom(13 * 1024 * 1024 + 12345) + secret)
    env = dict(enc_env, IMMICH_STREAM_PART_SIZE="6MiB")
    rows = row_counts(stack)
    before = snapshot_of_tree(stack.library)

    r = run_cli("backup", env=env)
    assert r.code == 0, r.err
    bucket = bucket_of(env)
    cfg = json.loads(bucket.get("config.json"))
    assert cfg["version"] == 2 and cfg["encryption"]["recipients"] == [own_pub, offline_pub]
    keys_ = bucket.keys()
    sealed = [k for k in keys_ if k.startswith(("data/", "snapshots/"))]
    assert sealed and all(k in ("config.json",) or k in sealed for k in keys_), keys_
    for k in sealed:
        body = bucket.get(k)
        assert body.startswith(INTRO), k
        assert secret not in body and b"CREATE TABLE" not in body, k
    [sid] = bucket.snapshots()
    manifest_raw = bucket.get(f"snapshots/{sid}/manifest.jsonl.gz")
    for identity in (own, offline):  # the standard tool opens objects with either key
        lines = [json.loads(x) for x in gzip.decompress(age_decrypt(manifest_raw, identity)).splitlines()]
        big = next(x for x in lines if x["path"] == "encoded-video/big.mp4")
        assert big["stored"] == keys_[big["key"]] > big["size"]
        assert age_decrypt(bucket.get(big["key"]), identity) == video.read_bytes()  # a multipart object
        note = next(x for x in lines if x["path"] == "library/secret-note.txt")
        assert "offset" in note and "stored" not in note  # a blob of a pack, which age opens whole
        assert bucket.read(note, lambda b, i=identity: age_decrypt(b, i)) == marker.read_bytes()
        sql = gzip.decompress(age_decrypt(bucket.get(f"snapshots/{sid}/database.sql.gz"), identity))
        assert b"CREATE TABLE public.assets" in sql
        summary = json.loads(age_decrypt(bucket.get(f"snapshots/{sid}/snapshot.json"), identity))
        assert summary["id"] == sid

    # incremental: an unchanged library uploads no file again (the files written just before
    # the first run are read again: too recent to trust their stat; their bytes decide)
    r = run_cli("backup", "--stop", "none", "--json", env=env)
    assert r.code == 0, r.err
    files = json.loads(r.out)["summary"]["files"]
    assert files["new"] == files["changed"] == files["bytes_uploaded"] == 0, files
    assert len(bucket.keys("data/")) == len([k for k in keys_ if k.startswith("data/")])
    r = run_cli("verify", "--read-data", env=env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err
    r = run_cli("prune", "--keep-last", "1", env=env)
    assert r.code == 0, r.err
    assert len(bucket.snapshots()) == 1

    # the recovery material: the offline key and the repository's authentication line
    r = run_cli("key", "show", env=env)
    auth_line = next(x.split(None, 2)[2] for x in r.out.splitlines() if x.startswith("auth key"))
    offline.write_text(offline.read_text() + auth_line + "\n")

    # disaster: a new machine with only the offline key on paper
    stack.clear_library()
    stack.psql("DROP DATABASE immich WITH (FORCE)", db="postgres")
    stack.psql("CREATE DATABASE immich", db="postgres")
    offline_env = {k: v for k, v in env.items() if not k.startswith("IMMICH_STREAM_AGE")}
    offline_env["IMMICH_STREAM_AGE_IDENTITY"] = str(offline)
    r = run_cli("restore", "latest", "--root", "library", "--to", str(stack.library), env=offline_env)
    assert r.code == 0, r.err
    assert snapshot_of_tree(stack.library) == before
    r = run_cli("restore", "--database", env=offline_env)
    assert r.code == 0, r.err
    assert row_counts(stack) == rows
    assert running_containers() == set(CONTAINERS)
    r = run_cli("drill", "latest", "--files", "3", env=offline_env, timeout=300)
    assert r.code == 0, r.out + r.err


def test_flipped_byte_in_a_ciphertext_is_caught_by_verify_and_refused_by_restore(
    enc_env: dict[str, str], stack: ImmichStack, tmp_path: Path
) -> None:
    make_library(stack.library, photos=6)
    assert run_cli("backup", "--stop", "none", env=enc_env).code == 0
    bucket = bucket_of(enc_env)
    [sid] = bucket.snapshots()
    lines = [x for x in manifest_of(bucket, sid, enc_env) if x["type"] == "file"]
    blob = max((x for x in lines if "offset" in x), key=lambda x: x["size"])
    victim = blob["key"]  # a pack: one age chunk (64 KiB of its plaintext) damaged
    data = bytearray(bucket.get(victim))
    header = data.index(b"\n", data.index(b"\n---") + 1) + 1
    at = blob["offset"] + blob["size"] // 2  # in the plaintext
    n = at // AGE_CHUNK
    data[header + 16 + n * (AGE_CHUNK + 16) + at % AGE_CHUNK] ^= 0x01  # same size: only the authentication can see it
    bucket.put(victim, bytes(data))
    hit = {  # the files with bytes in that chunk, and only they
        x["path"]
        for x in lines
        if x.get("key") == victim and x["offset"] < (n + 1) * AGE_CHUNK and x["offset"] + x["size"] > n * AGE_CHUNK
    }
    assert blob["path"] in hit

    r = run_cli("verify", env=enc_env)
    assert r.code == 0, r.out + r.err  # sizes alone cannot see it
    r = run_cli("verify", "--read-data", env=enc_env)
    assert r.code == 1
    named = {ln.split(" (", 1)[1].split(")", 1)[0] for ln in r.out.splitlines() if f"corrupt object {victim}" in ln}
    assert named == {f"library/{p}" for p in hit} and "failed authentication" in r.out, r.out
    assert f"{len(hit)} problems found" in r.last_error, r.out

    target = tmp_path / "restored"
    r = run_cli("restore", sid, "--root", "library", "--to", str(target), env=enc_env)
    assert r.code == 7, r.out + r.err  # partial: the rest restored, the damaged files named
    restored = {os.fsdecode(p) for p in tree(target)}
    lost = {os.fsdecode(unescape_path(p)) for p in hit}
    kept = {os.fsdecode(unescape_path(x["path"])) for x in lines if x["root"] == "library"}
    assert not lost & restored and len(restored) > 5, restored
    assert kept - lost <= restored, kept - lost - restored
    assert not [p for p in restored if p.endswith(PARTIAL)]  # nothing half-written left behind
    assert ".immich-stream-restore" in restored  # unfinished: the same command would resume it


def test_key_problems_are_one_line_errors_before_the_stack_is_touched(
    env: dict[str, str], enc_env: dict[str, str], stack: ImmichStack, tmp_path: Path
) -> None:
    make_library(stack.library, photos=2)
    assert run_cli("backup", "--stop", "none", env=enc_env).code == 0
    started = stack.started_at()

    def refused(r_env: dict[str, str], *needles: str) -> None:
        r = run_cli("backup", env=r_env)
        assert r.code == 2, (r.code, r.out, r.err)
        assert r.err.strip().count("\n") == 0 and r.last_error.startswith("immich-stream: error: "), r.err
        for needle in needles:
            assert needle in r.last_error, r.last_error
        assert stack.started_at() == started and running_containers() == set(CONTAINERS)

    plain = {k: v for k, v in enc_env.items() if not k.startswith("IMMICH_STREAM_AGE")}
    refused(plain, "is encrypted with age", "IMMICH_STREAM_AGE_IDENTITY")
    other = tmp_path / "other.key"
    keygen(other)
    refused(dict(enc_env, IMMICH_STREAM_AGE_IDENTITY=str(other)), "no identity in", "belongs to the repository")
    os.chmod(enc_env["IMMICH_STREAM_AGE_IDENTITY"], 0o644)
    refused(enc_env, "readable by others", "chmod 600")
    os.chmod(enc_env["IMMICH_STREAM_AGE_IDENTITY"], 0o600)
    refused(dict(enc_env, IMMICH_STREAM_AGE_RECIPIENTS=""), "differ from the repository's", "key rotate")
    refused(dict(enc_env, IMMICH_STREAM_AGE_IDENTITY=str(tmp_path / "missing.key")), "does not exist", "age-keygen")
    # a plain repository never gets encrypted objects
    plain_env = dict(env, S3_PREFIX="plain-repo")
    assert run_cli("backup", "--stop", "none", env=plain_env).code == 0
    # ... and an identity that holds an authentication key never hears "not encrypted, unset
    # the identity" from a config.json without a MAC: a bucket writer may have planted it
    # (issue 22's review): forged, exit 8, naming S3_PREFIX for the honest mistake
    r = run_cli("backup", env=dict(plain_env, IMMICH_STREAM_AGE_IDENTITY=enc_env["IMMICH_STREAM_AGE_IDENTITY"]))
    assert r.code == 8 and "config.json carries no MAC" in r.last_error and "S3_PREFIX" in r.last_error, r.err
    assert stack.started_at() == started and running_containers() == set(CONTAINERS)


def test_key_rotate_then_reencrypt_leaves_every_object_to_the_new_key(
    enc_env: dict[str, str], stack: ImmichStack, keys: tuple[Path, str, Path, str], tmp_path: Path
) -> None:
    own, old_pub, _offline, offline_pub = keys
    make_library(stack.library, photos=5)
    big = stack.library / "encoded-video" / "rotate.mp4"
    big.parent.mkdir(exist_ok=True)
    big.write_bytes(os.urandom(7 * 1024 * 1024 + 99))  # two parts at 6 MiB
    env = dict(enc_env, IMMICH_STREAM_PART_SIZE="6MiB", IMMICH_STREAM_STOP="none")
    assert run_cli("backup", env=env).code == 0
    old_only = tmp_path / "old-only.key"
    shutil.copy(own, old_only)
    bucket = bucket_of(env)
    [first] = bucket.snapshots()

    # rotate, and drop the offline key: 1 recipient instead of 2, so every size changes
    r = run_cli("key", "rotate", "--drop-recipient", offline_pub, env=dict(env, IMMICH_STREAM_AGE_RECIPIENTS=""))
    assert r.code == 0, r.err
    cfg = json.loads(bucket.get("config.json"))
    new_pub = cfg["encryption"]["recipients"][0]
    assert cfg["encryption"]["recipients"] == [new_pub] and new_pub != old_pub
    assert set(cfg["encryption"]["retired"]) == {old_pub, offline_pub}
    assert os.stat(own).st_mode & 0o777 == 0o600
    secrets_ = [x for x in own.read_text().splitlines() if x.startswith("AGE-SECRET-KEY-1")]
    assert len(secrets_) == 2  # the new one first, the old one kept for older objects
    new_only = tmp_path / "new-only.key"
    auth_line = [x for x in own.read_text().splitlines() if x.startswith("# immich-stream-auth: ")]
    new_only.write_text("\n".join([secrets_[0], *auth_line]) + "\n")  # the repository's authentication key too
    os.chmod(new_only, 0o600)
    # the old recipients are refused for a backup now; the new ones work
    r = run_cli("backup", env=env)
    assert r.code == 2 and "key rotate" in r.last_error, r.err
    env = dict(env, IMMICH_STREAM_AGE_RECIPIENTS="")
    (stack.library / "library" / "after-rotation.jpg").write_bytes(os.urandom(5000))
    assert run_cli("backup", env=env).code == 0
    second = bucket.snapshots()[-1]
    manifest = [
        json.loads(x)
        for x in gzip.decompress(
            age_decrypt(bucket.get(f"snapshots/{second}/manifest.jsonl.gz"), new_only)
        ).splitlines()
    ]
    after = next(x for x in manifest if x["path"] == "library/after-rotation.jpg")
    opened = bucket.read(after, lambda b: age_decrypt(b, new_only))
    assert opened == (stack.library / "library" / "after-rotation.jpg").read_bytes()
    old_obj = next(x for x in manifest if x["path"] == "encoded-video/rotate.mp4")
    assert age_decrypt(bucket.get(old_obj["key"]), old_only) == big.read_bytes()  # untouched until reencrypt
    r = run_cli("verify", "--all", "--read-data", env=env)
    assert r.code == 0, r.out + r.err

    r = run_cli("key", "reencrypt", env=env)
    assert r.code == 0, r.err
    for k in bucket.keys():
        if k.startswith(("data/", "snapshots/")):
            age_decrypt(bucket.get(k), new_only)  # every object opens with the new key alone
    assert age_decrypt(bucket.get(old_obj["key"]), new_only) == big.read_bytes()
    for sid in (first, second):  # packs are sealed again whole: their blobs' offsets hold, no size is recorded
        for x in manifest_of(bucket, sid, dict(env, IMMICH_STREAM_AGE_IDENTITY=str(new_only))):
            if x["type"] == "file":
                assert ("stored" in x) == ("offset" not in x and "chunks" not in x), x
                disk = (stack.library / os.fsdecode(unescape_path(x["path"]))).read_bytes()
                assert bucket.read(x, lambda b: age_decrypt(b, new_only)) == disk
    r = run_cli("key", "reencrypt", "--json", env=env)  # nothing left to do: it says so
    assert r.code == 0 and json.loads(r.out)["summary"]["objects_reencrypted"] == 0, r.out
    new_env = dict(env, IMMICH_STREAM_AGE_IDENTITY=str(new_only))
    r = run_cli("verify", "--all", "--read-data", env=new_env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err  # sizes in the manifests follow
    target = tmp_path / "restored"
    r = run_cli("restore", first, "--root", "library", "--to", str(target), env=new_env)
    assert r.code == 0, r.err
    assert (target / "encoded-video" / "rotate.mp4").read_bytes() == big.read_bytes()


@pytest.mark.parametrize("checksum", ["md5", "sha256", "crc32c"])
async def test_encrypted_streams_on_a_server_that_enforces_part_sizes_and_checksums(
    checksum: str,
    seaweed_s3: S3Server,
    proxy_factory: type[FaultProxy],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SeaweedFS refuses a part under 5 MiB that is not the last, and verifies the checksum
    headers: encrypted streams of awkward lengths land whole (age opens them), and a part
    corrupted on the way is refused and sent again, as in a plain repository."""
    bucket = seaweed_s3.new_bucket()
    proxy = proxy_factory(seaweed_s3.endpoint)
    rule = proxy.add(lambda m, p, q: is_part_upload(m, p, q) and q.get("partNumber") == "2", corrupt=True, times=1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    key_file = tmp_path / "k.txt"
    keygen(key_file)
    ident = age.read_identity_file(key_file)
    part = 5 * MIB + age.CHUNK  # the smallest part size allowed with encryption
    lengths = [3 * part, 2 * part + 1, part - 1, 0]  # exact multiples end with the held chunk alone
    settings = make_settings(
        endpoint=proxy.endpoint,
        bucket=bucket,
        home=tmp_path,
        IMMICH_STREAM_CHECKSUM=checksum,
        IMMICH_STREAM_RETRIES="3",
    )
    data = {n: os.urandom(n) for n in lengths}
    async with Store(StoreOptions.from_settings(settings)) as store:
        store = SealedStore(store, sealing=age.Sealing((ident[0].recipient,), tuple(ident), ("lib/",)))
        for n, body in data.items():
            async with store.stream(f"lib/stream-{n}", ByteBudget(4 * part), part) as out:
                for i in range(0, n, 1_000_000):
                    await out.write(body[i : i + 1_000_000])
                await out.finish()
            assert out.stored == age.sealed_size(n, 1)
            assert b"".join([c async for c in store.iter_object(f"lib/stream-{n}")]) == body
    assert rule.hits == 1 and len(rejected(proxy)) == 1, proxy.requests
    raw = Bucket(seaweed_s3.endpoint, bucket, KEY, SECRET, "lib")
    for n, body in data.items():
        assert age_decrypt(raw.get(f"stream-{n}"), key_file) == body
