"""What a Store may know: its own small options, built from the Settings by whoever opens
one (`StoreOptions.from_settings`). The Store reads these and nothing else of the
configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from immich_stream.config import Settings, read_sse_c_key
from immich_stream.s3.checksums import MIB


@dataclass(frozen=True)
class StoreOptions:
    bucket: str = ""
    endpoint_url: str | None = None  # None: AWS
    region: str | None = None
    path_style: bool = False
    verify_tls: bool = True
    ca_bundle: Path | None = None
    checksum: str = "md5"  # --checksum: md5, sha256 or crc32c
    part_size: int = 8 * MIB  # the smallest part of a multipart upload (writers start there)
    jobs: int = 8  # requests in flight at once (small PUTs: SMALL_FACTOR times as many)
    retries: int = 6  # attempts per request, the first included
    read_timeout: float = 120.0
    limit_upload: float = 0.0  # MiB/s, 0: no limit
    limit_download: float = 0.0
    sse: str | None = None  # SSE-S3 / SSE-KMS: the x-amz-server-side-encryption asked for
    sse_kms_key_id: str | None = None
    sse_c_key: bytes | None = dataclasses.field(default=None, repr=False)  # SSE-C: never logged
    # the storage class of file data: the default, and each root's own (root -> class)
    storage_class: str | None = None
    storage_classes: tuple[tuple[str, str], ...] = ()
    botocore_only: bool = False  # no direct path: every request through aiobotocore (for comparison)
    # a named repository's access key id and secret (config/repositories.py); None: the AWS
    # credential chain. Never logged.
    credentials: tuple[str, str] | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_settings(cls, s: Settings, retries: int | None = None) -> StoreOptions:
        """The Store's options of these settings (reads the SSE-C key file, if one is set);
        `retries` overrides --retries (doctor's probes try twice)."""
        roots = tuple(
            (f.name.removeprefix("storage_class_"), value)
            for f in dataclasses.fields(s)
            if f.name.startswith("storage_class_") and (value := getattr(s, f.name))
        )
        return cls(
            bucket=s.bucket or "",
            endpoint_url=s.endpoint_url,
            region=s.region,
            path_style=s.path_style,
            verify_tls=s.verify_tls,
            ca_bundle=s.ca_bundle,
            checksum=s.checksum,
            part_size=s.part_size,
            jobs=s.jobs,
            retries=retries or s.retries,
            read_timeout=s.read_timeout,
            limit_upload=s.limit_upload,
            limit_download=s.limit_download,
            sse=s.sse,
            sse_kms_key_id=s.sse_kms_key_id,
            sse_c_key=read_sse_c_key(s.sse_c_key_file) if s.sse_c_key_file is not None else None,
            storage_class=s.storage_class,
            storage_classes=roots,
            botocore_only=s.tuning.botocore_only,
            credentials=s.credentials,
        )

    def storage_class_of(self, root: str) -> str | None:
        """The storage class of a root's file objects: its own setting, else --storage-class
        (None: no header, STANDARD). External libraries (external:<name>) hold photos as the
        library does: the library's class."""
        root = "library" if root.startswith("external:") else root
        return dict(self.storage_classes).get(root) or self.storage_class
