"""Unit tests of immich_stream/backup/upload.py: the upload workers against the rclone S3 server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import pytest

from immich_stream.backup.changes import classify
from immich_stream.backup.upload import FileUploader, UploadWorkers
from immich_stream.backup.walk import walk
from immich_stream.config import Settings
from immich_stream.progress import Reporter
from immich_stream.repository.manifest import ManifestLine
from immich_stream.repository.repo import Repo
from immich_stream.repository.summary import RunStats
from immich_stream.s3.budget import ByteBudget
from immich_stream.s3.checksums import MIB
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import Store
from tests.unit.lines import exists, line


async def test_upload_workers_reuse_matching_bytes_and_leave_out_what_cannot_be_read(
    s3_settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "same.jpg"
    path.write_bytes(b"the same bytes")
    (tmp_path / "z.jpg").write_bytes(b"replaced by a FIFO after the walk")
    sha = hashlib.sha256(b"the same bytes").hexdigest()
    stats = RunStats()
    async with Store(StoreOptions.from_settings(s3_settings)) as store:
        repo = Repo(store, "")
        uploader = FileUploader(repo.store, repo, ByteBudget(MIB), s3_settings, stats)
        workers = UploadWorkers(uploader, stats, Reporter().phase("x"), jobs=2)
        entries = [e async for e in walk(os.fsencode(tmp_path), lambda p: None)]
        new = ManifestLine.from_entry("library", entries[0])
        old = line("same.jpg", size=14, mtime=new.mtime_ns, sha=sha, key="data/old/library/same.jpg")
        decision = classify(new, None, old, exists)
        assert (decision.action, decision.kind) == ("check", "moved")
        runner = asyncio.create_task(workers.run())
        done = await workers.submit(os.fsencode(path), entries[0], new, "data/run2/library/same.jpg", decision)
        (tmp_path / "z.jpg").unlink()
        os.mkfifo(tmp_path / "z.jpg")
        fifo = ManifestLine.from_entry("library", entries[1])
        upload = classify(fifo, None, None, exists)
        left_out = await workers.submit(
            os.fsencode(tmp_path / "z.jpg"), entries[1], fifo, "data/run2/library/z.jpg", upload
        )
        await workers.close()
        await asyncio.wait_for(runner, 30)
        assert await done is True and await left_out is False
        keys = [o.key async for o in store.list_objects("")]
    assert new.key == "data/old/library/same.jpg" and keys == [], "nothing uploaded: the moved file's object is reused"
    assert stats.moved == 1 and stats.bytes_read == 14 and stats.bytes_uploaded == 0
    assert stats.failed == 1 and list(stats.problems) == [
        "library/z.jpg: cannot be read (no longer a regular file); left out of this snapshot"
    ]


def test_a_fifo_swapped_in_for_a_file_is_refused_not_waited_for(tmp_path: Path) -> None:
    from immich_stream.backup.upload import _open_regular

    fifo = tmp_path / "was-a-photo.jpg"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(OSError, match="no longer a regular file"):
        _open_regular(os.fsencode(fifo))
    assert time.monotonic() - started < 1
