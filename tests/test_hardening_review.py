"""A hostile review of issue 22's merged hardening: a reader whose lock is lost stops, the
offline key restores an authenticated repository, a damaged or forged manifest line costs
only its entry (or is named forged), a replaced config.json is forged, and more.

Snapshots are written through the repository code (tests/test_hardening_restore.py's
write_snapshot) into a bucket on the real rclone S3 server; the real CLI reads them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import CONTAINERS, ImmichStack, bucket_of, running_containers
from tests.helpers import make_library, run_cli, start_cli, wait_for
from tests.test_encryption import keygen
from tests.test_hardening_restore import DUMP_SQL, photos, restored, write_snapshot

# each test runs the CLI as a process or waits on a real server: the full suite runs them,
# the quick gate does not
pytestmark = pytest.mark.slow

EXIT_PARTIAL = 7
EXIT_FORGED = 8


# -- 1: a reader whose lock is lost stops -------------------------------------------------------


@pytest.mark.parametrize("command", ["restore", "verify"])
def test_a_reader_whose_lock_was_removed_stops_before_prune_can_delete_its_snapshot(
    s3_env: dict[str, str], proxy_factory, tmp_path: Path, command: str
) -> None:
    """`unlock --force` mid-restore: the restore's refresher stops for good, so prune may
    delete the snapshot it reads. It must stop with one line saying why, not go on (and end
    in a partial restore advising to run again, or a verify that reports a pruned snapshot)."""
    entries = photos(40)
    sid = write_snapshot(s3_env, entries)
    proxy = proxy_factory(s3_env["S3_ENDPOINT_URL"])
    proxy.add(lambda m, path, q: m == "GET" and "/data/" in path, delay=1.0)  # a slow download per file
    env = dict(s3_env, S3_ENDPOINT_URL=proxy.endpoint, IMMICH_STREAM_JOBS="1", IMMICH_STREAM_LOCK_STALE="12s")
    target = tmp_path / "target"
    args = ["restore", sid, "--to", str(target)] if command == "restore" else ["verify", sid, "--read-data"]
    proc = start_cli(*args, env=env)
    bucket = bucket_of(s3_env)
    wait_for(lambda: any(k.endswith(".json") for k in bucket.keys("locks/")), 30, what="the reader's lock")
    time.sleep(1)
    r = run_cli("unlock", "--force", env=s3_env)
    assert r.code == 0, r.err
    try:
        _out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    errors = [ln for ln in err.splitlines() if ln.startswith("immich-stream: error:")]
    assert proc.returncode == 1, err
    assert errors and "lost the repository lock" in errors[-1] and "run it again" in errors[-1], err
    if command == "restore":
        got = restored(target)
        assert got and len(got) < len(entries), "it stopped midway; what it wrote stays"
        assert all(body == entries[os.fsdecode(rel).removeprefix("library/")].body for rel, body in got.items())


# -- 2: the offline key alone restores an authenticated repository ---------------------------------


@pytest.fixture
def auth_repo(s3_env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path, str, dict[str, bytes]]:
    """An encrypted, authenticated repository (the identity file carries the ready auth line)
    with one snapshot of three files written as a backup writes them; also the offline
    recovery key (a recipient), without the auth line. Returns (env, offline key, id, files)."""
    from immich_stream import config
    from immich_stream.repository.age import load_keys
    from immich_stream.repository.auth import RepoAuth
    from immich_stream.repository.layout import new_snapshot_id
    from immich_stream.repository.manifest import ManifestLine, ManifestWriter
    from immich_stream.repository.repo import Repo
    from immich_stream.repository.summary import DatabaseInfo, FileCounts, ManifestInfo, RootMeta, SnapshotSummary
    from immich_stream.s3.budget import ByteBudget
    from immich_stream.s3.options import StoreOptions
    from immich_stream.s3.store import Store

    own, offline = tmp_path / "own.key", tmp_path / "offline.key"
    keygen(own)
    offline_pub = keygen(offline)
    own.write_text(own.read_text() + RepoAuth(os.urandom(32), ready=True).line() + "\n")
    env = dict(s3_env, IMMICH_STREAM_AGE_IDENTITY=str(own), IMMICH_STREAM_AGE_RECIPIENTS=offline_pub)
    settings = config.load(environ=env)
    files = {f"upload/p{i}.jpg": f"photo {i} ".encode() * 100 for i in range(3)}

    async def main() -> str:
        keys = load_keys(settings.age_identity, settings.age_recipients)
        async with Store(StoreOptions.from_settings(settings)) as raw:
            repo = Repo(raw, settings.prefix)
            store = repo.store  # sealed, as a backup writes
            await repo.ensure_config(keys)
            await repo.check_config(keys, writing=True, upgrade=True)
            assert repo.auth is not None and repo.auth_required
            sid = new_snapshot_id()
            budget = ByteBudget(64 << 20)
            async with ManifestWriter(
                store, repo.manifest_key(sid), budget, settings.part_size, repo.manifest_mac(sid)
            ) as writer:
                for path, body in files.items():
                    key = repo.data_key(sid, "library", path)
                    await store.put(repo.object_key(key), body)
                    sha = hashlib.sha256(body).hexdigest()
                    stored = store.sealing.size(len(body)) if store.sealing else None
                    line = ManifestLine("library", path, "file", len(body), 10**18, 0o644, 0, 0, 1, sha, key)
                    line.stored = stored
                    await writer.add(line)
                await writer.finish()
            dump = gzip.compress(DUMP_SQL)
            await store.put(repo.dump_key(sid), dump)
            database = DatabaseInfo(
                repo.relative_key(repo.dump_key(sid)),
                "immich",
                len(DUMP_SQL),
                len(dump),
                hashlib.sha256(DUMP_SQL).hexdigest(),
                hashlib.sha256(dump).hexdigest(),
                store.sealing.size(len(dump)) if store.sealing else None,
            )
            await repo.commit(
                SnapshotSummary(
                    id=sid,
                    time=dt.datetime.now(dt.UTC).isoformat(),
                    roots={"library": "/photos"},
                    root_meta={"library": RootMeta(0o755, 0, 0, 10**18)},
                    files=FileCounts(files=len(files), bytes_total=sum(map(len, files.values()))),
                    manifest=ManifestInfo(repo.relative_key(repo.manifest_key(sid)), len(files)),
                    database=database,
                )
            )
            return sid

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", env["AWS_ACCESS_KEY_ID"])
        mp.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
        sid = asyncio.run(main())
    return env, offline, sid, files


def test_the_offline_key_alone_restores_an_authenticated_repository_when_trusted(
    auth_repo: tuple[dict[str, str], Path, str, dict[str, bytes]], tmp_path: Path
) -> None:
    """Disaster recovery: the backup host is gone, only the offline recovery key (no
    `# immich-stream-auth:` line) is left. With IMMICH_STREAM_TRUST_BUCKET=1, as the error
    offers, restore and verify read the repository unchecked: the MAC lines of its
    manifests are not files."""
    env, offline, sid, files = auth_repo
    offline_env = dict(env, IMMICH_STREAM_AGE_IDENTITY=str(offline), IMMICH_STREAM_TRUST_BUCKET="1")
    offline_env.pop("IMMICH_STREAM_AGE_RECIPIENTS")
    target = tmp_path / "target"
    r = run_cli("restore", sid, "--to", str(target), env=offline_env)
    assert r.code == 0, r.err
    assert restored(target) == {os.fsencode(f"library/{p}"): body for p, body in files.items()}
    r = run_cli("verify", sid, "--read-data", env=offline_env)
    assert r.code == 0, r.out + r.err


# -- 3: a manifest line of the wrong shape costs only its entry ----------------------------------

DAMAGED_LINES = {
    "size-a-string": lambda d: d.update(size="12"),
    "mode-a-float": lambda d: d.update(mode=420.5),
    "mode-missing": lambda d: d.pop("mode"),
    "path-a-number": lambda d: d.update(path=5),
    "not-json": None,
}


@pytest.mark.parametrize("damage", DAMAGED_LINES)
def test_a_manifest_line_of_the_wrong_shape_costs_only_its_entry(
    s3_env: dict[str, str], tmp_path: Path, damage: str
) -> None:
    """A plain repository's manifest line with a field of the wrong type, a field missing,
    or no JSON at all: restore names it damaged and brings back every other file (exit 7,
    partial); verify names it as a problem. Never an internal error that stops it all."""
    import json

    entries = photos(4)
    sid = write_snapshot(s3_env, entries)
    bucket = bucket_of(s3_env)
    key = f"snapshots/{sid}/manifest.jsonl.gz"
    lines = gzip.decompress(bucket.get(key)).split(b"\n")
    change = DAMAGED_LINES[damage]
    if change is None:
        lines[1] = b'{"root":"library","path":"upload/p001.jpg",garbage'
    else:
        d = json.loads(lines[1])
        change(d)
        lines[1] = json.dumps(d).encode()
    bucket.put(key, gzip.compress(b"\n".join(lines)))
    target = tmp_path / "target"
    r = run_cli("restore", sid, "--to", str(target), env=s3_env)
    assert r.code == EXIT_PARTIAL, r.err
    assert "internal error" not in r.err
    assert any("manifest line is damaged" in ln for ln in r.err.splitlines()), r.err
    assert restored(target) == {
        os.fsencode(f"library/{p}"): e.body for p, e in entries.items() if p != "upload/p001.jpg"
    }
    r = run_cli("verify", sid, env=s3_env)
    assert r.code == 1 and "internal error" not in r.err, r.out + r.err
    assert any("damaged" in ln for ln in r.out.splitlines() if ln.startswith("problem")), r.out


# -- 4: a forged manifest line is forged, whatever its shape ---------------------------------------


def test_a_forged_manifest_line_of_the_wrong_shape_is_named_forged(
    auth_repo: tuple[dict[str, str], Path, str, dict[str, bytes]], tmp_path: Path
) -> None:
    """Someone with only the bucket rewrites a manifest of an authenticated repository
    (sealed to the public keys, which anyone may), dropping a field of a line: the block's
    MAC decides before the line is parsed, so restore, verify and prune say forged (exit 8),
    not an internal error; prune deletes nothing."""
    import json
    import subprocess

    from tests.test_encryption import age_decrypt
    from tests.test_hardening_auth import _seal_for

    env, _offline, sid, _files = auth_repo
    bucket = bucket_of(env)
    own = Path(env["IMMICH_STREAM_AGE_IDENTITY"])
    own_pub = subprocess.run(["age-keygen", "-y", str(own)], capture_output=True, text=True, check=True).stdout
    key = f"snapshots/{sid}/manifest.jsonl.gz"
    lines = gzip.decompress(age_decrypt(bucket.get(key), own)).split(b"\n")
    d = json.loads(lines[0])
    d.pop("mode")
    lines[0] = json.dumps(d).encode()
    recipients = [own_pub.strip(), env["IMMICH_STREAM_AGE_RECIPIENTS"]]
    bucket.put(key, _seal_for(gzip.compress(b"\n".join(lines)), recipients))
    before = bucket.keys()
    for args in (["restore", sid, "--to", str(tmp_path / "t")], ["verify", sid], ["prune", "--keep-last", "1"]):
        r = run_cli(*args, env=env)
        assert r.code == EXIT_FORGED, (args, r.err)
        assert "internal error" not in r.err, r.err
    assert bucket.keys().keys() == before.keys()


# -- 5: a replaced config.json is forged when the identity carries the auth key -------------------

REPLACED_CONFIGS = {
    "plain": lambda cfg: json_bytes({k: v for k, v in cfg.items() if k not in ("encryption", "auth")}),
    "newer-version": lambda cfg: json_bytes(dict(cfg, version=99)),
    "not-json": lambda cfg: b"<html>not a repository</html>",
}


def json_bytes(d: dict) -> bytes:
    import json

    return json.dumps(d).encode()


@pytest.mark.parametrize("replaced", REPLACED_CONFIGS)
def test_a_replaced_config_json_is_forged_when_the_identity_holds_the_auth_key(
    auth_repo: tuple[dict[str, str], Path, str, dict[str, bytes]], tmp_path: Path, replaced: str
) -> None:
    """With the repository's auth key in the identity file, a config.json without a valid MAC
    is forged (exit 8) before any of its fields is believed: not "not encrypted: unset the
    identity", "upgrade immich-stream" or "choose another S3_PREFIX", advice that leads a
    user away from the real repository."""
    import json

    env, _offline, sid, _files = auth_repo
    bucket = bucket_of(env)
    cfg = json.loads(bucket.get("config.json"))
    bucket.put("config.json", REPLACED_CONFIGS[replaced](cfg))
    for args in (["snapshots"], ["restore", sid, "--to", str(tmp_path / "t")]):
        r = run_cli(*args, env=env)
        assert r.code == EXIT_FORGED, (args, r.err)
        assert "config.json" in r.last_error, r.err
    assert not (tmp_path / "t").exists()


# -- 6: the database's row count before the stop has a deadline ----------------------------------


def test_a_row_count_blocked_by_a_table_lock_fails_the_backup_before_the_stop(
    env: dict[str, str], stack: ImmichStack
) -> None:
    """Another session holds ACCESS EXCLUSIVE on `assets` (a migration, an admin's open
    transaction): the shrink guard's count before the stop waits on it. The backup fails
    within the stall timeout with one line saying so, nothing stopped, no snapshot; it never
    hangs holding its repository lock."""
    make_library(stack.library, photos=3, odd_names=False)
    assert run_cli("backup", "--stop", "none", env=env).code == 0
    bucket = bucket_of(env)
    [good] = bucket.snapshots()
    holder = subprocess.Popen(
        ["docker", "exec", "-i", "immich_postgres", "psql", "-U", "postgres", "-d", "immich", "-X", "-q"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdin is not None
        holder.stdin.write("BEGIN; LOCK TABLE assets IN ACCESS EXCLUSIVE MODE;\n")
        holder.stdin.flush()
        held = "SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND relation = 'assets'::regclass"
        wait_for(lambda: stack.psql(held) == "1", 30, what="the table lock")
        before = stack.started_at()
        started = time.monotonic()
        r = run_cli("backup", env=dict(env, IMMICH_STREAM_STALL_TIMEOUT="8s"), timeout=120)
        assert r.code == 1, r.err
        assert time.monotonic() - started < 60
        errors = [ln for ln in r.err.splitlines() if ln.startswith("immich-stream: error:")]
        assert len(errors) == 1 and "nothing was stopped" in errors[0] and "run again" in errors[0], r.err
        assert stack.started_at() == before and running_containers() == set(CONTAINERS)
        assert bucket.snapshots() == [good] and not bucket.keys("locks/")
        # the server ends the abandoned count itself: no session is left queued on the table
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        wait_for(lambda: stack.psql(waiting) == "0", 30, what="no session left waiting on the lock")
    finally:
        holder.communicate("ROLLBACK;\n", timeout=30)


# -- 7: prune on SeaweedFS keeps the objects of old raw-backslash keys ----------------------------


def test_prune_on_seaweedfs_keeps_objects_that_old_manifests_name_with_a_backslash(
    s3_env: dict[str, str], seaweed_s3, tmp_path: Path
) -> None:
    """Snapshots written before keys escaped `\\` recorded the raw key; SeaweedFS stores and
    lists it with `/`. prune must count that listed key as the one the manifest names, never
    delete the object of a kept snapshot; restore then still brings the file back."""
    import json

    env = dict(s3_env, S3_ENDPOINT_URL=seaweed_s3.endpoint, S3_BUCKET=seaweed_s3.new_bucket())
    entries = photos(3)
    sid = write_snapshot(env, entries, hours_ago=2)
    write_snapshot(env, photos(2, "newer"), hours_ago=1)
    bucket = bucket_of(env)
    key = f"snapshots/{sid}/manifest.jsonl.gz"
    lines = [json.loads(ln) for ln in gzip.decompress(bucket.get(key)).splitlines() if ln]
    old = lines[0]
    body = bucket.get(old["key"])
    bucket.delete(old["key"])
    old["key"] = f"data/{sid}/library/upload/old\\p000.jpg"  # as an old version wrote it
    bucket.put(old["key"], body)  # SeaweedFS keeps it as .../old/p000.jpg
    listed = f"data/{sid}/library/upload/old/p000.jpg"
    assert listed in bucket.keys("data/")
    bucket.put(key, gzip.compress(b"".join(json.dumps(ln).encode() + b"\n" for ln in lines)))

    r = run_cli("prune", "--keep-last", "2", env=env)
    assert r.code == 0, r.err
    assert listed in bucket.keys("data/"), "prune deleted the object of a kept snapshot"
    target = tmp_path / "target"
    r = run_cli("restore", sid, "--to", str(target), env=env)
    assert r.code == 0, r.err
    assert restored(target) == {os.fsencode(f"library/{p}"): e.body for p, e in entries.items()}


# -- 8: trust on first use only when no other run holds the repository ----------------------------


def test_authentication_is_set_up_only_by_a_backup_alone_in_the_repository(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Trust on first use runs under a backup's SHARED lock: two backups at once could each
    create a different key (one identity file then fails the other's MACs). While another
    run holds a lock, a backup leaves the set-up to a later run; alone, it sets it up."""
    import json

    from immich_stream import config
    from immich_stream.repository.age import load_keys
    from immich_stream.repository.layout import new_snapshot_id
    from immich_stream.repository.locks import RepoLock
    from immich_stream.repository.repo import Repo
    from immich_stream.repository.session import LockSpec, open_repo
    from immich_stream.s3.options import StoreOptions
    from immich_stream.s3.store import Store

    own = tmp_path / "own.key"
    keygen(own)
    env = dict(s3_env, IMMICH_STREAM_AGE_IDENTITY=str(own))
    settings = config.load(environ=env)
    bucket = bucket_of(env)

    def backup_spec(run: str) -> LockSpec:
        return LockSpec("backup", exclusive=False, wait=5, run=run)

    async def main() -> tuple[bool, bool]:
        keys = load_keys(settings.age_identity, settings.age_recipients)
        async with Store(StoreOptions.from_settings(settings)) as store:
            repo = Repo(store, settings.prefix)
            await repo.ensure_config(keys)  # an encrypted repository written before authentication
            async with RepoLock(repo, "backup", exclusive=False, wait=5, run=new_snapshot_id()):  # another backup
                sid = new_snapshot_id()
                async with open_repo(settings, create_for=sid, lock=backup_spec(sid)):
                    pass
                with_other = "auth" in json.loads(bucket.get("config.json")) or "immich-stream-auth" in own.read_text()
        sid = new_snapshot_id()
        async with open_repo(settings, create_for=sid, lock=backup_spec(sid)):
            pass
        alone = "auth" in json.loads(bucket.get("config.json")) and "immich-stream-auth" in own.read_text()
        return with_other, alone

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", env["AWS_ACCESS_KEY_ID"])
        mp.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
        with_other, alone = asyncio.run(main())
    assert not with_other, "a backup set authentication up while another run held the repository"
    assert alone, "a backup alone did not set authentication up"
