"""Notifications beyond the pings (issue 27): Apprise URLs (--notify, its json:// and form://
targets), the JSON webhook and the --on-success/--on-failure commands, against a real HTTP
receiver on loopback; receivers that fail, are not there or never answer; hooks that fail
or hang. None of it may change the exit code, hold the run up past its time limits, or
put a URL's secret into the output. (`schedule --on/--cron`: tests/unit/test_schedule.py.)"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import CONTAINERS, ImmichStack, free_port, running_containers
from tests.helpers import Bucket, make_library, run_cli


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    running: set[str] | None = None  # the stack's containers when it arrived (when asked)

    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.body.decode()))

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server on loopback. Paths under /500 answer 500, under /hang never
    answer; the rest 200. Every request is recorded."""

    requests: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    watch_stack: bool = False
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"

    def at(self, prefix: str) -> list[Received]:
        return [r for r in self.requests if r.path.startswith(prefix)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            running = running_containers() if state.watch_stack else None
            state.requests.append(Received(self.path, dict(self.headers), body, running))
            if self.path.startswith("/hang"):
                state.release.wait(60)  # never answers while the run lasts
                return
            if self.path.startswith("/redirect"):  # elsewhere: the same server by another name
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/landed")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 500 if self.path.startswith("/500") else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        do_GET = do_POST  # a redirected POST arrives as a GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    state.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


HOOK = """\
import json, os, sys
summary = sys.stdin.read()
with open(sys.argv[1], "w") as fh:
    json.dump({"stdin": summary, "env": {k: v for k, v in os.environ.items() if k.startswith("IMMICH_STREAM")}}, fh)
print("hook read", len(summary), "bytes")
sys.exit(int(sys.argv[2]))
"""


def hook(tmp_path: Path, name: str, exit_code: int = 0) -> tuple[str, Path]:
    """A command line for --on-success/--on-failure and the file it writes what it got to."""
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    out = tmp_path / f"{name}.json"
    return f"{sys.executable} {script} {out} {exit_code}", out


# -- no Docker: commands that need only S3 ----------------------------------------------------


@pytest.mark.slow
def test_success_reaches_apprise_json_and_form_the_webhook_and_the_hook(
    s3_env: dict, receiver: Receiver, tmp_path: Path
) -> None:
    cmd, out = hook(tmp_path, "success")
    r = run_cli(
        "unlock",
        "--notify", f"json://{receiver.url}/j",
        "--notify", f"form://{receiver.url}/f",
        "--webhook", f"http://{receiver.url}/w",
        "--on-success", cmd,
        "--on-failure", f"{sys.executable} -c 'raise SystemExit(9)'",
        env=s3_env,
    )  # fmt: skip
    assert r.code == 0, r.err
    start, end = (m.json() for m in receiver.at("/j"))
    assert (start["type"], start["title"]) == ("info", "immich-stream unlock started")
    assert (end["type"], end["title"]) == ("success", "immich-stream unlock ok")
    assert "unlock finished (exit 0)" in end["message"]
    assert [m.form()["type"] for m in receiver.at("/f")] == ["info", "success"]
    [hooked] = receiver.at("/w")
    doc = hooked.json()
    assert hooked.headers["Content-Type"] == "application/json"
    assert (doc["message_type"], doc["command"], doc["exit_code"], doc["ok"]) == ("summary", "unlock", 0, True)
    got = json.loads(out.read_text())
    assert json.loads(got["stdin"]) == doc  # the same summary on the hook's stdin
    assert got["env"]["IMMICH_STREAM_EXIT_CODE"] == "0" and got["env"]["IMMICH_STREAM_COMMAND"] == "unlock"
    assert "--on-success: hook read" in r.err and "exited with 9" not in r.err  # only the success hook ran


@pytest.mark.slow
def test_failure_carries_the_error_and_a_failing_hook_does_not_change_the_exit_code(
    s3_env: dict, receiver: Receiver, tmp_path: Path
) -> None:
    s3_env["S3_BUCKET"] = "no-such-bucket-here"
    cmd, out = hook(tmp_path, "failure", exit_code=3)
    r = run_cli(
        "prune", "--keep-last", "3",
        "--notify", f"json://{receiver.url}/j",
        "--notify", f"form://{receiver.url}/f",
        "--webhook", f"http://{receiver.url}/w",
        "--on-failure", cmd,
        env=s3_env,
    )  # fmt: skip
    assert r.code == 1 and "no-such-bucket-here" in r.last_error
    end = receiver.at("/j")[-1].json()
    assert (end["type"], end["title"]) == ("failure", "immich-stream prune FAILED (exit 1)")
    assert r.last_error in end["message"]  # the last log lines with the error, as the ping's body
    form = receiver.at("/f")[-1].form()
    assert form["type"] == "failure" and r.last_error in form["message"]
    doc = receiver.at("/w")[0].json()
    assert (doc["exit_code"], doc["ok"]) == (1, False) and "no-such-bucket-here" in doc["error"]
    assert json.loads(json.loads(out.read_text())["stdin"]) == doc
    assert "--on-failure" in r.err and "exited with 3: the run itself is not affected" in r.err


@pytest.mark.slow
def test_dead_failing_and_silent_receivers_never_fail_or_hold_up_the_run(
    s3_env: dict, receiver: Receiver, tmp_path: Path
) -> None:
    """A receiver that answers 500, a port nobody listens on and one that never answers,
    their URLs full of secrets: exit 0 within the time limit, each failure named by
    scheme and position only. A hook that hangs (with a child of its own) is killed."""
    s3_env["IMMICH_STREAM_NOTIFY_TIMEOUT"] = "2s"
    dead = free_port()
    urls = [
        f"json://user:leak1@{receiver.url}/500/leak2?token=leak3",
        f"form://127.0.0.1:{dead}/leak4",
        f"json://{receiver.url}/hang/leak5",
    ]
    args = [a for u in urls for a in ("--notify", u)]
    t0 = time.monotonic()
    r = run_cli(
        "unlock", *args,
        "--webhook", f"http://{receiver.url}/hang/leak6",
        "--on-success", "sh -c 'sleep 60 & sleep 60'",
        "--hook-timeout", "1s",
        env=s3_env,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    assert r.code == 0, r.err
    assert seconds < 12, seconds  # start 2 s + end 2 s (the hook's 1 s meanwhile) + the process
    assert "notification to json://... (notify URL 1 of 3) failed" in r.err
    assert "notification to form://... (notify URL 2 of 3) failed" in r.err
    assert "did not answer within 2 s (notify_timeout): given up" in r.err
    assert "--on-success sh was still running after 1 s (hook_timeout): killed" in r.err
    assert len(receiver.at("/500")) == 2  # start and end
    assert "leak" not in r.err + r.out
    shown = run_cli("config", *args, "--webhook", f"http://{receiver.url}/hang/leak6", env=s3_env)
    assert "json://..., form://..., json://... (hidden)" in shown.out and "leak" not in shown.out + shown.err
    assert "http://127.0.0.1/... (hidden)" in shown.out


def test_a_snapshot_records_no_receiver_url_of_a_sidecar_in_immichs_compose_file() -> None:
    """immich-stream added as a service to Immich's own docker-compose.yml, its receivers in
    the environment: the compose file and .env a snapshot records (host/metadata.py) keep none."""
    from immich_stream.host.metadata import redact

    compose = (
        "services:\n  backup:\n    image: immich-stream\n    environment:\n"
        "      IMMICH_STREAM_NOTIFY: discord://leak1/leak2\n      - IMMICH_STREAM_WEBHOOK=https://h/leak3\n"
        "    command: schedule --at 03:30 -- backup --notify tgram://leak4/x\n"
    )
    dotenv = "IMMICH_STREAM_NOTIFY=json://u:leak5@h/p\nIMMICH_STREAM_WEBHOOK=https://h/leak6\n"
    for kind, text in (("docker-compose.yml", compose), (".env", dotenv)):
        kept, removed = redact(kind, text)
        assert "leak" not in kept and "IMMICH_STREAM_NOTIFY" in removed


# -- the real stack ---------------------------------------------------------------------------


def test_a_nightly_backups_notifications_come_after_the_stack_is_running_again(
    env: dict, stack: ImmichStack, bucket: Bucket, receiver: Receiver, tmp_path: Path
) -> None:
    """From the config file and the environment, as the nightly backup has them: the end
    is told with every container running again, and carries the committed snapshot."""
    make_library(stack.library, photos=2, odd_names=False)
    cmd, out = hook(tmp_path, "nightly")
    conf = tmp_path / "config.toml"
    conf.write_text(f'[monitor]\nnotify = ["json://{receiver.url}/j"]\non_success = "{cmd}"\n')
    env.update({"IMMICH_STREAM_CONFIG": str(conf), "IMMICH_STREAM_WEBHOOK": f"http://{receiver.url}/w"})
    receiver.watch_stack = True
    r = run_cli("backup", "--stop", "app", env=env)
    assert r.code == 0, r.err
    [sid] = bucket.snapshots()
    start, end = receiver.at("/j")
    assert (
        start.json()["type"] == "info"
        and end.json()["type"] == "success"
        and f"snapshot {sid} committed" in end.json()["message"]
    )
    [hooked] = receiver.at("/w")
    assert hooked.json()["summary"]["id"] == sid
    assert end.running == hooked.running == set(CONTAINERS)  # told after the start, never holding it up
    got = json.loads(out.read_text())
    assert json.loads(got["stdin"])["summary"]["id"] == sid
    assert "IMMICH_STREAM_WEBHOOK" not in got["env"]  # a receiver's URL is not the hook's business


@pytest.mark.slow
def test_a_receivers_user_and_password_are_sent_as_basic_auth_never_printed(s3_env: dict, receiver: Receiver) -> None:
    """A webhook or ping URL with user:password@ (a receiver behind Basic authentication):
    urllib took the password for a port and its thread died with a traceback quoting it
    ("nonnumeric port: 'leak7@127.0.0.1:...'"), and nothing was delivered."""
    r = run_cli(
        "unlock",
        "--webhook", f"http://hook%40user:leak7@{receiver.url}/w",
        "--ping", f"http://pinger:leak8@{receiver.url}/p",
        env=s3_env,
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "leak" not in r.err + r.out and "Traceback" not in r.err
    [hooked] = receiver.at("/w")
    assert hooked.json()["command"] == "unlock"
    assert hooked.headers["Authorization"] == "Basic " + base64.b64encode(b"hook@user:leak7").decode()
    pinged = receiver.at("/p")  # the end's POST (the start is a GET this receiver refuses)
    assert pinged and pinged[-1].headers["Authorization"] == "Basic " + base64.b64encode(b"pinger:leak8").decode()


@pytest.mark.slow
def test_a_missing_hook_program_of_the_nightly_backup_does_not_stop_another_command(
    s3_env: dict, tmp_path: Path
) -> None:
    """The nightly backup's hook in the environment (or config file), its program not
    installed (a new machine, mid-recovery): other commands do not use it and must run
    (before: `restore` and the rest refused with exit 2); backup, schedule, doctor and config
    say so."""
    s3_env["IMMICH_STREAM_ON_FAILURE"] = str(tmp_path / "page-me")
    r = run_cli("unlock", env=s3_env)
    assert r.code == 0, r.err
    for args in (["config"], ["doctor"], ["schedule", "--at", "03:30", "--", "backup"]):
        r = run_cli(*args, env=s3_env)
        assert r.code == 2 and "on_failure (from env IMMICH_STREAM_ON_FAILURE)" in r.last_error, r.err
    r = run_cli("unlock", "--on-failure", str(tmp_path / "page-me"), env=s3_env)  # its own flag: checked
    assert r.code == 2 and "is not an executable file" in r.last_error


@pytest.mark.slow
def test_a_redirect_does_not_take_the_receivers_password_along(s3_env: dict, receiver: Receiver) -> None:
    """The password of a webhook URL goes to its own host only: a redirect (to a host of
    anyone's choosing) arrives without the Authorization header."""
    r = run_cli("unlock", "--webhook", f"http://u:leak9@{receiver.url}/redirect", env=s3_env)
    assert r.code == 0, r.err
    [first] = receiver.at("/redirect")
    [landed] = receiver.at("/landed")
    assert first.headers["Authorization"] == "Basic " + base64.b64encode(b"u:leak9").decode()
    assert "Authorization" not in landed.headers and landed.headers["Host"].startswith("localhost:")
