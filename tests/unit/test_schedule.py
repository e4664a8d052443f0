"""schedule's times: --at with --on weekdays, and --cron expressions (croniter). Bad ones
through the command line (one line, exit 2): tests/test_settings_bad_input.py."""

from __future__ import annotations

import datetime as dt

import pytest

from immich_stream.commands.schedule import next_run, parse_cron, parse_days, parse_times, shown
from immich_stream.errors import ConfigError


def test_schedule_takes_weekdays_and_cron_expressions() -> None:
    tz = dt.UTC
    friday_4am = dt.datetime(2024, 5, 3, 4, 0, tzinfo=tz)
    weekdays = parse_days(["mon-fri"])
    assert next_run(friday_4am, parse_times(["03:30"]), weekdays) == dt.datetime(2024, 5, 6, 3, 30, tzinfo=tz)
    assert parse_days(["fri-mon"]) == {4, 5, 6, 0} and parse_days(["sat,sun", "Wed"]) == {2, 5, 6}
    assert parse_cron("30 3 * * 1-5")(friday_4am) == dt.datetime(2024, 5, 6, 3, 30, tzinfo=tz)
    assert parse_cron("0 */6 * * *")(friday_4am) == dt.datetime(2024, 5, 3, 6, 0, tzinfo=tz)
    assert parse_cron("@daily")(friday_4am) == dt.datetime(2024, 5, 4, 0, 0, tzinfo=tz)


def test_schedule_logs_its_command_without_the_receivers_urls() -> None:
    command = ["backup", "--notify", "tgram://tok/chat", "--webhook=https://h/tok", "--ping", "https://hc/uuid", "-v"]
    assert shown(command) == "backup --notify *** --webhook=*** --ping *** -v"


def test_weekdays_are_names_not_prefixes() -> None:
    assert parse_days(["Monday-Wednesday", "thurs", "sat"]) == {0, 1, 2, 3, 5}
    for bad in ("monkey", "sunny", "fridays", "wed-fryday"):  # before: taken as mon, sun, fri, wed-fri
        with pytest.raises(ConfigError, match="is not a list of weekdays"):
            parse_days([bad])
