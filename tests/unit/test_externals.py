"""External libraries: their root names and where a container path is on the host."""

from __future__ import annotations

from pathlib import Path

from immich_stream.backup.externals import named, root_name
from immich_stream.host.externals import Mount, host_path
from immich_stream.repository.layout import is_external, is_root, root_dir, root_order


def test_root_names_follow_the_path_and_stay_apart() -> None:
    assert root_name("/mnt/nas/photos") == "external:mnt-nas-photos"
    assert root_name("/mnt/Fotos Familie/2020 (alt)/") == "external:mnt-Fotos-Familie-2020-alt"
    names = named([("A", "/mnt/a-b"), ("B", "/mnt/a/b"), ("C", "/mnt/c"), ("A", "/mnt/a-b")])
    assert names["/mnt/c"] == "external:mnt-c"
    assert names["/mnt/a-b"] != names["/mnt/a/b"] and all(
        n.startswith("external:mnt-a-b-") for n in (names["/mnt/a-b"], names["/mnt/a/b"])
    )
    again = named([("B", "/mnt/a/b"), ("A", "/mnt/a-b")])  # stable, whatever the order
    assert again == {p: names[p] for p in ("/mnt/a-b", "/mnt/a/b")}
    assert all(is_external(n) for n in names.values())


def test_only_safe_roots_are_roots() -> None:
    assert is_root("library") and is_root("postgres") and is_root("external:mnt-x")
    for bad in ("external:", "external:../x", "external:a/b", "external:.hidden", "other", "external:-x"):
        assert not is_root(bad), bad
    assert root_dir("external:mnt-x") == b"external/mnt-x"
    assert sorted(["external:b", "library", "external:a", "postgres"], key=root_order) == [
        "postgres",
        "library",
        "external:a",
        "external:b",
    ]


def test_host_path_through_the_longest_mount() -> None:
    mounts = [
        Mount("/srv/immich/library", "/data", False, "bind"),
        Mount("/srv/nas", "/mnt/nas", True, "bind"),
        Mount("/srv/nas-photos", "/mnt/nas/photos", True, "bind"),
    ]
    hit = host_path("/mnt/nas/photos/2020", mounts)
    assert hit is not None and hit[0] == Path("/srv/nas-photos/2020") and hit[1].read_only
    hit = host_path("/mnt/nas/", mounts)
    assert hit is not None and hit[0] == Path("/srv/nas")
    assert host_path("/mnt/nasx", mounts) is None and host_path("/srv/inside", mounts) is None
