#!/bin/bash
# Makes a fresh Debian 12 machine ready for the test suite, idempotently:
#   - Debian packages docker.io, debootstrap, restic, age and Debian's Python tools (when missing)
#   - dockerd running (when not answering)
#   - the local PostgreSQL test images: 15 (the suite's), 17 and 18 with pgvector (test_real_schema's;
#     one that cannot be built fails only those tests), built once, then cached by tag
# Fast on the second run: every step checks before it acts.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
IMAGE=${IMMICH_TEST_PG_IMAGE:-immich-stream-test/postgres:15}
BASE=immich-stream-test/debian-postgres:15

log() { printf '[%(%Y-%m-%d %H:%M:%S)T] setup: %s\n' -1 "$*"; }

need_pkgs=()
command -v dockerd >/dev/null || need_pkgs+=(docker.io)
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
command -v restic >/dev/null || need_pkgs+=(restic)  # the oracle for prune's retention rules
command -v age >/dev/null || need_pkgs+=(age)  # the standard tool that must open encrypted objects
# tests/test_image.py: Debian's Python goes into the image's local base, and its pip,
# setuptools and wheel build immich-stream's wheel offline
for pkg in python3.11-venv python3-pip python3-setuptools python3-wheel; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    # setsid: dockerd must outlive this script and the CI step that ran it.
    setsid dockerd >/var/log/dockerd.log 2>&1 < /dev/null &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { log "dockerd did not start, see /var/log/dockerd.log"; exit 1; }
fi

# The slow part (debootstrap, ~1 min each) is cached as a base image; the entrypoint is a
# small layer on top, rebuilt from tests/stack/ every time (seconds, and never stale).
# Three majors: PostgreSQL 15 from bookworm (no vector extension: neither bookworm nor
# bookworm-backports has a pgvector package), PostgreSQL 17 with pgvector from trixie and 18
# with pgvector from forky, both reached through the same apt mirror (bookworm's debootstrap
# knows no forky: it uses sid's script, which fits any suite after trixie).
build_base() {  # build_base MAJOR SUITE PACKAGES [DEBOOTSTRAP-SCRIPT]
    local major=$1 suite=$2 pkgs=$3 script=${4:-} base=immich-stream-test/debian-postgres:$1 rootfs started
    docker image inspect "$base" >/dev/null 2>&1 && return 0
    started=$SECONDS
    log "building $base with debootstrap $suite (about a minute)"
    rootfs=$(mktemp -d /var/tmp/immich-stream-pg.XXXXXX)
    debootstrap --variant=minbase --include="$pkgs" "$suite" "$rootfs" ${script:+http://deb.debian.org/debian "$script"} >"/var/log/immich-stream-debootstrap-$major.log" 2>&1 \
        || { rm -rf "$rootfs"; log "debootstrap failed, see /var/log/immich-stream-debootstrap-$major.log"; return 1; }
    # The Debian package's own cluster is not used; the entrypoint makes one in PGDATA.
    rm -rf "$rootfs/var/lib/postgresql/$major" "$rootfs/etc/postgresql"
    tar -C "$rootfs" -c . | docker import \
        -c "ENV PATH=/usr/lib/postgresql/$major/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        - "$base" >/dev/null || { rm -rf "$rootfs"; log "docker import of $base failed"; return 1; }
    rm -rf "$rootfs"
    log "built $base in $((SECONDS - started)) s"
}
build_base 15 bookworm postgresql-15 || exit 1
# 17 and 18 come from Debian's trixie and forky (testing, a moving suite): a package that is
# not there today must not stop the whole suite, only test_real_schema's cases of that major
# (they fail naming the missing image); the next run tries again.
for spec in "17 trixie postgresql-17,postgresql-17-pgvector" \
    "18 forky postgresql-18,postgresql-18-pgvector /usr/share/debootstrap/scripts/sid"; do
    # shellcheck disable=SC2086  # the words of spec are build_base's arguments
    build_base $spec || log "WARNING: no PostgreSQL ${spec%% *} test image: only tests/test_real_schema.py's ${spec%% *} cases will fail"
done
out=$(DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$BASE" -t "$IMAGE" "$here/stack" 2>&1) || { echo "$out"; exit 1; }
for major in 17 18; do
    docker image inspect "immich-stream-test/debian-postgres:$major" >/dev/null 2>&1 || continue
    out=$(DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=immich-stream-test/debian-postgres:$major" \
        -t "immich-stream-test/postgres:$major-pgvector" "$here/stack" 2>&1) || { echo "$out"; exit 1; }
done
log "machine ready"
