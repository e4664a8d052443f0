"""This host's own state (the state directory): the host lock of backups, the run files
that prove a run on this host is gone, where the stack's recovery file lives, and which
container (if any) this process runs in. Nothing here talks to S3 or Docker."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from immich_stream.errors import LockError

_TOKEN = re.compile(r"[0-9a-f]{32}")


def state_dir(environ: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """Where the host lock and the stack's recovery file live. As root, one system-wide
    place: a cron run and an interactive `sudo` run (whose HOME may differ) must share the
    lock and find each other's recovery file. Other users: XDG_STATE_HOME."""
    environ = os.environ if environ is None else environ
    explicit = environ.get("IMMICH_STREAM_STATE_DIR")
    if explicit:
        return Path(os.path.expanduser(explicit))
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/lib/immich-stream")
    base = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative one is to be ignored
        base = os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return Path(base) / "immich-stream"


def stack_lock(project: str) -> contextlib.AbstractContextManager[None]:
    """The host lock of one compose project: backups, and restores of its database, never
    stop and start the stack at once."""
    return local_lock(f"backup-{project}", state_dir())


def stack_state_file(project: str) -> Path:
    """What a backup stopped, written before the first stop: `recover` acts on it after a SIGKILL."""
    return state_dir() / f"stack-{project}.json"


@contextlib.contextmanager
def local_lock(name: str, state: Path) -> Iterator[None]:
    """An flock on this host: two backups of the same project never run at once. The
    kernel releases it when the process dies, however it dies."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise LockError(
                f"another immich-stream run on this host holds {path} (pid {holder}): wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


_CONTAINER_ID = re.compile(rb"/containers/([0-9a-f]{64})/")
_CGROUP_ID = re.compile(rb"(?:docker[-/]|/libpod-)([0-9a-f]{64})")


def own_container_id() -> str | None:
    """The id of the container this process runs in (or the 12-character prefix Docker
    makes its hostname), None outside one. Docker bind-mounts /etc/hostname from
    .../containers/<id>/hostname: that holds with host networking and a private cgroup
    namespace alike; the cgroup path and the hostname are the fallbacks."""
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            for line in fh:
                fields = line.split()
                mounted_at = fields[4] if len(fields) > 4 else b""
                if mounted_at in (b"/etc/hostname", b"/etc/hosts", b"/etc/resolv.conf") and (
                    m := _CONTAINER_ID.search(fields[3])
                ):
                    return m.group(1).decode()
    except OSError:
        pass
    try:
        if m := _CGROUP_ID.search(Path("/proc/self/cgroup").read_bytes()):
            return m.group(1).decode()
    except OSError:
        pass
    host = os.uname().nodename
    if os.path.exists("/.dockerenv") and re.fullmatch(r"[0-9a-f]{12}", host):
        return host
    return None


def run_alive(pid: int) -> bool:
    """Is pid a running immich-stream process on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie or a reused pid of another program is not a run.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"immich_stream" in cmdline or b"immich-stream" in cmdline


# -- this host's runs: runs/<token>.run in the state directory, flocked while the run lives --


def run_file(token: str) -> Path:
    return state_dir() / "runs" / f"{token}.run"


def claim_run(token: str) -> int:
    path = run_file(token)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh random name: nobody else holds it
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_run(token: str, fd: int, lock_removed: bool = True) -> None:
    """The run is over. While its lock object may still be in the bucket (removing it
    failed), its run file stays, unlocked: other runs on this host then see that lock as
    stale at once (local_run_gone) instead of after 30 minutes."""
    if lock_removed:
        with contextlib.suppress(OSError):
            run_file(token).unlink()
    os.close(fd)


def local_run_gone(token: str) -> bool:
    """True only when this host's state directory proves the run with this token is gone:
    its run file exists and nobody holds its flock (the kernel dropped it with the process)."""
    if not _TOKEN.fullmatch(token):
        return False
    try:
        fd = os.open(run_file(token), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False  # not a run of this host, as far as this state directory knows
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def forget_run(token: str | None) -> None:
    """Remove the run file of a gone run whose lock was removed."""
    if token is not None and local_run_gone(token):
        with contextlib.suppress(OSError):
            run_file(token).unlink()
