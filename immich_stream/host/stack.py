"""The Immich stack through the Docker API (aiodocker): find, stop, start, always restore.

`StackGuard` remembers which containers it stopped, in memory and in a small state file
written before the first stop and removed after the last start, so that a run killed with
SIGKILL is repaired by the next one (`recover()`), before it does anything else.

Every Docker API request has a deadline (DOCKER_DEADLINE, or the one `connect()` is given:
IMMICH_STREAM_DOCKER_DEADLINE, read by config into `settings.tuning`; a stop its own, longer one):
a wedged dockerd fails the call with one line (StackError) instead of keeping the run, and
the repository lock it holds, alive for ever. The output of a command running in a
container (pg_dump, psql) is a stream with no deadline: only its start is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

from immich_stream.config import Settings
from immich_stream.errors import ConfigError, StackError
from immich_stream.host.hoststate import own_container_id, run_alive, stack_state_file, state_dir

log = logging.getLogger(__name__)

PROJECT_LABEL = "com.docker.compose.project"
STOP_TIMEOUT = 30  # seconds Docker waits before SIGKILL; Postgres stops on SIGINT in well under that
STOP_WAIT = STOP_TIMEOUT + 30  # seconds a stop request may take before Docker is taken to hang
DOCKER_DEADLINE = 60.0  # seconds any other Docker API request may take

# The Docker client as the layers above hold it: passed back into host/ functions, never
# used by them directly (only host/ imports aiodocker).
Docker = aiodocker.Docker


class DeadlineDocker(aiodocker.Docker):
    """aiodocker whose every request has a deadline (the client-level timeout; long-running
    ones, exec streams and `stop`, set their own), reported as one line."""

    def __init__(self, deadline: float) -> None:
        super().__init__(timeout=aiohttp.ClientTimeout(total=deadline))
        self.deadline = deadline

    async def _do_query(self, path: Any, method: str, *args: Any, **kwargs: Any) -> aiohttp.ClientResponse:
        try:
            return await super()._do_query(path, method, *args, **kwargs)
        except TimeoutError:
            raise StackError(
                f"Docker did not answer {method} {path} within {self.deadline:.0f} s: dockerd seems wedged; "
                "check it (`docker info`, its logs) and run again"
            ) from None


@dataclass
class Container:
    id: str
    name: str
    running: bool


@contextlib.asynccontextmanager
async def connect(deadline: float | None = None) -> AsyncIterator[aiodocker.Docker]:
    """A Docker client whose requests end after `deadline` seconds (None: DOCKER_DEADLINE;
    the caller passes settings.tuning.docker_deadline)."""
    deadline = DOCKER_DEADLINE if deadline is None else deadline
    try:
        docker = DeadlineDocker(deadline)
    except Exception as exc:
        raise StackError(f"cannot reach Docker ({exc}): is dockerd running, and may this user use it?") from None
    try:
        yield docker
    finally:
        await docker.close()


class Stack:
    def __init__(self, docker: aiodocker.Docker, project: str, db_container: str) -> None:
        self.docker = docker
        self.project = project
        self.db_container = db_container
        self._own: dict[str, Any] | None = None
        self._own_looked = False

    async def own_container(self) -> dict[str, Any] | None:
        """The inspect data of the container this process runs in, None outside one (or
        when Docker does not know it: another engine's container)."""
        if not self._own_looked:
            cid = own_container_id()
            self._own = await self._get(cid) if cid else None
            self._own_looked = True
        return self._own

    async def own_name(self) -> str | None:
        own = await self.own_container()
        if own is None:
            return None
        return str(own.get("Name", "")).lstrip("/") or None

    async def check_recovery_record(self, state: Path) -> None:
        """In a container, the state directory must outlive it: the recovery file there is
        what starts the stack again after a run killed with the stack stopped. A path in the
        container's own layer, a tmpfs, or an anonymous volume of a `docker run --rm`
        container goes with the container. Refused before anything is stopped."""
        own = await self.own_container()
        if own is None:
            return
        state = state if state.is_absolute() else Path.cwd() / state
        mount: dict[str, Any] | None = None
        for m in own.get("Mounts") or []:
            dest = str(m.get("Destination", ""))
            if (state == Path(dest) or Path(dest) in state.parents) and (
                mount is None or len(dest) > len(mount["Destination"])
            ):
                mount = m
        kind = (mount or {}).get("Type")
        anonymous = kind == "volume" and re.fullmatch(r"[0-9a-f]{64}", str((mount or {}).get("Name", "")))
        auto_remove = bool((own.get("HostConfig") or {}).get("AutoRemove"))
        if kind in ("bind", "volume") and not (anonymous and auto_remove):
            return
        name = str(own.get("Name", "")).lstrip("/")
        raise ConfigError(
            f"the state directory {state} is not on a volume that outlives this container ({name}): the record of "
            "which containers a run stopped would go with it, and a killed run would leave Immich stopped; mount "
            f"one (docker run -v immich-stream-state:{state} ..., as contrib/compose.backup.yml does) or use "
            "--stop none; nothing was stopped"
        )

    async def ping(self) -> None:
        try:
            await self.docker.version()
        except StackError:
            raise  # a deadline: says so itself
        except Exception as exc:
            where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
            raise StackError(
                f"cannot reach Docker at {where} ({type(exc).__name__}): is dockerd running, and may this user use it?"
            ) from None

    async def containers(self) -> list[Container]:
        """Every container of the compose project, plus the database container by name."""
        try:
            found = await self.docker.containers.list(
                all=True, filters=json.dumps({"label": [f"{PROJECT_LABEL}={self.project}"]})
            )
        except aiodocker.DockerError as exc:
            raise StackError(f"cannot list containers: {exc.message}") from None
        out = [self._info(c._container) for c in found]
        if not any(c.name == self.db_container for c in out):
            db = await self._get(self.db_container)
            if db is not None:
                out.append(self._info(db))
        return sorted(out, key=lambda c: c.name)

    async def _get(self, name: str) -> dict[str, Any] | None:
        try:
            c = await self.docker.containers.get(name)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise StackError(f"cannot look up container {name}: {exc.message}") from None
        return c._container

    @staticmethod
    def _info(raw: dict[str, Any]) -> Container:
        names = raw.get("Names") or [raw.get("Name", "")]
        state = raw.get("State")
        running = state == "running" if isinstance(state, str) else bool((state or {}).get("Running"))
        return Container(raw["Id"], names[0].lstrip("/"), running)

    async def run_state(self, name: str) -> tuple[bool, str]:
        """(running, StartedAt) of a container: a restart changes StartedAt."""
        raw = await self._get(name)
        if raw is None:
            raise StackError(f"container {name} disappeared: check `docker ps -a`")
        state = raw.get("State") or {}
        return bool(state.get("Running")), str(state.get("StartedAt", ""))

    async def preflight(self) -> list[Container]:
        """Docker answers, the project has containers, the database container exists and runs."""
        await self.ping()
        containers = await self.containers()
        if not any(c.name != self.db_container for c in containers):
            raise StackError(
                f"no containers of compose project {self.project!r} found: set COMPOSE_PROJECT_NAME (or --project) "
                "to the name `docker compose ls` shows"
            )
        db = [c for c in containers if c.name == self.db_container]
        if not db:
            raise StackError(
                f"database container {self.db_container!r} not found, nor a container of compose project "
                f"{self.project!r} whose service runs Postgres: set DB_CONTAINER to its name (`docker ps`)"
            )
        if not db[0].running:
            raise StackError(f"database container {self.db_container!r} is not running: start Immich first")
        return containers

    async def stop(self, names: list[str]) -> None:
        """Stop containers; every stop is awaited, then the first failure raised: a restart
        must never race a stop still in flight (it would land after the start)."""

        async def one(name: str) -> None:
            try:
                # Bounded: dockerd kills the container after STOP_TIMEOUT; a stop that takes
                # much longer is Docker hanging (a container stuck on a dead NFS mount).
                async with asyncio.timeout(STOP_WAIT):
                    await self.docker.containers.container(name).stop(t=STOP_TIMEOUT, timeout=None)
            except TimeoutError:
                raise StackError(
                    f"Docker did not stop {name} within {STOP_WAIT} s: check dockerd and `docker inspect {name}`"
                ) from None
            except aiodocker.DockerError as exc:
                if exc.status != 304:  # 304: already stopped
                    raise StackError(f"cannot stop container {name}: {exc.message}") from None

        results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def start(self, names: list[str]) -> None:
        """Start containers; try every one, then report all that failed."""
        failures: list[str] = []

        async def one(name: str) -> None:
            try:
                async with asyncio.timeout(STOP_WAIT):
                    await self.docker.containers.container(name).start()
            except TimeoutError:
                failures.append(f"{name} (Docker did not answer within {STOP_WAIT} s)")
            except StackError:  # the request's own deadline
                failures.append(f"{name} (Docker did not answer)")
            except aiodocker.DockerError as exc:
                if exc.status != 304:  # 304: already running
                    failures.append(f"{name} ({exc.message})")

        await asyncio.gather(*(one(n) for n in names))
        if failures:
            raise StackError(
                f"cannot start {', '.join(failures)}: start them with `docker start` and check `docker logs`"
            )

    async def check_running(self, names: list[str], timeout: float = 10.0, settle: float = 1.0) -> list[str]:
        """Start again, for `timeout` seconds, any named container that is not running;
        return those that still are not (a crash-looping app is reported, not waited for).
        Each look comes `settle` seconds after a start: one that dies at once shows it by then."""
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.sleep(settle)
            state = {c.name: c.running for c in await self.containers()}
            down = [n for n in names if not state.get(n)]
            if not down or time.monotonic() > deadline:
                return down
            with contextlib.suppress(StackError):
                await self.start(down)

    async def wait_db_ready(self, user: str, timeout: float = 120.0) -> None:
        """Poll pg_isready inside the database container (no fixed sleep)."""
        from immich_stream.host.docker_exec import run_in_container

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                code, out = await run_in_container(self.docker, self.db_container, ["pg_isready", "--username", user])
                if code == 0:
                    return
                last = out.decode(errors="replace").strip()
            except StackError as exc:
                last = str(exc)
            await asyncio.sleep(0.25)
        raise StackError(
            f"the database in {self.db_container} was not ready after {timeout:.0f}s ({last}): "
            "check `docker logs " + self.db_container + "`"
        )


SERVICE_LABEL = "com.docker.compose.service"
ONEOFF_LABEL = "com.docker.compose.oneoff"


async def find_containers(docker: aiodocker.Docker, settings: Settings) -> None:
    """The database container by its compose labels, unless DB_CONTAINER (or the config
    file, or --db-container) names it: the project's container of the compose service that
    runs Postgres (the compose files' database service, else `database`, else the one whose
    image is a postgres image). A container_name that is not the default needs no setting.
    Settings are updated in place, with where the name came from."""
    if settings.sources.get("db_container", "default") != "default":
        return
    try:
        found = await docker.containers.list(
            all=True, filters=json.dumps({"label": [f"{PROJECT_LABEL}={settings.project}"]})
        )
    except StackError:
        raise  # a deadline: says so itself
    except Exception:
        return  # Docker out of reach: the ping that comes next says so in its own words
    own = own_container_id() or ""
    raw = [
        c._container
        for c in found
        if (c._container.get("Labels") or {}).get(ONEOFF_LABEL, "False") != "True"  # `docker compose run`
        and not (own and str(c._container.get("Id", "")).startswith(own))  # ourselves, as a sidecar
    ]
    service = settings.db_service or "database"
    by_service = [c for c in raw if (c.get("Labels") or {}).get(SERVICE_LABEL) == service]
    # Guess by image only without compose files: with them, their database service is the one
    # (a container of another service with postgres in its image is a sidecar: a backup job, an admin UI)
    by_image = [c for c in raw if "postgres" in str(c.get("Image", "")).lower()] if not settings.db_service else []
    pick = by_service or (by_image if len(by_image) == 1 else [])
    running = [c for c in pick if c.get("State") == "running"]
    if not running and len(pick) > 1:  # all stopped (a run killed with the stack down?): which is
        pick = []  # unknown, and recover() must not be kept from starting them again: the default name
    if len(running) > 1:
        names = ", ".join(sorted(str((c.get("Names") or [""])[0]).lstrip("/") for c in running))
        raise ConfigError(
            f"compose project {settings.project!r} has several containers of its database service {service} "
            f"({names}): set DB_CONTAINER to the one Immich uses; nothing was stopped"
        )
    if pick:
        c = (running or pick)[0]
        settings.db_container = str((c.get("Names") or [""])[0]).lstrip("/")
        label = (c.get("Labels") or {}).get(SERVICE_LABEL, "?")
        settings.sources["db_container"] = f"compose labels: project {settings.project}, service {label}"


def _readable_dir(path: Path) -> bool:  # a stat and an access(2): not worth a thread
    return path.is_dir() and os.access(path, os.R_OK | os.X_OK)


async def postgres_volume_dir(docker: aiodocker.Docker, settings: Settings) -> None:
    """DB_DATA_LOCATION as a named volume: its mountpoint, from Docker, becomes postgres_dir
    for the cold copy, which reads it like any directory. Refused with one line, before
    anything is stopped, when the volume does not exist or its directory cannot be read
    from where this runs (a container without the volume, a user that is not root)."""
    name = settings.postgres_volume
    if name is None or settings.postgres_dir is not None:
        return
    try:
        info = await docker._query_json(f"volumes/{name}")
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            raise ConfigError(
                f"DB_DATA_LOCATION is the named volume {name}, which Docker does not have: check the project name "
                "(`docker volume ls`), or set POSTGRES_DIR; nothing was stopped"
            ) from None
        raise StackError(f"cannot look up volume {name}: {exc.message}") from None
    mountpoint = Path(str(info.get("Mountpoint") or ""))  # "" (a volume plugin's, unmounted) is no "."
    if not mountpoint.is_absolute() or not _readable_dir(mountpoint):
        raise ConfigError(
            f"DB_DATA_LOCATION is the named volume {name}, at {mountpoint} on the Docker host, which cannot be read "
            "from here: run as root on the Docker host, or mount the volume into immich-stream's container and set "
            "POSTGRES_DIR to where, or use --stop app (the database as a dump only); nothing was stopped"
        )
    settings.postgres_dir = mountpoint
    settings.sources["postgres_dir"] = f"docker volume {name}"


RESTART_DEADLINE = 120.0  # seconds the restart may take when Docker itself hangs


class StackGuard:
    """Stops containers and guarantees they are started again.

    `async with StackGuard(stack) as guard:` ... `await guard.stop(names)` ... on leaving the
    block (success, error, cancellation, a signal during cleanup) every container it stopped
    is started again. The state file makes this survive SIGKILL: see `recover()`.
    """

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.stopped: list[str] = []  # in stop order
        self.state_file = stack_state_file(stack.project)
        self.stopped_at: float | None = None
        self.started_at: float | None = None
        self.unstable: list[str] = []  # restarted, but did not stay running
        self._stopping: asyncio.Future[None] | None = None
        self._restoring: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StackGuard:
        return self

    def _write_state(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        body = {
            "containers": self.stopped,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": dt.datetime.now(dt.UTC).isoformat(),
        }
        with open(tmp, "w") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_file)

    async def stop(self, names: list[str]) -> None:
        names = [n for n in names if n not in self.stopped]
        # Run as a service of Immich's own compose project (a sidecar added to its
        # docker-compose.yml): never stop ourselves, stop the others around us.
        own = await self.stack.own_name()
        if own in names:
            log.info("%s (this container) belongs to compose project %s: it is left running", own, self.stack.project)
            names.remove(own)
        if not names:
            return
        if not self.stopped:
            await self.stack.check_recovery_record(state_dir())
        self.stopped.extend(names)
        self._write_state()  # before the first stop: a SIGKILL from here on is recoverable
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
        log.info("stopping %s", ", ".join(names))
        # Shielded: dockerd goes on stopping a container when the request is cancelled, so
        # a cancelled run must wait for the stop before starting the container again, or
        # the stop would land after the start.
        self._stopping = asyncio.ensure_future(self.stack.stop(names))
        await asyncio.shield(self._stopping)

    async def start(self, names: list[str]) -> None:
        await self.stack.start(names)
        self.stopped = [n for n in self.stopped if n not in names]

    @property
    def down(self) -> bool:
        return bool(self.stopped)

    async def restore(self) -> None:
        """Start everything still stopped, the database first; see that they stay up.
        Runs to its end once begun: a cancellation (a signal during cleanup) is noted and
        raised only after the restart was issued."""
        if self._restoring is None:
            self._restoring = asyncio.ensure_future(self._restore())
        cancelled = False
        while not self._restoring.done():
            try:
                await asyncio.shield(self._restoring)
            except asyncio.CancelledError:
                if self._restoring.done():
                    break
                cancelled = True  # finish starting the stack first
        self._restoring.result()
        if cancelled:
            raise asyncio.CancelledError

    async def _restore(self) -> None:
        if self._stopping is not None:
            # Each stop is bounded (STOP_WAIT); wait for them all, then start whatever is
            # not running, whether its stop succeeded, failed or hung.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._stopping), STOP_WAIT + 5)
        if self.stopped:
            db_first = sorted(self.stopped, key=lambda n: n != self.stack.db_container)
            log.info("starting %s", ", ".join(db_first))
            try:
                async with asyncio.timeout(RESTART_DEADLINE):
                    if self.stack.db_container in db_first:
                        await self.stack.start([self.stack.db_container])
                    await self.stack.start([n for n in db_first if n != self.stack.db_container])
                    # Up from here (for the downtime and --max-downtime); whether they stay
                    # up is checked next and reported, never a reason to stop them again.
                    self.stopped = []
                    self.started_at = time.monotonic()
                    self.unstable = await self.stack.check_running(db_first)
            except TimeoutError:
                raise StackError(
                    f"Docker did not start {', '.join(db_first)} within {RESTART_DEADLINE:.0f} s: "
                    "check dockerd, then start them with `docker start`; the next run retries"
                ) from None
            self.stopped = []
            if self.unstable:
                log.error(
                    "%s did not stay running after the restart: check `docker logs %s`",
                    ", ".join(self.unstable),
                    self.unstable[0],
                )
        if self.started_at is None:
            self.started_at = time.monotonic()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    @property
    def downtime(self) -> float:
        if self.stopped_at is None:
            return 0.0
        return (self.started_at or time.monotonic()) - self.stopped_at

    async def __aexit__(self, *exc: object) -> None:
        await self.restore()


async def recover(stack: Stack) -> list[str]:
    """Start containers a killed earlier run left stopped (its state file says which)."""
    path = stack_state_file(stack.project)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise StackError(
            f"cannot read {path} ({exc}): check which Immich containers are stopped, start them, then delete that file"
        ) from None
    pid = state.get("pid")
    if state.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and run_alive(pid):
        raise StackError(f"another immich-stream run (pid {pid}) has the Immich stack stopped: wait for it to finish")
    names = list(state.get("containers", []))
    log.warning(
        "a previous run (pid %s, since %s) was killed with the stack stopped: starting %s",
        pid,
        state.get("since"),
        ", ".join(names) or "nothing",
    )
    guard = StackGuard(stack)
    guard.stopped = names
    await guard.restore()
    return names
