"""The catalog a backup stores beside its manifest (snapshots/<id>/catalog.jsonl.gz,
encrypted when the repository is): made from the dump as it streamed (CatalogBuilder fed by
the dump's compressor), written once the stack runs again. A dump that is not an Immich
database of a known schema stores none: `find` then says why, from the dump.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import zlib

from immich_stream.browse.catalog import CatalogBuilder, CatalogError
from immich_stream.browse.catalog_find import mounts_in
from immich_stream.repository.repo import Repo

log = logging.getLogger(__name__)


def compress(builder: CatalogBuilder) -> bytes:
    """The catalog as one gzip member, compressed as its lines are made (the lines are
    never all in memory at once; the compressed bytes are, a few dozen an asset)."""
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    out = [z.compress(line) for line in builder.lines()]
    out.append(z.flush())
    return b"".join(out)


def made(builder: CatalogBuilder, snap_id: str) -> bytes | None:
    """The compressed catalog, or None when the dump held none (said at -v: a database that
    is not Immich's is not this run's failure) or making it failed for any other reason
    (said as a warning: the snapshot is whole without it; `find` reads the dump instead)."""
    try:
        return compress(builder)
    except CatalogError as exc:
        log.info("no Immich catalog stored with snapshot %s: %s", snap_id, exc)
    except Exception as exc:  # the backup goes on whatever the dump held, as feed_safely does
        log.warning(
            "no Immich catalog stored with snapshot %s (making it failed: %r); find reads its dump", snap_id, exc
        )
    finally:
        builder.rows.clear()  # the rows read from the dump: no longer needed
    return None


async def store_catalog(
    repo: Repo, snap_id: str, builder: CatalogBuilder, config_files: dict[str, str]
) -> dict[str, object] | None:
    """Write the snapshot's catalog; snapshot.json's `catalog` record (its size and sha256,
    which readers check: the catalog is then as trustworthy as snapshot.json), or None when
    no catalog was made (see made). Paths are placed in roots by the compose files the
    snapshot records, as `find` does when it builds a catalog from the dump."""
    builder.library_mounts = mounts_in(config_files)
    data = await asyncio.to_thread(made, builder, snap_id)
    if data is None:
        return None
    await repo.store.put(repo.catalog_key(snap_id), data)
    log.debug("stored the Immich catalog of snapshot %s (%d bytes)", snap_id, len(data))
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
