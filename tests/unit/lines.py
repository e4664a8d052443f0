"""Manifest lines for unit tests: `line(path, ...)` with defaults, and object-existence probes."""

from __future__ import annotations

from immich_stream.repository.manifest import ManifestLine

SHA = "a" * 64


def line(path: str, size: int = 10, mtime: int = 100, inode: int = 7, ctime: int | None = 5, dev: int | None = 1,
         sha: str | None = SHA, key: str | None = "auto", root: str = "library") -> ManifestLine:  # fmt: skip
    if key == "auto":
        key = f"data/x/{root}/{path}"
    return ManifestLine(root, path, "file", size, mtime, 0o644, 0, 0, inode, sha, key, ctime_ns=ctime, dev=dev)


def exists(_line: ManifestLine) -> bool:
    return True


def missing(_line: ManifestLine) -> bool:
    return False
