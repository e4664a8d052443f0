"""Notifications beyond the pings: Apprise URLs (--notify), a JSON webhook (--webhook) and
commands run at the end (--on-success, --on-failure).

The same events as a ping (monitor.py): a start, then a success, a run that committed but
not cleanly (exit 3, 5, 6) or a failure, with the log's last lines. None of it may fail a
run or hold it up: the start goes out in the background, the end only after the command
returned (a backup has started the stack again by then), every receiver and command in its
own thread, all of them bounded in time (notify_timeout, hook_timeout). A receiver that
never answers is given up on; a command still running is killed with its process group.
URLs are credentials: a message names a URL's scheme or host, never the URL.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
import urllib.parse
from typing import Any

from immich_stream import config as cfg
from immich_stream.commands.monitor import deliver
from immich_stream.config.notify import load_apprise, quiet_apprise

log = logging.getLogger("immich_stream")

HOOK_OUTPUT_LINES = 20  # a hook's last lines of output go to the log
# What a hook does not need to see of our environment: the receivers' URLs.
HIDDEN_FROM_HOOKS = ("IMMICH_STREAM_NOTIFY", "IMMICH_STREAM_WEBHOOK", "IMMICH_STREAM_PING_URL")


def _shown(url: str, n: int, of: int) -> str:
    return f"{url.split(':', 1)[0]}://... (notify URL {n} of {of})"


class _ReasonCapture(logging.Handler):
    """Apprise's last warning, with every part of the URL that may be secret taken out."""

    def __init__(self, url: str) -> None:
        super().__init__(logging.WARNING)
        # Apprise's logger is shared: the start's thread may still be sending when the end's
        # begins; a warning about another URL (with that URL's secrets) is not this one's
        self.thread = threading.get_ident()
        parts = urllib.parse.urlsplit(url)
        words = [url, parts.netloc, parts.path, parts.query, parts.username or "", parts.password or ""]
        words += [w for w in parts.path.split("/") if w] + [v for _, v in urllib.parse.parse_qsl(parts.query)]
        self.secrets = sorted({w for w in words if len(w) >= 4}, key=len, reverse=True)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        try:
            text = record.getMessage()
        except Exception:  # pragma: no cover - a foreign library's bad format string
            return
        for word in self.secrets:
            text = text.replace(word, "***")
        self.last = " ".join(text.split())[:200]


class Notifier:
    """Everything a run tells at its start and end besides the ping."""

    def __init__(self, settings: cfg.Settings, command: str, names: set[str]) -> None:
        self.command = command
        self.urls: tuple[str, ...] = settings.notify if "notify" in names else ()
        self.webhook = settings.webhook if "webhook" in names else None
        self.on_success = settings.on_success if "on_success" in names else None
        self.on_failure = settings.on_failure if "on_failure" in names else None
        self.timeout = settings.notify_timeout
        self.hook_timeout = settings.hook_timeout
        self._started: threading.Thread | None = None

    def __bool__(self) -> bool:
        return bool(self.urls or self.webhook or self.on_success or self.on_failure)

    def start(self) -> None:
        """The start event, sent in the background: a slow receiver does not hold up the run."""
        if not self.urls:
            return
        title = f"immich-stream {self.command} started"
        self._started = _thread(lambda: self._apprise(title, f"{title} on {os.uname().nodename}", "info"))

    def finish(self, code: int, committed: bool, headline: str, tail: str, doc: dict[str, Any]) -> None:
        """The end: every receiver and the hook at once, each in its own thread; returns when
        all are done or after the time limits, whichever comes first."""
        if self._started is not None:  # the start comes before the end, unless it hangs
            self._started.join(min(5.0, self.timeout))
        if code == 0:
            title, kind, body = f"immich-stream {self.command} ok", "success", headline
        elif committed:
            title, kind = f"immich-stream {self.command} finished with problems (exit {code})", "warning"
            body = f"{headline}\n\n{tail}"
        else:
            title, kind, body = f"immich-stream {self.command} FAILED (exit {code})", "failure", f"{headline}\n\n{tail}"
        data = json.dumps(doc, indent=2).encode()
        threads: list[threading.Thread] = []
        deadline = time.monotonic() + self.timeout
        if self.urls:
            threads.append(_thread(lambda: self._apprise(title, body[-4000:], kind)))
        if self.webhook:
            url = self.webhook
            per_try = min(10.0, self.timeout / 2)
            headers = {"Content-Type": "application/json"}
            threads.append(_thread(lambda: deliver(url, data, headers, "the --webhook POST", per_try)))
        hook = self.on_success if code == 0 else self.on_failure
        hook_thread: threading.Thread | None = None
        if hook:
            name = "on_success" if code == 0 else "on_failure"
            hook_thread = _thread(lambda: run_hook(name, hook, data, code, self.command, self.hook_timeout))
            hook_deadline = time.monotonic() + self.hook_timeout + 5  # it is killed at hook_timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning(
                    "a notification receiver did not answer within %.0f s (notify_timeout): given up; the run "
                    "itself is not affected",
                    self.timeout,
                )
                break
        if hook_thread is not None:
            hook_thread.join(max(0.0, hook_deadline - time.monotonic()))

    def _apprise(self, title: str, body: str, kind: str) -> None:
        apprise = load_apprise()
        if apprise is None:  # settings checked it; a package removed since
            log.warning("notify: the apprise package is not installed: pip install 'immich-stream[notify]'")
            return
        logger = quiet_apprise()
        per_url = max(1, int(min(10.0, self.timeout / 2)))
        for n, url in enumerate(self.urls, 1):
            capture = _ReasonCapture(url)
            logger.addHandler(capture)
            try:
                target = apprise.Apprise()
                timed = _with_timeouts(url, per_url)
                if not target.add(timed) and not target.add(url):
                    ok = False
                else:
                    ok = target.notify(body=body, title=title, notify_type=kind)
            except Exception as exc:  # a plugin's bug must not end the run
                ok = False
                capture.last = type(exc).__name__
            finally:
                logger.removeHandler(capture)
            if not ok:
                log.warning(
                    "notification to %s failed (%s): the run itself is not affected",
                    _shown(url, n, len(self.urls)),
                    capture.last or "no reason given",
                )


def _with_timeouts(url: str, seconds: int) -> str:
    """Apprise's connect and read timeouts (cto, rto), unless the URL sets its own."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    given = {k for k, _ in query}
    query += [(k, str(seconds)) for k in ("cto", "rto") if k not in given]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _thread(fn: Any) -> threading.Thread:
    """A daemon thread: one stuck on a receiver must not keep the process alive at exit."""
    t = threading.Thread(target=fn, daemon=True, name="immich-stream-notify")
    t.start()
    return t


def run_hook(name: str, text: str, summary: bytes, code: int, command: str, timeout: float) -> int | None:
    """Run a hook without a shell, the JSON summary on its stdin, its output into our log;
    killed with its process group after `timeout`. Its exit code, or None when killed."""
    argv = shlex.split(text)
    flag = "--" + name.replace("_", "-")
    env = {k: v for k, v in os.environ.items() if k not in HIDDEN_FROM_HOOKS}
    env.update({"IMMICH_STREAM_COMMAND": command, "IMMICH_STREAM_EXIT_CODE": str(code)})
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: a kill takes its children too
        )
    except OSError as exc:
        log.warning("%s %s could not be started (%s): the run itself is not affected", flag, argv[0], exc.strerror)
        return None
    lines: collections.deque[str] = collections.deque(maxlen=HOOK_OUTPUT_LINES)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def feed() -> None:
        try:
            stdin.write(summary)
            stdin.close()
        except OSError:  # it did not read its stdin: that is its business
            pass

    def read() -> None:
        for raw in stdout:
            lines.append(raw.decode(errors="replace").rstrip())

    writer, reader = _thread(feed), _thread(read)
    try:
        rc: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    writer.join(1)
    reader.join(1)  # a child that left the group may hold the pipe: not waited for
    for line in list(lines):
        log.info("%s: %s", flag, line)
    if rc is None:
        log.warning(
            "%s %s was still running after %.0f s (hook_timeout): killed; the run itself is not affected",
            flag,
            argv[0],
            timeout,
        )
    elif rc != 0:
        log.warning("%s %s exited with %d: the run itself is not affected", flag, argv[0], rc)
    else:
        log.info("%s %s done", flag, argv[0])
    return rc
