"""Unit tests of immich_stream/config: every source in its place, every bad input a ConfigError."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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


# -- every setting of config.SETTINGS given a wrong value --------------------------------------
# Every setting of config.SETTINGS, given a wrong type, a value out of range, an empty
# value and a number with a unit nobody takes: one line that names the setting and says
# what to do (the CLI turns it into exit 2). Generated from the table itself, so a new
# setting is covered the day it is added; in-process (no Docker, no S3). A few of them
# through the command line as a user runs it are in tests/test_settings_bad_input.py.

NUMERIC = (cfg.parse_int, cfg.parse_size, cfg.parse_duration, cfg.parse_rate, cfg.parse_percent)
# Ranges that live in the parser or in _validate rather than in Spec.low/high.
OUT_OF_RANGE_EXTRA = {
    "part_size": "2GiB",
    "max_shrink": "150%",
    "keep_within": "2000y",
    "limit_upload": "1b",  # 1 byte/s: below the floor
    "limit_download": "10P",  # 10 PiB/s
}
# What a message that "says what to do" contains: an instruction or the values allowed.
ADVICE = re.compile(
    r"\b(give|write|choose|use|set|put|move|remove|fix|try|like|e\.g\.|one of|create|run|check|quote|chmod|"
    r"did you mean)\b"
)


def load(tmp_path: Path, *, toml: str | None = None, environ: dict[str, str] | None = None, **flags: Any) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), **(environ or {})}
    path = None
    if toml is not None:
        conf = tmp_path / "config.toml"
        conf.write_text(toml)
        path = str(conf)
    cfg.load(flags=flags, environ=env, config_path=path)


def refused(tmp_path: Path, name: str, **how: Any) -> str:
    """The ConfigError's message, checked: one line, the setting named, advice given."""
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, **how)
    message = str(exc.value)
    assert "\n" not in message, message
    assert name in message, (name, message)
    assert ADVICE.search(message), f"says nothing about what to do: {message}"
    assert "Traceback" not in message and "could not convert" not in message, message
    return message


def toml_line(spec: cfg.Spec, literal: str) -> str:
    return f"[{spec.toml[0]}]\n{spec.toml[1]} = {literal}\n"


def wrong_type(spec: cfg.Spec) -> list[str]:
    """TOML literals of a type the setting never takes: an inline table, and a boolean
    (a number where a boolean belongs)."""
    return ["{ a = 1 }", "5" if spec.parse is cfg.parse_bool else "true"]


def out_of_range(spec: cfg.Spec) -> list[str]:
    values = []
    if spec.name in OUT_OF_RANGE_EXTRA:
        values.append(OUT_OF_RANGE_EXTRA[spec.name])
    for bound, step in ((spec.low, -1), (spec.high, +1)):
        if bound is None or (spec.parse is cfg.parse_rate and bound == 0):
            continue
        if spec.parse is cfg.parse_rate:
            values.append(f"{bound * 2:g}")
        else:
            values.append(str(int(bound) + step))  # seconds, bytes or a count
    return values


RANGED = [(s.name, v) for s in cfg.SETTINGS for v in out_of_range(s)]
NUMBERS = [s for s in cfg.SETTINGS if s.parse in NUMERIC]


@pytest.mark.parametrize("name", [s.name for s in cfg.SETTINGS])
def test_a_wrong_type_in_the_config_file_is_refused_naming_the_setting(tmp_path: Path, name: str) -> None:
    spec = cfg.SPECS[name]
    for literal in wrong_type(spec):
        refused(tmp_path, name, toml=toml_line(spec, literal))


@pytest.mark.parametrize(("name", "value"), RANGED)
def test_a_value_out_of_range_is_refused_naming_the_setting_and_the_range(
    tmp_path: Path, name: str, value: str
) -> None:
    spec = cfg.SPECS[name]
    message = refused(tmp_path, name, environ={spec.env[0]: value})
    assert f"env {spec.env[0]}" in message  # where to fix it


def test_every_number_setting_has_a_range_checked() -> None:
    assert [s.name for s in NUMBERS if not out_of_range(s) and s.parse is not cfg.parse_int] == []
    # counts without an upper bound (keep_*) still have their floor of 0
    assert all(s.low is not None for s in NUMBERS if s.parse is cfg.parse_int)


@pytest.mark.parametrize("name", [s.name for s in cfg.SETTINGS])
def test_an_empty_value_is_refused_in_the_config_file_and_as_a_flag(tmp_path: Path, name: str) -> None:
    spec = cfg.SPECS[name]
    message = refused(tmp_path, name, toml=toml_line(spec, '""'))
    assert "is empty" in message
    if spec.flag:
        assert "is empty" in refused(tmp_path / "flag", name, **{name: "  "})


@pytest.mark.parametrize("name", [s.name for s in NUMBERS])
def test_a_number_with_a_unit_it_does_not_take_is_refused(tmp_path: Path, name: str) -> None:
    spec = cfg.SPECS[name]
    unit = "7d" if spec.parse is cfg.parse_int else "7 parsecs"
    refused(tmp_path, name, environ={spec.env[0]: unit})
    refused(tmp_path / "toml", name, toml=toml_line(spec, f'"{unit}"'))


# -- the newcomer review's cases (issue 22, item 21) -------------------------------------------


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[prune]\nkeep_dialy = 7\n", "unknown key 'keep_dialy' in [prune]: did you mean keep_daily?"),
        ("[s3]\nbuckett = 'b'\n", "did you mean bucket?"),
        ("[s3]\njobs = 4\n", "jobs belongs in [backup], not [s3]"),
        ("[backups]\njobs = 4\n", "unknown section [backups]: did you mean [backup]?"),
        ("bucket = 'b'\n", "bucket is outside any [section]: put it under [s3]"),
        ("[encryption]\nidentity = '/k'\n", "did you mean identity_file?"),
    ],
)
def test_unknown_config_keys_and_sections_name_the_nearest_valid_one(tmp_path: Path, toml: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, toml=toml)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("value", ["0.5", "0.99", ".5"])
def test_max_shrink_as_a_bare_fraction_is_refused_not_read_as_half_a_percent(tmp_path: Path, value: str) -> None:
    message = refused(tmp_path, "max_shrink", max_shrink=value)
    assert "50%" in message


def test_max_shrink_with_its_percent_sign_or_a_whole_number_still_loads(tmp_path: Path) -> None:
    for value, fraction in (("0.5%", 0.005), ("50", 0.5), ("50%", 0.5), ("100", 1.0)):
        s = cfg.load(flags={"max_shrink": value}, environ={"XDG_CONFIG_HOME": str(tmp_path)})
        assert s.max_shrink == pytest.approx(fraction)


def test_max_shrink_abc_says_what_a_percentage_is(tmp_path: Path) -> None:
    message = refused(tmp_path, "max_shrink", max_shrink="abc")
    assert "'abc' is not a percentage: write a percentage like 50%" in message


@pytest.mark.parametrize(
    ("text", "mib_s"),
    [
        ("60MiB", 60.0),
        ("60M", 60.0),
        ("60MB/s", 60.0),
        ("60MiB/s", 60.0),
        ("500k", 500 / 1024),
        ("500KiB", 500 / 1024),
        ("1G", 1024.0),
        ("2.5", 2.5),
        ("0", 0.0),
        ("16k", 16 / 1024),
    ],
)
def test_limits_take_the_units_rclone_users_type(tmp_path: Path, text: str, mib_s: float) -> None:
    s = cfg.load(flags={"limit_upload": text, "limit_download": text}, environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert s.limit_upload == pytest.approx(mib_s) and s.limit_download == pytest.approx(mib_s)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("1b", "below 16 KiB/s"),
        ("1000b", "below 16 KiB/s"),
        ("0.001", "below 16 KiB/s"),
        ("-5", "is not a rate"),
        ("10P", "out of range"),
        ("1e9", "is not a rate"),
        ("fast", "is not a rate"),
    ],
)
def test_absurd_limits_are_refused_with_one_line(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in refused(tmp_path, "limit_upload", limit_upload=text)


@pytest.mark.parametrize(
    "url",
    [
        "http://hc.example.com:99999/ping/abc",
        "http://hc.example.com:abc/",
        "https://hc.example.com:0/x",
        "ntfy+https://ntfy.example.com:70000/topic",
    ],
)
def test_a_ping_url_with_a_malformed_port_is_refused_at_settings_time(tmp_path: Path, url: str) -> None:
    message = refused(tmp_path, "ping_url", ping_url=url)
    assert "malformed port" in message
    assert "/ping/abc" not in message and "topic" not in message  # a ping URL is a credential


def test_a_ping_url_with_a_good_port_loads(tmp_path: Path) -> None:
    s = cfg.load(flags={"ping_url": "https://hc.example.com:8443/ping/x"}, environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert s.ping_url == "https://hc.example.com:8443/ping/x"


# -- Immich's .env, read as docker compose reads it ------------------------------------------


def immich_dir_with(tmp_path: Path, dotenv: str) -> Path:
    d = tmp_path / "immich-app"
    (d / "library").mkdir(parents=True)
    (d / "pg").mkdir()
    (d / ".env").write_text(dotenv)
    return d


def test_dotenv_is_interpolated_as_docker_compose_does(tmp_path: Path) -> None:
    d = immich_dir_with(
        tmp_path,
        "BASE=./\nUPLOAD_LOCATION=${BASE}library\nDB_DATA_LOCATION=${PGDIR:-./pg}\n"
        "DB_USERNAME=\"${DB_USER_FROM_ENV:-immich}_admin\"\nDB_DATABASE_NAME='lit${x}'\nexport DB_PASSWORD=a b\n",
    )
    s = cfg.load(environ={"IMMICH_DIR": str(d), "XDG_CONFIG_HOME": str(tmp_path)})
    assert s.library_dir == d / "library" and s.postgres_dir == d / "pg"
    assert s.db_user == "immich_admin"
    assert s.db_name == "lit${x}"  # single quotes: literal
    s = cfg.load(environ={"IMMICH_DIR": str(d), "XDG_CONFIG_HOME": str(tmp_path), "DB_USER_FROM_ENV": "ops"})
    assert s.db_user == "ops_admin"  # the environment first, as compose


def test_a_broken_dotenv_line_is_refused_naming_the_line_not_its_text(tmp_path: Path) -> None:
    d = immich_dir_with(tmp_path, "UPLOAD_LOCATION=./library\nthis line is hunter2 garbage\n")
    with pytest.raises(ConfigError) as exc:
        cfg.load(environ={"IMMICH_DIR": str(d), "XDG_CONFIG_HOME": str(tmp_path)})
    assert "line 2 is not KEY=VALUE" in str(exc.value) and "hunter2" not in str(exc.value)


# -- booleans, and good values that still load ------------------------------------------------


def test_booleans_accept_the_usual_words_only(tmp_path: Path) -> None:
    for word, value in [
        ("yes", True),
        ("No", False),
        ("ON", True),
        ("off", False),
        ("1", True),
        ("0", False),
        ("true", True),
        ("False", False),
    ]:
        assert cfg.load(environ={"S3_PATH_STYLE": word, "XDG_CONFIG_HOME": str(tmp_path)}).path_style is value
    conf = tmp_path / "c.toml"
    conf.write_text("[s3]\npath_style = true\nverify_tls = false\n")
    s = cfg.load(environ={}, config_path=str(conf))
    assert (s.path_style, s.verify_tls) == (True, False)


def test_good_values_still_load(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        '[s3]\nbucket = "Legacy_Bucket.1"\nregion = "eu-central-1"\n'
        'endpoint_url = "https://[::1]:9000/s3/"\n[immich]\ndb_name = "immich db ü"\n'
        '[backup]\njobs = 256\nstall_timeout = 30\nmax_memory = "8GiB"\npart_size = "1GiB"\n'
        'lock_wait = 0\n[prune]\nkeep_within = "1y2m3d4h"\nstale_after = "1h"\nkeep_daily = 7\n'
    )
    s = cfg.load(environ={}, config_path=str(conf))
    assert (s.bucket, s.region, s.endpoint_url, s.db_name) == (
        "Legacy_Bucket.1",
        "eu-central-1",
        "https://[::1]:9000/s3",
        "immich db ü",
    )
    assert (s.jobs, s.stall_timeout, s.max_memory, s.lock_wait) == (256, 30.0, 8 * 1024 * cfg.MIB, 0.0)
    assert (s.keep_within, s.stale_after, s.keep_daily) == ("1y2m3d4h", 3600.0, 7)


@pytest.mark.parametrize("value", ["", "0", "false", "no", "off", "False", " 1", "yes"])
def test_the_test_only_auto_init_switch_takes_exactly_1(value: str) -> None:
    """IMMICH_STREAM_TEST_AUTO_INIT=false (or no, off) in an env file must not make backup
    create a repository at a mistyped bucket/prefix: only the suite's own "1" turns it on."""
    from immich_stream.config.tuning import AUTO_INIT_ENV, Tuning

    assert Tuning.from_env({AUTO_INIT_ENV: value}).auto_init is False
    assert Tuning.from_env({AUTO_INIT_ENV: "1"}).auto_init is True
