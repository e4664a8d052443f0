"""The test stack itself: what the backup will look for is really there."""

from __future__ import annotations

import json

from tests.conftest import CONTAINERS, ImmichStack, docker, running_containers


def test_stack_has_immich_names_and_compose_labels(stack: ImmichStack) -> None:
    assert running_containers() == set(CONTAINERS)
    services = {}
    for name in CONTAINERS:
        labels = json.loads(docker("inspect", "-f", "{{json .Config.Labels}}", name))
        assert labels["com.docker.compose.project"] == "immich"
        services[name] = labels["com.docker.compose.service"]
    assert services == {
        "immich_server": "immich-server",
        "immich_machine_learning": "immich-machine-learning",
        "immich_redis": "redis",
        "immich_postgres": "database",
    }
    mounts = json.loads(docker("inspect", "-f", "{{json .Mounts}}", "immich_postgres"))
    assert any(m["Type"] == "bind" and m["Source"] == str(stack.postgres) for m in mounts)
    assert (stack.postgres / "PG_VERSION").read_text().strip() == "15"


def test_seeded_database_answers(stack: ImmichStack) -> None:
    assert stack.psql("SELECT count(*) FROM assets") == "90000"
    assert stack.psql("SELECT count(*) FROM users") == "5"
    exts = set(stack.psql("SELECT extname FROM pg_extension").split())
    assert {"cube", "earthdistance"} <= exts
    # earthdistance works on the seeded geodata (what Immich's reverse geocoding does)
    near = stack.psql('SELECT count(*) FROM geodata_places WHERE earth_box(ll_to_earth(0, 0), 2000000) @> "earthCoord"')
    assert int(near) > 0
    size = int(stack.psql("SELECT pg_database_size('immich')"))
    assert size > 40 * 1024 * 1024
