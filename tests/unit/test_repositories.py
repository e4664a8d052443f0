"""config/repositories.py: [repositories.NAME] tables, their credentials, and the settings
of a command pointed at one (--repo NAME)."""

from __future__ import annotations

from pathlib import Path

import pytest

from immich_stream.config import load
from immich_stream.config.repositories import credentials, parse_repositories, pointed_at
from immich_stream.config.resolve import describe
from immich_stream.errors import ConfigError


def loaded(tmp_path: Path, text: str, **env: str) -> object:
    conf = tmp_path / "config.toml"
    conf.write_text(text)
    return load(environ={"S3_BUCKET": "main", "HOME": str(tmp_path), **env}, config_path=str(conf))


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"offsite": {"prefix": "x"}}, "has no bucket"),
        ({"Off Site": {"bucket": "b"}}, "a repository name is"),
        ({"offsite": {"bucket": "b", "endpoint": "http://x"}}, "did you mean endpoint_url?"),
        ({"offsite": {"bucket": "b", "secret_access_key": "hunter2"}}, "secrets never go in the config file"),
        ({"offsite": {"bucket": "b", "access_key_id_env": "K"}}, "names only one of"),
        (
            {"offsite": {"bucket": "b", "access_key_id_env": "not a name", "secret_access_key_env": "S"}},
            "give the name",
        ),
        ({"offsite": {"bucket": "my bucket"}}, "bucket is invalid"),
        ({"offsite": {"bucket": "b", "recipients": ["age1" + "q" * 58]}}, "recipients needs identity_file"),
        ({"offsite": "b"}, "is not a table"),
    ],
)
def test_a_bad_table_is_one_line_naming_it(table: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_repositories(Path("/etc/immich-stream/config.toml"), table)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "hunter2" not in str(err.value)


def test_credentials_come_from_the_variables_it_names_or_its_own_or_the_chain(tmp_path: Path) -> None:
    t = parse_repositories(tmp_path / "c.toml", {"b2": {"bucket": "b"}})["b2"]
    assert credentials(t, {}) is None  # the AWS credential chain
    own = {"IMMICH_STREAM_REPO_B2_ACCESS_KEY_ID": "k", "IMMICH_STREAM_REPO_B2_SECRET_ACCESS_KEY": "s"}
    assert credentials(t, own) == ("k", "s")
    with pytest.raises(ConfigError, match="IMMICH_STREAM_REPO_B2_SECRET_ACCESS_KEY is not set"):
        credentials(t, {"IMMICH_STREAM_REPO_B2_ACCESS_KEY_ID": "k"})
    named = parse_repositories(
        tmp_path / "c.toml", {"b2": {"bucket": "b", "access_key_id_env": "B2_ID", "secret_access_key_env": "B2_KEY"}}
    )["b2"]
    assert credentials(named, {"B2_ID": "i", "B2_KEY": "x", **own}) == ("i", "x")
    with pytest.raises(ConfigError, match="B2_ID is not set"):
        credentials(named, own)


def test_pointed_at_a_named_repository_its_secret_is_never_shown(tmp_path: Path) -> None:
    s = loaded(
        tmp_path,
        '[backup]\ncopy_to = ["offsite"]\n[repositories.offsite]\nbucket = "far"\nprefix = "p"\n'
        'endpoint_url = "https://s3.example.com"\nstorage_class = "STANDARD_IA"\n',
    )
    env = {"IMMICH_STREAM_REPO_OFFSITE_ACCESS_KEY_ID": "AKID", "IMMICH_STREAM_REPO_OFFSITE_SECRET_ACCESS_KEY": "sekrit"}
    p = pointed_at(s, "offsite", env)  # type: ignore[arg-type]
    assert (p.bucket, p.prefix, p.endpoint_url, p.storage_class) == (
        "far",
        "p",
        "https://s3.example.com",
        "STANDARD_IA",
    )
    assert p.credentials == ("AKID", "sekrit") and p.repository_name == "offsite"
    assert "sekrit" not in repr(p) and "sekrit" not in str(describe(p))
    assert s.bucket == "main" and s.credentials is None  # type: ignore[attr-defined]
    from immich_stream.s3.classify import describe_credentials

    env["IMMICH_STREAM_REPO_OFFSITE_ACCESS_KEY_ID"] = "AKIAEXAMPLE12"
    shown, where = describe_credentials(pointed_at(s, "offsite", env))  # type: ignore[arg-type]
    assert shown == "AKIA...12 (secret redacted)" and "[repositories.offsite]" in where
    with pytest.raises(ConfigError, match=r"no \[repositories.other\]"):
        pointed_at(s, "other", env)  # type: ignore[arg-type]


def test_copy_to_must_name_a_declared_repository(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"copy_to nowhere: no \[repositories.nowhere\]"):
        loaded(tmp_path, '[backup]\ncopy_to = "nowhere"\n')


@pytest.mark.parametrize(
    "prefix",
    ["immich-backup", "immich-backup/data", "immich-backup/snapshots/x", "immich-backup/copy"],
)
def test_copy_to_this_repository_or_inside_it_is_refused_before_anything_runs(tmp_path: Path, prefix: str) -> None:
    """A destination on the same bucket whose prefix is this repository's, or inside it: this
    repository's prune would take its objects (under data/, snapshots/) for garbage."""
    with pytest.raises(ConfigError, match=r"copy_to offsite: .*this repository") as err:
        loaded(
            tmp_path, f'[backup]\ncopy_to = "offsite"\n[repositories.offsite]\nbucket = "main"\nprefix = "{prefix}"\n'
        )
    assert "\n" not in str(err.value)


def test_copy_to_another_prefix_or_bucket_is_fine(tmp_path: Path) -> None:
    for table in ('bucket = "main"\nprefix = "immich-copy"', 'bucket = "other"\nprefix = "immich-backup"'):
        assert loaded(tmp_path, f'[backup]\ncopy_to = "offsite"\n[repositories.offsite]\n{table}\n')


def test_copy_to_with_half_its_credentials_is_refused_before_the_backup(tmp_path: Path) -> None:
    """found after the night's backup (exit 6) would be too late: refused with the settings (exit 2)"""
    text = '[backup]\ncopy_to = "offsite"\n[repositories.offsite]\nbucket = "far"\n'
    with pytest.raises(ConfigError, match="IMMICH_STREAM_REPO_OFFSITE_SECRET_ACCESS_KEY is not set") as err:
        loaded(tmp_path, text, IMMICH_STREAM_REPO_OFFSITE_ACCESS_KEY_ID="AKIAEXAMPLE")
    assert "AKIAEXAMPLE" not in str(err.value)


def test_a_named_repository_does_not_inherit_the_main_buckets_lock_days(tmp_path: Path) -> None:
    """copy writes its destination without Object Lock; with lock_days in [s3] (the main
    bucket's), `prune --repo offsite` refused the copy's bucket (no Object Lock) for ever.
    A --lock-days flag given with --repo is the user's word for that repository: kept."""
    text = '[s3]\nlock_days = 30\n[repositories.offsite]\nbucket = "far"\n'
    s = loaded(tmp_path, text)
    assert s.lock_days == 30  # type: ignore[attr-defined]
    assert pointed_at(s, "offsite", {}).lock_days == 0  # type: ignore[arg-type]
    conf = tmp_path / "config.toml"
    flagged = load({"lock_days": 7}, {"S3_BUCKET": "main", "HOME": str(tmp_path)}, str(conf))
    assert pointed_at(flagged, "offsite", {}).lock_days == 7
