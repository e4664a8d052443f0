"""The backup's files stage alone (walk, classify, upload, manifest), without Docker.

    .venv/bin/python bench/files_stage.py DIR [--incremental]   (settings from the environment, as the CLI)

--incremental: against the repository's newest snapshot, as `backup` runs (the no-change
night when nothing changed).

Runs exactly what `backup` runs for one root (backup.roots.backup_root with a real Store, Repo,
ManifestWriter and the budgets backup uses), minus the stack and the dump: it is what
bench/throughput.py times against s5cmd for the small-file case, and what a profiler
wraps (`py-spy record -- python bench/files_stage.py DIR`, or IMMICH_STREAM_PROFILE=out.prof
for cProfile). Prints one line: files, bytes, seconds.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from immich_stream import config  # noqa: E402
from immich_stream.backup.changes import Source, WalkedLibrary, scan_parent  # noqa: E402
from immich_stream.backup.library import library_walk  # noqa: E402
from immich_stream.backup.roots import OrderedManifest, Sources, backup_root  # noqa: E402
from immich_stream.backup.run import stream_budget_share  # noqa: E402
from immich_stream.backup.upload import FileUploader  # noqa: E402
from immich_stream.progress import Reporter  # noqa: E402
from immich_stream.repository.layout import new_snapshot_id  # noqa: E402
from immich_stream.repository.manifest import ManifestWriter  # noqa: E402
from immich_stream.repository.repo import ObjectIndex  # noqa: E402
from immich_stream.repository.session import open_repo  # noqa: E402
from immich_stream.repository.summary import ManifestInfo, RunStats, SnapshotSummary  # noqa: E402
from immich_stream.s3.budget import ByteBudget  # noqa: E402


async def files_stage(directory: Path, incremental: bool = False) -> tuple[RunStats, float]:
    # a fresh bucket: the repository is created by this first run, as `backup` did before `init`
    os.environ.setdefault("IMMICH_STREAM_TEST_AUTO_INIT", "1")
    settings = config.load()
    snap_id = new_snapshot_id()
    started = time.monotonic()
    async with open_repo(settings, create_for=snap_id) as repo:
        sources = Sources(None, [], None, ObjectIndex())
        if incremental:  # against the newest snapshot, as `backup` does (a no-change run)
            parent = (await repo.resolve("latest")).id
            # as backup: one walk of names for the count and the vanished
            library = WalkedLibrary(library_walk(directory, ()))
            try:
                info = await scan_parent(repo, parent, {"library": directory}, library=library)
                await library.count()
            finally:
                await library.aclose()
            objects = await ObjectIndex.load(repo)
            sources = Sources(Source.of_run(repo.read_manifest(parent), parent), [], info, objects)
        stats = RunStats()
        share = stream_budget_share(settings.max_memory, settings.part_size)
        stream_budget = ByteBudget(share)
        budget = ByteBudget(max(settings.max_memory - share, settings.part_size))
        uploader = FileUploader(repo.store, repo, budget, settings, stats)
        phase = Reporter("quiet").phase("files")
        async with ManifestWriter(repo.store, repo.manifest_key(snap_id), stream_budget, settings.part_size) as mf:
            await backup_root(
                "library",
                directory,
                snap_id,
                uploader,
                sources,
                OrderedManifest(mf),
                stats,
                phase,
                settings.jobs,
            )
            await mf.finish()
        phase.close()
        # A snapshot without a database, so that `restore --to` (bench/throughput.py) finds it.
        summary = SnapshotSummary(
            id=snap_id,
            roots={"library": str(directory)},
            files=stats.counts(),
            manifest=ManifestInfo(repo.relative_key(repo.manifest_key(snap_id)), mf.lines),
        )
        await repo.commit(summary)
    return stats, time.monotonic() - started


def main() -> None:
    directory = Path(sys.argv[1])
    incremental = "--incremental" in sys.argv[2:]
    profile = os.environ.get("IMMICH_STREAM_PROFILE")
    prof = cProfile.Profile() if profile else None
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    if prof:
        prof.enable()
    stats, seconds = runner(files_stage(directory, incremental))
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    files = stats.new + stats.changed
    print(
        f"files {files} unchanged {stats.unchanged} rechecked {stats.rechecked} bytes {stats.bytes_uploaded} "
        f"packs {stats.packs} seconds {seconds:.3f} failed {stats.failed}"
    )
    if stats.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
