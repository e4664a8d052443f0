"""find_containers (issue 25's database container by compose labels) against the listings
Docker gives for the awkward cases: a `docker compose run` left behind, a postgres-imaged
sidecar, two running containers of the database service. No Docker: a listing as
/containers/json returns it, newest first."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from immich_stream import config as cfg
from immich_stream.errors import ConfigError
from immich_stream.host.stack import find_containers


class _C:
    def __init__(self, raw: dict[str, Any]) -> None:
        self._container = raw


class _Containers:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    async def list(self, **_: Any) -> list[_C]:
        return [_C(r) for r in self.rows]


class _Docker:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.containers = _Containers(rows)


def row(
    name: str, service: str, state: str = "running", image: str = "postgres:14", oneoff: bool = False
) -> dict[str, Any]:
    labels = {"com.docker.compose.project": "immich", "com.docker.compose.service": service}
    labels["com.docker.compose.oneoff"] = "True" if oneoff else "False"
    return {"Id": name * 8, "Names": [f"/{name}"], "Labels": labels, "State": state, "Image": image}


def settings(tmp_path: Path, db_service: str | None) -> cfg.Settings:
    s = cfg.load(environ={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    s.db_service = db_service
    return s


def found(tmp_path: Path, rows: list[dict[str, Any]], db_service: str | None = "database") -> str:
    s = settings(tmp_path, db_service)
    asyncio.run(find_containers(_Docker(rows), s))  # type: ignore[arg-type]
    return s.db_container


def test_a_compose_run_of_the_database_service_is_not_the_database(tmp_path: Path) -> None:
    # `docker compose run database psql ...` after `up`: listed first (newest), stopped or running
    for state in ("exited", "running"):
        rows = [row("immich-database-run-3f2a", "database", state, oneoff=True), row("immich_postgres", "database")]
        assert found(tmp_path, rows) == "immich_postgres"


def test_a_stale_stopped_container_of_the_service_gives_way_to_the_running_one(tmp_path: Path) -> None:
    rows = [row("immich-database-2", "database", "exited"), row("immich_postgres", "database")]
    assert found(tmp_path, rows) == "immich_postgres"


def test_two_running_containers_of_the_database_service_are_refused_in_one_line(tmp_path: Path) -> None:
    rows = [row("immich-database-1", "database"), row("immich-database-2", "database")]
    with pytest.raises(ConfigError, match=r"several containers of its database service database.*DB_CONTAINER"):
        found(tmp_path, rows)


def test_a_postgres_imaged_sidecar_is_not_taken_for_the_compose_files_database(tmp_path: Path) -> None:
    # the compose files name the database service `db`, whose container is gone (`docker compose rm`):
    # the backup sidecar must not be stopped, dumped or restored into in its place
    rows = [
        row("pgbackup", "backup", image="prodrigestivill/postgres-backup-local"),
        row("immich_server", "immich-server", image="immich-server"),
    ]
    assert found(tmp_path, rows, db_service="db") == "immich_postgres"  # the default: preflight says not found
    # without compose files, the one postgres-imaged container of the project is still the guess
    assert found(tmp_path, rows, db_service=None) == "pgbackup"


class _VolumeDocker:
    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    async def _query_json(self, path: str) -> dict[str, Any]:
        assert path == "volumes/immich_pgdata"
        return self.info


@pytest.mark.parametrize("mountpoint", ["", "relative/dir"])
def test_a_named_volume_without_an_absolute_mountpoint_is_refused_not_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mountpoint: str
) -> None:
    from immich_stream.host.stack import postgres_volume_dir

    (tmp_path / "relative" / "dir").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # a readable current directory: what Path("") would copy cold
    s = settings(tmp_path, "database")
    s.postgres_volume = "immich_pgdata"
    with pytest.raises(ConfigError, match=r"named volume immich_pgdata.*cannot be read from here"):
        asyncio.run(postgres_volume_dir(_VolumeDocker({"Mountpoint": mountpoint}), s))  # type: ignore[arg-type]
    assert s.postgres_dir is None


def test_several_stopped_containers_of_the_service_are_no_error_so_a_killed_run_is_recovered(tmp_path: Path) -> None:
    rows = [row("immich-database-2", "database", "exited"), row("immich-database-1", "database", "exited")]
    assert found(tmp_path, rows) == "immich_postgres"  # none picked: recover() runs, preflight names the default
    assert found(tmp_path, rows[1:]) == "immich-database-1"  # the one container, stopped: still it
