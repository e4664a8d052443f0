"""Unit tests of immich_stream/host/hoststate.py: the local lock and run records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from immich_stream.errors import LockError
from immich_stream.host.hoststate import claim_run, local_lock, local_run_gone, release_run

# -- this host's state -------------------------------------------------------------------------


def test_local_lock_keeps_a_second_run_out(tmp_path: Path) -> None:
    with local_lock("backup-immich", tmp_path), pytest.raises(LockError, match=f"pid {os.getpid()}"):  # noqa: SIM117
        with local_lock("backup-immich", tmp_path):
            pass
    with local_lock("backup-immich", tmp_path):  # released with the block
        pass


def test_a_live_run_is_never_judged_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMMICH_STREAM_STATE_DIR", str(tmp_path))
    token = "ab" * 16
    fd = claim_run(token)
    assert not local_run_gone(token), "its flock is held"
    release_run(token, fd)
    assert not local_run_gone(token), "no run file: not provably gone"
    assert not local_run_gone("../../etc/passwd"), "only real tokens name a file"
