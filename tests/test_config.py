"""Configuration: every source in its place, every bad input a one-line error, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from immich_stream import config as cfg
from immich_stream.errors import ConfigError
from tests.conftest import base_env
from tests.helpers import run_cli


@pytest.fixture
def immich_dir(tmp_path: Path) -> Path:
    d = tmp_path / "immich-app"
    (d / "library").mkdir(parents=True)
    (d / "postgres").mkdir()
    (d / ".env").write_text(
        "# Immich's .env\nUPLOAD_LOCATION=./library\nDB_DATA_LOCATION=./postgres\n"
        "DB_USERNAME=immich_user\nDB_DATABASE_NAME='immich_db'  \nDB_PASSWORD=hunter2\n"
    )
    (d / "docker-compose.yml").write_text("#\nname: my-immich\n\nservices:\n  immich-server:\n    image: x\n")
    return d


def test_defaults_without_any_source(tmp_path: Path) -> None:
    s = cfg.load(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert (s.prefix, s.project, s.db_container, s.db_user, s.db_name) == (
        "immich-backup",
        "immich",
        "immich_postgres",
        "postgres",
        "immich",
    )
    assert s.bucket is None and s.verify_tls is True and s.stop == "all"
    assert set(s.sources.values()) == {"default"}


def test_immich_env_file_fills_paths_and_db(immich_dir: Path, tmp_path: Path) -> None:
    s = cfg.load(environ={"IMMICH_DIR": str(immich_dir), "XDG_CONFIG_HOME": str(tmp_path)})
    # relative paths in .env are resolved against IMMICH_DIR, as docker compose does
    assert s.library_dir == immich_dir / "library"
    assert s.postgres_dir == immich_dir / "postgres"
    assert (s.db_user, s.db_name, s.project) == ("immich_user", "immich_db", "my-immich")
    assert s.sources["library_dir"].endswith(".env UPLOAD_LOCATION")
    assert "name:" in s.sources["project"]


def test_precedence_file_env_dotenv_flags(immich_dir: Path, tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[immich]\ndir = "{immich_dir}"\ndb_name = "from_file"\ndb_user = "file_user"\ndb_container = "file_db"\n'
        '[s3]\nbucket = "file-bucket"\nprefix = "file/prefix"\n[backup]\njobs = 3\npart_size = "16MiB"\n'
    )
    environ = {
        "S3_BUCKET": "env-bucket",
        "DB_USER": "env_user",
        "DB_CONTAINER": "env_db",
        "XDG_CONFIG_HOME": str(tmp_path),
    }
    s = cfg.load(flags={"db_container": "flag_db"}, environ=environ, config_path=str(conf))
    assert s.db_name == "immich_db"  # .env beats the config file
    assert s.db_user == "env_user"  # the environment beats .env
    assert s.db_container == "flag_db"  # flags beat everything
    assert s.bucket == "env-bucket" and s.sources["bucket"] == "env S3_BUCKET"
    assert s.prefix == "file/prefix" and s.sources["prefix"] == f"config file {conf}"
    assert s.jobs == 3 and s.part_size == 16 * cfg.MIB


def test_default_config_location_is_read(tmp_path: Path) -> None:
    (tmp_path / "immich-stream").mkdir()
    (tmp_path / "immich-stream" / "config.toml").write_text('[s3]\nbucket = "found-it"\n')
    s = cfg.load(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert s.bucket == "found-it"


def test_endpoint_from_aws_endpoint_url_and_sizes(tmp_path: Path) -> None:
    s = cfg.load(
        environ={
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000/",
            "IMMICH_STREAM_MAX_MEMORY": "1GiB",
            "XDG_CONFIG_HOME": str(tmp_path),
        }
    )
    assert s.endpoint_url == "http://127.0.0.1:9000" and s.max_memory == 1024 * cfg.MIB


def test_original_script_obsolete_variables_are_accepted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    s = cfg.load(environ={"LOCAL_BACKUP_DIR": "/mnt/x", "BACKUP_DATE": "2024-01-01", "XDG_CONFIG_HOME": str(tmp_path)})
    assert s.bucket is None
    assert "LOCAL_BACKUP_DIR is set but no longer used" in caplog.text
    assert "BACKUP_DATE is set but no longer used" in caplog.text


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({"S3_ENDPOINT_URL": "ftp://example"}, "endpoint_url from env S3_ENDPOINT_URL is invalid"),
        ({"S3_ENDPOINT_URL": "http://host:notaport"}, "bad port"),
        ({"IMMICH_STREAM_JOBS": "0"}, "jobs 0 (from env IMMICH_STREAM_JOBS) is out of range: choose 1 to 256"),
        ({"IMMICH_STREAM_PART_SIZE": "8 parsecs"}, "is not a size"),
        ({"IMMICH_STREAM_PART_SIZE": "1MiB"}, "part_size 1.0 MiB (from env IMMICH_STREAM_PART_SIZE) is out of range"),
        ({"S3_PATH_STYLE": "maybe"}, "is not true or false"),
        ({"IMMICH_STREAM_STOP": "some"}, "is not one of all, app, none"),
        ({"IMMICH_DIR": "/does/not/exist"}, "immich_dir /does/not/exist (from env IMMICH_DIR) does not exist"),
        ({"S3_PREFIX": "a/../b"}, "has empty, '.' or '..' parts"),
    ],
)
def test_invalid_settings_raise_config_error(tmp_path: Path, environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg.load(environ={**environ, "XDG_CONFIG_HOME": str(tmp_path)})
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_toml_names_the_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text('[s3]\nbucket = "ok"\nprefix = unquoted\n')
    with pytest.raises(ConfigError, match=r"bad.toml is not valid TOML: .*line 3"):
        cfg.load(environ={}, config_path=str(conf))


# -- through the CLI, as a user sees it ------------------------------------------------------


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = base_env(tmp_path)
    env.update(extra)
    return env


@pytest.mark.slow
def test_help_and_version(tmp_path: Path) -> None:
    r = run_cli("--help", env=cli_env(tmp_path))
    assert r.code == 0 and "config" in r.out and "backup" in r.out
    r = run_cli("--version", env=cli_env(tmp_path))
    assert r.code == 0 and r.out.startswith("immich-stream 0.")


@pytest.mark.slow
def test_config_command_shows_values_sources_and_hides_secrets(tmp_path: Path, immich_dir: Path) -> None:
    env = cli_env(
        tmp_path,
        IMMICH_DIR=str(immich_dir),
        S3_BUCKET="b1",
        AWS_ACCESS_KEY_ID="AKIAEXAMPLEKEY1234",
        AWS_SECRET_ACCESS_KEY="very-secret-value-123",
    )
    r = run_cli("config", "--prefix", "nightly", env=env)
    assert r.code == 0, r.err
    rows = {line.split()[0]: line for line in r.out.splitlines()[1:]}
    assert "b1" in rows["bucket"] and "env S3_BUCKET" in rows["bucket"]
    assert "nightly" in rows["prefix"] and "flag --prefix" in rows["prefix"]
    assert str(immich_dir / "library") in rows["library_dir"] and "UPLOAD_LOCATION" in rows["library_dir"]
    assert "immich_user" in rows["db_user"]
    assert "AKIA...34" in rows["credentials"] and "env" in rows["credentials"]
    assert "very-secret-value-123" not in r.out + r.err
    assert "hunter2" not in r.out + r.err  # the DB password in .env is never shown


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "extra", "needle"),
    [
        (["--endpoint-url", "localhost:9000"], {}, "endpoint_url from flag --endpoint-url is invalid"),
        (
            ["--library-dir", "/no/such/library"],
            {},
            "library_dir /no/such/library (from flag --library-dir) does not exist",
        ),
        (["--config", "/no/such.toml"], {}, "config file /no/such.toml does not exist"),
        ([], {"IMMICH_STREAM_CONFIG": "__bad__"}, "is not valid TOML"),
        ([], {"IMMICH_STREAM_CONFIG": "__unreadable__"}, "cannot be read"),
    ],
)
def test_config_errors_exit_2_with_one_line(
    tmp_path: Path, args: list[str], extra: dict[str, str], needle: str
) -> None:
    if extra.get("IMMICH_STREAM_CONFIG") == "__bad__":
        bad = tmp_path / "bad.toml"
        bad.write_text("[s3\nbucket=1\n")
        extra = {"IMMICH_STREAM_CONFIG": str(bad)}
    elif extra.get("IMMICH_STREAM_CONFIG") == "__unreadable__":
        extra = {"IMMICH_STREAM_CONFIG": str(tmp_path)}  # a directory: cannot be read as a file
    r = run_cli("config", *args, env=cli_env(tmp_path, **extra))
    assert r.code == 2, (r.out, r.err)
    assert needle in r.last_error
    assert len(r.err.strip().splitlines()) == 1, r.err


@pytest.mark.slow
def test_backup_without_bucket_exit_2(tmp_path: Path, immich_dir: Path) -> None:
    r = run_cli("backup", env=cli_env(tmp_path, IMMICH_DIR=str(immich_dir)))
    assert r.code == 2
    assert "bucket is not set" in r.last_error and "S3_BUCKET" in r.last_error
