#!/usr/bin/env bash
# Run immich-stream against the test stack, with no real Immich at hand:
#   bash tests/stack/demo.sh                 # a backup (the main job)
#   bash tests/stack/demo.sh snapshots       # any other command and its flags
# Sets up the machine (as tests/run.sh does), starts a local S3 server (rclone serve s3
# over /var/tmp/immich-stream-demo/s3), brings up docker-compose.test.yml with a small
# generated library, then runs `python -m immich_stream "$@"`.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
demo=${IMMICH_STREAM_DEMO_DIR:-/var/tmp/immich-stream-demo}
port=${IMMICH_STREAM_DEMO_PORT:-9199}
VENV=${IMMICH_STREAM_VENV:-.venv}

bash tests/run.sh --co -q >/dev/null  # machine + virtualenv, no tests run
mkdir -p "$demo/s3/immich-demo" "$demo/immich/library"

if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    setsid "$VENV/bin/rclone" serve s3 "$demo/s3" --addr "127.0.0.1:$port" \
        --auth-key "demo-key,demo-secret" >"$demo/rclone.log" 2>&1 < /dev/null &
    for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
fi

cat > "$demo/immich/.env" <<ENV
UPLOAD_LOCATION=./library
DB_DATA_LOCATION=./postgres
DB_PASSWORD=demo-password
DB_USERNAME=postgres
DB_DATABASE_NAME=immich
IMMICH_TEST_SEED_DIR=$repo/tests/stack/initdb
ENV
cp docker-compose.test.yml "$demo/immich/docker-compose.yml"
if [ -z "$(ls -A "$demo/immich/library")" ]; then
    "$VENV/bin/python" -c "import sys; from pathlib import Path; from tests.helpers import make_library; make_library(Path(sys.argv[1]), photos=200)" "$demo/immich/library"
fi
"$VENV/bin/docker-compose" --project-directory "$demo/immich" -f "$demo/immich/docker-compose.yml" up -d --quiet-pull 2>/dev/null \
    || "$VENV/bin/docker-compose" --project-directory "$demo/immich" -f "$demo/immich/docker-compose.yml" up -d
for _ in $(seq 1 240); do
    docker exec immich_postgres pg_isready -h 127.0.0.1 -U postgres >/dev/null 2>&1 && break
    sleep 0.5
done

export IMMICH_DIR="$demo/immich" S3_ENDPOINT_URL="http://127.0.0.1:$port" S3_BUCKET=immich-demo S3_PATH_STYLE=true
export AWS_ACCESS_KEY_ID=demo-key AWS_SECRET_ACCESS_KEY=demo-secret
[ $# -gt 0 ] || set -- backup
# The demo's repository, made once (plain: the demo keeps no key to lose); later runs keep it.
if [ "$1" != init ] && [ ! -d "$demo/s3/immich-demo/immich-backup" ]; then
    "$VENV/bin/python" -m immich_stream init --plaintext --config "$demo/config.toml" >/dev/null
fi
export IMMICH_STREAM_CONFIG="$demo/config.toml"
exec "$VENV/bin/python" -m immich_stream "$@"
