"""Monitoring: --json documents and progress events, pings to a real HTTP server on
loopback (healthchecks.io's protocol, Uptime Kuma push URLs, ntfy topics), the Prometheus
textfile, snapshots --check-age, and progress figures a person can read."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import CONTAINERS, KEY, SECRET, ImmichStack, S3Server, free_port, running_containers
from tests.helpers import REPO_ROOT, Bucket, make_library, run_cli, start_cli, tree, wait_for

MIB = 1024 * 1024


@dataclass
class Ping:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: str


@dataclass
class PingServer:
    """A real HTTP server on loopback that records every request (the monitoring side)."""

    status: int = 200
    requests: list[Ping] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def paths(self) -> list[str]:
        return [f"{p.method} {p.path}" for p in self.requests]


@pytest.fixture
def pings() -> Iterator[PingServer]:
    state = PingServer()

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            url = urllib.parse.urlsplit(self.path)
            state.requests.append(
                Ping(self.command, url.path, dict(urllib.parse.parse_qsl(url.query)), dict(self.headers), body)
            )
            self.send_response(state.status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        do_GET = do_POST = _record

        def log_message(self, *args: object) -> None:
            pass

    state.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=state.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.server.shutdown()
        state.server.server_close()
        thread.join(5)


def json_lines(text: str) -> list[dict]:
    """stderr under --json: every line a JSON object, but the one-line error."""
    return [json.loads(line) for line in text.splitlines() if line and not line.startswith("immich-stream: error:")]


# -- pings (no Docker: commands that need only S3) ---------------------------------------------


@pytest.mark.slow
def test_healthchecks_ping_start_then_success(s3_env: dict, pings: PingServer) -> None:
    r = run_cli("unlock", "--ping", f"{pings.url}/ping/abc-123", env=s3_env)
    assert r.code == 0, r.err
    assert pings.paths() == ["GET /ping/abc-123/start", "POST /ping/abc-123"]
    start, end = pings.requests
    assert start.query["rid"] == end.query["rid"]  # healthchecks.io pairs them: it measures the run
    assert "immich-stream/" in end.headers["User-Agent"]


@pytest.mark.slow
def test_failure_pings_fail_with_the_last_log_lines(s3_env: dict, pings: PingServer) -> None:
    s3_env["S3_BUCKET"] = "no-such-bucket-here"
    r = run_cli("prune", "--keep-last", "3", "--ping", f"{pings.url}/hc", env=s3_env)
    assert r.code == 1 and "no-such-bucket-here" in r.last_error
    assert pings.paths() == ["GET /hc/start", "POST /hc/fail"]
    assert r.last_error in pings.requests[1].body  # what a phone shows: the reason


@pytest.mark.slow
def test_config_file_ping_is_the_backups_only(s3_env: dict, pings: PingServer, tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(f'[monitor]\nping_url = "{pings.url}/nightly"\n')
    s3_env["IMMICH_STREAM_CONFIG"] = str(conf)
    assert run_cli("unlock", env=s3_env).code == 0
    assert pings.requests == [], "a manual unlock must not look like the nightly backup to the check"
    r = run_cli("config", env=s3_env)
    assert "/nightly" not in r.out and "(hidden)" in r.out  # a ping URL is a credential


@pytest.mark.slow
def test_a_dead_or_failing_ping_server_never_fails_the_run(s3_env: dict, pings: PingServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}/x"
    r = run_cli("unlock", "--ping", dead, env=s3_env)
    assert r.code == 0, r.err
    assert "monitoring ping to http://127.0.0.1/... failed" in r.err and "/x" not in r.err
    pings.status = 500
    r = run_cli("unlock", "--ping", pings.url + "/y", env=s3_env)
    assert r.code == 0 and "HTTP 500" in r.err
    assert len(pings.requests) == 4  # each ping tried twice: a 5xx may be passing


@pytest.mark.slow
def test_uptime_kuma_push_url(s3_env: dict, pings: PingServer) -> None:
    s3_env["S3_BUCKET"] = "no-such-bucket-here"
    r = run_cli("unlock", "--ping", f"{pings.url}/api/push/Tok3n?status=up&msg=OK&ping=", env=s3_env)
    assert r.code == 1
    [p] = pings.requests  # Kuma has no start signal
    assert p.method == "GET" and p.path == "/api/push/Tok3n"
    assert p.query["status"] == "down" and "no-such-bucket-here" in p.query["msg"]


@pytest.mark.slow
def test_ntfy_topic(s3_env: dict, pings: PingServer) -> None:
    r = run_cli("unlock", "--ping", f"ntfy+{pings.url}/immich-backups", env=s3_env)
    assert r.code == 0, r.err
    [p] = pings.requests
    assert p.method == "POST" and p.path == "/immich-backups"
    assert p.headers["Title"] == "immich-stream unlock ok" and p.headers["Priority"] == "low"


# -- --json and the metrics file without a stack -----------------------------------------------


@pytest.mark.slow
def test_json_document_of_a_failed_command(s3_env: dict) -> None:
    s3_env["S3_BUCKET"] = "no-such-bucket-here"
    r = run_cli("prune", "--keep-last", "3", "--json", env=s3_env)
    assert r.code == 1
    doc = json.loads(r.out)  # stdout is exactly one JSON document
    assert doc["exit_code"] == 1 and doc["ok"] is False and doc["command"] == "prune"
    assert "no-such-bucket-here" in doc["error"]
    json_lines(r.err)  # stderr: JSON lines, and the one error line a person reads


@pytest.mark.slow
def test_metrics_file_keeps_the_last_success_across_a_failure(s3_env: dict, tmp_path: Path) -> None:
    prom = tmp_path / "immich.prom"
    r = run_cli("unlock", "--metrics-file", str(prom), env=s3_env)
    assert r.code == 0, r.err
    first = prom.read_text()
    success = re.search(r'^immich_stream_last_success_timestamp_seconds\{command="unlock"\} (\S+)$', first, re.M)
    assert success and abs(float(success.group(1)) - time.time()) < 60
    assert 'immich_stream_last_exit_code{command="unlock"} 0' in first

    s3_env["S3_BUCKET"] = "no-such-bucket-here"
    r = run_cli("unlock", "--metrics-file", str(prom), env=s3_env)
    assert r.code == 1
    second = prom.read_text()
    assert 'immich_stream_last_exit_code{command="unlock"} 1' in second
    assert success.group(0) in second  # an alert on its age keeps firing
    assert second.count("# TYPE immich_stream_last_success_timestamp_seconds gauge") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".immich.prom")] == []  # written atomically


@pytest.mark.slow
def test_metrics_file_in_a_missing_directory_is_refused_up_front(s3_env: dict) -> None:
    r = run_cli("unlock", "--metrics-file", "/no/such/dir/immich.prom", env=s3_env)
    assert r.code == 2 and "metrics_file /no/such/dir/immich.prom" in r.last_error


# -- progress figures -------------------------------------------------------------------------


# -- the real stack ---------------------------------------------------------------------------


def test_backup_json_ping_metrics_and_check_age(
    env: dict, stack: ImmichStack, bucket: Bucket, pings: PingServer, tmp_path: Path
) -> None:
    make_library(stack.library, photos=10)
    prom = tmp_path / "immich.prom"
    r = run_cli("backup", "--json", "--ping", f"{pings.url}/hc", "--metrics-file", str(prom), env=env)
    assert r.code == 0, r.err
    [sid] = bucket.snapshots()
    doc = json.loads(r.out)
    assert doc["exit_code"] == 0 and doc["summary"]["id"] == sid and doc["problems"] == []
    assert doc["summary"]["files"]["new"] > 0 and doc["summary"]["database"]["compressed_size"] > 0
    events = json_lines(r.err)
    assert any(e["message_type"] == "log" and "committed" in e["message"] for e in events)
    [lib] = [e for e in events if e["message_type"] == "status" and e["phase"] == "library files" and e["done"]]
    files = len(tree(stack.library))
    assert lib["files_done"] == lib["total_files"] == files and lib["totals"] == "final"  # counted ahead
    assert lib["percent_done"] == 1.0 and lib["downtime_seconds"] > 0  # the apps were down meanwhile
    assert pings.paths() == ["GET /hc/start", "POST /hc"]
    assert f"snapshot {sid} committed" in pings.requests[1].body
    text = prom.read_text()
    assert f'immich_stream_snapshot_timestamp_seconds{{snapshot="{sid}"}}' in text
    assert (
        'immich_stream_backup_files{kind="new"}' in text and 'immich_stream_last_exit_code{command="backup"} 0' in text
    )
    success = re.search(r"^immich_stream_last_success_timestamp_seconds.*$", text, re.M)
    assert success

    r = run_cli("doctor", env=env)  # everything a backup needs is there: exit 0
    assert r.code == 0, r.out + r.err
    assert "1 snapshots, newest " + sid in r.out and r.out.rstrip().endswith("a backup would work")

    # An incremental run under cron: the parent's totals, a percentage, the human summary unchanged.
    r = run_cli("backup", env=env)
    assert r.code == 0, r.err
    assert re.search(rf"library files: done, {files} files of {files}, .* \(100%\)", r.err), r.err
    assert "committed (stop: all)" in r.out

    r = run_cli("snapshots", "--check-age", "36h", env=env)
    assert r.code == 0 and r.out.startswith("ok: the newest snapshot")
    time.sleep(2)
    r = run_cli("snapshots", "--check-age", "1s", env=env)
    assert r.code == 1 and r.out == ""
    assert len(r.err.strip().splitlines()) == 1 and "older than --check-age 1s" in r.last_error

    # S3 gone: the run fails, the check hears /fail, the metrics keep the last success.
    env["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    env["IMMICH_STREAM_RETRIES"] = "1"
    pings.requests.clear()
    r = run_cli("backup", "--ping", f"{pings.url}/hc", "--metrics-file", str(prom), env=env)
    assert r.code == 1
    assert running_containers() == set(CONTAINERS)
    assert pings.paths() == ["GET /hc/start", "POST /hc/fail"] and r.last_error in pings.requests[1].body
    text = prom.read_text()
    assert success.group(0) in text and 'immich_stream_last_exit_code{command="backup"} 1' in text
    assert f'snapshot="{sid}"' in text


# -- packaging --------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """The units as shipped, with ExecStart pointing at this checkout's installed command
    (verify checks that the program exists)."""
    exe = Path(sys.executable).parent / "immich-stream"
    service = (REPO_ROOT / "contrib/immich-stream.service").read_text()
    assert "Persistent=true" in (REPO_ROOT / "contrib/immich-stream.timer").read_text()
    assert "IOSchedulingClass=idle" in service and "TimeoutStopSec=10min" in service
    (tmp_path / "immich-stream.service").write_text(service.replace("/opt/immich-stream/bin/immich-stream", str(exe)))
    shutil.copy(REPO_ROOT / "contrib/immich-stream.timer", tmp_path)
    r = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "immich-stream.timer"), str(tmp_path / "immich-stream.service")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


@pytest.mark.slow
def test_schedule_runs_the_command_then_sleeps_until_the_next_time(s3_env: dict, pings: PingServer) -> None:
    import signal

    from immich_stream.commands.schedule import next_run, parse_times

    proc = start_cli(
        "schedule", "--at", "03:30", "--at", "15:00", "--run-now", "--", "unlock", "--ping", pings.url, env=s3_env
    )
    try:
        wait_for(lambda: len(pings.requests) == 2, timeout=60, what="the first run's pings")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert re.search(r"next run at \d{4}-\d\d-\d\d (03:30|15:00) .*: immich-stream unlock --ping \*\*\*$", err, re.M)
    assert pings.url not in err  # the ping URL is a credential: not in schedule's nightly log line
    tz = dt.UTC
    times = parse_times(["15:00", "03:30"])
    assert next_run(dt.datetime(2024, 5, 1, 3, 30, tzinfo=tz), times) == dt.datetime(2024, 5, 1, 15, 0, tzinfo=tz)
    assert next_run(dt.datetime(2024, 5, 1, 23, 0, tzinfo=tz), times) == dt.datetime(2024, 5, 2, 3, 30, tzinfo=tz)


def test_compose_backup_file_is_valid_and_its_own_project(tmp_path: Path) -> None:
    """docker compose reads it (no daemon needed for `config`); it is not Immich's project,
    whose containers every backup stops."""
    shutil.copy(REPO_ROOT / "contrib/compose.backup.yml", tmp_path)
    (tmp_path / ".env").write_text("UPLOAD_LOCATION=./library\nDB_DATA_LOCATION=./postgres\nDB_USERNAME=postgres\n")
    compose = Path(sys.executable).parent / "docker-compose"
    r = subprocess.run(
        [str(compose), "-f", "compose.backup.yml", "config", "--format", "json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    conf = json.loads(r.stdout)
    assert conf["name"] == "immich-backup"
    [svc] = conf["services"].values()
    assert svc["environment"]["COMPOSE_PROJECT_NAME"] == "immich"
    mounts = {v["target"]: v for v in svc["volumes"]}
    assert mounts["/data/library"]["read_only"] and mounts["/data/postgres"]["read_only"]
    assert "/var/run/docker.sock" in mounts and "/state" in mounts
    assert svc["command"][:1] == ["schedule"] and svc["stop_grace_period"]


# -- doctor -----------------------------------------------------------------------------------


def doctor_rows(out: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in out.splitlines()[:-1]:
        status, rest = line.split(None, 1)
        name, _, detail = rest.partition("  ")
        rows[name.strip()] = (status, detail.strip())
    return rows


@pytest.mark.slow
def test_doctor_tells_what_each_s3_server_verifies(
    s3_env: dict, moto_s3: S3Server, seaweed_s3: S3Server, tmp_path: Path
) -> None:
    s3_env["LIBRARY_DIR"] = str(tmp_path)  # no Immich markers: that row fails
    r = run_cli("doctor", env=dict(s3_env, IMMICH_STREAM_STOP="app"))
    assert r.code == 1 and "doctor: " in r.last_error
    rows = doctor_rows(r.out)
    assert rows["Immich markers"][0] == "FAIL" and "Docker and containers" in rows
    # it runs beside the Docker tests (xdist): the shared test stack is out of its reach
    assert rows["Docker and containers"][0] == "FAIL" and "Immich's own database dumps" not in rows
    for name in ("S3 reachable, credentials, bucket", "clock skew", "write, read, delete", "repository"):
        assert rows[name][0] == "ok", (name, rows[name])
    # rclone serve s3: checks Content-MD5, stores a wrong sha256 checksum as given, small parts fine
    assert rows["server checks Content-MD5"][0] == "ok"
    assert rows["server checks x-amz-checksum-sha256"][0] == "WARN"
    assert "under 5 MiB accepted" in rows["multipart upload"][1]
    assert "doctor/" not in str(bucket_keys(s3_env))  # every probe removed again
    assert rows["versioning, Object Lock"] == (
        "ok",
        "versioning off, Object Lock off, default retention: none: snapshots can be deleted by any key that may "
        "delete (see --lock-days in the README)",
    )

    moto = dict(s3_env, S3_ENDPOINT_URL=moto_s3.endpoint, S3_BUCKET=moto_s3.new_bucket())
    rows = doctor_rows(run_cli("doctor", env=dict(moto, IMMICH_STREAM_STOP="app")).out)
    assert rows["server checks Content-MD5"][0] == "WARN"  # moto verifies nothing
    assert "enforces S3's 5 MiB minimum" in rows["multipart upload"][1]
    # a bucket with Object Lock and a default retention: what --lock-days makes of it
    locked = dict(moto, S3_BUCKET=moto_s3.new_bucket())
    Bucket(moto_s3.endpoint, locked["S3_BUCKET"], KEY, SECRET).s3.put_bucket_versioning(
        Bucket=locked["S3_BUCKET"], VersioningConfiguration={"Status": "Enabled"}
    )
    rows = doctor_rows(run_cli("doctor", "--lock-days", "30", env=dict(locked, IMMICH_STREAM_STOP="app")).out)
    assert (
        rows["versioning, Object Lock"][0] == "FAIL"
        and "--lock-days 30 needs both" in rows["versioning, Object Lock"][1]
    )
    lock_bucket = "lk-" + moto_s3.new_bucket()[2:]
    b3 = Bucket(moto_s3.endpoint, lock_bucket, KEY, SECRET).s3
    b3.create_bucket(Bucket=lock_bucket, ObjectLockEnabledForBucket=True)
    b3.put_object_lock_configuration(
        Bucket=lock_bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 7}},
        },
    )
    locked["S3_BUCKET"] = lock_bucket
    rows = doctor_rows(run_cli("doctor", "--lock-days", "30", env=dict(locked, IMMICH_STREAM_STOP="app")).out)
    assert rows["versioning, Object Lock"] == (
        "ok",
        "versioning Enabled, Object Lock enabled, default retention: GOVERNANCE 7 days: every snapshot is kept "
        "30 days after its commit (governance)",
    )

    weed = dict(s3_env, S3_ENDPOINT_URL=seaweed_s3.endpoint, S3_BUCKET=seaweed_s3.new_bucket())
    rows = doctor_rows(run_cli("doctor", env=dict(weed, IMMICH_STREAM_STOP="app")).out)
    assert rows["server checks Content-MD5"][0] == "ok"  # SeaweedFS verifies both
    assert rows["server checks x-amz-checksum-sha256"][0] == "ok"
    assert "enforces S3's 5 MiB minimum" in rows["multipart upload"][1]
    assert rows["repository"][0] == "ok", rows["repository"]


def bucket_keys(env: dict) -> dict[str, int]:
    return Bucket(env["S3_ENDPOINT_URL"], env["S3_BUCKET"], KEY, SECRET).keys()
