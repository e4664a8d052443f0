"""`restore --album/--user/--person/--taken/--name`: the files of the assets the catalog
selects, through restore_files (every restore's safety: temporary names, size and sha256,
nothing through a symlink), either in the library layout (to copy back under
UPLOAD_LOCATION) or as a human tree (`--layout names`: album/original-file-name).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from immich_stream.browse.catalog_find import Asset, Selectors, find_assets, wanted_files
from immich_stream.config import Settings
from immich_stream.progress import Reporter
from immich_stream.repository.manifest import ManifestLine
from immich_stream.repository.session import open_reader
from immich_stream.restore.files import restore_files
from immich_stream.restore.restorer import RestoreStats

NO_ALBUM = "(no album)"
NAMED_KINDS = ("original", "live-video", "sidecar")  # what --layout names restores of an asset


@dataclass
class Picked:
    """The files a catalog restore asks for, and which of them the manifest held."""

    wanted: set[tuple[str, bytes]]
    rename: dict[tuple[str, bytes], bytes] | None = None
    seen: set[tuple[str, bytes]] = field(default_factory=set)
    unmapped: int = 0  # files whose path is under no root of the snapshot

    def select(self, line: ManifestLine) -> bool:
        key = (line.root, line.relpath)
        if line.type == "dir" or key not in self.wanted:
            return False
        self.seen.add(key)
        return True

    def renamed(self, line: ManifestLine) -> bytes:
        assert self.rename is not None
        return self.rename[(line.root, line.relpath)]

    @property
    def missing(self) -> int:
        return len(self.wanted - self.seen)


def _part(text: str) -> str:
    """A name fit for one path part: no "/" or NUL, not "." or "..", not empty."""
    text = re.sub(r"[/\x00]", "_", text).strip() or "_"
    return "_" if text in (".", "..") else text


NAME_MAX = 255  # bytes in one path part (Linux filesystems): a longer album or file name is cut


def _fit(text: str, limit: int) -> str:
    """text cut to at most `limit` bytes of UTF-8, at a character's edge."""
    raw = text.encode("utf-8", "surrogateescape")
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore").rstrip() or "_"


def names_layout(assets: list[Asset], albums: list[str]) -> dict[tuple[str, bytes], bytes]:
    """album/original-file-name for each asset's original (its live-photo video beside it,
    a sidecar as name.xmp): the album the selectors named, else its first, else NO_ALBUM.
    Two files of one name in one album: the later ones get " (2)", " (3)"... before the
    extension."""
    asked = {a.casefold() for a in albums}
    taken: set[str] = set()  # the names given, lower-cased
    out: dict[tuple[str, bytes], bytes] = {}
    for asset in sorted(assets, key=lambda a: (str(a.get("taken") or ""), str(a.get("id")))):
        in_albums = asset.get("albums") or []
        album = next((a for a in in_albums if a.casefold() in asked), in_albums[0] if in_albums else NO_ALBUM)
        stem, ext = os.path.splitext(_part(str(asset.get("name") or asset.get("id"))))
        ext = _fit(ext, 32)
        mine: list[tuple[tuple[str, bytes], str]] = []  # (root, path), the suffix after the name
        for root, path, kind in asset.get("files", []):
            key = (root, str(path).encode("utf-8", "surrogateescape"))
            if root and kind in NAMED_KINDS and key not in dict(mine):
                suffix = (
                    ext
                    if kind == "original"
                    else (_fit(os.path.splitext(path)[1], 32) if kind == "live-video" else ext + ".xmp")
                )
                while suffix in (s for _, s in mine):  # two files of one kind (a sidecar in two places)
                    suffix = "-" + suffix
                mine.append((key, suffix))
        longest = max((len(x.encode("utf-8", "surrogateescape")) for _, x in mine), default=0)
        stem = _fit(stem, NAME_MAX - 16 - longest)  # room for " (n)" and the longest suffix
        folder = _fit(_part(album), NAME_MAX)
        n = 1  # the same " (n)" for all of an asset's files: a sidecar keeps its photo's name
        while True:
            base = f"{folder}/{stem}" + (f" ({n})" if n > 1 else "")
            names = [f"{base}{suffix}".encode("utf-8", "surrogateescape") for _, suffix in mine]
            # compared without regard to case: the tree is often copied to a disk that
            # ignores it (exFAT, macOS, Windows), where IMG_1.JPG would replace img_1.jpg
            folded = {name.decode("utf-8", "surrogateescape").lower() for name in names}
            if not taken.intersection(folded) and len(folded) == len(names):
                break
            n += 1
        taken.update(folded)
        out.update(zip((key for key, _ in mine), names, strict=True))
    return out


async def restore_selected(
    settings: Settings,
    reporter: Reporter,
    which: str,
    target: Path,
    selectors: Selectors,
    layout: str,
    overwrite: bool,
    wait: bool = True,
    each: Callable[[Asset], None] | None = None,
) -> tuple[str, list[Asset], Picked, RestoreStats]:
    """Find the assets (NothingMatched when none), then restore exactly their files."""
    async with open_reader(settings, "restore") as (repo, _):
        snap = await repo.resolve(which)
        _, assets = await find_assets(repo, snap, selectors, each)
    if layout == "names":
        rename = names_layout(assets, selectors.albums)
        picked = Picked(set(rename), rename)
    else:
        picked = Picked(wanted_files(assets))
    picked.unmapped = sum(1 for a in assets for root, _, _ in a.get("files", []) if not root)
    roots = sorted({root for root, _ in picked.wanted})
    done, stats = await restore_files(
        settings,
        reporter,
        snap.id,
        target,
        roots if len(roots) == 1 and layout != "names" else None,  # one root: straight into target
        [],
        overwrite,
        wait,
        select=picked.select,
        rename=picked.renamed if picked.rename is not None else None,
    )
    return done.id, assets, picked, stats
