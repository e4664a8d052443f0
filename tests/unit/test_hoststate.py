"""Unit tests of immich_stream/host/hoststate.py: the local lock and run records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from immich_stream.errors import LockError
from immich_stream.host.hoststate import claim_run, local_lock, local_run_gone, release_run, state_dir

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


def test_state_dir_root_user_and_override() -> None:
    assert state_dir({"HOME": "/root", "XDG_STATE_HOME": "/root/.xdg"}, euid=0) == Path("/var/lib/immich-stream")
    assert state_dir({"HOME": "/home/ann"}, euid=1000) == Path("/home/ann/.local/state/immich-stream")
    assert state_dir({"HOME": "/home/ann", "XDG_STATE_HOME": "/srv/st"}, euid=1000) == Path("/srv/st/immich-stream")
    assert state_dir({"HOME": "/home/ann", "XDG_STATE_HOME": "rel"}, euid=1000) == Path(
        "/home/ann/.local/state/immich-stream"
    )  # a relative XDG_STATE_HOME is ignored, as the spec says
    for euid in (0, 1000):
        assert state_dir({"IMMICH_STREAM_STATE_DIR": "/tmp/st", "HOME": "/home/ann"}, euid=euid) == Path("/tmp/st")


def test_state_dir_of_this_process_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root")
    monkeypatch.delenv("IMMICH_STREAM_STATE_DIR", raising=False)
    monkeypatch.setenv("HOME", "/home/someone-else")  # sudo may keep the caller's HOME
    assert state_dir() == Path("/var/lib/immich-stream")
