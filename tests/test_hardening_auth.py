"""Issue 22, the keys and the repository's authenticity: forged snapshots refused, key
rotation that cannot drop a recipient by omission, a re-encryption that always completes,
and an interrupted one that costs no re-upload."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from immich_stream.errors import EXIT_FORGED
from immich_stream.repository.age import load_keys
from immich_stream.repository.layout import new_snapshot_id
from immich_stream.repository.repo import Repo
from immich_stream.repository.summary import ManifestInfo, SnapshotSummary
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store
from tests.conftest import CONTAINERS, ImmichStack, S3Server, bucket_of, moto_env, running_containers
from tests.helpers import USER_ID, Bucket, Result, make_library, make_settings, run_cli, start_cli, wait_for
from tests.test_encryption import AGE, age_decrypt, keygen

pytestmark = pytest.mark.skipif(AGE is None, reason="the age CLI is not installed (apt-get install age)")


def _new_repository(env: dict[str, str], objects: dict[str, bytes]) -> None:
    """An encrypted repository with these data objects (keys relative to the prefix),
    sealed for its recipients, as a backup would leave them."""
    settings = make_settings(env, export_credentials=True)

    async def main() -> None:
        keys = load_keys(settings.age_identity, settings.age_recipients)
        assert keys is not None
        async with Store(StoreOptions.from_settings(settings)) as store:
            repo = Repo(store, settings.prefix)
            await repo.ensure_config(keys)
            await repo.check_config(keys, writing=True, upgrade=True)  # as a backup's, under its lock
            for key, data in objects.items():
                await repo.store.put(repo.object_key(key), data)

    asyncio.run(main())


@pytest.fixture
def two_keys(s3_env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path, str, Path, str]:
    own, offline = tmp_path / "own.key", tmp_path / "offline.key"
    own_pub, offline_pub = keygen(own), keygen(offline)
    env = dict(s3_env, IMMICH_STREAM_AGE_IDENTITY=str(own), IMMICH_STREAM_AGE_RECIPIENTS=offline_pub)
    return env, own, own_pub, offline, offline_pub


# -- 17: dropping a recipient is explicit ---------------------------------------------------


@pytest.mark.slow
def test_key_rotate_never_drops_the_offline_recipient_by_omission(
    two_keys: tuple[dict[str, str], Path, str, Path, str],
) -> None:
    env, own, _own_pub, offline, offline_pub = two_keys
    photo = f"data/{new_snapshot_id()}/library/a.jpg"
    _new_repository(env, {photo: b"a photo" * 100})
    bucket = bucket_of(env)
    config_before, identity_before = bucket.get("config.json"), own.read_bytes()

    forgot = dict(env, IMMICH_STREAM_AGE_RECIPIENTS="")  # the offline key left out of the settings
    for args in (("key", "rotate"), ("key", "rotate", "--reencrypt")):
        r = run_cli(*args, env=forgot)
        assert r.code == 2, r.out + r.err
        assert offline_pub in r.last_error and "--drop-recipient" in r.last_error, r.err
        assert len([x for x in r.err.splitlines() if x.strip()]) == 1, r.err
        # nothing changed: the repository still encrypts to both, the identity file is as it was
        assert bucket.get("config.json") == config_before
        assert own.read_bytes() == identity_before
        assert age_decrypt(bucket.get(photo), offline) == b"a photo" * 100

    # explicit: the recipient named is dropped
    r = run_cli("key", "rotate", "--drop-recipient", offline_pub, env=forgot)
    assert r.code == 0, r.err
    assert json.loads(bucket.get("config.json"))["encryption"]["recipients"] == [
        str(load_keys(own, ()).identities[0].recipient)  # type: ignore[union-attr]
    ]


@pytest.mark.slow
def test_key_rotate_drops_missing_recipients_when_told_to(
    two_keys: tuple[dict[str, str], Path, str, Path, str],
) -> None:
    env, _own, _own_pub, _offline, offline_pub = two_keys
    _new_repository(env, {})
    r = run_cli("key", "rotate", "--drop-missing-recipients", env=dict(env, IMMICH_STREAM_AGE_RECIPIENTS=""))
    assert r.code == 0, r.err
    recipients = json.loads(bucket_of(env).get("config.json"))["encryption"]["recipients"]
    assert offline_pub not in recipients and len(recipients) == 1


# -- 15: foreign objects under data/ do not stop a re-encryption ------------------------------


@pytest.mark.slow
def test_key_reencrypt_completes_past_folder_markers_and_stray_objects(
    two_keys: tuple[dict[str, str], Path, str, Path, str], moto_s3: S3Server, tmp_path: Path
) -> None:
    env, own, _own_pub, _offline, _offline_pub = two_keys
    env = moto_env(env, moto_s3)  # moto keeps a zero-byte "folder/" object as an object (rclone makes a dir)
    run = new_snapshot_id()
    photos = {f"data/{run}/library/p{i}.jpg": os.urandom(3000) for i in range(3)}
    _new_repository(env, photos)
    bucket = bucket_of(env)
    # what consoles and sync tools leave: folder markers, a stray note, a plain file in a run
    foreign = {
        "data/": b"",
        f"data/{run}/": b"",
        "data/README.txt": b"notes from the admin",
        f"data/{run}/library/copied-by-hand.txt": b"not an age file",
    }
    for key, data in foreign.items():
        bucket.put(key, data)
    assert run_cli("key", "rotate", env=env).code == 0

    for attempt in range(2):  # and again: a rotation can always be completed, and stays so
        r = run_cli("key", "reencrypt", "--json", env=env)
        assert r.code == 0, r.out + r.err
        summary = json.loads(r.out)["summary"]
        assert sorted(summary["skipped"]) == sorted(f"{bucket.prefix}/{k}" for k in foreign), summary
        assert summary["objects_reencrypted"] == (3 if attempt == 0 else 0), summary
    new_only = tmp_path / "new-only.key"
    new_only.write_text(next(x for x in own.read_text().splitlines() if x.startswith("AGE-SECRET-KEY-1")) + "\n")
    os.chmod(new_only, 0o600)
    for key, data in photos.items():
        assert age_decrypt(bucket.get(key), new_only) == data  # re-encrypted for the new key alone
    for key, data in foreign.items():
        assert bucket.get(key) == data  # left as they were


# -- 19: an interrupted re-encryption costs no re-upload ------------------------------------


def test_backup_after_a_killed_reencrypt_uploads_only_the_changed_files(
    env: dict[str, str], stack: ImmichStack, tmp_path: Path
) -> None:
    own, offline = tmp_path / "own.key", tmp_path / "offline.key"
    keygen(own)
    env = dict(
        env,
        IMMICH_STREAM_AGE_IDENTITY=str(own),
        IMMICH_STREAM_AGE_RECIPIENTS=keygen(offline),
        IMMICH_STREAM_STOP="none",
        IMMICH_STREAM_JOBS="1",  # a slow re-encryption, so the kill lands in the middle of it
    )
    make_library(stack.library, photos=60)
    assert run_cli("backup", env=env).code == 0
    bucket = bucket_of(env)
    sealed_for_two = bucket.keys("data/")
    # the offline key dropped: 2 recipients -> 1, so every object re-sealed is 98 bytes shorter
    env = dict(env, IMMICH_STREAM_AGE_RECIPIENTS="")
    assert run_cli("key", "rotate", "--drop-missing-recipients", env=env).code == 0
    proc = start_cli("key", "reencrypt", env=env)
    try:

        def resealed() -> int:
            now = bucket.keys("data/")
            return sum(1 for k, size in now.items() if size != sealed_for_two[k])

        # (small files are in packs: the objects are a few packs and the large files)
        third = max(2, len(sealed_for_two) // 3)
        wait_for(lambda: resealed() >= third, timeout=120, interval=0.05, what="a third of the objects re-sealed")
        proc.kill()
    finally:
        proc.kill()
        proc.communicate()
    done = resealed()
    assert third <= done < len(sealed_for_two), f"the kill did not land midway ({done} of {len(sealed_for_two)})"

    changed = stack.library / "library" / "edited-after-the-kill.jpg"
    changed.write_bytes(os.urandom(20_000))
    r = run_cli("backup", "--json", env=env)
    assert r.code == 0, r.err
    added = set(bucket.keys("data/")) - set(sealed_for_two)
    lines = [ln for ln in _manifest(bucket, bucket.snapshots()[-1], own) if ln.get("key") in added]
    assert len(added) == 1 and [ln["path"] for ln in lines] == ["library/edited-after-the-kill.jpg"], (
        f"{len(added)} objects uploaded for 1 changed file ({done} were re-sealed by the killed reencrypt)"
    )
    assert json.loads(r.out)["summary"]["files"]["reuploaded"] == 0, r.out
    r = run_cli("verify", "--all", "--read-data", env=env)
    assert r.code == 0, r.out + r.err
    assert run_cli("key", "reencrypt", env=env).code == 0  # and the rotation completes
    r = run_cli("verify", "--all", "--read-data", env=env)
    assert r.code == 0, r.out + r.err


# -- 6: what the repository says is authenticated -------------------------------------------


def _manifest(bucket: Bucket, sid: str, own: Path) -> list[dict]:
    raw = gzip.decompress(age_decrypt(bucket.get(f"snapshots/{sid}/manifest.jsonl.gz"), own))
    return [ln for ln in map(json.loads, raw.splitlines()) if "path" in ln]


def _seal_for(data: bytes, recipients: list[str]) -> bytes:
    """What an attacker with only the bucket can do: seal to the public keys config.json names."""
    args = [AGE or "age"]
    for r in recipients:
        args += ["-r", r]
    return subprocess.run(args, input=data, capture_output=True, check=True).stdout


def _one_error_line(r: Result) -> str:
    errors = [x for x in r.err.splitlines() if x.startswith("immich-stream: error:")]
    assert len(errors) == 1, r.err
    return errors[0]


@pytest.fixture
def enc_backup(env: dict[str, str], stack: ImmichStack, tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """An encrypted repository with one snapshot, made by a real backup; the offline key
    (a recovery identity) and the backup host's identity file."""
    own, offline = tmp_path / "own.key", tmp_path / "offline.key"
    keygen(own)
    env = dict(
        env,
        IMMICH_STREAM_AGE_IDENTITY=str(own),
        IMMICH_STREAM_AGE_RECIPIENTS=keygen(offline),
        IMMICH_STREAM_STOP="none",
    )
    make_library(stack.library, photos=6)
    r = run_cli("backup", env=env)
    assert r.code == 0, r.err
    return env, own, offline


def _forge_snapshot(bucket: Bucket, evil: bytes) -> str:
    """A snapshot made from the bucket alone: a manifest naming an object of the attacker's,
    with its true sha256, and a snapshot.json, all sealed to config.json's recipients."""
    recipients = json.loads(bucket.get("config.json"))["encryption"]["recipients"]
    sid = new_snapshot_id()
    key = f"data/{sid}/library/library/{USER_ID}/2024/evil.jpg"
    line = {
        "root": "library",
        "path": f"library/{USER_ID}/2024/evil.jpg",
        "type": "file",
        "size": len(evil),
        "mtime_ns": 1,
        "mode": 0o644,
        "uid": 0,
        "gid": 0,
        "inode": 1,
        "sha256": hashlib.sha256(evil).hexdigest(),
        "key": key,
    }
    manifest = gzip.compress(json.dumps(line).encode() + b"\n")
    summary = SnapshotSummary(id=sid, time="2099-01-01T00:00:00+00:00", host="attacker", mode="none")
    summary.manifest = ManifestInfo(f"snapshots/{sid}/manifest.jsonl.gz", 1)
    bucket.put(key, _seal_for(evil, recipients))
    bucket.put(f"snapshots/{sid}/manifest.jsonl.gz", _seal_for(manifest, recipients))
    bucket.put(f"snapshots/{sid}/snapshot.json", _seal_for(summary.to_json(), recipients))
    return sid


def test_a_snapshot_forged_with_only_bucket_write_is_refused_by_verify_and_restore(
    enc_backup: tuple[dict[str, str], Path, Path], tmp_path: Path
) -> None:
    env, _own, _offline = enc_backup
    bucket = bucket_of(env)
    evil = b"a photo the attacker chose " * 100
    forged = _forge_snapshot(bucket, evil)
    assert bucket.snapshots()[-1] == forged  # it is the latest

    for args in (("verify", forged, "--read-data"), ("verify", "--all")):
        r = run_cli(*args, env=env)
        assert r.code == EXIT_FORGED, r.out + r.err
        assert "MAC" in _one_error_line(r) and forged in r.last_error, r.err
    target = tmp_path / "restored"
    r = run_cli("restore", "latest", "--root", "library", "--to", str(target), env=env)
    assert r.code == EXIT_FORGED, r.out + r.err
    assert forged in _one_error_line(r)
    assert not any(p.is_file() and p.read_bytes() == evil for p in target.rglob("*")) if target.exists() else True

    # a forged manifest under the real snapshot.json is refused too
    real = bucket.snapshots()[0]
    recipients = json.loads(bucket.get("config.json"))["encryption"]["recipients"]
    fake = gzip.compress(
        b'{"root":"library","path":"x.jpg","type":"file","size":1,"mtime_ns":1,"mode":420,"inode":1}\n'
    )
    bucket.put(f"snapshots/{real}/manifest.jsonl.gz", _seal_for(fake, recipients))
    r = run_cli("restore", real, "--root", "library", "--to", str(tmp_path / "r2"), env=env)
    assert r.code == EXIT_FORGED and real in _one_error_line(r), r.out + r.err
    assert not (tmp_path / "r2" / "x.jpg").exists()


def test_a_recipient_added_to_config_json_is_never_sealed_to(
    enc_backup: tuple[dict[str, str], Path, Path], stack: ImmichStack, tmp_path: Path
) -> None:
    env, _own, _offline = enc_backup
    bucket = bucket_of(env)
    before = bucket.keys()
    cfg = json.loads(bucket.get("config.json"))
    thief = keygen(tmp_path / "thief.key")
    cfg["encryption"]["recipients"].append(thief)  # the MAC left as it was: the attacker has no key
    bucket.put("config.json", json.dumps(cfg, indent=2).encode())
    (stack.library / "library" / "new-photo.jpg").write_bytes(os.urandom(9000))

    r = run_cli("backup", env=env)
    assert r.code == EXIT_FORGED, r.out + r.err
    assert "config.json" in _one_error_line(r)
    assert set(bucket.keys()) - set(before) <= {"config.json"}, "objects were written"
    assert set(CONTAINERS) <= running_containers()  # refused before the stack was touched
    # `key reencrypt` seals every object to config.json's recipients: it must not believe them
    sizes = bucket.keys("data/")
    r = run_cli("key", "reencrypt", env=env)
    assert r.code == EXIT_FORGED and "config.json" in _one_error_line(r), r.out + r.err
    assert bucket.keys("data/") == sizes
    thief_opens = subprocess.run(
        [AGE or "age", "-d", "-i", str(tmp_path / "thief.key")],
        input=bucket.get(next(iter(sizes))),
        capture_output=True,
    )
    assert thief_opens.returncode != 0

    del cfg["auth"]  # and stripping the MAC is a downgrade the identity file's key refuses
    bucket.put("config.json", json.dumps(cfg, indent=2).encode())
    for args in (("backup",), ("verify",), ("snapshots",)):
        r = run_cli(*args, env=env)
        assert r.code == EXIT_FORGED and "carries no MAC" in _one_error_line(r), r.out + r.err
    assert set(bucket.keys()) - set(before) <= {"config.json"}


def _legacify(bucket: Bucket, own: Path) -> None:
    """The repository as an immich-stream without authentication wrote it: no MAC in
    config.json, snapshot.json or the manifests, and no key line in the identity file."""
    cfg = json.loads(bucket.get("config.json"))
    recipients = cfg["encryption"]["recipients"]
    del cfg["auth"]
    bucket.put("config.json", json.dumps(cfg, indent=2).encode())
    for sid in bucket.snapshots():
        raw = gzip.decompress(age_decrypt(bucket.get(f"snapshots/{sid}/manifest.jsonl.gz"), own))
        lines = [x for x in raw.splitlines(keepends=True) if not x.startswith(b'{"auth":')]
        assert len(lines) < len(raw.splitlines())  # it had MAC lines
        bucket.put(f"snapshots/{sid}/manifest.jsonl.gz", _seal_for(gzip.compress(b"".join(lines)), recipients))
        summary = json.loads(age_decrypt(bucket.get(f"snapshots/{sid}/snapshot.json"), own))
        del summary["auth"]
        bucket.put(f"snapshots/{sid}/snapshot.json", _seal_for(json.dumps(summary).encode(), recipients))
    own.write_text("".join(x for x in own.read_text().splitlines(keepends=True) if "immich-stream-auth" not in x))


def test_a_repository_written_before_authentication_is_authenticated_by_its_next_backup(
    enc_backup: tuple[dict[str, str], Path, Path], stack: ImmichStack, tmp_path: Path
) -> None:
    env, own, offline = enc_backup
    bucket = bucket_of(env)
    _legacify(bucket, own)
    [old] = bucket.snapshots()

    # without the key, readers refuse with what to do (or read unchecked when told to)
    r = run_cli("verify", env=env)
    assert r.code == 2 and "run `backup` once" in _one_error_line(r), r.out + r.err
    r = run_cli("verify", env=dict(env, IMMICH_STREAM_TRUST_BUCKET="1"))
    assert r.code == 0, r.out + r.err

    # the next backup: trust on first use, the key into the identity file
    (stack.library / "library" / "after-upgrade.jpg").write_bytes(os.urandom(7000))
    r = run_cli("backup", env=env)
    assert r.code == 0, r.err
    assert "1 existing snapshots were authenticated" in r.err
    key_line = next(x for x in own.read_text().splitlines() if x.startswith("# immich-stream-auth: "))
    assert not key_line.endswith("pending") and os.stat(own).st_mode & 0o777 == 0o600
    assert "auth" in json.loads(bucket.get("config.json"))
    assert "auth" in json.loads(age_decrypt(bucket.get(f"snapshots/{old}/snapshot.json"), own))
    r = run_cli("verify", "--all", "--read-data", env=env)
    assert r.code == 0, r.out + r.err
    r = run_cli("key", "show", env=env)
    assert r.code == 0 and key_line in r.out, r.out + r.err

    # the offline recovery key alone is refused (one line saying what to add); with the line, it restores
    rec_env = dict(env, IMMICH_STREAM_AGE_IDENTITY=str(offline))
    r = run_cli("restore", old, "--root", "library", "--to", str(tmp_path / "r"), env=rec_env)
    assert r.code == 2 and "key show" in _one_error_line(r), r.out + r.err
    offline.write_text(offline.read_text() + key_line + "\n")
    r = run_cli("restore", old, "--root", "library", "--to", str(tmp_path / "r"), env=rec_env)
    assert r.code == 0, r.out + r.err
    # and the age CLI still reads the identity file with the key line in it
    age_decrypt(bucket.get(f"snapshots/{old}/snapshot.json"), offline)
