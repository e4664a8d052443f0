"""The restorer's directory walk under concurrency: two file-system threads may meet at the
same directory that --overwrite must make in the place of a file (CI saw one of them fail
with FileNotFoundError, and a photo under it was not restored)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from immich_stream.restore.restorer import DIR_FLAGS, FileRestorer


def _restorer(target: Path) -> FileRestorer:
    # Only the walk's own state: the target's descriptor and --overwrite.
    r = object.__new__(FileRestorer)
    r.target = os.fsencode(target)
    r.target_fd = os.open(target, DIR_FLAGS)
    r.overwrite = True
    return r


def test_threads_replacing_the_same_file_by_a_directory_all_succeed(tmp_path: Path) -> None:
    r = _restorer(tmp_path)
    threads = 4
    try:
        for round_ in range(300):
            here = tmp_path / f"r{round_}"
            here.mkdir()
            (here / "was-file").write_bytes(b"old file")
            rel = f"r{round_}/was-file/sub".encode()
            gate = threading.Barrier(threads)
            errors: list[BaseException] = []

            def walk(rel: bytes = rel, gate: threading.Barrier = gate, errors: list[BaseException] = errors) -> None:
                gate.wait()
                try:
                    r.make_dir(rel)
                except BaseException as exc:
                    errors.append(exc)

            workers = [threading.Thread(target=walk) for _ in range(threads)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            assert not errors, f"round {round_}: {errors[0]!r}"
            assert (here / "was-file" / "sub").is_dir()
    finally:
        os.close(r.target_fd)
