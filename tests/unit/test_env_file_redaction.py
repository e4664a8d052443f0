"""An env file of any name (--env-file .env.prod, --env-file prod-vars) is recorded in the
snapshot redacted as an env file: its passwords out, its paths kept (review of issue 25)."""

from __future__ import annotations

from pathlib import Path

import pytest

from immich_stream import config as cfg
from immich_stream.host.metadata import SECRET_PLACEHOLDER, read_config_files


@pytest.mark.parametrize("name", [".env.prod", "prod-vars", "immich.env"])
def test_env_file_of_any_name_is_redacted_as_an_env_file(tmp_path: Path, name: str) -> None:
    d = tmp_path / "app"
    d.mkdir()
    (d / "compose.yaml").write_text("services:\n  immich-server:\n    volumes: ['${UPLOAD_LOCATION}:/data']\n")
    (tmp_path / name).write_text("UPLOAD_LOCATION=./library\nDB_PASSWORD=hunter2\n")
    s = cfg.load(
        environ={"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "IMMICH_DIR": str(d)},
        flags={"env_file": str(tmp_path / name)},
    )
    files, secrets = read_config_files(s)
    assert "hunter2" not in files[name] and "DB_PASSWORD" in secrets
    assert files[name] == f"UPLOAD_LOCATION=./library\nDB_PASSWORD={SECRET_PLACEHOLDER}\n"


def test_the_compose_file_in_use_is_recorded_not_a_stale_one_of_the_same_name_in_immich_dir(tmp_path: Path) -> None:
    old, used = tmp_path / "old", tmp_path / "stack"
    old.mkdir()
    used.mkdir()
    (old / "docker-compose.yml").write_text("name: stale\n")
    (used / "docker-compose.yml").write_text("name: in-use\n")
    (used / ".env").write_text("UPLOAD_LOCATION=./library\n")
    (old / ".env").write_text("UPLOAD_LOCATION=./stale\n")
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "IMMICH_DIR": str(old)}
    s = cfg.load(environ=environ, flags={"compose_file": [str(used / "docker-compose.yml")]})
    files, _ = read_config_files(s)
    assert files["docker-compose.yml"] == "name: in-use\n" and files[".env"] == "UPLOAD_LOCATION=./library\n"
