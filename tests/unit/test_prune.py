"""Unit tests of immich_stream/repository/prune.py: the retention policy."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from immich_stream import config as cfg
from immich_stream.errors import ConfigError
from immich_stream.repository.prune import Policy, apply_policy


def sid(t: dt.datetime, n: int = 0) -> str:
    return t.strftime("%Y-%m-%dT%H%M%SZ") + f"-{n:04x}"


def times() -> list[dt.datetime]:
    """Snapshot times with the shapes retention cares about: several a day, gaps of days
    and weeks, month and year boundaries, an ISO week that straddles a year."""
    base = dt.datetime(2021, 11, 28, 3, 0, tzinfo=dt.UTC)
    out = []
    for day in range(0, 50, 1):
        for hour in (3, 9, 21) if day % 7 == 0 else (3,):
            if day % 11 == 5:
                continue  # days without a snapshot
            out.append(base + dt.timedelta(days=day, hours=hour - 3, minutes=day % 5))
    for months in range(3, 30, 2):  # sparse history going back years
        out.append(base - dt.timedelta(days=30 * months, hours=months))
    return sorted(out)


POLICIES = [
    Policy(last=5),
    Policy(daily=7),
    Policy(hourly=10),
    Policy(daily=7, weekly=4),
    Policy(daily=3, weekly=2, monthly=6, yearly=3),
    Policy(weekly=10),
    Policy(monthly=12),
    Policy(yearly=5),
    Policy(last=2, within="14d"),
    Policy(within="1m3d"),
    Policy(within="1y"),
    Policy(last=1, hourly=5, daily=2, weekly=2, monthly=2, yearly=2),
]


def test_retention_by_hand() -> None:
    d = lambda s: sid(dt.datetime.fromisoformat(s).replace(tzinfo=dt.UTC))  # noqa: E731
    ids = [
        d("2024-03-01 10:00"),
        d("2024-03-01 12:00"),
        d("2024-03-02 09:00"),
        d("2024-03-04 08:00"),
        d("2024-03-04 20:00"),
        d("2024-03-05 11:00"),
    ]
    keep, _ = apply_policy(ids, Policy(daily=3))
    assert keep == [d("2024-03-02 09:00"), d("2024-03-04 20:00"), d("2024-03-05 11:00")]  # days with snapshots
    keep, _ = apply_policy(ids, Policy(within="1d"))
    assert keep == [d("2024-03-04 20:00"), d("2024-03-05 11:00")]  # after newest minus one day
    with pytest.raises(ConfigError, match="no retention policy"):
        apply_policy(ids, Policy())


@pytest.mark.parametrize("within", ["0d", "0h", "0m", "0y", "0y0m0d0h"])
def test_policy_that_keeps_nothing_is_refused(within: str) -> None:
    ids = [sid(t, i) for i, t in enumerate(times())]
    with pytest.raises(ConfigError, match=f"keep-within {within} keeps nothing"):
        apply_policy(ids, Policy(within=within))
    with pytest.raises(ConfigError, match="keeps nothing"):
        apply_policy([], Policy(within=within))  # refused before any listing


def test_newest_snapshot_is_kept_whatever_the_policy() -> None:
    ids = [sid(t, i) for i, t in enumerate(times())]
    keep, remove = apply_policy(ids, Policy(last=1, within="0d"))
    assert keep == [max(ids)] and len(remove) == len(ids) - 1
    for policy in POLICIES:
        for n in (1, 2, 7, len(ids)):
            assert max(ids[:n]) in apply_policy(ids[:n], policy)[0]


def test_keep_within_uses_prunes_rules(tmp_path: Path) -> None:
    from immich_stream.repository.prune import parse_within

    for text in ("30d", "6m", "1y2m3d4h", "12h", " 2y ", "0d"):
        assert cfg.parse_within_parts(text) == parse_within(text)
        assert (
            cfg.load(environ={"IMMICH_STREAM_KEEP_WITHIN": text, "XDG_CONFIG_HOME": str(tmp_path)}).keep_within
            == text.strip()
        )


def test_repack_chooses_the_emptiest_packs_until_max_unused_holds() -> None:
    from immich_stream.repository.repack import PackUse, choose

    packs = [
        PackUse("a", 100, 90, None),  # 10% unused
        PackUse("b", 100, 20, None),  # 80% unused
        PackUse("c", 100, 50, "STANDARD_IA"),  # 50%
        PackUse("d", 100, 5, "GLACIER"),  # 95%, but a GET of it waits for a thaw
        PackUse("e", 100, 100, None),  # all used
    ]
    names = lambda chosen: [p.key for p in chosen]  # noqa: E731
    # 0%: every partly used pack that can be read at once, emptiest first
    total = sum(p.size for p in packs)
    assert names(choose(packs, 0.0, total)) == ["b", "c", "a"]
    assert names(choose(packs, 1.0, total)) == []
    # GLACIER's unneeded 95 counts as used (no repack reclaims it): used 360, unneeded 140.
    # 25% allows 120 unneeded: b alone brings it to 60
    assert names(choose(packs, 0.25, total)) == ["b"]
    # 10% allows 40: b, then c (60 -> 10)
    assert names(choose(packs, 0.10, total)) == ["b", "c"]
    assert names(choose(packs, 0.5, total)) == []  # 140 <= 360


def test_repack_judges_unneeded_bytes_against_every_kept_pack_and_caps_one_prune() -> None:
    """--max-unused is a share of all pack bytes, fully used packs included (the review: one
    pack 10% unneeded among a thousand full ones was repacked every night); one prune moves
    at most max_pieces blobs and chunks (the first pack chosen whatever its count)."""
    from immich_stream.repository.repack import PackUse, choose

    mib = 1 << 20
    partly = [PackUse("p", 16 * mib, 14 * mib, None, 10)]
    assert choose(partly, 0.05, 1000 * 16 * mib + 16 * mib) == []
    assert choose(partly, 0.05, 16 * mib) == partly
    many = [PackUse(f"m{i}", 100, 10, None, 60) for i in range(5)]
    assert [p.key for p in choose(many, 0.0, 500, max_pieces=150)] == ["m0", "m1"]
    assert [p.key for p in choose(many, 0.0, 500, max_pieces=10)] == ["m0"]


def test_pack_usage_counts_every_kept_pack_and_each_packs_pieces() -> None:
    """What choose() is given: every judged pack's bytes (fully used ones too), each partly
    used pack's pieces (the cap counts them), and an encrypted pack of empty files only
    judged as the age file it is, not as all unneeded (the review: repacked every prune)."""
    from immich_stream.repository.age import sealed_size
    from immich_stream.repository.manifest import ManifestLine
    from immich_stream.repository.prune import PackUsage

    def blob(key: str, offset: int, size: int) -> ManifestLine:
        line = ManifestLine("library", f"f{offset}", "file", size, 0, 0o644, 0, 0, offset, "0" * 64, key)
        line.offset = offset
        return line

    usage = PackUsage()
    for line in (blob("p", 0, 0), blob("p", 0, 100), blob("p", 100, 50), blob("full", 0, 300), blob("empty", 0, 0)):
        usage.add(line)
    usage.kept("p", 400, None, None)
    usage.kept("full", 300, None, None)
    assert usage.pack_bytes == 700
    [p] = usage.partly
    assert (p.key, p.used, p.pieces) == ("p", 150, 3)

    class Sealing:  # one recipient, as age.Sealing.size says
        @staticmethod
        def size(plain: int) -> int:
            return sealed_size(plain, 1)

    usage.kept("empty", sealed_size(0, 1), Sealing(), None)  # type: ignore[arg-type]
    assert [q.key for q in usage.partly] == ["p"]
