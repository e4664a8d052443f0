"""Compose projects as people write them (issue 25), brought up with docker compose and backed
up without DB_CONTAINER or a project name set: immich-stream reads the same files, finds the
containers by their compose labels, and copies a named volume's data directory.

- "vault": two compose files (the second names the project, `name: ${STACK_NAME}`, and gives
  the containers names that are not Immich's), the env file elsewhere (`--env-file`), and
  UPLOAD_LOCATION from its default `${UPLOAD_LOCATION:-./library}`: backup (the cold copy),
  wipe, restore --database.
- "Family Album": no `name:` (the project is the directory's name as compose normalises it,
  familyalbum), the database service called `postgres` with compose's own container name,
  and DB_DATA_LOCATION a named volume: the cold copy reads the volume's mountpoint.
(Config resolution of every variant without Docker: tests/unit/test_compose.py.)
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import _tool, docker
from tests.helpers import make_library, run_cli, wait_for

pytestmark = pytest.mark.docker

IMAGE = "immich-stream-test/postgres:15"
PLACEHOLDER = f"""\
    image: {IMAGE}
    entrypoint: ["/bin/bash", "-c", "trap 'exit 0' TERM INT; sleep infinity & wait"]
"""
SEED = (
    "CREATE TABLE photos (id int PRIMARY KEY, name text NOT NULL);\n"
    "INSERT INTO photos SELECT g, 'IMG_' || g || '.jpg' FROM generate_series(1, 2000) g;\n"
)

VAULT_BASE = f"""\
services:
  immich-server:
{PLACEHOLDER}    volumes:
      - ${{UPLOAD_LOCATION:-./library}}:/data
  database:
    image: {IMAGE}
    environment:
      POSTGRES_PASSWORD: ${{DB_PASSWORD}}
      POSTGRES_USER: ${{DB_USERNAME}}
      POSTGRES_DB: ${{DB_DATABASE_NAME}}
    volumes:
      - ${{DB_DATA_LOCATION:-./pg}}:/var/lib/postgresql/data
      - ./seed:/docker-entrypoint-initdb.d:ro
    stop_signal: SIGINT
"""
VAULT_PROD = """\
name: ${STACK_NAME:-not-this-one}
services:
  immich-server:
    container_name: vault_app
  database:
    container_name: vault_db_main
"""
FAMILY = f"""\
services:
  immich-server:
{PLACEHOLDER}    volumes:
      - ./library:/data
  postgres:
    image: {IMAGE}
    environment:
      POSTGRES_PASSWORD: family-db-password
      POSTGRES_DB: immich
    volumes:
      - ${{DB_DATA_LOCATION:-pgdata}}:/var/lib/postgresql/data
      - ./seed:/docker-entrypoint-initdb.d:ro
    stop_signal: SIGINT
volumes:
  pgdata:
"""


@dataclass
class Project:
    dir: Path
    db: str
    compose: list[str]

    def psql(self, sql: str) -> str:
        return docker("exec", self.db, "psql", "-U", "postgres", "-d", "immich", "-v", "ON_ERROR_STOP=1", "-qAtc", sql)


def _up(d: Path, compose_args: list[str]) -> list[str]:
    (d / "seed").mkdir(parents=True)
    (d / "seed" / "seed.sql").write_text(SEED)
    make_library(d / "library", photos=5, odd_names=False)
    compose = [_tool("docker-compose"), *compose_args]
    subprocess.run([*compose, "down", "-v", "--remove-orphans"], capture_output=True)
    subprocess.run([*compose, "up", "-d"], check=True, capture_output=True)
    return compose


def _ready(db: str) -> bool:  # over TCP: the entrypoint's seeding server answers on the socket only
    return subprocess.run(["docker", "exec", db, "pg_isready", "-h", "127.0.0.1"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def projects(machine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Project]]:
    base = tmp_path_factory.mktemp("compose")
    vault, secrets, family = base / "photos", base / "secrets", base / "Family Album"
    vault.mkdir()
    secrets.mkdir()
    (vault / "docker-compose.yml").write_text(VAULT_BASE)
    (vault / "prod.yml").write_text(VAULT_PROD)
    (vault / ".env").write_text("STACK_NAME=wrong-env-file\n")  # compose reads --env-file instead
    (secrets / "immich.env").write_text(
        "STACK_NAME=vault\nDB_PASSWORD=vault-db-password\nDB_USERNAME=postgres\nDB_DATABASE_NAME=immich\n"
    )
    family.mkdir()
    (family / "compose.yaml").write_text(FAMILY)
    started = {
        "vault": Project(
            vault,
            "vault_db_main",
            _up(
                vault,
                [
                    "-f",
                    str(vault / "docker-compose.yml"),
                    "-f",
                    str(vault / "prod.yml"),
                    "--env-file",
                    str(secrets / "immich.env"),
                ],
            ),
        ),
        "family": Project(family, "familyalbum-postgres-1", _up(family, ["--project-directory", str(family)])),
    }
    try:
        for p in started.values():
            wait_for(lambda p=p: _ready(p.db), 120, 0.3, f"the database of {p.db}")
        yield started
    finally:
        for p in started.values():
            subprocess.run([*p.compose, "down", "-v"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_two_files_name_from_the_second_env_file_elsewhere_backup_and_restore(
    projects: dict[str, Project], s3_env: dict[str, str], tmp_path: Path
) -> None:
    p = projects["vault"]
    labels = docker("inspect", "-f", '{{index .Config.Labels "com.docker.compose.project"}}', p.db)
    assert labels == "vault"  # what docker compose made of the files: the project immich-stream must find
    env = dict(s3_env, IMMICH_DIR=str(p.dir))
    env.pop("DB_CONTAINER", None)
    env.pop("COMPOSE_PROJECT_NAME", None)
    files = ["--compose-file", str(p.dir / "docker-compose.yml"), "--compose-file", str(p.dir / "prod.yml")]
    env_file = ["--env-file", str(p.dir.parent / "secrets" / "immich.env")]
    before = p.psql("SELECT count(*), md5(string_agg(id || name, ',' ORDER BY id)) FROM photos")

    r = run_cli("backup", *files, *env_file, env=env)  # --stop all: the cold copy of ./pg too
    assert r.code == 0, r.err
    assert "stopping vault_app" in r.err, r.err  # found by its labels, then stopped and started
    assert docker("inspect", "-f", "{{.State.Running}}", "vault_app") == "true"

    p.psql("DELETE FROM photos WHERE id % 3 = 0; UPDATE photos SET name = 'lost'")
    # COMPOSE_FILE this time, with the separator compose splits it by; relative to IMMICH_DIR
    r = run_cli("restore", "--database", *env_file, env=dict(env, COMPOSE_FILE="docker-compose.yml:prod.yml"))
    assert r.code == 0, r.err
    assert p.psql("SELECT count(*), md5(string_agg(id || name, ',' ORDER BY id)) FROM photos") == before

    # the snapshot recorded the files compose used, the env file elsewhere too (redacted)
    r = run_cli("restore", "latest", "--config-files", "--to", str(tmp_path / "rebuild"), env=env)
    assert r.code == 0, r.err
    rebuilt = tmp_path / "rebuild"
    assert sorted(f.name for f in rebuilt.iterdir()) == [".env", "docker-compose.yml", "immich.env", "prod.yml"]
    assert (rebuilt / "prod.yml").read_text() == VAULT_PROD
    assert "DB_PASSWORD=" in (rebuilt / "immich.env").read_text()
    assert "vault-db-password" not in (rebuilt / "immich.env").read_text()
    assert (rebuilt / "immich.env").stat().st_mode & 0o777 == 0o600

    r = run_cli("config", *files, *env_file, env=env)
    assert r.code == 0, r.err
    project = next(ln for ln in r.out.splitlines() if ln.split()[:1] == ["project"])
    assert "vault" in project and "prod.yml name:" in project, r.out


def test_directory_project_named_volume_and_a_database_service_of_another_name(
    projects: dict[str, Project], s3_env: dict[str, str], tmp_path: Path
) -> None:
    p = projects["family"]
    env = dict(s3_env, IMMICH_DIR=str(p.dir))
    volume = docker("volume", "inspect", "-f", "{{.Mountpoint}}", "familyalbum_pgdata")
    r = run_cli("backup", env=env)
    assert r.code == 0, r.err
    assert "stopping familyalbum-immich-server-1" in r.err, r.err
    assert docker("inspect", "-f", "{{.State.Running}}", p.db) == "true"

    r = run_cli("restore", "--root", "postgres", "--to", str(tmp_path / "pg"), env=env)
    assert r.code == 0, r.err
    assert (tmp_path / "pg" / "PG_VERSION").read_text() == (Path(volume) / "PG_VERSION").read_text()
    copy, live = (
        (tmp_path / "pg" / "global" / "pg_control").read_bytes(),
        (Path(volume) / "global" / "pg_control").read_bytes(),
    )
    assert copy[:8] == live[:8]  # the same cluster (its system identifier) ...
    assert int.from_bytes(copy[16:20], "little") == 1  # ... copied cold: DB_SHUTDOWNED, not DB_IN_PRODUCTION

    r = run_cli("doctor", env=env)
    assert f"{volume} (named volume familyalbum_pgdata)" in r.out, r.out
    assert "project familyalbum: 2 containers, 2 running; familyalbum-postgres-1 found" in r.out, r.out

    # the volume compose would use for another project does not exist: one line, nothing stopped
    r = run_cli("backup", env=dict(env, COMPOSE_PROJECT_NAME="elsewhere"))
    assert r.code == 2, r.err  # a configuration error
    assert "named volume elsewhere_pgdata, which Docker does not have" in r.last_error, r.err
    assert "nothing was stopped" in r.last_error and "stopping" not in r.err
