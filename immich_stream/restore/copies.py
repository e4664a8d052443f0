"""The partial-restore problems: each file not restored is named in one line with why, and
where another committed snapshot holds the same content (a copy to restore it from).
"""

from __future__ import annotations

import logging

from immich_stream.errors import RepoError, StoreError
from immich_stream.problems import Problems
from immich_stream.repository.manifest import ManifestLine
from immich_stream.repository.repo import Repo, Snapshot

log = logging.getLogger(__name__)

LOOKUP_LIMIT = 1000  # files not restored that are looked up in other snapshots (the rest: named only)
COPIES_NAMED = 3  # other snapshots named per file


async def find_copies(
    repo: Repo, snap: Snapshot, failures: list[tuple[ManifestLine, str]], copies: list[dict[str, str]]
) -> None:
    """For each file not restored, the other committed snapshots whose manifests hold the
    same content (sha256) in other stored bytes that are in the bucket (every object they are in): a copy to restore it
    from (into copies: snapshot -> the path it holds it at). The manifests are streamed one at a time, newest
    first; one that cannot be read is skipped."""
    by_sha: dict[str, list[int]] = {}
    for i, (line, _) in enumerate(failures):
        assert line.sha256 is not None
        by_sha.setdefault(line.sha256, []).append(i)
    others = [s for s in reversed(await repo.snapshot_ids()) if s != snap.id]
    if others:
        log.info("looking for other copies of %d files in %d other snapshots", len(failures), len(others))
    present: dict[str, bool] = {}  # object key -> in the bucket (a copy lost too is not named)
    tried = [0] * len(failures)  # copies looked up per file: bounded, however many snapshots miss it

    async def there(key: str) -> bool:
        if key not in present:
            present[key] = await repo.store.head(repo.object_key(key)) is not None
        return present[key]

    async def all_there(keys: list[str]) -> bool:
        for key in keys:
            if not await there(key):
                return False
        return True

    for sid in others:
        try:
            async for other in repo.read_manifest(sid, damaged=True):
                if other.type != "file" or other.sha256 not in by_sha or not other.has_object:
                    continue
                # every object its bytes are in (a blob's pack, each chunk's pack): all must be there
                keys = list(dict.fromkeys(k for k, _ in other.object_refs()))
                for i in by_sha[other.sha256]:
                    if other.same_object(failures[i][0]) or len(copies[i]) >= COPIES_NAMED or sid in copies[i]:
                        continue
                    if any(k not in present for k in keys):
                        if tried[i] >= 2 * COPIES_NAMED:
                            continue
                        tried[i] += 1
                    if await all_there(keys):
                        copies[i][sid] = f"{other.root}/{other.path}"
        except (RepoError, StoreError) as exc:
            log.warning("could not look for other copies in snapshot %s: %s", sid, exc)


def name_failures(failures: list[tuple[ManifestLine, str]], copies: list[dict[str, str]], problems: Problems) -> None:
    """Each file not restored in one line: the path, why, and where another copy is."""
    for (line, why), found in zip(failures, copies, strict=True):
        where = f"{line.root}/{line.path}"
        if found:
            named = ", ".join(f"snapshot {sid}" + ("" if p == where else f" as {p}") for sid, p in found.items())
            tail = f"another copy: {named}"
        else:
            tail = "no other snapshot holds a copy"
        problems.add(f"{where}: not restored: {why}; {tail}")
