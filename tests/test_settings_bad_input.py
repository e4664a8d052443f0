"""Every setting of config.SETTINGS, given a wrong type, a value out of range, an empty
value and a number with a unit nobody takes: one line that names the setting and says
what to do (the CLI turns it into exit 2). Generated from the table itself, so a new
setting is covered the day it is added; in-process (no Docker, no S3), and a few of them
through the command line as a user runs it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from immich_stream import config as cfg
from immich_stream.errors import ConfigError
from tests.conftest import base_env
from tests.helpers import run_cli

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


# -- end to end: what a user sees ---------------------------------------------------------------


def assert_one_line_exit_2(r: Any, *needles: str) -> None:
    assert r.code == 2, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("immich-stream: error: "), r.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "toml", "needles"),
    [
        (["backup", "--max-shrink", "abc"], None, ["max_shrink from flag --max-shrink", "50%"]),
        (["backup", "--max-shrink", "0.5"], None, ["max_shrink", "ambiguous"]),
        (["config", "--limit-upload", "1b"], None, ["limit_upload", "16 KiB/s"]),
        (["config", "--ping", "http://hc.example.com:99999/secret-uuid"], None, ["ping_url", "malformed port"]),
        (["config"], "[prune]\nkeep_dialy = 7\n", ["did you mean keep_daily?"]),
        (["config", "--bucket", ""], None, ["bucket from flag --bucket is empty"]),
    ],
)
def test_bad_settings_through_the_cli_one_line_exit_2(
    tmp_path: Path, args: list[str], toml: str | None, needles: list[str]
) -> None:
    env = base_env(tmp_path)
    if toml is not None:
        (tmp_path / "c.toml").write_text(toml)
        env["IMMICH_STREAM_CONFIG"] = str(tmp_path / "c.toml")
    r = run_cli(*args, env=env, timeout=60)
    assert_one_line_exit_2(r, *needles)
    assert "secret-uuid" not in r.err


@pytest.mark.slow
def test_limit_upload_60mib_is_accepted_by_the_cli(tmp_path: Path) -> None:
    r = run_cli("config", "--limit-upload", "60MiB", "--limit-download", "500k", env=base_env(tmp_path), timeout=60)
    assert r.code == 0, r.err
    rows = {line.split()[0]: line for line in r.out.splitlines()[1:] if line.strip()}
    assert "60 MiB/s" in rows["limit_upload"] and "0.488281 MiB/s" in rows["limit_download"]
