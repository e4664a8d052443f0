#!/usr/bin/env bash
# One command, on a fresh Debian 12 machine or a warm one: install what the tests need
# (Debian packages, dockerd, the test image, a virtualenv with the package, its test extra:
# rclone, moto, docker-compose, build, and its docs extra: mkdocs for scripts/check), then
# run the whole suite.
#   bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[%(%Y-%m-%d %H:%M:%S)T] tests: %s\n' -1 "$*"; }

bash tests/setup_machine.sh

VENV=${IMMICH_STREAM_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
fi
# aioboto3 pins botocore: keep it in this virtualenv, away from a system boto3.
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    log "installing immich-stream[test,docs] into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test,docs]'
    touch "$stamp"
fi

# Two workers: the tests that use the Docker engine and the test stack all run on one of
# them (tests/conftest.py groups them), the others (S3 servers only) beside them.
# IMMICH_STREAM_TEST_WORKERS=0 runs everything in this process.
workers=${IMMICH_STREAM_TEST_WORKERS:-2}
parallel=()
if [ "$workers" != 0 ]; then
    parallel=(-n "$workers" --dist loadgroup)
fi
log "running the test suite"
# pytest exits 5 when it collected no test: that fails this script like any failure.
exec "$VENV/bin/python" -m pytest "${parallel[@]}" "$@"
