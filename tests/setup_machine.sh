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
debian_mirror() {  # the Debian mirror of this machine's apt sources (deb822 or one-line form)
    local m
    m=$(sed -n -e 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)\/*$/\1/p' \
        -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\{0,1\}\([^[:space:]]*\/debian\)\/*[[:space:]].*/\2/p' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1)
    [ -n "$m" ] || { log "no Debian mirror in /etc/apt/sources.list(.d): debootstrap needs one"; exit 1; }
    echo "$m"
}
build_base() {  # build_base MAJOR SUITE PACKAGES [DEBOOTSTRAP-SCRIPT]
    local major=$1 suite=$2 pkgs=$3 script=${4:-} base=immich-stream-test/debian-postgres:$1 rootfs started
    docker image inspect "$base" >/dev/null 2>&1 && return 0
    started=$SECONDS
    log "building $base with debootstrap $suite (about a minute)"
    rootfs=$(mktemp -d /var/tmp/immich-stream-pg.XXXXXX)
    debootstrap --variant=minbase --include="$pkgs" "$suite" "$rootfs" ${script:+"$(debian_mirror)" "$script"} >"/var/log/immich-stream-debootstrap-$major.log" 2>&1 \
        || { rm -rf "$rootfs"; log "debootstrap failed, see /var/log/immich-stream-debootstrap-$major.log"; return 1; }
    # The Debian package's own cluster is not used; the entrypoint makes one in PGDATA.
    rm -rf "$rootfs/var/lib/postgresql/$major" "$rootfs/etc/postgresql"
    tar -C "$rootfs" -c . | docker import \
        -c "ENV PATH=/usr/lib/postgresql/$major/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        - "$base" >/dev/null || { rm -rf "$rootfs"; log "docker import of $base failed"; return 1; }
    rm -rf "$rootfs"
    log "built $base in $((SECONDS - started)) s"
}
# The three at once (a fresh machine took ~3 min one after the other: downloads, unpacking).
# 17 and 18 come from Debian's trixie and forky (testing, a moving suite): a package that is
# not there today must not stop the whole suite, only test_real_schema's cases of that major
# (they fail naming the missing image); the next run tries again.
build_base 15 bookworm postgresql-15 & b15=$!
build_base 17 trixie postgresql-17,postgresql-17-pgvector & b17=$!
build_base 18 forky postgresql-18,postgresql-18-pgvector /usr/share/debootstrap/scripts/sid & b18=$!
wait "$b15" || { log "the PostgreSQL 15 test image could not be built (above)"; exit 1; }
wait "$b17" || log "WARNING: no PostgreSQL 17 test image: only tests/test_real_schema.py's 17 cases will fail"
wait "$b18" || log "WARNING: no PostgreSQL 18 test image: only tests/test_real_schema.py's 18 cases will fail"
out=$(DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$BASE" -t "$IMAGE" "$here/stack" 2>&1) || { echo "$out"; exit 1; }
for major in 17 18; do
    docker image inspect "immich-stream-test/debian-postgres:$major" >/dev/null 2>&1 || continue
    out=$(DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=immich-stream-test/debian-postgres:$major" \
        -t "immich-stream-test/postgres:$major-pgvector" "$here/stack" 2>&1) || { echo "$out"; exit 1; }
done
log "machine ready"
