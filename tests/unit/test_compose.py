"""Compose files as people write them (issue 25), resolved from real files on disk as docker
compose would: Immich's release compose file and example .env, several files (`-f a -f b`,
COMPOSE_FILE and its separator, the override file), the project name (COMPOSE_PROJECT_NAME,
`name:`, the directory's name), an env file elsewhere (--env-file), ${VAR:-default} in the
volumes, and DB_DATA_LOCATION as a named volume. No Docker: tests/test_compose_stacks.py
brings such projects up."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from immich_stream import config as cfg
from immich_stream.config.compose import normalise_project
from immich_stream.errors import ConfigError

CORPUS = Path(__file__).resolve().parent.parent / "data" / "immich-config"

SERVER = """
services:
  immich-server:
    container_name: photos_app
    image: ghcr.io/immich-app/immich-server:release
    volumes:
      - ${UPLOAD_LOCATION:-./library}:/data
  database:
    container_name: photos_db
    image: ghcr.io/immich-app/postgres:14-vectorchord0.4.3
    volumes:
      - ${DB_DATA_LOCATION:-./pg}:/var/lib/postgresql/data
"""


def load(tmp_path: Path, flags: dict[str, object] | None = None, **environ: str) -> cfg.Settings:
    return cfg.load(flags=flags, environ={"XDG_CONFIG_HOME": str(tmp_path / "xdg"), **environ})


def test_immichs_release_compose_file_and_example_env(tmp_path: Path) -> None:
    d = tmp_path / "immich-app"
    d.mkdir()
    shutil.copy(CORPUS / "release.docker-compose.yml", d / "docker-compose.yml")
    shutil.copy(CORPUS / "example.env", d / ".env")
    (d / "library").mkdir()
    s = load(tmp_path, IMMICH_DIR=str(d))
    assert (s.project, s.library_dir, s.postgres_dir) == ("immich", d / "library", d / "postgres")
    assert s.compose_file == (d / "docker-compose.yml",)
    assert s.db_service == "database" and s.postgres_volume is None
    assert s.sources["library_dir"] == "docker-compose.yml services.immich-server.volumes"


def test_defaults_of_variables_in_the_volumes_apply_when_the_env_file_is_silent(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "compose.yaml").write_text("name: photos\n" + SERVER)
    (tmp_path / "app" / ".env").write_text("DB_USERNAME=photos\n")
    s = load(tmp_path, IMMICH_DIR=str(tmp_path / "app"))
    assert s.library_dir == tmp_path / "app" / "library" and s.postgres_dir == tmp_path / "app" / "pg"
    assert (s.project, s.db_user) == ("photos", "photos")
    assert s.sources["project"] == f"{tmp_path / 'app' / 'compose.yaml'} name:"


def test_two_files_merged_in_order_volumes_by_target_and_the_last_name(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text("name: first\n" + SERVER)
    (tmp_path / "b.yml").write_text(
        "name: second\nservices:\n  immich-server:\n    volumes:\n      - /srv/photos:/data\n"
        "      - /etc/localtime:/etc/localtime:ro\n"
    )
    s = load(tmp_path, {"compose_file": [str(tmp_path / "a.yml"), str(tmp_path / "b.yml")]})
    assert s.project == "second" and s.library_dir == Path("/srv/photos")
    assert s.postgres_dir == tmp_path / "pg"  # from a.yml, relative to the first file's directory
    assert s.compose_file == (tmp_path / "a.yml", tmp_path / "b.yml")


@pytest.mark.parametrize("separator", [None, ";"])
def test_compose_file_variable_with_its_separator(tmp_path: Path, separator: str | None) -> None:
    d = tmp_path / "app"
    (d / "extra").mkdir(parents=True)
    (d / "docker-compose.yml").write_text("name: ignored-default\n" + SERVER)  # not listed: not read
    (d / "base.yml").write_text("name: listed\n" + SERVER)
    (d / "extra" / "nas.yml").write_text(
        "services:\n  database:\n    volumes:\n      - /nas/pg:/var/lib/postgresql/data\n"
    )
    env = {"IMMICH_DIR": str(d), "COMPOSE_FILE": f"base.yml{separator or ':'}extra/nas.yml"}
    if separator:
        env["COMPOSE_PATH_SEPARATOR"] = separator
    s = load(tmp_path, **env)
    assert (s.project, s.postgres_dir, s.library_dir) == ("listed", Path("/nas/pg"), d / "library")


def test_compose_file_named_in_the_env_file(tmp_path: Path) -> None:
    d = tmp_path / "app"
    d.mkdir()
    (d / "main.yml").write_text(SERVER)
    (d / ".env").write_text("COMPOSE_FILE=main.yml\nCOMPOSE_PROJECT_NAME=from-env-file\nUPLOAD_LOCATION=/photos\n")
    s = load(tmp_path, IMMICH_DIR=str(d))
    assert (s.project, s.library_dir) == ("from-env-file", Path("/photos"))
    assert s.sources["project"].endswith(".env COMPOSE_PROJECT_NAME")


def test_override_file_is_merged_when_no_file_is_named(tmp_path: Path) -> None:
    d = tmp_path / "app"
    d.mkdir()
    (d / "docker-compose.yml").write_text("name: immich\n" + SERVER)
    (d / "docker-compose.override.yml").write_text(
        "services:\n  immich-server:\n    volumes:\n      - /mnt/big/library:/data\n"
    )
    s = load(tmp_path, IMMICH_DIR=str(d))
    assert s.library_dir == Path("/mnt/big/library")
    assert s.compose_file == (d / "docker-compose.yml", d / "docker-compose.override.yml")


@pytest.mark.parametrize(
    ("directory", "project"), [("immich-app", "immich-app"), ("My Photos.2024", "myphotos2024"), ("_Immich", "immich")]
)
def test_project_name_from_the_directory_as_compose_normalises_it(tmp_path: Path, directory: str, project: str) -> None:
    d = tmp_path / directory
    d.mkdir()
    (d / "compose.yml").write_text(SERVER)
    s = load(tmp_path, IMMICH_DIR=str(d))
    assert s.project == project == normalise_project(directory)
    assert "project directory" in s.sources["project"]
    # the environment's COMPOSE_PROJECT_NAME beats everything, as in compose
    assert load(tmp_path, IMMICH_DIR=str(d), COMPOSE_PROJECT_NAME="other").project == "other"


def test_env_file_elsewhere(tmp_path: Path) -> None:
    d, secrets = tmp_path / "app", tmp_path / "secrets"
    d.mkdir()
    secrets.mkdir()
    (d / "docker-compose.yml").write_text("name: ${STACK_NAME:-immich}\n" + SERVER)
    (d / ".env").write_text("UPLOAD_LOCATION=/wrong\nDB_USERNAME=wrong\n")  # not read with --env-file
    (secrets / "immich.env").write_text(
        "STACK_NAME=vault\nUPLOAD_LOCATION=/srv/immich/upload\nDB_USERNAME=vault_user\nDB_DATA_LOCATION=/srv/pg\n"
    )
    s = load(tmp_path, {"env_file": str(secrets / "immich.env")}, IMMICH_DIR=str(d))
    assert (s.project, s.library_dir, s.postgres_dir, s.db_user) == (
        "vault",
        Path("/srv/immich/upload"),
        Path("/srv/pg"),
        "vault_user",
    )
    assert s.sources["db_user"] == f"{secrets / 'immich.env'} DB_USERNAME"
    # the environment still beats the env file, in the settings as in compose's interpolation
    s = load(tmp_path, {"env_file": str(secrets / "immich.env")}, IMMICH_DIR=str(d), UPLOAD_LOCATION="/env/lib")
    assert s.library_dir == Path("/env/lib")


@pytest.mark.parametrize(
    ("top", "volume"),
    [
        ("volumes:\n  pgdata:\n", "photos_pgdata"),
        ("volumes:\n  pgdata:\n    name: immich-db\n", "immich-db"),
        ("volumes:\n  pgdata:\n    external: true\n", "pgdata"),
    ],
)
def test_db_data_location_as_a_named_volume(tmp_path: Path, top: str, volume: str) -> None:
    d = tmp_path / "app"
    d.mkdir()
    (d / "compose.yaml").write_text("name: photos\n" + SERVER + top)
    (d / ".env").write_text("DB_DATA_LOCATION=pgdata\nUPLOAD_LOCATION=./library\n")
    s = load(tmp_path, IMMICH_DIR=str(d))
    assert s.postgres_dir is None and s.postgres_volume == volume
    # POSTGRES_DIR (where the volume is mounted, in a sidecar) wins and needs no Docker
    s = load(tmp_path, IMMICH_DIR=str(d), POSTGRES_DIR="/mnt/pg")
    assert s.postgres_dir == Path("/mnt/pg") and s.postgres_volume is None


def test_broken_compose_files_are_one_line(tmp_path: Path) -> None:
    d = tmp_path / "app"
    d.mkdir()
    (d / "docker-compose.yml").write_text("services:\n  a: [\n")
    with pytest.raises(ConfigError, match=r"docker-compose.yml line \d+ is not valid YAML: `docker compose config`"):
        load(tmp_path, IMMICH_DIR=str(d))
    with pytest.raises(ConfigError, match=r"compose_file .*missing.yml does not exist: fix --compose-file"):
        load(tmp_path, IMMICH_DIR=str(d), COMPOSE_FILE="missing.yml")
    (d / "docker-compose.yml").write_text("services:\n  immich-server:\n    volumes: ['${UP:?set UP in .env}:/data']\n")
    with pytest.raises(ConfigError, match=r"UP\} is required: set UP in .env"):
        load(tmp_path, IMMICH_DIR=str(d))


def test_the_database_service_is_the_one_that_mounts_postgres_data(tmp_path: Path) -> None:
    d = tmp_path / "app"
    d.mkdir()
    (d / "compose.yaml").write_text(
        SERVER.replace("database:", "pg:") + "  postgres-exporter:\n    image: postgres-exporter\n"
    )
    s = load(tmp_path, IMMICH_DIR=str(d))
    assert s.db_service == "pg" and s.postgres_dir == d / "pg"


def test_immichs_pgvecto_rs_era_compose_file_mounts_the_library_at_its_old_target(tmp_path: Path) -> None:
    d = tmp_path / "immich-app"
    d.mkdir()
    shutil.copy(CORPUS / "pgvectors.docker-compose.yml", d / "docker-compose.yml")
    (d / ".env").write_text("UPLOAD_LOCATION=/photos\nDB_DATA_LOCATION=/pg\n")
    s = load(tmp_path, IMMICH_DIR=str(d))
    assert (s.library_dir, s.postgres_dir) == (Path("/photos"), Path("/pg"))
    assert "services.immich-server.volumes" in s.sources["library_dir"]


def test_an_unset_variable_in_a_volume_is_no_volume_named_after_the_project(tmp_path: Path) -> None:
    d = tmp_path / "app"
    d.mkdir()
    shutil.copy(CORPUS / "release.docker-compose.yml", d / "docker-compose.yml")  # ${DB_DATA_LOCATION}, unset
    s = load(tmp_path, IMMICH_DIR=str(d))
    assert (s.postgres_dir, s.postgres_volume, s.library_dir) == (None, None, None)
    with pytest.raises(ConfigError, match="postgres_dir is not set"):
        s.require("postgres_dir")
