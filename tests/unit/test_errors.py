"""Unit tests of immich_stream/errors.py: a backup's exit code."""

from __future__ import annotations

from immich_stream.errors import EXIT_INCOMPLETE, EXIT_OK, EXIT_UNSTABLE, backup_exit_code


def test_backup_exit_codes() -> None:
    assert backup_exit_code(complete=True, unstable=False) == EXIT_OK
    assert backup_exit_code(complete=False, unstable=False) == EXIT_INCOMPLETE
    assert backup_exit_code(complete=False, unstable=True) == EXIT_UNSTABLE
