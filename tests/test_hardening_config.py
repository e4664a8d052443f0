"""Issue 22, the configuration group: what a newcomer gets wrong on the command line, said
in one line with exit 2 (and the JSON document under --json); `snapshots` telling a
server that is not S3, a missing bucket and an empty prefix apart; `schedule` leaving no
child behind whenever a signal arrives. No Docker: the S3 server is rclone's.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KEY, SECRET, S3Server, base_env
from tests.helpers import Result, run_cli


def assert_one_line_exit_2(r: Result, *needles: str) -> None:
    assert r.code == 2, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("immich-stream: error: "), r.err
    assert "Traceback" not in r.err and "usage:" not in r.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# -- argparse: one line, a pointer to --help, and the JSON document under --json ---------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["backup", "--stop", "sometimes"], "backup: argument --stop: invalid choice: 'sometimes'"),
        (["restore", "--to", "/tmp/x", "--database"], "not allowed with argument"),
        (["snapshots", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
    ],
)
def test_a_command_line_argparse_refuses_is_one_line_with_a_pointer_to_help(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    r = run_cli(*args, env=base_env(tmp_path), timeout=60)
    assert_one_line_exit_2(r, needle, "--help`")
    assert r.out == ""


@pytest.mark.slow
def test_a_command_line_error_under_json_also_prints_the_json_document(tmp_path: Path) -> None:
    r = run_cli("backup", "--json", "--jobs", "4", "--stop", "sometimes", env=base_env(tmp_path), timeout=60)
    assert_one_line_exit_2(r, "invalid choice: 'sometimes'")
    doc = json.loads(r.out)
    assert (doc["command"], doc["exit_code"], doc["ok"]) == ("backup", 2, False)
    assert "invalid choice: 'sometimes'" in doc["error"]


# -- flags that a combination would silently ignore --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["backup", "--keep-daily", "7"], "backup --keep-daily does nothing without --prune"),
        (["backup", "--keep-within", "30d", "--keep-last", "3"], "without --prune"),
        (["restore", "--database", "--include", "*.jpg"], "--include only apply to files"),
        (["restore", "--database", "--root", "library"], "--root only apply to files"),
        (["restore", "--dump-to", "x.sql.gz", "--overwrite"], "restore --dump-to restores the database dump"),
        (["restore", "--database", "--overwrite", "--include", "a"], "--include, --overwrite only apply to files"),
    ],
)
def test_flags_a_combination_would_ignore_are_refused(tmp_path: Path, args: list[str], needle: str) -> None:
    env = base_env(tmp_path)
    env.update({"S3_BUCKET": "b", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    env["S3_ENDPOINT_URL"] = "http://127.0.0.1:9"  # never reached
    r = run_cli(*args, env=env, timeout=60, cwd=str(tmp_path))
    assert_one_line_exit_2(r, needle)


@pytest.mark.slow
def test_backup_prune_with_a_policy_is_still_accepted_by_the_parser(tmp_path: Path) -> None:
    # the refusal is about the missing --prune only: with it, the run goes on (to the missing bucket)
    r = run_cli("backup", "--prune", "--keep-daily", "7", env=base_env(tmp_path), timeout=60)
    assert_one_line_exit_2(r, "bucket is not set")


# -- schedule ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("run", "needle"),
    [
        (["backupp"], "schedule: 'backupp' is not an immich-stream command"),
        (["backup", "--stop", "sometimes"], "schedule -- backup --stop sometimes: argument --stop: invalid choice"),
        (["backup", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        ([], "give the command to run after --"),
    ],
)
def test_schedule_names_the_bad_command(tmp_path: Path, run: list[str], needle: str) -> None:
    r = run_cli("schedule", "--at", "03:00", "--", *run, env=base_env(tmp_path), timeout=60)
    assert_one_line_exit_2(r, needle)


# -- credentials ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_missing_credentials_are_a_configuration_error_exit_2(tmp_path: Path, rclone_s3: S3Server) -> None:
    env = base_env(tmp_path)
    env.update(
        {
            "S3_ENDPOINT_URL": rclone_s3.endpoint,
            "S3_BUCKET": rclone_s3.new_bucket(),
            "S3_PATH_STYLE": "true",
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance role to wait for on this machine
            "IMMICH_STREAM_RETRIES": "1",
        }
    )
    r = run_cli("snapshots", env=env, timeout=120)
    assert_one_line_exit_2(r, "no S3 credentials found", "AWS_ACCESS_KEY_ID")


# -- snapshots: not S3, no bucket, no repository ---------------------------------------------


class NotS3(http.server.SimpleHTTPRequestHandler):
    """An ordinary web server (a typo in the endpoint's port): 404 for what it lacks."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class WebApp(NotS3):
    """A single-page web app (Immich's own web UI on 2283): 200 and its page for any path."""

    def send_head(self) -> Any:
        self.path = "/index.html"
        return super().send_head()


@pytest.fixture(params=[NotS3, WebApp])
def web_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("<html><body>Immich</body></html>")

    def handler(*a: Any) -> NotS3:
        return request.param(*a, directory=str(tmp_path / "www"))  # type: ignore[no-any-return]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def snapshots_env(tmp_path: Path, endpoint: str, bucket: str) -> dict[str, str]:
    env = base_env(tmp_path)
    env.update(
        {
            "S3_ENDPOINT_URL": endpoint,
            "S3_BUCKET": bucket,
            "S3_PATH_STYLE": "true",
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "IMMICH_STREAM_RETRIES": "1",
        }
    )
    return env


@pytest.mark.slow
def test_snapshots_against_a_server_that_is_not_s3_says_so(tmp_path: Path, web_server: str) -> None:
    r = run_cli("snapshots", env=snapshots_env(tmp_path, web_server, "photos"), timeout=120)
    assert r.code == 1, (r.code, r.err)
    assert "is not an S3 endpoint" in r.last_error and web_server in r.last_error, r.err
    assert "no repository at" not in r.err


@pytest.mark.slow
def test_snapshots_of_a_bucket_that_does_not_exist_says_so(tmp_path: Path, rclone_s3: S3Server) -> None:
    r = run_cli("snapshots", env=snapshots_env(tmp_path, rclone_s3.endpoint, "no-such-bucket-22"), timeout=120)
    assert r.code == 1, (r.code, r.err)
    assert "bucket 'no-such-bucket-22' does not exist" in r.last_error, r.err
    assert "no repository at" not in r.err


@pytest.mark.slow
def test_snapshots_of_an_empty_bucket_says_no_repository(tmp_path: Path, rclone_s3: S3Server) -> None:
    r = run_cli("snapshots", env=snapshots_env(tmp_path, rclone_s3.endpoint, rclone_s3.new_bucket()), timeout=120)
    assert r.code == 9, (r.code, r.err)
    assert "no repository at" in r.last_error and "run `immich-stream init`" in r.last_error, r.err


# -- schedule's signal window ---------------------------------------------------------------------

SLEEPER = """
import signal, sys, time
def bye(signum, frame):
    open(sys.argv[1], "w").write(signal.Signals(signum).name)
    sys.exit(143)
signal.signal(signal.SIGTERM, bye)
open(sys.argv[1] + ".started", "w").close()
time.sleep(30)
"""


def run_schedule_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, before_start: bool
) -> tuple[float, Path, list[subprocess.Popen[bytes]]]:
    """run_schedule with --run-now, a SIGTERM arriving while its child is being started:
    before the child exists, or after it exists but before the loop has noted it. The child
    is a process that records the signal it gets (a backup would start the stack again)."""
    from immich_stream.commands import schedule

    marker = tmp_path / "child-got"
    real_popen = subprocess.Popen
    started: list[subprocess.Popen[bytes]] = []

    def popen(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        if before_start:
            os.kill(os.getpid(), signal.SIGTERM)
        proc = real_popen([sys.executable, "-c", SLEEPER, str(marker)])
        started.append(proc)
        while not Path(f"{marker}.started").exists() and proc.poll() is None:
            time.sleep(0.02)
        if not before_start:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before Popen returns
        return proc

    monkeypatch.setattr(schedule.subprocess, "Popen", popen)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.monotonic()
    try:
        schedule.run_schedule([], ["backup"], run_now=True)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return time.monotonic() - t0, marker, started


def test_a_sigterm_while_schedule_starts_its_child_reaches_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seconds, marker, started = run_schedule_in_process(tmp_path, monkeypatch, before_start=False)
    assert len(started) == 1
    assert marker.read_text() == "SIGTERM"  # the child got it: a backup starts the stack again and exits
    assert seconds < 20  # and the schedule did not wait out the child's whole run


def test_a_sigterm_just_before_schedule_starts_its_child_starts_nothing_or_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seconds, marker, started = run_schedule_in_process(tmp_path, monkeypatch, before_start=True)
    assert seconds < 20
    assert all(p.returncode is not None for p in started)
    if started:  # started after the signal: it was told to stop at once
        assert marker.read_text() == "SIGTERM"


def test_schedule_puts_the_signal_handlers_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from immich_stream.commands import schedule

    real_popen = subprocess.Popen
    monkeypatch.setattr(schedule.subprocess, "Popen", lambda *a, **k: real_popen(["true"]))
    before = signal.getsignal(signal.SIGTERM)

    # one run, then a SIGTERM during the wait for the next time of day
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        import datetime as dt

        assert schedule.run_schedule([dt.time(3, 0)], ["backup"], run_now=True) == 0
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGTERM) is before


# -- doctor -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_doctor_reports_a_missing_pg_version_as_missing_not_as_needing_root(tmp_path: Path) -> None:
    pg = tmp_path / "not-pgdata"
    (pg / "base").mkdir(parents=True)
    env = base_env(tmp_path)
    env.update({"POSTGRES_DIR": str(pg), "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    r = run_cli("doctor", env=env, timeout=120)
    assert r.code == 1, (r.code, r.out, r.err)
    row = next(line for line in r.out.splitlines() if "postgres_dir" in line)
    assert row.startswith("FAIL") and "has no PG_VERSION" in row and "DB_DATA_LOCATION" in row, row
    assert "needs root" not in row
