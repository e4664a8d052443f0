"""Bad settings through the command line as a user runs it: one line, exit 2. The
in-process checks of every setting of config.SETTINGS (generated from the table) are in
tests/unit/test_config.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_env
from tests.helpers import run_cli

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
        (["config", "--notify", "secret-uuid"], None, ["notify from flag --notify", "not an Apprise URL"]),
        (["config"], '[monitor]\non_failure = "mail -s x root < report.txt"\n', ["on_failure", "without a shell"]),
        (["schedule", "--cron", "61 3 * * *", "--", "backup"], None, ["--cron '61 3 * * *' is not a cron expression"]),
        (["schedule", "--at", "03:30", "--on", "funday", "--", "backup"], None, ["--on 'funday' is not a list"]),
        # a typo after a receiver's URL: the error quotes the command line, but not the URL
        (
            ["schedule", "--at", "03:30", "--", "backup", "--webhook", "https://h/secret-uuid", "--bogus"],
            None,
            ["schedule -- backup --webhook *** --bogus"],
        ),
        # valid field by field, but never a date: was "internal error CroniterBadDateError", exit 1
        (["schedule", "--cron", "0 3 31 2 *", "--", "backup"], None, ["--cron '0 3 31 2 *' never comes"]),
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
