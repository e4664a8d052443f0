"""The drill's throwaway PostgreSQL container: created from an image with a fresh labelled
volume and no network, removed with it whatever the way out is; the leftovers of a drill
killed with SIGKILL (labelled with its host and pid) are found and removed by the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from typing import Any

import aiodocker

from immich_stream.errors import ConfigError, DumpError, StackError
from immich_stream.host.docker_exec import run_in_container

log = logging.getLogger(__name__)

LABEL = "immich-stream.drill"  # value: "<host> <pid>" of the drill that made it
READY_TIMEOUT = 180.0
REMOVE_TIMEOUT = 60.0
DEFAULT_PGDATA = "/var/lib/postgresql/data"


async def reachable(docker: aiodocker.Docker) -> None:
    """Docker answers (a version request), or StackError."""
    try:
        await docker.version()
    except StackError:
        raise  # a deadline: says so itself
    except Exception as exc:
        raise StackError(f"cannot reach Docker ({type(exc).__name__}): is dockerd running?") from None


class Throwaway:
    """A PostgreSQL container that exists only for the drill: created with a fresh volume,
    removed with it on the way out, whatever the way out is."""

    def __init__(self, docker: aiodocker.Docker, image: str, user: str, dbname: str, like: dict[str, Any] | None):
        self.docker = docker
        self.image = image
        self.user = user
        self.dbname = dbname
        self.like = like  # the live database container's inspect data (its Cmd, when the image is the same)
        self.name = f"immich-stream-drill-{os.getpid()}-{secrets.token_hex(4)}"

    async def _pgdata(self) -> str:
        try:
            info = await self.docker.images.inspect(self.image)
        except aiodocker.DockerError as exc:
            raise ConfigError(
                f"image {self.image} is not available ({exc.message}): give --image NAME of a local PostgreSQL image"
            ) from None
        for item in (info.get("Config") or {}).get("Env") or []:
            if item.startswith("PGDATA="):
                return str(item.split("=", 1)[1])
        return DEFAULT_PGDATA

    async def __aenter__(self) -> Throwaway:
        pgdata = await self._pgdata()
        labels = {LABEL: f"{socket.gethostname()} {os.getpid()}"}
        env = [f"POSTGRES_USER={self.user}", f"POSTGRES_PASSWORD={secrets.token_hex(16)}", f"POSTGRES_DB={self.dbname}"]
        config: dict[str, Any] = {
            "Image": self.image,
            "Env": env,
            "Labels": labels,
            # No network: nothing can reach it, and it can reach nothing.
            "HostConfig": {
                "NetworkMode": "none",
                "Mounts": [{"Type": "volume", "Source": self.name, "Target": pgdata}],
            },
        }
        if self.like is not None:
            live_env = (self.like.get("Config") or {}).get("Env") or []
            env += [e for e in live_env if e.startswith("POSTGRES_INITDB_ARGS=")]
            if (self.like.get("Config") or {}).get("Cmd"):
                config["Cmd"] = self.like["Config"]["Cmd"]  # e.g. shared_preload_libraries for vector extensions
            if shm := (self.like.get("HostConfig") or {}).get("ShmSize"):
                config["HostConfig"]["ShmSize"] = shm

        async def create() -> None:
            await self.docker.volumes.create(  # type: ignore[no-untyped-call]
                {"Name": self.name, "Labels": labels}
            )
            container = await self.docker.containers.create(config, name=self.name)
            await container.start()

        # Shielded: a Ctrl-C during a create request must not leave a container that
        # dockerd makes after we gave up on it; the removal below waits for it.
        task = asyncio.ensure_future(create())
        try:
            await asyncio.shield(task)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, REMOVE_TIMEOUT)
            await self.remove()
            if isinstance(exc, aiodocker.DockerError):
                raise StackError(f"cannot start a throwaway container from {self.image}: {exc.message}") from None
            raise
        log.info("throwaway database container %s started from %s", self.name, self.image)
        return self

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            info = (await self.docker.containers.get(self.name))._container
            if not (info.get("State") or {}).get("Running"):
                logs = await self.docker.containers.container(self.name).log(stdout=True, stderr=True, tail=5)
                tail = " | ".join(line.strip() for line in logs if line.strip())[-400:]
                raise DumpError(f"the throwaway PostgreSQL container from {self.image} exited: {tail or 'no output'}")
            code, _ = await run_in_container(
                self.docker, self.name, ["pg_isready", "-h", "127.0.0.1", "-U", self.user, "-d", self.dbname]
            )
            if code == 0:
                return
            await asyncio.sleep(0.25)
        raise DumpError(
            f"the throwaway PostgreSQL container from {self.image} was not ready after {READY_TIMEOUT:.0f} s"
        )

    async def remove(self) -> None:
        await remove_drill_objects(self.docker, self.name)

    async def __aexit__(self, *exc: object) -> None:
        await self.remove()


async def remove_drill_objects(docker: aiodocker.Docker, name: str) -> None:
    """Remove a drill's container and volume; bounded, and shielded from a cancellation
    (a Ctrl-C must not leave them behind)."""

    async def remove() -> None:
        with contextlib.suppress(aiodocker.DockerError):
            await docker.containers.container(name).delete(force=True, v=True)
        with contextlib.suppress(aiodocker.DockerError):
            await (await docker.volumes.get(name)).delete()  # type: ignore[no-untyped-call]

    task = asyncio.ensure_future(asyncio.wait_for(remove(), REMOVE_TIMEOUT))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task  # a second cancellation: still wait for the removal
        raise
    except TimeoutError:
        log.warning("could not remove the drill container %s within %.0f s: remove it with docker rm -f", name, 60)


async def remove_leftovers(docker: aiodocker.Docker) -> None:
    """Containers and volumes of drills on this host whose process is gone (SIGKILL)."""
    host = socket.gethostname()
    names: set[str] = set()
    try:
        for c in await docker.containers.list(all=True, filters=json.dumps({"label": [LABEL]})):
            owner = (c._container.get("Labels") or {}).get(LABEL, "")
            names.update(n.lstrip("/") for n in c._container.get("Names") or [] if _dead(owner, host))
        for v in (
            await docker.volumes.list(  # type: ignore[no-untyped-call]
                filters={"label": [LABEL]}
            )
        ).get("Volumes") or []:
            if _dead((v.get("Labels") or {}).get(LABEL, ""), host):
                names.add(v["Name"])
    except aiodocker.DockerError as exc:
        raise StackError(f"cannot list containers: {exc.message}") from None
    for name in sorted(names):
        log.info("removing %s, left by a drill that was killed", name)
        await remove_drill_objects(docker, name)


def _dead(owner: str, host: str) -> bool:
    h, _, pid = owner.rpartition(" ")
    if h != host or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def inspect_container(docker: aiodocker.Docker, name: str) -> dict[str, Any] | None:
    """A container's inspect data, None when there is none of that name."""
    try:
        return (await docker.containers.get(name))._container
    except aiodocker.DockerError:
        return None
