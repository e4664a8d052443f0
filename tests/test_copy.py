"""A second copy (3-2-1): `copy --to NAME` and `backup --copy-to NAME` into a named repository
on another S3 server (a second `rclone serve s3` with credentials of its own), or on the
same one (CopyObject); the copy verifies with --read-data and restores byte for byte, and a
copy killed midway is never a snapshot there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import KEY, SECRET, ImmichStack, _tool, free_port, running_containers, wait_port
from tests.faultproxy import FaultProxy
from tests.helpers import Bucket, make_library, run_cli, start_cli, tree, wait_for

OFF_KEY, OFF_SECRET = "offsite-key", "offsite-secret-never-logged"
AGE_MAGIC = b"age-encryption.org/v1\n"


class Offsite:
    """A second S3 server, with credentials of its own (the main ones are refused there)."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                *(_tool("rclone"), "serve", "s3", str(root), "--addr", f"127.0.0.1:{self.port}"),
                *("--config", "/dev/null", "--auth-key", f"{OFF_KEY},{OFF_SECRET}", "--log-level", "ERROR"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def bucket(self, name: str, endpoint: str | None = None) -> Bucket:
        b = Bucket(endpoint or self.endpoint, name, OFF_KEY, OFF_SECRET)
        b.s3.create_bucket(Bucket=name)
        return b


@pytest.fixture(scope="module")
def offsite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Offsite]:
    server = Offsite(tmp_path_factory.mktemp("offsite"))
    try:
        yield server
    finally:
        server.proc.terminate()
        server.proc.wait(10)


def with_repos(env: dict[str, str], tmp_path: Path, **repos: dict[str, str]) -> dict[str, str]:
    """env with a config file declaring [repositories.NAME] tables."""
    text = ""
    for name, table in repos.items():
        text += f"[repositories.{name}]\n" + "".join(f'{k} = "{v}"\n' for k, v in table.items())
        text += "path_style = true\n"
    path = tmp_path / "config.toml"
    path.write_text(text)
    return dict(
        env,
        IMMICH_STREAM_CONFIG=str(path),
        IMMICH_STREAM_REPO_OFFSITE_ACCESS_KEY_ID=OFF_KEY,
        IMMICH_STREAM_REPO_OFFSITE_SECRET_ACCESS_KEY=OFF_SECRET,
    )


def counted(proxy: FaultProxy) -> list[tuple[str, str, int]]:
    """The proxy's requests so far, emptied."""
    seen = list(proxy.requests)
    proxy.requests.clear()
    return seen


def data_puts(requests: list[tuple[str, str, int]]) -> set[str]:
    return {
        urllib.parse.unquote(p.split("?")[0].split("/immich-backup/", 1)[1])
        for m, p, _ in requests
        if m == "PUT" and "/data/" in p
    }


def data_keys_sent(requests: list[tuple[str, str, int]]) -> list[str]:
    """The data/ keys of PutObject and CreateMultipartUpload requests, each as often as sent."""
    return [
        urllib.parse.unquote(p.split("?")[0].split("/immich-backup/", 1)[1])
        for m, p, _ in requests
        if "/data/" in p and ((m == "PUT" and "uploadId" not in p) or (m == "POST" and p.endswith("?uploads")))
    ]


def repository_objects(b: Bucket) -> dict[str, int]:
    """What a repository is made of: config.json, data/, committed snapshots' objects."""
    committed = set(b.snapshots())
    return {
        k: n
        for k, n in b.keys().items()
        if k == "config.json" or k.startswith("data/") or (k.startswith("snapshots/") and k.split("/")[1] in committed)
    }


def test_copy_after_each_backup_copies_only_what_is_new_survives_a_kill_and_restores(
    env: dict[str, str], stack: ImmichStack, offsite: Offsite, tmp_path: Path, proxy_factory: type[FaultProxy]
) -> None:
    src = Bucket(env["S3_ENDPOINT_URL"], env["S3_BUCKET"], KEY, SECRET)
    proxy = proxy_factory(offsite.endpoint)
    dst = offsite.bucket("offsite-1", proxy.endpoint)
    env = with_repos(env, tmp_path, offsite={"endpoint_url": proxy.endpoint, "bucket": "offsite-1"})
    make_library(stack.library, seed=3, photos=6, odd_names=True)

    held: set[str] = set()
    for night in range(3):
        if night:  # new photos each night
            big = [600_000] * 6 if night == 1 else []  # objects of their own (not packed): a copy to cut
            make_library(stack.library / "library" / f"n{night}", seed=night, photos=3, odd_names=False, large=big)
        r = run_cli("backup", "--stop", "none", env=env)
        assert r.code == 0, r.err
        new_at_source = set(src.keys("data/")) - held
        counted(proxy)
        if night == 1:  # killed midway: the data objects are on their way, no snapshot.json yet
            proxy.add(lambda m, p, q: m == "PUT" and "/data/" in p, delay=0.3)
            proc = start_cli("copy", "--to", "offsite", "--jobs", "2", env=env)
            wait_for(lambda: len(data_puts(proxy.requests)) >= 2, 60, 0.02, "the copy's first uploads")
            assert proc.poll() is None
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proxy.rules.clear()
            assert len(src.snapshots()) == 2 and len(dst.snapshots()) == 1, "a cut copy is no snapshot there"
            r = run_cli("snapshots", "--repo", "offsite", env=env)
            assert r.code == 0 and src.snapshots()[-1] not in r.out, r.out
            counted(proxy)
            before_rerun = set(dst.keys("data/")) & new_at_source  # what the killed copy landed there
            assert before_rerun and before_rerun < new_at_source
            # what the killed copy left is garbage to the destination's prune (asked, not done),
            # once older than --stale-after (its objects' LastModified: seconds)
            time.sleep(2.1)
            r = run_cli(
                "prune", "--repo", "offsite", "--keep-last", "9", "--stale-after", "1s", "--dry-run", "--json", env=env
            )
            assert r.code == 0, r.err
            rep = json.loads(r.out)["summary"]
            assert rep["kept"] == dst.snapshots() and rep["objects_deleted"] == len(before_rerun), rep
        r = run_cli("copy", "--to", "offsite", env=env)
        assert r.code == 0, r.err
        puts = data_puts(counted(proxy))
        if night == 1:  # the rerun copies only what the killed copy had not
            assert puts == new_at_source - before_rerun, (puts, new_at_source, before_rerun)
        else:
            assert puts == new_at_source, "only the new night's objects are sent"
        held |= new_at_source
        assert "1 snapshots copied" in r.out, r.out
        assert f"({night} there already)" in r.out if night else "there already" not in r.out, r.out
        assert repository_objects(dst) == repository_objects(src)

    assert dst.snapshots() == src.snapshots() and len(dst.snapshots()) == 3
    assert OFF_SECRET not in r.err and OFF_SECRET not in r.out
    r = run_cli("verify", "--repo", "offsite", "--all", "--read-data", env=env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err
    target = tmp_path / "restored"
    r = run_cli("restore", "--repo", "offsite", "latest", "--root", "library", "--to", str(target), env=env)
    assert r.code == 0, r.err
    theirs, ours = tree(target), tree(stack.library)
    assert theirs.keys() == ours.keys()
    assert all(theirs[k].read_bytes() == ours[k].read_bytes() for k in ours if ours[k].is_file())


def test_encrypted_copy_stays_encrypted_streamed_or_server_side(
    env: dict[str, str],
    stack: ImmichStack,
    offsite: Offsite,
    tmp_path: Path,
    proxy_factory: type[FaultProxy],
) -> None:
    from tests.test_encryption import keygen

    identity = tmp_path / "id.key"
    keygen(identity)
    # the source through a proxy that sees both buckets of its server: copies there are CopyObject
    local = proxy_factory(env["S3_ENDPOINT_URL"])
    puts = local.add(lambda m, p, q: m == "PUT")
    same = Bucket(env["S3_ENDPOINT_URL"], "same-" + env["S3_BUCKET"], KEY, SECRET)
    same.s3.create_bucket(Bucket=same.name)
    far = proxy_factory(offsite.endpoint)
    dst = offsite.bucket("offsite-enc")
    env = with_repos(
        dict(env, S3_ENDPOINT_URL=local.endpoint, IMMICH_STREAM_AGE_IDENTITY=str(identity)),
        tmp_path,
        offsite={"endpoint_url": far.endpoint, "bucket": "offsite-enc"},
        second={"endpoint_url": local.endpoint, "bucket": same.name},
    )
    make_library(stack.library, seed=5, photos=5, odd_names=False, large=[9 << 20])
    r = run_cli("backup", "--stop", "none", "--part-size", "6MiB", env=env)
    assert r.code == 0, r.err

    # a part the destination keeps refusing: one line, and no multipart upload left behind
    refused = far.add(lambda m, p, q: m == "PUT" and "partNumber" in q, status=500)
    r = run_cli("copy", "--to", "offsite", "--part-size", "6MiB", env=env)
    assert r.code == 1 and refused.hits and "upload part" in r.last_error, r.err
    assert dst.open_multipart_uploads() == [] and dst.snapshots() == []
    far.rules.clear()
    r = run_cli("copy", "--to", "offsite", "--part-size", "6MiB", env=env)  # another server: streamed
    assert r.code == 0, r.err
    assert "server-side" not in r.out, r.out
    objects = dst.keys()
    assert any(n > 6 << 20 for n in objects.values()), "a multipart copy"
    for key in objects:
        body = dst.get(key)
        if key == "config.json":
            assert b'"recipients"' in body
        else:
            assert body.startswith(AGE_MAGIC), f"{key} is not an age file"
    assert dst.open_multipart_uploads() == []
    r = run_cli("verify", "--repo", "offsite", "--read-data", env=env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err

    puts.headers_seen.clear()
    local.requests.clear()
    r = run_cli("copy", "--to", "second", env=env)  # one endpoint, one set of credentials: CopyObject
    assert r.code == 0, r.err
    copies = [h for h in puts.headers_seen if "x-amz-copy-source" in h]
    data = [k for k in same.keys() if not k.startswith("locks/") and k != "config.json"]
    assert len(copies) == len(data) > 0, (len(copies), data)
    assert not [p for m, p, _ in local.requests if m == "GET" and "/data/" in p], "no byte came through this host"
    assert {k: same.get(k) for k in data} == {
        k: Bucket(env["S3_ENDPOINT_URL"], env["S3_BUCKET"], KEY, SECRET).get(k) for k in data
    }
    r = run_cli("verify", "--repo", "second", "--read-data", env=env)
    assert r.code == 0, r.out + r.err


def test_copy_to_a_repository_with_its_own_keys_reseals_every_object(
    env: dict[str, str], stack: ImmichStack, offsite: Offsite, tmp_path: Path, proxy_factory: type[FaultProxy]
) -> None:
    from tests.test_encryption import keygen

    ours, theirs = tmp_path / "ours.key", tmp_path / "theirs.key"
    keygen(ours), keygen(theirs)
    offline = keygen(tmp_path / "offline.key")  # two recipients there, one here: other sizes
    proxy = proxy_factory(offsite.endpoint)
    dst = offsite.bucket("offsite-sealed", proxy.endpoint)
    env = with_repos(
        dict(env, IMMICH_STREAM_AGE_IDENTITY=str(ours)),
        tmp_path,
        offsite={
            "endpoint_url": proxy.endpoint,
            "bucket": dst.name,
            "identity_file": str(theirs),
            "recipients": offline,
        },
    )
    src = Bucket(env["S3_ENDPOINT_URL"], env["S3_BUCKET"], KEY, SECRET)
    make_library(stack.library, seed=9, photos=4, odd_names=False, large=[700_000])
    before: set[str] = set()
    for night in range(3):
        if night:
            big = [800_000 + night]
            make_library(stack.library / "library" / f"n{night}", seed=night, photos=1, odd_names=False, large=big)
        r = run_cli("backup", "--stop", "none", env=env)
        assert r.code == 0, r.err
        if night == 0:
            continue  # the first copy takes two snapshots at once
        counted(proxy)
        r = run_cli("copy", "--to", "offsite", env=env)
        assert r.code == 0, r.err
        sent = data_keys_sent(counted(proxy))
        assert sorted(sent) == sorted(set(src.keys("data/")) - before), "each new object once, nothing held again"
        before = set(src.keys("data/"))
    assert "# immich-stream-auth:" in theirs.read_text(), "the new repository's own authentication key"
    assert dst.snapshots() == src.snapshots()
    key = next(k for k in dst.keys("data/") if "/library/" in k)
    sealed = dst.get(key)
    assert sealed.startswith(AGE_MAGIC) and sealed != src.get(key), "sealed again, not copied"
    for identity, opens in ((theirs, True), (ours, False)):
        p = subprocess.run(["age", "-d", "-i", str(identity)], input=sealed, capture_output=True)
        assert (p.returncode == 0) == opens, p.stderr
    r = run_cli("verify", "--repo", "offsite", "--all", "--read-data", env=env)
    assert r.code == 0 and "no problems" in r.out, r.out + r.err
    target = tmp_path / "restored"
    r = run_cli("restore", "--repo", "offsite", "latest", "--root", "library", "--to", str(target), env=env)
    assert r.code == 0, r.err
    assert {k: v.read_bytes() for k, v in tree(target).items() if v.is_file()} == {
        k: v.read_bytes() for k, v in tree(stack.library).items() if v.is_file()
    }
    # its MACs are made with its own authentication key: ours does not vouch for them
    with_repos(env, tmp_path, offsite={"endpoint_url": proxy.endpoint, "bucket": dst.name})
    r = run_cli("snapshots", "--repo", "offsite", env=env)
    assert r.code == 8 and "config.json carries no valid MAC" in r.last_error, r.err


def test_backup_copy_to_runs_after_the_stack_is_up_and_a_dead_destination_exits_6(
    env: dict[str, str], stack: ImmichStack, offsite: Offsite, tmp_path: Path, proxy_factory: type[FaultProxy]
) -> None:
    proxy = proxy_factory(offsite.endpoint)
    up_at_first_put: list[set[str]] = []

    def first_put(m: str, p: str, q: dict[str, str]) -> bool:
        if m == "PUT" and "/data/" in p and not up_at_first_put:
            up_at_first_put.append(running_containers())
        return False

    proxy.add(first_put)
    dst = offsite.bucket("offsite-2", proxy.endpoint)
    dead = f"http://127.0.0.1:{free_port()}"  # a stopped server
    env = with_repos(
        env,
        tmp_path,
        offsite={"endpoint_url": proxy.endpoint, "bucket": "offsite-2"},
        dead={"endpoint_url": dead, "bucket": "gone"},
    )
    make_library(stack.library, seed=7, photos=4, odd_names=False)
    metrics = tmp_path / "m.prom"
    r = run_cli(
        "backup", "--stop", "app", "--copy-to", "offsite", "--copy-to", "dead", "--metrics-file", str(metrics), env=env
    )
    src = Bucket(env["S3_ENDPOINT_URL"], env["S3_BUCKET"], KEY, SECRET)
    assert r.code == 6, r.err
    sid = src.snapshots()[-1]
    assert r.last_error.startswith(f"immich-stream: error: snapshot {sid} committed, but the copy to dead failed")
    assert len([ln for ln in r.err.splitlines() if "error:" in ln]) == 1, r.err
    assert dst.snapshots() == [sid]
    assert up_at_first_put == [set(running_containers())] and "immich_server" in up_at_first_put[0]
    text = metrics.read_text()
    assert 'immich_stream_copy_ok{repository="offsite"} 1' in text
    assert 'immich_stream_copy_ok{repository="dead"} 0' in text
    assert 'immich_stream_copy_objects{repository="offsite"}' in text


@pytest.mark.slow
def test_named_repository_errors_are_one_line(s3_env: dict[str, str], tmp_path: Path) -> None:
    env = with_repos(s3_env, tmp_path, offsite={"bucket": "b", "endpoint_url": "http://127.0.0.1:1"})
    r = run_cli("copy", "--to", "nowhere", env=env)
    assert r.code == 2 and "no [repositories.nowhere]" in r.last_error, r.err
    r = run_cli("backup", "--copy-to", "nowhere", env=env)
    assert r.code == 2 and "copy_to nowhere" in r.last_error, r.err
    (tmp_path / "config.toml").write_text('[repositories.offsite]\nbucket = "b"\nsecret_access_key = "x"\n')
    r = run_cli("snapshots", "--repo", "offsite", env=env)
    assert (
        r.code == 2 and "secrets never go in the config file" in r.last_error and "x" not in r.last_error.split(":")[-1]
    )
    (tmp_path / "config.toml").write_text('[repositories.offsite]\nbucket = "b"\nbukcet = "c"\n')
    r = run_cli("snapshots", "--repo", "offsite", env=env)
    assert r.code == 2 and "did you mean bucket" in r.last_error, r.err
    env.pop("IMMICH_STREAM_REPO_OFFSITE_SECRET_ACCESS_KEY")
    (tmp_path / "config.toml").write_text('[repositories.offsite]\nbucket = "b"\n')
    r = run_cli("snapshots", "--repo", "offsite", env=env)
    assert r.code == 2 and "IMMICH_STREAM_REPO_OFFSITE_SECRET_ACCESS_KEY is not set" in r.last_error, r.err
    assert len(r.err.strip().splitlines()) == 1


def test_plain_to_encrypted_is_refused(s3_env: dict[str, str], offsite: Offsite, tmp_path: Path) -> None:
    """Judged on the two config.json alone (no backup needed): nothing is copied or created."""
    src = Bucket(s3_env["S3_ENDPOINT_URL"], s3_env["S3_BUCKET"], KEY, SECRET)
    src.put("config.json", json.dumps({"format": "immich-stream", "version": 1, "created": "2026"}).encode())
    dst = offsite.bucket("offsite-refuse")
    enc = {"scheme": "age-encryption.org/v1", "recipients": ["age1" + "q" * 58]}
    dst.put("config.json", json.dumps({"format": "immich-stream", "version": 2, "encryption": enc}).encode())
    env = with_repos(s3_env, tmp_path, offsite={"endpoint_url": offsite.endpoint, "bucket": "offsite-refuse"})
    r = run_cli("copy", "--to", "offsite", env=env)
    assert r.code == 2 and "is plain and the destination encrypted" in r.last_error, r.err
    assert set(dst.keys()) == {"config.json"} or all(k.startswith("locks/") for k in dst.keys() if k != "config.json")
