"""Unit tests of immich_stream/config: every source in its place, every bad input a ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from immich_stream import config as cfg
from immich_stream.errors import ConfigError
from immich_stream.s3.pacing import MIB, RateLimit


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


def test_limits_parse_decimals_and_zero_means_none() -> None:
    s = cfg.load({"limit_upload": "2.5"}, environ={"IMMICH_STREAM_LIMIT_DOWNLOAD": "0.5MiB/s"})
    assert (s.limit_upload, s.limit_download) == (2.5, 0.5)
    assert cfg.load({"limit_upload": "0"}, environ={}).limit_upload == 0
    assert RateLimit.mib_per_s(0) is None and RateLimit.mib_per_s(None) is None
    assert RateLimit.mib_per_s(2.5).rate == 2.5 * MIB  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"limit_upload .* is not a rate"):
        cfg.load({"limit_upload": "fast"}, environ={})
    with pytest.raises(ConfigError, match="out of range"):
        cfg.load({"limit_download": "1000000"}, environ={})


def test_exclude_accepts_only_regenerable_folders(tmp_path: Path) -> None:
    s = cfg.load({"exclude": ["encoded-video", "thumbs"]}, environ={})
    assert s.exclude == ("thumbs", "encoded-video")
    assert cfg.load({}, environ={"IMMICH_STREAM_EXCLUDE": "thumbs, thumbs"}).exclude == ("thumbs",)
    conf = tmp_path / "c.toml"
    conf.write_text('[backup]\nexclude = ["encoded-video"]\n')
    assert cfg.load({}, environ={}, config_path=str(conf)).exclude == ("encoded-video",)
    assert cfg.load({}, environ={}).exclude == ()  # off by default
    for bad in ("library", "thumbs,upload", ["profile"]):
        with pytest.raises(ConfigError, match="cannot be excluded: only Immich's regenerable folders"):
            cfg.load({"exclude": bad}, environ={})
