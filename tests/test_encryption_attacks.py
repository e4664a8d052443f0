"""Attacks on the age encryption found by review: each failed before its fix."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from immich_stream import config
from immich_stream.repository.age import Identity, load_keys
from immich_stream.repository.keys import write_identity_file
from immich_stream.repository.locks import RepoLock
from immich_stream.repository.repo import Repo
from immich_stream.repository.session import LockSpec, open_repo
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store
from tests.conftest import ImmichStack, bucket_of
from tests.helpers import make_library, make_settings, run_cli
from tests.test_encryption import AGE, keygen

pytest_plugins = ["tests.test_encryption"]  # its fixtures keys and enc_env


def _secret(path: Path) -> str:
    return next(x for x in path.read_text().splitlines() if x.startswith("AGE-SECRET-KEY-1"))


@pytest.mark.slow
@pytest.mark.parametrize("var", ["IMMICH_STREAM_AGE_IDENTITY", "IMMICH_STREAM_AGE_RECIPIENTS"])
def test_a_secret_key_put_in_the_wrong_setting_is_never_printed(var: str, tmp_path: Path) -> None:
    """A user who puts the key itself (not its file) in IMMICH_STREAM_AGE_IDENTITY, or the
    secret key in the recipients, must get an error that does not print the secret."""
    own = tmp_path / "own.key"
    keygen(own)
    secret = _secret(own)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMICH_", "S3_", "AWS_"))}
    env.update(HOME=str(tmp_path), S3_BUCKET="b", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")
    env.update(S3_ENDPOINT_URL="http://127.0.0.1:9", IMMICH_STREAM_AGE_IDENTITY=str(own))
    env[var] = secret
    for command in ("config", "backup"):
        r = run_cli(command, env=env, timeout=60)
        assert r.code != 0
        printed = r.out + r.err
        assert secret[16:60] not in printed.upper(), f"{command} printed the secret key: {r.last_error}"


@pytest.mark.slow
def test_backup_waiting_for_the_lock_during_key_rotate_writes_for_the_new_key(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    """A backup opens the repository (config.json, the identity file) and then waits for
    the lock; a `key rotate` that held the repository meanwhile changed both. The backup
    must write for the new recipients (the old key may be deleted once `key reencrypt`
    has run), so open_repo reads them again once it holds the lock."""
    own = tmp_path / "own.key"
    keygen(own)
    env = dict(s3_env, IMMICH_STREAM_AGE_IDENTITY=str(own), IMMICH_STREAM_STOP="none")
    settings = make_settings(env, export_credentials=True)
    data_key = "data/review/after-rotate.jpg"

    async def main() -> None:
        ks = load_keys(settings.age_identity, settings.age_recipients)
        assert ks is not None
        async with Store(StoreOptions.from_settings(settings)) as store:
            repo = Repo(store, settings.prefix)
            await repo.ensure_config(ks)  # a new encrypted repository
            await repo.store.put(repo.object_key("data/review/before.jpg"), b"old photo")
            rotation = RepoLock(repo, "key rotate", exclusive=True, wait=5)
            await rotation.__aenter__()  # what `key rotate` holds while it works
        backup = asyncio.create_task(_backup_put(settings, data_key))
        await asyncio.sleep(3)  # the backup has read config.json and waits for the lock
        assert not backup.done()
        # the rotation: the identity file first, then config.json (as keys.rotate does)
        new = Identity.generate()
        write_identity_file(own, [new, *ks.identities])
        async with Store(StoreOptions.from_settings(settings)) as store:
            repo = Repo(store, settings.prefix)
            cfg = await repo.read_config()
            cfg["encryption"]["recipients"] = [str(new.recipient)]
            cfg["encryption"]["retired"] = [str(ks.identities[0].recipient)]
            await store.put(repo.config_key(), json.dumps(cfg).encode(), "application/json")
            rotation.repo = repo
            await rotation.__aexit__(None, None, None)
        await asyncio.wait_for(backup, 60)

    asyncio.run(main())
    new_only = tmp_path / "new-only.key"
    new_only.write_text(_secret(own) + "\n")  # what the docs allow once reencrypt has run
    os.chmod(new_only, 0o600)
    p = subprocess.run(
        [AGE or "age", "-d", "-i", str(new_only)], input=bucket_of(env).get(data_key), capture_output=True
    )
    assert p.returncode == 0, f"written after the rotation, yet not for the new key: {p.stderr!r}"


async def _backup_put(settings: config.Settings, data_key: str) -> None:
    async with open_repo(settings, lock=LockSpec("backup", exclusive=False, wait=60, run="x"), create_for="x") as repo:
        await repo.store.put(repo.object_key(data_key), b"photo taken after the rotation")


def test_verify_after_a_reencrypt_interrupted_after_the_data_objects(
    enc_env: dict[str, str], stack: ImmichStack, keys: tuple[Path, str, Path, str]
) -> None:
    """`key reencrypt` rewrites every data object first and the manifests (their `stored`
    sizes) last. Interrupted in between (a kill, a stall: the docstring says run it again),
    with the number of recipients changed by the rotation, every rewritten object now has
    another size than its manifest says: verify fails the repository, and the next backup
    re-uploads every such file as 'reuploaded', though nothing is damaged."""
    from immich_stream.repository import keys as keymod
    from immich_stream.repository.session import open_repo
    from immich_stream.s3.budget import ByteBudget

    make_library(stack.library, photos=4)
    env = dict(enc_env, IMMICH_STREAM_STOP="none")
    assert run_cli("backup", env=env).code == 0
    env = dict(env, IMMICH_STREAM_AGE_RECIPIENTS="")  # the rotation drops the offline key: 2 -> 1
    assert run_cli("key", "rotate", "--drop-missing-recipients", env=env).code == 0
    settings = make_settings(env, export_credentials=True)

    async def data_phase_only() -> int:  # what _reencrypt does before the manifests
        async with open_repo(settings) as repo:
            n = 0
            async for obj in repo.store.list_objects(repo.data_prefix()):
                await keymod._rewrite(repo.store, obj.key, obj.size, ByteBudget(64 << 20), settings.part_size)
                n += 1
            return n

    assert asyncio.run(data_phase_only()) > 0
    r = run_cli("verify", "--all", env=env)
    assert r.code == 0, r.out + r.err


def _flip(bucket: Any, key: str, at: int = -40) -> None:
    body = bytearray(bucket.get(key))
    body[at] ^= 1
    bucket.put(key, bytes(body))


def test_damaged_ciphertext_is_a_one_line_error_in_every_command(
    enc_env: dict[str, str], stack: ImmichStack, tmp_path: Path
) -> None:
    """A DecryptError anywhere must end as `immich-stream: error: ...` (or a listed problem),
    never a traceback or an 'internal error'."""
    make_library(stack.library, photos=3)
    env = dict(enc_env, IMMICH_STREAM_STOP="none")
    assert run_cli("backup", env=env).code == 0
    assert run_cli("backup", env=env).code == 0
    bucket = bucket_of(env)
    first, second = bucket.snapshots()
    _flip(bucket, f"snapshots/{first}/snapshot.json")
    _flip(bucket, f"snapshots/{second}/database.sql.gz")
    _flip(bucket, f"snapshots/{second}/manifest.jsonl.gz")
    outcomes = {}
    for args in (
        ("snapshots",),
        ("restore", second, "--dump-to", str(tmp_path / "dump.sql.gz")),
        ("drill",),
        ("verify", "--all", "--read-data"),
        ("prune", "--keep-last", "1"),
    ):
        r = run_cli(*args, env=env)
        outcomes[args[0]] = (r.code, r.last_error)
        assert "Traceback" not in r.err and "internal error" not in r.err, (args, r.err[-2000:])
    assert all(code != 0 and err for code, err in outcomes.values()), outcomes
