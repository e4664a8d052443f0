"""Unit tests of immich_stream/backup/walk.py: the directory walk."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

import immich_stream.backup.walk as walk_module
from immich_stream.backup.walk import walk, walk_batches


async def test_walk_marks_special_files_as_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo")
    problems = []
    entries = [e.relpath async for e in walk(os.fsencode(tmp_path), problems.append)]
    assert entries == [b"a.jpg"]
    assert [(p.relpath, p.skipped) for p in problems] == [(b"fifo", True)]


def _tree(root: Path) -> None:
    for rel in ("b/y.jpg", "a/x.jpg", "a/sub/z.jpg", "a/é\nnl.jpg", "thumbs/.immich", "thumbs/t.webp"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * len(rel))
    os.symlink("a/x.jpg", root / "link")
    os.mkfifo(root / "a" / "fifo")
    (root / "locked").mkdir(mode=0)


async def _walked(root: Path, thread: bool, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[list[Any], list[Any]]:
    monkeypatch.setattr(walk_module, "_RUNNABLE", not thread)
    problems: list[Any] = []
    entries = [e async for batch in walk_batches(os.fsencode(root), problems.append, **kw) for e in batch]
    return entries, problems


async def test_the_walker_process_walks_as_the_thread_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _tree(tmp_path)
    kw: dict[str, Any] = {"prune": {b"thumbs"}, "keep": {b".immich"}}
    in_process = await _walked(tmp_path, False, monkeypatch, **kw)
    in_thread = await _walked(tmp_path, True, monkeypatch, **kw)
    assert in_process == in_thread
    entries, problems = in_process
    assert [e.relpath for e in entries if e.type == "file"] == [
        b"a/sub/z.jpg", b"a/x.jpg", "a/é\nnl.jpg".encode(), b"b/y.jpg", b"thumbs/.immich"
    ]  # fmt: skip
    assert [e.type for e in entries if e.relpath == b"link"] == ["symlink"]
    assert {(p.relpath, p.skipped) for p in problems} >= {(b"a/fifo", True)}
    assert next(e for e in entries if e.relpath == b"a/x.jpg").size == 7
    assert "skipping FIFO a/fifo" in caplog.text


@pytest.mark.slow
async def test_leaving_a_walk_early_ends_its_process(tmp_path: Path) -> None:
    # More entries than the pipe (1 MiB) and the reader's buffers hold: the walker must still
    # be writing when it is stopped (3,000 fit, and a fast walker had exited before SIGSTOP)
    for i in range(40000):
        (tmp_path / f"{i:05}").touch()
    before = set(_children())  # a session's servers may be children too
    batches = walk_batches(os.fsencode(tmp_path), lambda p: None)
    first = await anext(batches)
    assert len(first) == 512
    children = set(_children()) - before
    assert children, "the walk runs in a process of its own"
    await batches.aclose()
    assert not set(_children()) & children, "its process is gone"


@pytest.mark.slow
async def test_a_walk_process_that_does_not_die_does_not_hold_up_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walker stuck in a hung NFS mount (state D) outlives SIGKILL until the mount
    answers: a run cancelled by its watchdog must unwind anyway (and start the stack)."""
    # More entries than the pipe (1 MiB) and the reader's buffers hold: the walker must still
    # be writing when it is stopped (3,000 fit, and a fast walker had exited before SIGSTOP)
    for i in range(40000):
        (tmp_path / f"{i:05}").touch()
    monkeypatch.setattr(walk_module, "REAP_TIMEOUT", 0.5, raising=False)
    before = set(_children())
    batches = walk_batches(os.fsencode(tmp_path), lambda p: None)
    await anext(batches)
    [child] = set(_children()) - before
    os.kill(child, signal.SIGSTOP)  # writes no more, never closes its pipe (ProcessLookupError: it had finished)
    monkeypatch.setattr(asyncio.subprocess.Process, "kill", lambda self: None)  # and SIGKILL waits
    try:
        await asyncio.wait_for(batches.aclose(), 10)
    finally:
        os.kill(child, signal.SIGKILL)
        await asyncio.sleep(0.3)  # reaped: its transport closes before the loop does


def _children() -> list[int]:
    me = str(os.getpid())
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        out.append(int(pid))
            except OSError:
                pass
    return out


async def test_a_walker_that_cannot_start_falls_back_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interpreter that runs but cannot run the walker (it exits before its first batch)
    is no reason to fail the backup: the thread walks, as when no process can be started."""
    _tree(tmp_path)
    monkeypatch.setattr(walk_module.sys, "executable", "/bin/false")
    entries = [e async for batch in walk_batches(os.fsencode(tmp_path), lambda p: None) for e in batch]
    assert b"a/x.jpg" in [e.relpath for e in entries]


@pytest.mark.slow
async def test_a_walker_killed_midway_fails_the_run_with_one_line(tmp_path: Path) -> None:
    """The out-of-memory killer picking the walker: the run's error names it (exit 1), not
    an internal error to report."""
    from immich_stream.errors import ImmichStreamError

    for i in range(8000):  # more than the pipe holds: the walker is still writing when killed
        (tmp_path / f"{i:05}{'x' * 200}").write_bytes(b"")
    before = set(_children())
    batches = walk_batches(os.fsencode(tmp_path), lambda p: None)
    await anext(batches)
    [child] = set(_children()) - before
    os.kill(child, signal.SIGKILL)
    with pytest.raises(ImmichStreamError, match=r"its process was killed by SIGKILL \(the out-of-memory killer\?\)"):
        async for _ in batches:
            pass
