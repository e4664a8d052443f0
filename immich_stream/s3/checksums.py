"""Checksums and sizes: the --checksum header every PUT and part carries (its value, its
botocore parameter), and the part sizes of files and of streams of unknown length.

Content-MD5 by default (understood everywhere), or x-amz-checksum-sha256 / -crc32c
(`--checksum`), which AWS, MinIO and SeaweedFS verify and which reuse the sha256 already
computed for the manifest (sha256) or cost far less CPU than MD5 (crc32c).
"""

from __future__ import annotations

import base64
import hashlib

MAX_PARTS = 10_000
MIB = 1024 * 1024
SMALL_OBJECT = MIB  # a PUT this small may run SMALL_FACTOR times as many at once as --jobs
SMALL_FACTOR = 4
CHUNK_SHARED = MIB  # a larger download is read 1 MiB at a time into a reused buffer


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


# --checksum: the header each choice sends, and the botocore parameter that sends it.
CHECK_HEADERS = {"md5": "Content-MD5", "sha256": "x-amz-checksum-sha256", "crc32c": "x-amz-checksum-crc32c"}
CHECK_PARAMS = {"md5": "ContentMD5", "sha256": "ChecksumSHA256", "crc32c": "ChecksumCRC32C"}
CHECK_ALGORITHMS = {"sha256": "SHA256", "crc32c": "CRC32C"}


def check_value(kind: str, data: bytes, sha256_hex: str | None = None) -> str:
    """The base64 value of the `kind` checksum header for data (blocking: CPU-bound on large
    data). The sha256 a caller already has is reused, not computed again."""
    if kind == "md5":
        return md5_b64(data)
    if kind == "sha256":
        digest = bytes.fromhex(sha256_hex) if sha256_hex else hashlib.sha256(data).digest()
        return base64.b64encode(digest).decode()
    if kind == "crc32c":
        import crc32c  # the optional dependency: config checks it is installed

        return base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()
    raise ValueError(f"unknown checksum {kind!r}")


UNSIGNED = "UNSIGNED-PAYLOAD"


def sealed_hashes(checksum: str, data: bytes) -> tuple[str, str]:
    """(checksum header value, payload hash to sign) of an encrypted body. Its sha256 is not
    computed for the signature alone (UNSIGNED-PAYLOAD, a second pass over every byte): the
    server still verifies the checksum header, which is signed, and age authenticates every
    chunk, so a body changed on the way is refused on the way in or at the latest on the
    way out."""
    if checksum == "sha256":
        sha = hashlib.sha256(data).hexdigest()
        return check_value(checksum, data, sha), sha
    return check_value(checksum, data), UNSIGNED


def part_size_for(size: int, part_size: int) -> int:
    """The part size for a file of known size: at least part_size, and at most 10,000 parts."""
    needed = -(-size // MAX_PARTS)
    needed = -(-needed // MIB) * MIB
    return max(part_size, needed)


PARTS_PER_STEP = 1000  # a stream's parts double in size every this many parts


def stream_part_size(part_number: int, part_size: int, max_part: int) -> int:
    """Part sizes for a stream of unknown length: double every 1,000 parts, up to
    max_part (half the memory budget: a part is held whole before it is sent)."""
    grown = part_size << min((part_number - 1) // PARTS_PER_STEP, 20)
    return max(part_size, min(grown, max_part))


def max_stream_size(part_size: int, max_part: int) -> int:
    """The largest stream (dump, manifest) that fits in 10,000 parts with these sizes."""
    return (
        sum(stream_part_size(n, part_size, max_part) for n in range(1, MAX_PARTS + 1, PARTS_PER_STEP)) * PARTS_PER_STEP
    )
