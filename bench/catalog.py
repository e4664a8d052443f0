"""The Immich catalog at scale (issue 26): a synthetic pg_dump of N assets in Immich's current
names (every column of the real asset, asset_exif, asset_file, asset_face, album_asset tables,
as tests/stack/real/10-schema.sql has them), then

- pace: the dump's compressor (GzipChunker, as a backup runs it) alone and with the catalog
  reader fed the same chunks: MiB/s of SQL, the backup's dump pace before and after;
- build: the catalog from the dump (CatalogBuilder, then compressed as a backup stores it):
  seconds, peak RSS, bytes per 100,000 assets;
- find: `find --album` through the CLI on a snapshot whose catalog is stored in a bucket on
  a local `rclone serve s3`: wall seconds and peak RSS.

    .venv/bin/python bench/catalog.py [--assets 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import random
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

from run import measure  # noqa: E402 (bench/run.py)

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
MIB = 1 << 20
NULL = "\\N"

ASSET_COLS = (
    'id, "deviceAssetId", "ownerId", "deviceId", type, "originalPath", "fileCreatedAt", "fileModifiedAt", '
    '"isFavorite", duration, "encodedVideoPath", checksum, "livePhotoVideoId", "updatedAt", "createdAt", '
    '"originalFileName", "sidecarPath", thumbhash, "isOffline", "libraryId", "isExternal", "deletedAt", '
    '"localDateTime", "stackId", "duplicateId", status, "updateId", visibility'
)


def make_dump(path: Path, n: int) -> None:
    """A pg_dump-shaped SQL file of n assets: 4 users, 200 albums holding a third of the
    assets, 100 people with a face on a third, two thumbnails each, a video in ten."""
    rnd = random.Random(7)
    users = [str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(4)]
    albums = [str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(200)]
    people = [str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(100)]
    ids = [str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(n)]
    ts = "2024-05-01 12:00:00+00"
    with open(path, "w") as f:
        f.write("-- PostgreSQL database dump\n\n")
        f.write('COPY public.album (id, "ownerId", "albumName", "createdAt", "deletedAt") FROM stdin;\n')
        for i, a in enumerate(albums):
            f.write(f"{a}\t{users[i % 4]}\tAlbum {i}\t{ts}\t\\N\n")
        f.write('\\.\n\nCOPY public.album_asset ("albumsId", "assetsId", "createdAt") FROM stdin;\n')
        for i, a in enumerate(ids):
            if i % 3 == 0:
                f.write(f"{albums[i % 200]}\t{a}\t{ts}\n")
        f.write(f"\\.\n\nCOPY public.asset ({ASSET_COLS}) FROM stdin;\n")
        for i, a in enumerate(ids):
            u = users[i % 4]
            video = i % 10 == 0
            ext = "mp4" if video else "jpg"
            enc = f"/data/encoded-video/{u}/{a[:2]}/{a[2:4]}/{a}.mp4" if video else ""
            duration = "0:00:12.000000" if video else NULL
            hexid = a.replace("-", "")
            f.write(
                f"{a}\tIMG_{i}.{ext}-{i * 7919 % 100000}\t{u}\tphone\t{'VIDEO' if video else 'IMAGE'}\t"
                f"/data/library/{u}/{2010 + i % 15}/{i % 12 + 1:02d}/IMG_{i}.{ext}\t{ts}\t{ts}\tf\t"
                f"{duration}\t{enc}\t\\\\x{hexid:0<40}\t\\N\t{ts}\t{ts}\t"
                f"IMG_{i}.{ext}\t\\N\t\\\\x{hexid}\tf\t\\N\tf\t\\N\t{ts}\t\\N\t\\N\tactive\t{a}\ttimeline\n"
            )
        f.write('\\.\n\nCOPY public.asset_exif ("assetId", make, model, "dateTimeOriginal", city, description) FROM stdin;\n')
        for i, a in enumerate(ids):
            f.write(f"{a}\tApple\tiPhone 15 Pro\t2023-0{1 + i % 9}-1{i % 10} 10:00:00+00\tVille {i % 5000}\t\n")
        f.write('\\.\n\nCOPY public.asset_face ("assetId", "personId", id, "deletedAt") FROM stdin;\n')
        for i, a in enumerate(ids):
            if i % 3 == 1:
                f.write(f"{a}\t{people[i % 100]}\t{uuid.UUID(int=i)}\t\\N\n")
        f.write('\\.\n\nCOPY public.asset_file (id, "assetId", "createdAt", "updatedAt", type, path) FROM stdin;\n')
        for i, a in enumerate(ids):
            u = users[i % 4]
            for kind, ext in (("preview", "jpeg"), ("thumbnail", "webp")):
                f.write(f"{uuid.UUID(int=i * 2)}\t{a}\t{ts}\t{ts}\t{kind}\t/data/thumbs/{u}/{a[:2]}/{a[2:4]}/{a}-{kind}.{ext}\n")
        f.write('\\.\n\nCOPY public.person (id, "ownerId", name) FROM stdin;\n')
        for i, p in enumerate(people):
            f.write(f"{p}\t{users[i % 4]}\tPerson {i}\n")
        f.write('\\.\n\nCOPY public."user" (id, email, name) FROM stdin;\n')
        for i, u in enumerate(users):
            f.write(f"{u}\tuser{i}@example.org\tUser {i}\n")
        f.write("\\.\n\n-- PostgreSQL database dump complete\n")


def chunks(path: Path) -> list[bytes]:
    with open(path, "rb") as f:
        return list(iter(lambda: f.read(MIB), b""))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pace(path: Path) -> None:
    from immich_stream.browse.catalog import CatalogBuilder
    from immich_stream.host.postgres import DumpScanner, GzipChunker

    data = chunks(path)
    size = sum(map(len, data)) / MIB
    for rnd in range(3):
        for label, with_catalog in (("dump alone", False), ("dump + catalog", True)):
            builder = CatalogBuilder()
            gz = GzipChunker(DumpScanner(), builder.feed if with_catalog else None)
            t = time.perf_counter()

            async def run(gz: GzipChunker = gz) -> None:  # as dump_database calls it
                for c in data:
                    await gz.compress(c)
                await gz.compress(b"", True)

            asyncio.run(run())
            s = time.perf_counter() - t
            print(f"pace round {rnd + 1}: {label}: {s:.2f} s, {size / s:.0f} MiB/s of SQL")


def build(path: Path, out: Path) -> None:
    from immich_stream.browse.catalog import CatalogBuilder
    from immich_stream.browse.catalog_store import compress

    t = time.perf_counter()
    b = CatalogBuilder()
    with open(path, "rb") as f:
        for c in iter(lambda: f.read(MIB), b""):
            b.feed(c)
    fed = time.perf_counter() - t
    data = compress(b)
    s = time.perf_counter() - t
    peak = peak_mib()  # the build's: what follows is the bench's own counting
    out.write_bytes(data)
    n = len(b.rows["asset"])
    print(
        f"build: {n} assets: read {fed:.1f} s, catalog made and compressed {s:.1f} s in all, peak RSS "
        f"{peak:.0f} MiB; catalog {len(data) / MIB:.1f} MiB = {len(data) * 100000 / n / MIB:.2f} MiB "
        f"per 100,000 assets ({len(gzip.decompress(data)) * 100000 / n / MIB:.1f} MiB uncompressed)"
    )


def find(catalog: Path, work: Path) -> None:
    from tests.test_hardening_restore import Entry, write_snapshot
    from throughput import KEY, SECRET, Server

    server = Server("rclone", work)
    try:
        env = dict(os.environ)
        env.update(
            {
                "AWS_ACCESS_KEY_ID": KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET,
                "S3_ENDPOINT_URL": server.endpoint,
                "S3_BUCKET": "bench",
                "S3_PATH_STYLE": "true",
                "IMMICH_STREAM_STATE_DIR": str(work / "state"),
                "IMMICH_STREAM_TEST_AUTO_INIT": "1",
                "HOME": str(work),
            }
        )
        import boto3

        boto3.client(
            "s3", endpoint_url=server.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET
        ).create_bucket(Bucket="bench")
        sid = write_snapshot(env, {"library/x.jpg": Entry(b"x")})
        boto3.client(
            "s3", endpoint_url=server.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET
        ).put_object(Bucket="bench", Key=f"immich-backup/snapshots/{sid}/catalog.jsonl.gz", Body=catalog.read_bytes())
        py = str(HERE.parent / ".venv" / "bin" / "python")
        for rnd in range(3):
            m = measure("find", [py, "-m", "immich_stream", "find", "-q", "--album", "Album 7"], env)
            last = m["output"].strip().splitlines()[-1]
            print(f"find --album round {rnd + 1}: {m['wall']:.2f} s, peak RSS {m['rss_mib']:.0f} MiB ({last})")
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", type=int, default=200_000)
    args = ap.parse_args()
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sql = work / "dump.sql"
        make_dump(sql, args.assets)
        print(f"synthetic dump: {args.assets} assets, {sql.stat().st_size / MIB:.0f} MiB of SQL")
        pace(sql)
        catalog = work / "catalog.jsonl.gz"
        py = str(HERE.parent / ".venv" / "bin" / "python")
        for rnd in range(2):  # a process of its own: its peak RSS is the build's
            m = measure("build", [py, __file__, "--build-only", str(sql), str(catalog)], dict(os.environ))
            print(f"round {rnd + 1}: {m['output'].strip()}")
        find(catalog, work)
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--build-only":
        build(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
