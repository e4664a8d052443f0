"""Issue 22, the keys and the repository's authenticity: forged snapshots refused, key
rotation that cannot drop a recipient by omission, a re-encryption that always completes,
and an interrupted one that costs no re-upload."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from immich_stream import config
from immich_stream.age import load_keys
from immich_stream.repo import Repo, new_snapshot_id
from immich_stream.store import Store
from tests.conftest import ImmichStack, S3Server, bucket_of, moto_env
from tests.helpers import make_library, run_cli, start_cli, wait_for
from tests.test_encryption import AGE, age_decrypt, keygen

pytestmark = pytest.mark.skipif(AGE is None, reason="the age CLI is not installed (apt-get install age)")


def _settings(env: dict[str, str]) -> config.Settings:
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    return config.load(environ=env)


def _new_repository(env: dict[str, str], objects: dict[str, bytes]) -> None:
    """An encrypted repository with these data objects (keys relative to the prefix),
    sealed for its recipients, as a backup would leave them."""
    settings = _settings(env)

    async def main() -> None:
        keys = load_keys(settings.age_identity, settings.age_recipients)
        assert keys is not None
        async with Store(settings) as store:
            repo = Repo(store, settings.prefix)
            await repo.ensure_config(keys)
            for key, data in objects.items():
                await store.put(repo.object_key(key), data)

    asyncio.run(main())


@pytest.fixture
def two_keys(s3_env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path, str, Path, str]:
    own, offline = tmp_path / "own.key", tmp_path / "offline.key"
    own_pub, offline_pub = keygen(own), keygen(offline)
    env = dict(s3_env, IMMICH_STREAM_AGE_IDENTITY=str(own), IMMICH_STREAM_AGE_RECIPIENTS=offline_pub)
    return env, own, own_pub, offline, offline_pub


# -- 17: dropping a recipient is explicit ---------------------------------------------------


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

        wait_for(lambda: resealed() >= 20, timeout=120, interval=0.05, what="a third of the objects re-sealed")
        proc.kill()
    finally:
        proc.kill()
        proc.communicate()
    done = resealed()
    assert 20 <= done < len(sealed_for_two), f"the kill did not land midway ({done} of {len(sealed_for_two)})"

    changed = stack.library / "library" / "edited-after-the-kill.jpg"
    changed.write_bytes(os.urandom(20_000))
    r = run_cli("backup", "--json", env=env)
    assert r.code == 0, r.err
    added = set(bucket.keys("data/")) - set(sealed_for_two)
    assert len(added) == 1 and next(iter(added)).endswith("edited-after-the-kill.jpg"), (
        f"{len(added)} objects uploaded for 1 changed file ({done} were re-sealed by the killed reencrypt)"
    )
    assert json.loads(r.out)["summary"]["files"]["reuploaded"] == 0, r.out
    r = run_cli("verify", "--all", "--read-data", env=env)
    assert r.code == 0, r.out + r.err
    assert run_cli("key", "reencrypt", env=env).code == 0  # and the rotation completes
    r = run_cli("verify", "--all", "--read-data", env=env)
    assert r.code == 0, r.out + r.err
