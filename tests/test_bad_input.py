"""Bad input: one line `immich-stream: error: ...`, exit 2, before S3 or Docker is touched.

None of these needs Docker; the S3 clock test uses the rclone server through the fault proxy.
"""

from __future__ import annotations

import email.utils
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from immich_stream import config as cfg
from tests.conftest import S3Server, base_env, bucket_of
from tests.faultproxy import FaultProxy, any_request
from tests.helpers import Result, run_cli

# A wrong value for every setting: (in the environment, as a TOML literal in the config file).
# Where any text is valid (db_user, db_name) the wrong values are the ones Postgres cannot
# take: empty, a control character, longer than its 63 bytes. The TOML ones also cover wrong
# types (a number for a path, a boolean for a count, inf for a duration).
WRONG: dict[str, tuple[str, str]] = {
    "immich_dir": ("/no/such/immich", "5"),
    "library_dir": ("/no/such/library", '""'),
    "postgres_dir": ("/no/such/postgres", "[]"),
    "compose_file": ("/no/such/compose.yml", "5"),
    "env_file": ("/no/such/immich.env", "[]"),
    "project": ("My Immich", '"immich/app"'),
    "db_container": ("immich postgres", '"-x"'),
    "db_user": ("u" * 64, '""'),
    "db_name": ("immich\tdb", '"a\\nb"'),
    "bucket": ("s3://photos/backup", '"my bucket"'),
    "prefix": ("a/../b", '"a//b"'),
    "endpoint_url": ("ftp://example.com", '"http://user:hunter2@example.com"'),
    "region": ("eu central 1", '"EU-CENTRAL-1"'),
    "path_style": ("maybe", "1"),
    "verify_tls": ("nope", '"y"'),
    "live_pass": ("sometimes", "2"),
    "append_only": ("perhaps", "3"),
    "ca_bundle": ("/no/such/ca.pem", '""'),
    "stop": ("some", "1"),
    "external": ("yes", "1"),
    "checksum": ("crc32", "5"),
    "jobs": ("100000000", "0"),
    "part_size": ("8 parsecs", '"2GiB"'),
    "max_memory": ("64GiB", "true"),
    "lock_wait": ("-5s", "-5"),
    "stall_timeout": ("0", "inf"),
    "keep_last": ("-1", "1.5"),
    "keep_hourly": ("two", "-1"),
    "keep_daily": ("1.0", "true"),
    "keep_weekly": ("1e3", "false"),
    "keep_monthly": ("-3", '"x"'),
    "keep_yearly": ("yes", "[1]"),
    "keep_within": ("2weeks", "30"),
    "stale_after": ("0s", '"1m"'),
    "retries": ("50", "0"),
    "read_timeout": ("1s", '"2d"'),
    "max_shrink": ("0%", "true"),
    "max_unused": ("101%", '"half"'),
    "max_downtime": ("1s", "-1"),
    "ping_url": ("ftp://hc-ping.com/x", '"ntfy+https://ntfy.sh/"'),
    "metrics_file": ("/no/such/dir/immich.prom", '""'),
    "storage_class": ("GLACEIR", '"cold"'),
    "storage_class_library": ("fast", "1"),
    "storage_class_postgres": ("S3", "[]"),
    "thaw_days": ("0", "31"),
    "thaw_tier": ("fast", "1"),
    "lock_days": ("-1", "36501"),
    "lock_mode": ("legal-hold", "true"),
    "thaw_poll": ("1s", '"2d"'),
    "sse": ("aes", "true"),
    "sse_kms_key_id": ("two words", "5"),
    "sse_c_key_file": ("/no/such/key", '""'),
    "age_identity": ("/no/such/age-key.txt", '""'),
    "age_recipients": ("age1notakey", "5"),
    "limit_upload": ("-1", '"fast"'),
    "limit_download": ("1e6", "true"),
    "exclude": ("library", '["thumbs", "upload"]'),
    "copy_to": ("Offsite!", '["offsite"]'),
    "notify": ("json://user:hunter2@", '["hunter2"]'),
    "webhook": ("ftp://user:hunter2@example.com", '"http://"'),
    "on_success": ("/no/such/hook", '"backup-done | mail root"'),
    "on_failure": ("'unclosed", "5"),
    "hook_timeout": ("0s", '"2d"'),
    "notify_timeout": ("0.5s", '"11m"'),
}


def assert_usage_error(r: Result, *needles: str) -> None:
    """Exit 2, and stderr is exactly one line: the error naming the problem."""
    assert r.code == 2, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("immich-stream: error: "), r.err
    assert "Traceback" not in r.err and "internal error" not in r.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_every_setting_has_a_wrong_value() -> None:
    assert set(WRONG) == set(cfg.SPECS), "add a wrong value for the new setting to WRONG"


@pytest.mark.slow
@pytest.mark.parametrize("source", ["env", "toml"])
@pytest.mark.parametrize("name", list(WRONG))
def test_every_setting_refuses_a_wrong_value(tmp_path: Path, name: str, source: str) -> None:
    spec = cfg.SPECS[name]
    env = base_env(tmp_path)
    env.pop("IMMICH_STREAM_TEST_SHORT_DURATIONS")  # the floors a user gets
    if source == "env":
        env[spec.env[0]] = WRONG[name][0]
    else:
        conf = tmp_path / "config.toml"
        conf.write_text(f"[{spec.toml[0]}]\n{spec.toml[1]} = {WRONG[name][1]}\n")
        env["IMMICH_STREAM_CONFIG"] = str(conf)
    r = run_cli("config", env=env)
    assert_usage_error(r, name)
    assert "hunter2" not in r.err  # a password in an endpoint URL is never echoed


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        (
            "IMMICH_STREAM_STALL_TIMEOUT",
            "29s",
            "stall_timeout 29s (from env IMMICH_STREAM_STALL_TIMEOUT) is out of range: choose 30s to 1d",
        ),
        (
            "IMMICH_STREAM_STALE_AFTER",
            "59m",
            "stale_after 59m (from env IMMICH_STREAM_STALE_AFTER) is out of range: choose 1h to 365d",
        ),
        ("IMMICH_STREAM_LOCK_WAIT", "2d", "lock_wait 2d (from env IMMICH_STREAM_LOCK_WAIT) is out of range"),
        ("IMMICH_STREAM_JOBS", "257", "jobs 257 (from env IMMICH_STREAM_JOBS) is out of range: choose 1 to 256"),
        ("IMMICH_STREAM_RETRIES", "21", "retries 21 (from env IMMICH_STREAM_RETRIES) is out of range: choose 1 to 20"),
        ("IMMICH_STREAM_MAX_MEMORY", "9GiB", "max_memory 9.0 GiB (from env IMMICH_STREAM_MAX_MEMORY) is out of range"),
        ("IMMICH_STREAM_PART_SIZE", "2GiB", "part_size 2.0 GiB (from env IMMICH_STREAM_PART_SIZE) is out of range"),
        ("IMMICH_STREAM_MIN_PART_SIZE", "abc", "IMMICH_STREAM_MIN_PART_SIZE is invalid: 'abc' is not a size"),
        ("IMMICH_STREAM_MIN_PART_SIZE", "6MiB", "IMMICH_STREAM_MIN_PART_SIZE '6MiB' is out of range"),
        ("S3_REGION", "eu central 1", "region from env S3_REGION is invalid: 'eu central 1' is not a region name"),
        ("S3_ENDPOINT_URL", "http://", "endpoint_url from env S3_ENDPOINT_URL is invalid"),
        ("S3_ENDPOINT_URL", "https://bad_host.example.com", "has no valid host name"),
        (
            "IMMICH_STREAM_KEEP_WITHIN",
            "1w",
            "keep_within from env IMMICH_STREAM_KEEP_WITHIN is invalid: '1w' is not a duration",
        ),
    ],
)
def test_bounds_and_syntax_through_the_cli(tmp_path: Path, name: str, value: str, needle: str) -> None:
    env = base_env(tmp_path)
    env.pop("IMMICH_STREAM_TEST_SHORT_DURATIONS")  # the floors a user gets
    env[name] = value
    assert_usage_error(run_cli("config", env=env), needle)


@pytest.mark.slow
def test_keep_daily_true_in_toml_is_not_a_count(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("[prune]\nkeep_daily = true\n")
    assert_usage_error(
        run_cli("prune", "--config", str(conf), env=base_env(tmp_path)),
        f"keep_daily from config file {conf} is invalid: True is not a whole number",
    )


# -- refused before anything is touched -------------------------------------------------------


class Listener:
    """A TCP port and a Unix socket nobody answers on: a client that connects is seen."""

    def __init__(self, tmp: Path) -> None:
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix_path = str(tmp / "docker.sock")
        self.unix.bind(self.unix_path)
        self.unix.listen()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.tcp.getsockname()[1]}"

    def connections(self) -> int:
        n = 0
        for s in (self.tcp, self.unix):
            s.setblocking(False)
            try:
                while True:
                    s.accept()[0].close()
                    n += 1
            except BlockingIOError:
                pass
        return n

    def close(self) -> None:
        self.tcp.close()
        self.unix.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    lst = Listener(tmp_path)
    yield lst
    lst.close()


@pytest.fixture
def untouched_env(tmp_path: Path, listener: Listener) -> dict[str, str]:
    """S3 and Docker both point at the listener; an Immich directory that exists."""
    immich = tmp_path / "immich-app"
    (immich / "library").mkdir(parents=True)
    (immich / "postgres").mkdir()
    env = base_env(tmp_path)
    env.update(
        {
            "IMMICH_DIR": str(immich),
            "LIBRARY_DIR": str(immich / "library"),
            "POSTGRES_DIR": str(immich / "postgres"),
            "S3_BUCKET": "photos",
            "S3_ENDPOINT_URL": listener.endpoint,
            "DOCKER_HOST": f"unix://{listener.unix_path}",
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
            "IMMICH_STREAM_RETRIES": "1",
        }
    )
    return env


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "extra", "needle"),
    [
        (["backup"], {"IMMICH_STREAM_JOBS": "100000000"}, "jobs 100000000"),
        (["backup"], {"IMMICH_STREAM_STALL_TIMEOUT": "0"}, "stall_timeout 0s"),
        (["backup", "--prune", "--keep-within", "2weeks"], {}, "keep_within from flag --keep-within is invalid"),
        (["backup"], {"S3_REGION": "eu central 1"}, "region from env S3_REGION"),
        (["prune", "--keep-daily", "2.5"], {}, "keep_daily from flag --keep-daily is invalid"),
        (["restore", "--database"], {"DB_NAME": "x" * 64}, "db_name from env DB_NAME is invalid"),
    ],
)
def test_bad_input_is_refused_before_s3_or_docker_is_touched(
    untouched_env: dict[str, str],
    listener: Listener,
    args: list[str],
    extra: dict[str, str],
    needle: str,
) -> None:
    r = run_cli(*args, env={**untouched_env, **extra}, timeout=30)
    assert_usage_error(r, needle)
    assert listener.connections() == 0  # neither S3 nor Docker heard from it


# -- local paths a command would write ---------------------------------------------------------


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a read-only bind mount: not writable even for root."""
    src, ro = tmp_path / "ro-src", tmp_path / "ro"
    src.mkdir()
    (src / "existing").mkdir()
    ro.mkdir()
    proc = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {proc.stderr.strip()}")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.slow
def test_restore_to_a_read_only_place(untouched_env: dict[str, str], listener: Listener, read_only_dir: Path) -> None:
    for target in (read_only_dir / "new" / "dir", read_only_dir / "existing"):
        r = run_cli("restore", "--to", str(target), env=untouched_env, timeout=30)
        assert_usage_error(r, f"restore --to {target}:", "is not writable (read-only file system)")
    assert listener.connections() == 0


@pytest.mark.slow
def test_restore_to_a_path_under_a_file(untouched_env: dict[str, str], listener: Listener, tmp_path: Path) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for target in (afile / "restore", afile):
        r = run_cli("restore", "--to", str(target), env=untouched_env, timeout=30)
        assert_usage_error(r, f"restore --to {target}: {afile} is not a directory")
    assert listener.connections() == 0
    assert afile.read_text() == "x"


@pytest.mark.slow
def test_dump_to_an_unwritable_or_missing_place(
    untouched_env: dict[str, str], listener: Listener, tmp_path: Path, read_only_dir: Path
) -> None:
    cases = [
        (
            read_only_dir / "dump.sql.gz",
            f"restore --dump-to {read_only_dir / 'dump.sql.gz'}: {read_only_dir} is not "
            "writable (read-only file system)",
        ),
        (tmp_path / "no" / "such" / "dump.sql.gz", f"directory {tmp_path / 'no' / 'such'} does not exist"),
        (tmp_path, f"restore --dump-to {tmp_path} is a directory: give a file name"),
    ]
    for dest, needle in cases:
        r = run_cli("restore", "--dump-to", str(dest), env=untouched_env, timeout=30)
        assert_usage_error(r, needle)
    assert listener.connections() == 0
    assert not (tmp_path / "no").exists()


@pytest.mark.slow
def test_backup_refuses_a_state_dir_it_cannot_create(
    untouched_env: dict[str, str], listener: Listener, tmp_path: Path
) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("x")
    env = {**untouched_env, "IMMICH_STREAM_STATE_DIR": str(afile / "state")}
    r = run_cli("backup", env=env, timeout=30)
    assert_usage_error(r, "state directory (IMMICH_STREAM_STATE_DIR)", f"{afile} is not a directory")
    assert listener.connections() == 0


# -- where the state lives --------------------------------------------------------------------


# -- a clock problem is not a network problem ------------------------------------------------


def is_get(method: str, path: str, query: dict[str, str]) -> bool:
    return method == "GET"


@pytest.mark.slow
def test_clock_skew_fails_at_once_with_a_clock_message(
    s3_env: dict[str, str], rclone_s3: S3Server, proxy_factory: type[FaultProxy]
) -> None:
    bucket_of(s3_env).put("config.json", json.dumps({"format": "immich-stream", "version": 1}).encode())
    proxy = proxy_factory(rclone_s3.endpoint)
    rule = proxy.add(is_get, status=403, code="RequestTimeTooSkewed")  # the HEAD of config.json passes
    env = {**s3_env, "S3_ENDPOINT_URL": proxy.endpoint, "IMMICH_STREAM_RETRIES": "6"}
    r = run_cli("snapshots", env=env, timeout=60)
    assert r.code == 1, (r.out, r.err)
    assert "this machine's clock is off (RequestTimeTooSkewed)" in r.last_error, r.err
    assert "date -u" in r.last_error and "NTP" in r.last_error
    assert rule.hits == 1, proxy.requests  # not retried


@pytest.mark.slow
def test_clock_skew_on_a_head_is_told_by_the_servers_date(
    s3_env: dict[str, str], rclone_s3: S3Server, proxy_factory: type[FaultProxy]
) -> None:
    # A HEAD's 403 has no body, and a server may answer a skewed GET with a plain AccessDenied:
    # S3's Date header, an hour after ours, is then the only hint. (Readers' first request is
    # the GET of config.json, no HEAD before it: one round trip less.)
    an_hour_on = email.utils.formatdate(time.time() + 3600, usegmt=True)
    proxy = proxy_factory(rclone_s3.endpoint)
    rule = proxy.add(any_request, status=403, code="AccessDenied", headers={"Date": an_hour_on})
    r = run_cli("snapshots", env={**s3_env, "S3_ENDPOINT_URL": proxy.endpoint}, timeout=60)
    assert r.code == 1, (r.out, r.err)
    assert "this machine's clock is off by 60 minutes (AccessDenied)" in r.last_error, r.err
    assert rule.hits == 1, proxy.requests


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["find"], "find needs a PATTERN (a glob such as 'IMG_4411*') or a catalog selector"),
        (["find", "IMG_1*", "--album", "Summer"], "find takes a PATTERN or the catalog's selectors, not both"),
        (["find", "--album", "Summer", "--all"], "find with the catalog's selectors looks in one snapshot"),
    ],
)
def test_find_refuses_a_pattern_and_selectors_mixed_before_s3_is_asked(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    # the same find answers paths (PATTERN, every snapshot) and assets (selectors, one snapshot)
    assert_usage_error(run_cli(*args, env=base_env(tmp_path)), needle)
