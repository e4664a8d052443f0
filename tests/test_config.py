"""Configuration: every source in its place, every bad input a one-line error, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import base_env
from tests.helpers import run_cli

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
