"""Issue 24, part 1: backups with an S3 key that cannot delete (append-only), prune elsewhere
with a key that can. moto enforces IAM (tests/iam.py): the backup key may PutObject,
GetObject, ListBucket and AbortMultipartUpload only, so any delete a backup needed would fail
it with AccessDenied."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from pathlib import Path

import pytest

from immich_stream.errors import LockError
from immich_stream.repository.locks import RepoLock
from immich_stream.repository.repo import Repo
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store
from tests.conftest import ImmichStack, base_env
from tests.helpers import Bucket, file_digest, make_library, run_cli, tree
from tests.iam import IamServer

WARNING = "this S3 key cannot delete: continuing append-only"


def leftovers(bucket: Bucket) -> dict[str, list[str]]:
    """What a delete-less run leaves that prune must remove, by kind."""
    keys = bucket.keys()
    released = [k for k in keys if k.startswith("locks/") and json.loads(bucket.get(k)).get("released")]
    committed = set(bucket.snapshots())
    journals = [k for k in keys if "/journal/" in k and k.split("/")[1] in committed]
    return {
        "released locks": released,
        "probes": [k for k in keys if k.startswith(("preflight/", "doctor/"))],
        "journals of committed runs": journals,
        "live locks": [k for k in keys if k.startswith("locks/") and k not in released],
    }


def test_five_nightly_backups_with_a_key_that_cannot_delete_then_prune_elsewhere(
    env: dict, stack: ImmichStack, iam_s3: IamServer, tmp_path: Path
) -> None:
    make_library(stack.library, photos=3, odd_names=False)
    prefix = "nightly-" + uuid.uuid4().hex[:8]
    backup = iam_s3.env(env, iam_s3.backup_key, prefix)
    # prune runs elsewhere: another machine, its own state directory
    prune = dict(iam_s3.env(env, iam_s3.prune_key, prefix), IMMICH_STREAM_STATE_DIR=str(tmp_path / "elsewhere"))
    bucket = iam_s3.view(prefix)

    for night in range(5):
        (stack.library / "upload" / f"night-{night}.jpg").write_bytes(b"photo %d\n" % night * 1000)
        if night == 0:  # not set: detected at the first refused delete; the live pass writes a journal
            r = run_cli("backup", "--stop", "app", env=backup)
        else:  # set: no delete is even tried
            r = run_cli("backup", "--stop", "none", env=dict(backup, IMMICH_STREAM_APPEND_ONLY="true"))
        assert r.code == 0, r.err
        said = [ln for ln in r.err.splitlines() if "cannot delete" in ln]
        assert len(said) == (1 if night == 0 else 0), r.err
        assert WARNING in "".join(said) or night > 0
    # a sixth with --prune: the snapshot commits, the prune refuses the key: exit 6
    r = run_cli("backup", "--stop", "none", "--prune", "--keep-last", "3", env=backup)
    assert r.code == 6, r.err
    assert "committed, but prune failed: this S3 key cannot delete" in r.last_error, r.err
    snaps = bucket.snapshots()
    assert len(snaps) == 6
    left = leftovers(bucket)
    assert len(left["released locks"]) == 6 and not left["live locks"], left
    host = socket.gethostname()
    # one per host, however many runs (the refused prune's probe of deletes too)
    assert left["probes"] == [f"preflight/{host}-backup", f"preflight/{host}-delete"], left
    assert left["journals of committed runs"], "the live pass's journal of the first run"

    # prune with the backup key: one line, exit 1, nothing deleted (its probe of deletes is all it writes)
    before = set(bucket.keys())
    r = run_cli("prune", "--keep-last", "3", env=backup)
    assert r.code == 1
    assert r.last_error == (
        "immich-stream: error: this S3 key cannot delete (AccessDenied on DeleteObject): prune needs a key "
        "that can; run prune with one (README: keys that cannot delete)"
    ), r.err
    assert set(bucket.keys()) == before

    # doctor with each key says which rights it has and what that means; exit 0 with both
    r = run_cli("doctor", env=backup)
    assert r.code == 0, r.out + r.err
    assert "put, get, list, abort multipart: yes; delete, list uploads: no: backups work append-only" in r.out
    r = run_cli("doctor", env=backup)  # again: its probes are overwritten, not added
    assert r.code == 0
    probes = [k for k in bucket.keys() if k.startswith("doctor/")]
    assert probes and all(k.startswith(f"doctor/host-{host}/") for k in probes), probes
    r = run_cli("doctor", env=prune)
    assert r.code == 0, r.out + r.err
    assert "put, get, list, abort multipart, delete, list uploads: yes: backups, prune and unlock all work" in r.out

    probed = time.monotonic()

    # prune elsewhere, with the key that may delete: nothing of the delete-less runs is left.
    # A short staleness (6 s) so that doctor's probes are old enough to collect; not shorter:
    # moto's LastModified has whole seconds, and prune's own lock is judged lost once the
    # server saw it unrefreshed for half the staleness (at 1 s that failed one run in three).
    time.sleep(max(0.0, 6.5 - (time.monotonic() - probed)))
    r = run_cli("prune", "--keep-last", "3", "--lock-wait", "0s", env=dict(prune, IMMICH_STREAM_LOCK_STALE="6s"))
    assert r.code == 0, r.err
    assert bucket.snapshots() == snaps[3:]
    assert leftovers(bucket) == {
        "released locks": [],
        "probes": [],
        "journals of committed runs": [],
        "live locks": [],
    }, bucket.keys()
    r = run_cli("verify", "--all", "--read-data", env=prune)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err
    target = tmp_path / "restored"
    r = run_cli("restore", "latest", "--root", "library", "--to", str(target), env=backup)
    assert r.code == 0, r.err
    assert {k: file_digest(p) for k, p in tree(target).items()} == {
        k: file_digest(p) for k, p in tree(stack.library).items()
    }


def test_released_locks_exclude_nothing_and_a_removed_lock_is_never_written_again(
    iam_s3: IamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the backup key: a held lock keeps prune out; released (overwritten, not deleted)
    it keeps nobody out; `unlock --force` with the prune key removes a held one for good."""
    prefix = "locks-" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("IMMICH_STREAM_STATE_DIR", str(tmp_path / "state"))
    for name, value in iam_s3.backup_key.items():
        monkeypatch.setenv(name, value)
    bucket = iam_s3.view(prefix)
    prune_env = iam_s3.env(base_env(tmp_path), iam_s3.prune_key, prefix)
    prune_env["IMMICH_STREAM_STATE_DIR"] = str(tmp_path / "state")

    async def scenario() -> None:
        options = StoreOptions(bucket=iam_s3.bucket, endpoint_url=iam_s3.endpoint, path_style=True, retries=2)
        async with Store(options) as store:
            repo = Repo(store, prefix)
            first = RepoLock(repo, "backup", exclusive=False, wait=0, stale=600, run="r1")
            async with first:
                with pytest.raises(LockError, match="locked by backup"):
                    async with RepoLock(repo, "prune", exclusive=True, wait=0, stale=600):
                        pass
                await first.ensure_held()
            assert store.append_only, "the refused delete switched the store to append-only"
            body = json.loads(bucket.get(first.key.removeprefix(prefix + "/")))
            assert body.get("released") is True  # still there, but released
            async with RepoLock(repo, "prune", exclusive=True, wait=0, stale=600):  # it keeps nobody out
                pass

            held = RepoLock(repo, "backup", exclusive=False, wait=0, stale=600, run="r2")
            async with held:
                r = await asyncio.to_thread(run_cli, "unlock", "--force", env=prune_env)
                assert r.code == 0, r.err
                with pytest.raises(LockError, match="removed"):
                    await held.ensure_held()
            rel = held.key.removeprefix(prefix + "/")
            if rel in bucket.keys():  # released at the end, never live again
                assert json.loads(bucket.get(rel)).get("released") is True

    asyncio.run(scenario())
    r = run_cli("unlock", env=iam_s3.env(base_env(tmp_path), iam_s3.backup_key, prefix))
    assert r.code == 1 and "this S3 key cannot delete" in r.last_error and "unlock needs a key" in r.last_error


def test_backup_prune_with_append_only_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """append_only says the key cannot delete: the --prune after the night's backup could only
    fail (exit 6 every night). Refused at once, one line, exit 2 (Docker and S3 unreachable
    here: nothing may be touched before the refusal)."""
    env = base_env(tmp_path)
    (tmp_path / "lib").mkdir()
    (tmp_path / "pg").mkdir()
    env.update(
        S3_BUCKET="b",
        S3_ENDPOINT_URL="http://127.0.0.1:9",
        AWS_ACCESS_KEY_ID="k",
        AWS_SECRET_ACCESS_KEY="s",
        LIBRARY_DIR=str(tmp_path / "lib"),
        POSTGRES_DIR=str(tmp_path / "pg"),
        DOCKER_HOST="unix:///nonexistent/docker.sock",
        IMMICH_STREAM_RETRIES="1",
    )
    r = run_cli("backup", "--prune", "--keep-last", "3", "--append-only", env=env, timeout=60)
    assert r.code == 2 and "--prune" in r.last_error and "append_only" in r.last_error, r.err
    assert len(r.err.strip().splitlines()) == 1
