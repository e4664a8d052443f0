"""Compose files that are hostile or odd (review of issue 25): each is one line (ConfigError)
or resolved as docker compose would, never a traceback or a hang. No Docker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from immich_stream import config as cfg
from immich_stream.errors import ConfigError


def load(tmp_path: Path, **environ: str) -> cfg.Settings:
    return cfg.load(environ={"XDG_CONFIG_HOME": str(tmp_path / "xdg"), **environ})


BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (BOMB, "too large or too deeply nested"),  # 9**9 strings once expanded
        ("services: &s\n  x: [*s]\n", "too large or too deeply nested"),  # an alias of itself
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("# padding\n" * 120_000, "over 1024 KiB"),
    ],
    ids=["billion-laughs", "self-alias", "deep", "huge"],
)
def test_hostile_compose_file_is_one_line_and_quick(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "compose.yaml").write_text(text)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=says) as exc:
        load(tmp_path, IMMICH_DIR=str(tmp_path / "app"))
    assert time.monotonic() - t0 < 5 and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "text",
    [
        "services:\n  immich-server:\n    volumes: 5\n  database:\n    volumes: 7\n",
        "services:\n  foo:\n  bar: 3\n",
        "services:\n  immich-server:\n    volumes: [{type: bind, source: [1], target: /data}]\nvolumes: 3\n",
    ],
    ids=["volumes-not-a-list", "service-not-a-mapping", "source-not-a-string"],
)
def test_compose_file_of_the_wrong_shapes_gives_no_paths_and_no_traceback(tmp_path: Path, text: str) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "compose.yaml").write_text(text)
    s = load(tmp_path, IMMICH_DIR=str(tmp_path / "app"))
    assert (s.library_dir, s.postgres_dir, s.postgres_volume) == (None, None, None)


def test_a_required_variable_we_do_not_read_does_not_refuse_a_setup_that_worked(tmp_path: Path) -> None:
    # before issue 25 only `name:` was read: a ${VAR:?} that `docker compose` gets from the shell
    # (here a proxy's label) must not stop a backup whose paths and container are set
    d = tmp_path / "app"
    d.mkdir()
    (d / "docker-compose.yml").write_text(
        "name: immich\nservices:\n  proxy:\n    image: traefik\n    labels: ['host=${DOMAIN:?set DOMAIN}']\n"
        "  immich-server:\n    volumes: ['${UPLOAD_LOCATION}:/data']\n"
    )
    (d / ".env").write_text("UPLOAD_LOCATION=./library\n")
    s = load(tmp_path, IMMICH_DIR=str(d), DB_CONTAINER="immich_postgres")
    assert (s.project, s.library_dir, s.db_container) == ("immich", d / "library", "immich_postgres")
    (d / "docker-compose.yml").write_text("name: ${NAME:?set NAME}\n")  # what we read is still refused
    with pytest.raises(ConfigError, match=r"NAME\} is required: set NAME"):
        load(tmp_path, IMMICH_DIR=str(d))


def test_override_files_with_compose_merge_tags_reset_and_override(tmp_path: Path) -> None:
    # compose 2.24's `!override` and `!reset` are valid compose: refusing them as "not valid YAML"
    # stopped every command of a setup whose paths were all set
    d = tmp_path / "app"
    d.mkdir()
    (d / "docker-compose.yml").write_text(
        "name: immich\nservices:\n  immich-server:\n    volumes: ['./library:/data', '/etc/localtime:/etc/localtime:ro']\n"
        "    ports: ['2283:2283']\n  database:\n    volumes: ['./postgres:/var/lib/postgresql/data']\n"
    )
    (d / "docker-compose.override.yml").write_text(
        "services:\n  immich-server:\n    volumes: !override\n      - /mnt/big/library:/data\n    ports: !reset []\n"
        "  database:\n    volumes: !reset null\n"
    )
    s = load(tmp_path, IMMICH_DIR=str(d))
    assert (s.project, s.library_dir, s.postgres_dir) == ("immich", Path("/mnt/big/library"), None)


def test_upload_location_without_dot_slash_is_a_named_volume_not_the_directory_beside(tmp_path: Path) -> None:
    d = tmp_path / "app"
    (d / "library").mkdir(parents=True)  # stale or empty: Immich writes into the volume immich_library
    (d / "docker-compose.yml").write_text(
        "name: immich\nservices:\n  immich-server:\n    volumes: ['${UPLOAD_LOCATION}:/data']\n"
    )
    (d / ".env").write_text("UPLOAD_LOCATION=library\n")
    assert load(tmp_path, IMMICH_DIR=str(d)).library_dir is None
    (d / ".env").write_text("UPLOAD_LOCATION=./library\n")  # a bind mount: the directory
    assert load(tmp_path, IMMICH_DIR=str(d)).library_dir == d / "library"
    assert load(tmp_path, IMMICH_DIR=str(d), LIBRARY_DIR="/mnt/vol").library_dir == Path("/mnt/vol")


def test_a_default_that_is_itself_a_variable_is_substituted_as_compose_does(tmp_path: Path) -> None:
    # `${UPLOAD_LOCATION:-${BASE}/library}`: the old one-level substitution made the library a
    # named volume called `${BASE}/library` (and so no library_dir), the database's a 404 from Docker
    d = tmp_path / "app"
    d.mkdir()
    (d / "compose.yaml").write_text(
        "name: immich\nservices:\n  immich-server:\n    volumes: ['${UPLOAD_LOCATION:-${BASE}/library}:/data']\n"
        "  database:\n    volumes: ['${DB_DATA_LOCATION:-${BASE:-/nope}/pg}:/var/lib/postgresql/data']\n"
    )
    (d / ".env").write_text("BASE=/srv/immich\n")
    s = load(tmp_path, IMMICH_DIR=str(d))
    assert (s.library_dir, s.postgres_dir, s.postgres_volume) == (
        Path("/srv/immich/library"),
        Path("/srv/immich/pg"),
        None,
    )


def test_another_apps_postgres_in_the_same_files_is_not_immichs_database(tmp_path: Path) -> None:
    # Immich's Postgres mounted at /var/lib/postgresql (as Postgres 18's image wants), Nextcloud's at
    # .../data: the service immich-server depends on is Immich's, not the one mount that matched
    d = tmp_path / "app"
    d.mkdir()
    (d / "compose.yaml").write_text(
        "name: home\nservices:\n  immich-server:\n    depends_on: [redis, immich-db]\n"
        "  immich-db:\n    image: ghcr.io/immich-app/postgres:18\n    volumes: ['./pg:/var/lib/postgresql']\n"
        "  nextcloud-db:\n    image: postgres:16\n    volumes: ['./ncpg:/var/lib/postgresql/data']\n"
        "  other:\n    image: busybox\n    volumes: ['${SCRATCH:?set SCRATCH}:/scratch']\n"
    )
    s = load(tmp_path, IMMICH_DIR=str(d))
    assert s.db_service == "immich-db" and s.postgres_dir != d / "ncpg"
