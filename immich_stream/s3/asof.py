"""`--as-of TIME`: the bucket as it was at TIME, read-only. On a versioned bucket a delete
only adds a delete marker and an overwrite a new version; this view sees, for each key,
the newest version whose LastModified is at or before TIME, and nothing where that one is
a delete marker (ListObjectVersions), and reads it by its VersionId. It is a Store with
the same read interface (list_objects, get, iter_object, download, head, head_info), so
the repository, restore and verify read it unchanged; every write is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

from immich_stream.errors import ConfigError, ObjectNotFound, StoreError
from immich_stream.s3.checksums import MIB
from immich_stream.s3.options import StoreOptions
from immich_stream.s3.store import HeadInfo, ObjectInfo, Store
from immich_stream.s3.versions import Version, list_versions


class AsOfStore(Store):
    """A Store that sees the bucket as of `as_of` (aware datetime). Reads go through
    botocore (the direct path names no versions)."""

    def __init__(self, options: StoreOptions, as_of: dt.datetime) -> None:
        super().__init__(dataclasses.replace(options, botocore_only=True))
        self.as_of = as_of
        self._seen: dict[str, Version | None] = {}  # key -> the version it had then (None: absent)
        self._listed: set[str] = set()  # prefixes whose versions are all in _seen
        self._folders: set[str] = set()  # folders whose own keys (not their subfolders) are in _seen

    def _refuse(self, *args: Any, **kw: Any) -> NoReturn:
        raise StoreError(
            f"the repository as of {self.as_of.isoformat()} is a read-only view: drop --as-of to write to it"
        )

    put = create_multipart = upload_part = complete_multipart = abort_multipart = _refuse
    delete = restore_object = probe_checksum_sha256 = _refuse

    async def _versions(self, prefix: str, shallow: bool = False) -> AsyncIterator[Version]:
        """The version each key under prefix had at as_of (delete markers included)."""
        current: str | None = None
        try:
            async for v in list_versions(self, prefix, shallow):
                if v.key == current or v.last_modified > self.as_of:
                    continue  # an older version of a key already decided, or one written later
                current = v.key
                self._seen[v.key] = None if v.delete_marker else v
                yield v
        except StoreError as exc:
            if exc.code not in ("NotImplemented", "MethodNotAllowed", "501", "405"):
                raise
            raise ConfigError(
                f"--as-of: bucket {self.bucket!r} keeps no versions (ListObjectVersions answered {exc.code}): "
                "only a bucket with versioning can be read as it was"
            ) from None
        (self._folders if shallow else self._listed).add(prefix)

    async def _resolve(self, key: str) -> Version:
        if key not in self._seen:
            folder = key.rpartition("/")[0] + "/" if "/" in key else key
            # its folder at once (neighbours come next), but not its subfolders: config.json's
            # folder is the whole repository, whose every version would be listed and held
            if folder not in self._folders and not any(folder.startswith(p) for p in self._listed):
                async for _ in self._versions(folder, shallow=True):
                    pass
            self._seen.setdefault(key, None)
        v = self._seen[key]
        if v is None:
            raise ObjectNotFound(f"{key} did not exist at {self.as_of.isoformat()} (or was deleted then)")
        return v

    def _version(self, key: str) -> dict[str, str]:
        v = self._seen.get(key)
        # "null" is a real version (written before versioning was on): named, or S3 reads the current one
        return {"VersionId": v.version_id} if v is not None else {}

    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        async for v in self._versions(prefix):
            if not v.delete_marker:
                yield ObjectInfo(v.key, v.size, v.last_modified, v.storage_class)

    async def head_info(self, key: str) -> HeadInfo | None:
        try:
            await self._resolve(key)
        except ObjectNotFound:
            return None
        return await super().head_info(key)

    async def iter_object(
        self,
        key: str,
        chunk_size: int = MIB,
        small: bool = False,
        progress: bool = True,
        start: int = 0,
        end: int | None = None,
    ) -> AsyncIterator[bytes]:
        await self._resolve(key)
        async for chunk in super().iter_object(key, chunk_size, small, progress, start, end):
            yield chunk

    async def download(self, key: str, sink: Callable[[memoryview], None], size_hint: int, small: bool = False) -> None:
        await self._resolve(key)
        await super().download(key, sink, size_hint, small)
