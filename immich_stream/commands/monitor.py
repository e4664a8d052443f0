"""Telling monitoring what a run did: the --json document, pings, the Prometheus textfile.

None of it may fail a run: a ping that cannot be delivered or a metrics file that cannot
be written is logged, and the command's own exit code stands.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime as dt
import http.client
import logging
import os
import re
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from immich_stream import __version__

log = logging.getLogger("immich_stream")

PING_TIMEOUT = 10.0
PING_ATTEMPTS = 2
PING_BODY_LINES = 30
PING_BODY_LIMIT = 10_000  # healthchecks.io keeps 100 kB; a phone shows far less


@dataclass
class Outcome:
    """What a command returns when it has more to say than its exit code: the summary the
    --json document, the pings and the metrics carry, the problems it listed, and the
    one-line error the CLI prints (when the run finished but must exit non-zero)."""

    code: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    error: str | None = None


def plain(obj: Any) -> Any:
    """A command's result object as JSON-ready data: dataclasses as dicts, Problems and
    other iterables as lists, paths as text."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    try:
        return [plain(v) for v in obj]
    except TypeError:
        return str(obj)


def outcome_of(result: int | dict[str, Any] | Outcome) -> Outcome:
    """A command may return its exit code, its summary dict (exit 0), or an Outcome."""
    if isinstance(result, Outcome):
        return result
    if isinstance(result, dict):
        return Outcome(0, result)
    return Outcome(int(result))


def document(command: str, outcome: Outcome, started: float, seconds: float) -> dict[str, Any]:
    """The one JSON document --json prints on stdout at the end (restic's summary message)."""
    return {
        "message_type": "summary",
        "command": command,
        "version": __version__,
        "exit_code": outcome.code,
        "ok": outcome.code == 0,
        "error": outcome.error,
        "started": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
        "seconds": round(seconds, 3),
        "problems": outcome.problems,
        "summary": outcome.summary,
    }


class LogTail(logging.Handler):
    """The last lines of the log, for the body of a failure ping."""

    def __init__(self, lines: int = PING_BODY_LINES) -> None:
        super().__init__(logging.DEBUG)
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)

    def text(self, extra: list[str] | None = None) -> str:
        body = "\n".join([*self.lines, *(extra or [])])
        return body[-PING_BODY_LIMIT:]


def _redact(url: str) -> str:
    """A ping URL is a credential (anyone holding it can ping): log its host only."""
    parts = urllib.parse.urlsplit(url.removeprefix("ntfy+"))
    return f"{parts.scheme}://{parts.hostname or '?'}/..."


def ping_kind(url: str) -> str:
    """healthchecks (the default), kuma (an Uptime Kuma push URL) or ntfy (ntfy+https://host/topic)."""
    if url.startswith("ntfy+"):
        return "ntfy"
    if "/api/push/" in urllib.parse.urlsplit(url).path:
        return "kuma"
    return "healthchecks"


class Pinger:
    """healthchecks.io's protocol: URL/start, then URL (success), URL/fail (failed) or
    URL/<exit code> (finished, but not cleanly), the log's last lines as the body. Uptime
    Kuma push URLs get ?status=up|down&msg=...; ntfy topics get one message at the end."""

    def __init__(self, url: str, command: str) -> None:
        self.url = url
        self.command = command
        self.kind = ping_kind(url)
        self.rid = str(uuid.uuid4())  # pairs /start with its end in healthchecks.io's log
        self.started = time.monotonic()

    def start(self) -> None:
        self.started = time.monotonic()
        if self.kind == "healthchecks":
            self._send(self._hc("/start"), None, {})

    def finish(self, code: int, failed: bool, headline: str, body: str) -> None:
        """failed: nothing was done (no snapshot); otherwise a non-zero code means done, but not cleanly."""
        if self.kind == "healthchecks":
            suffix = "" if code == 0 else ("/fail" if failed else f"/{code}")
            self._send(self._hc(suffix), body.encode(), {"Content-Type": "text/plain; charset=utf-8"})
        elif self.kind == "kuma":
            parts = urllib.parse.urlsplit(self.url)
            query = urllib.parse.urlencode(
                {
                    "status": "up" if code == 0 else "down",
                    "msg": headline[:200],
                    "ping": str(round((time.monotonic() - self.started) * 1000)),
                }
            )
            self._send(urllib.parse.urlunsplit(parts._replace(query=query)), None, {})
        else:
            title = f"immich-stream {self.command} " + ("ok" if code == 0 else f"FAILED (exit {code})")
            headers = {
                "Title": title,
                "Priority": "low" if code == 0 else "high",
                "Tags": "white_check_mark" if code == 0 else "warning",
                "Content-Type": "text/plain; charset=utf-8",
            }
            text = headline if code == 0 else f"{headline}\n\n{body}"
            self._send(self.url.removeprefix("ntfy+"), text[-4000:].encode(), headers)

    def _hc(self, suffix: str) -> str:
        parts = urllib.parse.urlsplit(self.url)
        query = "&".join(q for q in (parts.query, f"rid={self.rid}") if q)
        return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix, query=query))

    def _send(self, url: str, body: bytes | None, headers: dict[str, str]) -> None:
        deliver(url, body, headers, "monitoring ping")


def deliver(url: str, body: bytes | None, headers: dict[str, str], what: str, timeout: float = PING_TIMEOUT) -> bool:
    """Deliver one request (GET, or POST with a body), retried once; failing is logged with
    the URL's host only, never raised. A user:password@ in the URL is sent as Basic
    authentication (urllib would take it for a port, and its error quotes the password)."""
    target, auth = _split_credentials(url)
    why = ""
    for attempt in range(PING_ATTEMPTS):
        try:
            req = urllib.request.Request(
                target,
                data=body,
                headers={"User-Agent": f"immich-stream/{__version__}", **headers},
                method="POST" if body is not None else "GET",
            )
            if auth:  # not passed on to wherever a redirect points
                req.add_unredirected_header("Authorization", auth)
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError as exc:
            why = f"HTTP {exc.code}"
            if exc.code < 500:
                break  # a wrong URL does not become right by asking again
        except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, timed out, DNS, a bad answer
            # the reason of a malformed URL may quote the URL: only its type is told then
            reason = getattr(exc, "reason", exc)
            why = type(exc).__name__ if isinstance(reason, (ValueError, http.client.InvalidURL)) else str(reason)
            why = why or type(exc).__name__
        if attempt + 1 < PING_ATTEMPTS:
            time.sleep(1.0)
    log.warning("%s to %s failed (%s): the run itself is not affected", what, _redact(url), why)
    return False


def _split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without user:password@, its Basic Authorization header or None)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), "Basic " + base64.b64encode(pair).decode()


# -- Prometheus textfile (node_exporter's textfile collector) ------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
KEPT_ON_FAILURE = (
    "immich_stream_last_success_timestamp_seconds",
    "immich_stream_snapshot_timestamp_seconds",
    "immich_stream_snapshot_age_seconds",
    "immich_stream_snapshots",
)


def snapshot_time(snap_id: str) -> float | None:
    """A snapshot id starts with the UTC time of its run (repo.new_snapshot_id)."""
    try:
        return dt.datetime.strptime(snap_id[:18], "%Y-%m-%dT%H%M%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels.items()
    )
    return "{" + inner + "}"


class Metrics:
    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.help: dict[str, str] = {}
        self.kept: list[str] = []

    def add(self, name: str, value: float | None, help_: str, **labels: str) -> None:
        if value is None:
            return
        self.help.setdefault(name, help_)
        self.samples.setdefault(name, []).append((labels, float(value)))

    def text(self) -> str:
        out: list[str] = []
        for name, samples in self.samples.items():
            out.append(f"# HELP {name} {self.help[name]}")
            out.append(f"# TYPE {name} gauge")
            out.extend(f"{name}{_labels(lab)} {val:.17g}" for lab, val in samples)
        out.extend(self.kept)
        return "\n".join(out) + "\n"


def _previous(path: Path, names: tuple[str, ...]) -> list[str]:
    """Lines of an earlier metrics file worth keeping when this run has no newer figures."""
    try:
        text = path.read_text() if path.is_file() else ""  # never wait on a pipe (or read a device)
    except (OSError, UnicodeDecodeError):
        return []
    keep: list[str] = []
    for line in text.splitlines():
        words = line.split()
        name = words[2] if line.startswith("# ") and len(words) > 2 else None
        if name is None and (m := _SAMPLE.match(line)):
            name = m.group(1)
        if name in names:
            keep.append(line)
    return keep


def metrics_text(
    path: Path,
    command: str,
    outcome: Outcome,
    finished: float,
    seconds: float,
    snapshots: list[str] | None,
) -> str:
    """The file's new contents. On failure, last-success and per-snapshot figures are carried
    over from the file as it was, so an alert on their age keeps working."""
    m = Metrics()
    cmd = {"command": command}
    m.add("immich_stream_last_run_timestamp_seconds", finished, "when the last run ended (Unix time)", **cmd)
    m.add("immich_stream_last_exit_code", outcome.code, "exit code of the last run (0 = success)", **cmd)
    m.add("immich_stream_last_duration_seconds", seconds, "how long the last run took", **cmd)
    m.add("immich_stream_last_problems", len(outcome.problems), "problems the last run listed", **cmd)
    s = outcome.summary
    if command == "backup" and outcome.code in (0, 3, 5, 6) and "id" in s:
        files = s.get("files", {})
        m.add("immich_stream_backup_downtime_seconds", s.get("downtime_seconds"), "how long Immich was down")
        for kind in ("files", "new", "changed", "unchanged", "moved", "touched", "skipped", "failed"):
            m.add(
                "immich_stream_backup_files", files.get(kind), "files in the snapshot, by what the run did", kind=kind
            )
        for kind, key in (("total", "bytes_total"), ("read", "bytes_read")):
            m.add("immich_stream_backup_bytes", files.get(key), "bytes in the snapshot, read, uploaded", kind=kind)
        uploaded = s.get("bytes_uploaded", files.get("bytes_uploaded"))  # both passes
        m.add("immich_stream_backup_bytes", uploaded, "bytes in the snapshot, read, uploaded", kind="uploaded")
        db = s.get("database", {})
        m.add("immich_stream_backup_dump_bytes", db.get("size"), "the database dump", kind="sql")
        m.add("immich_stream_backup_dump_bytes", db.get("compressed_size"), "the database dump", kind="gzip")
        m.add("immich_stream_backup_complete", 1 if s.get("complete") else 0, "1 when no file was left out")
    _copy_metrics(m, s.get("copies") or [])
    success = outcome.code == 0 if command != "backup" else outcome.code in (0, 5, 6) and "id" in s
    carried = list(KEPT_ON_FAILURE[1:] if success else KEPT_ON_FAILURE)
    if success:
        m.add(
            "immich_stream_last_success_timestamp_seconds",
            finished,
            "when the last successful run ended (Unix time)",
            **cmd,
        )
    if snapshots is not None:
        carried = [n for n in carried if n not in KEPT_ON_FAILURE[1:]]
        m.add("immich_stream_snapshots", len(snapshots), "committed snapshots in the repository")
        for sid in snapshots:
            t = snapshot_time(sid)
            m.add("immich_stream_snapshot_timestamp_seconds", t, "when each snapshot was taken", snapshot=sid)
        for sid in snapshots:
            t = snapshot_time(sid)
            age = None if t is None else finished - t
            m.add(
                "immich_stream_snapshot_age_seconds",
                age,
                "age of each snapshot when this file was written",
                snapshot=sid,
            )
    m.kept = _previous(path, tuple(carried))
    return m.text()


def _copy_metrics(m: Metrics, copies: list[dict[str, Any]]) -> None:
    """Per destination of `copy` or backup --copy-to: ok or failed, what was copied, and
    the newest snapshot the destination holds from this repository."""
    for c in copies:
        repo = {"repository": str(c.get("repository"))}
        m.add("immich_stream_copy_ok", 1 if c.get("ok") else 0, "1 when the last copy to it succeeded", **repo)
        if not c.get("ok"):
            continue
        m.add("immich_stream_copy_objects", c.get("objects"), "objects the last copy to it copied", **repo)
        m.add("immich_stream_copy_bytes", c.get("bytes"), "bytes the last copy to it copied", **repo)
        last = c.get("last_snapshot")
        t = snapshot_time(last) if isinstance(last, str) else None
        m.add(
            "immich_stream_copy_last_snapshot_timestamp_seconds",
            t,
            "when the newest snapshot copied to it was taken",
            **repo,
        )


def write_metrics(path: Path, text: str) -> None:
    """Atomically (a temporary file in the same directory, renamed): the collector never
    reads half a file. A character device or a pipe (/dev/null, a FIFO) is written as a
    stream instead, never replaced by a file. A failure is logged, never raised."""
    tmp: str | None = None
    try:
        if _write_stream(path, text):
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        log.warning(
            "could not write the metrics file %s (%s): the run itself is not affected", path, exc.strerror or exc
        )
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _write_stream(path: Path, text: str) -> bool:
    """Write text to path if it is a character device or a pipe (a FIFO without a reader is
    an error, not a wait); False for anything else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        return False
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return True
