"""Unit tests of immich_stream/s3/store.py: part sizes."""

from __future__ import annotations

from immich_stream.s3.checksums import MAX_PARTS, MIB, part_size_for, stream_part_size


def test_part_sizes_fit_s3s_part_count() -> None:
    assert part_size_for(100 * MIB, 8 * MIB) == 8 * MIB
    big = 200 * 1024 * 1024 * MIB  # 200 TiB would need more than 10,000 8 MiB parts
    size = part_size_for(big, 8 * MIB)
    assert -(-big // size) <= MAX_PARTS and size % MIB == 0
    assert [stream_part_size(n, 8 * MIB, 32 * MIB) // MIB for n in (1, 1000, 1001, 2001, 9999)] == [8, 8, 16, 32, 32]
