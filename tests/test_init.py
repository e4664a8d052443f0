"""`init` (issue 27): one step from an empty bucket to an encrypted repository and a config
file, checked live first; every other command refuses a bucket/prefix without a repository;
the README's quick start, run as written on the test stack.

These tests unset IMMICH_STREAM_TEST_AUTO_INIT (tests/conftest.py sets it so the rest of the
suite may back up into fresh buckets without an init each)."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import stat
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import CONTAINERS, ImmichStack, base_env, bucket_of, running_containers
from tests.helpers import REPO_ROOT, make_library, run_cli, tree
from tests.iam import IamServer

NO_REPOSITORY = 9


def fresh(env: dict[str, str]) -> dict[str, str]:
    """The environment of a user's host: no test shortcut that creates a repository."""
    out = dict(env)
    out.pop("IMMICH_STREAM_TEST_AUTO_INIT", None)
    return out


def recovery_of(out: str) -> str:
    """The recovery identity init printed (its indented lines after the RECOVERY KEY line)."""
    lines = out.split("RECOVERY KEY", 1)[1].splitlines()[1:]
    body = [ln.strip() for ln in lines if ln.startswith("    ")]
    assert body and body[-1].startswith("# immich-stream-auth: "), out
    return "\n".join(body) + "\n"


@pytest.mark.slow
def test_init_creates_an_encrypted_repository_and_a_config_and_refuses_a_second(
    tmp_path: Path, s3_env: dict[str, str]
) -> None:
    env = fresh(s3_env)
    r = run_cli("init", env=env, timeout=60)
    assert r.code == 0, r.out + r.err
    bucket = bucket_of(env)
    config = json.loads(bucket.get("config.json"))
    assert config["version"] == 2 and len(config["encryption"]["recipients"]) == 2 and "auth" in config
    toml_path = Path(env["XDG_CONFIG_HOME"]) / "immich-stream" / "config.toml"
    written = tomllib.loads(toml_path.read_text())
    identity = Path(written["encryption"]["identity_file"])
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert written["s3"]["bucket"] == env["S3_BUCKET"] and written["prune"]["keep_daily"] == 7
    assert f"created age identity {identity}" in r.out and f"created config file {toml_path}" in r.out
    recovery = recovery_of(r.out)
    secret = next(ln for ln in recovery.splitlines() if ln.startswith("AGE-SECRET-KEY-1"))
    assert secret not in identity.read_text() and secret not in toml_path.read_text()
    assert "Keep it away from this machine" in r.out

    again = run_cli("init", env=env, timeout=60)
    assert again.code == 2 and "a repository exists at s3://" in again.last_error, again.err
    assert json.loads(bucket.get("config.json")) == config  # untouched
    forced = run_cli("init", "--force", env=env, timeout=60)
    assert forced.code == 0 and "nothing to create" in forced.out and "it opens" in forced.out, forced.err

    # key export --paper: typed back, it opens the repository like the file itself
    paper = run_cli("key", "export", "--paper", env=env)
    assert paper.code == 0, paper.err
    secret, auth, part = [], [], None
    for line in paper.out.splitlines():
        if line.startswith(("key 1:", "auth")):
            part = secret if line.startswith("key") else auth
        elif part is not None and (m := re.match(r"\s+\d+\s{2}(.*)$", line)):
            part.append(m.group(1).replace(" ", ""))
    typed = tmp_path / "typed.txt"
    text = "AGE-SECRET-KEY-1" + "".join(secret) + "\n# immich-stream-auth: " + "".join(auth) + "\n"
    typed.write_text(text)
    typed.chmod(0o600)
    shown = run_cli("snapshots", env={**env, "IMMICH_STREAM_AGE_IDENTITY": str(typed)})
    assert shown.code == 0 and "0 snapshots" in shown.out and "encrypted (age)" in shown.out, shown.err


@pytest.mark.slow
def test_init_plaintext_is_shown_by_snapshots_and_doctor(s3_env: dict[str, str]) -> None:
    env = fresh(s3_env)
    r = run_cli("init", "--plaintext", env=env, timeout=60)
    assert r.code == 0 and "NOT encrypted" in r.out and "RECOVERY" not in r.out, r.out + r.err
    assert "encryption" not in bucket_of(env).get("config.json").decode()
    shown = run_cli("snapshots", env=env)
    assert shown.code == 0 and "NOT encrypted" in shown.out, shown.out + shown.err
    doc = run_cli("doctor", env=env, timeout=60)
    assert re.search(r"repository .*NOT encrypted", doc.out), doc.out


def test_init_refuses_a_bucket_it_cannot_write(tmp_path: Path, iam_s3: IamServer) -> None:
    env = fresh(iam_s3.env(base_env(tmp_path), iam_s3.read_key, "init-read-only"))
    env["S3_PATH_STYLE"] = "true"
    r = run_cli("init", env=env, timeout=60)
    assert r.code == 2, r.out + r.err
    assert "cannot write (s3:PutObject)" in r.last_error and "nothing was written" in r.last_error, r.err
    assert iam_s3.view("init-read-only").keys() == {}
    assert not (Path(env["XDG_CONFIG_HOME"]) / "immich-stream").exists()


def test_commands_refuse_a_prefix_without_a_repository_before_stopping_anything(
    tmp_path: Path, env: dict[str, str], stack: ImmichStack
) -> None:
    env = fresh(env)
    make_library(stack.library, photos=3, odd_names=False)
    before = stack.started_at()
    where = f"s3://{env['S3_BUCKET']}/immich-backup"
    line = f"immich-stream: error: no repository at {where}: run `immich-stream init`, or check S3_PREFIX"
    commands = [("backup",), ("restore", "latest", "--to", str(tmp_path / "out")), ("drill",), ("verify",)]
    for args in (*commands, ("prune", "--keep-last", "1"), ("unlock",), ("key", "show")):
        r = run_cli(*args, env=env, timeout=60)
        assert r.code == NO_REPOSITORY and r.last_error == line, (args, r.code, r.err)
    assert stack.started_at() == before  # nothing was stopped
    assert bucket_of(env).keys() == {}  # nothing was written, not even a probe


def quick_start() -> list[str]:
    """The README's quick start: the lines of the block after <!-- quick-start ... -->."""
    text = (REPO_ROOT / "README.md").read_text()
    block = text.split("<!-- quick-start", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip()]


def test_the_readme_quick_start_ends_in_a_passing_drill_and_the_recovery_key_restores_elsewhere(
    tmp_path: Path, env: dict[str, str], stack: ImmichStack
) -> None:
    commands = quick_start()
    assert len(commands) <= 5 and "pip install" in commands[0], commands
    assert [shlex.split(c)[:2] for c in commands[1:]] == [
        ["immich-stream", "init"],
        ["immich-stream", "doctor"],
        ["immich-stream", "backup"],
        ["immich-stream", "drill"],
    ]
    written = make_library(stack.library, photos=4, odd_names=False)
    env = fresh(env)
    del env["IMMICH_DIR"]  # the quick start names it
    # The placeholders a reader replaces: the Immich folder and the bucket (the test's S3
    # server is in S3_ENDPOINT_URL, which wins over the preset's endpoint).
    places = {"/opt/immich": str(stack.dir), "my-photos-backup": env.pop("S3_BUCKET")}
    outputs = []
    for command in commands[1:]:  # the install line: this checkout is installed in the venv already
        args = [places.get(a, a) for a in shlex.split(command)[1:]]
        t0 = time.monotonic()
        r = run_cli(*args, env=env, timeout=180)
        print(f"quick start: {command}: exit {r.code} in {time.monotonic() - t0:.1f} s")  # seen with -s
        assert r.code == 0, (command, r.out, r.err)
        outputs.append(r.out)
    assert running_containers() >= set(CONTAINERS)  # the backup started the stack again

    # A fresh host: no config file, no key file; the printed recovery identity and the S3 settings.
    recovery = tmp_path / "recovery.txt"
    recovery.write_text(recovery_of(outputs[0]))
    recovery.chmod(0o600)
    (tmp_path / "fresh").mkdir()
    host = base_env(tmp_path / "fresh")
    host.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL", "S3_PATH_STYLE")})
    host.update({"S3_BUCKET": places["my-photos-backup"], "IMMICH_STREAM_AGE_IDENTITY": str(recovery)})
    host.pop("IMMICH_STREAM_TEST_AUTO_INIT")
    target = tmp_path / "restored"
    r = run_cli("restore", "latest", "--root", "library", "--to", str(target), env=host, timeout=120)
    assert r.code == 0, r.out + r.err
    restored = tree(target)
    for rel, digest in written.items():
        assert hashlib.sha256(restored[rel].read_bytes()).hexdigest().encode() == digest, rel
    without = run_cli("snapshots", env={**host, "IMMICH_STREAM_AGE_IDENTITY": ""}, timeout=60)
    assert without.code == 2 and "encrypted with age" in without.last_error, without.err
