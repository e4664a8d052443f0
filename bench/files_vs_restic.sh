#!/bin/bash
# The files stage alone (bench/files_stage.py: the parent's scan and the walk as `backup` runs
# them, no Docker, no dump) beside restic backing up the same folder, alternating in one run,
# one `rclone serve s3` on loopback: a first backup each, then ROUNDS no-change rounds.
#
#   bash bench/files_vs_restic.sh [FILES] [ROUNDS]        (FILES: 100000 or 300000, the trees
#                                                          bench/scale.py generates and caches)
#   OLD=/path/to/other/checkout bash bench/files_vs_restic.sh 300000 3
#                                                         (that checkout's files_stage.py and
#                                                          package too, in the same rounds)
# Prints wall s, CPU s (user+system, children waited for included) and the peak RSS of the
# main process (/usr/bin/time) per run, with the load average.
set -eu
N=${1:-300000}; ROUNDS=${2:-3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
L=/var/tmp/immich-stream-scale-$N
[ -d "$L" ] || { echo "$L missing: run bench/scale.py --files $N once"; exit 2; }
D=$(mktemp -d /var/tmp/immich-stream-files-vs-restic-XXXX); mkdir -p "$D/s3/new" "$D/s3/old"
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
"$HERE/.venv/bin/rclone" serve s3 "$D/s3" --addr 127.0.0.1:$PORT --config /dev/null --auth-key bench-key,bench-secret >/dev/null 2>&1 &
RP=$!
trap 'kill $RP; rm -rf "$D"' EXIT
sleep 2
export AWS_ACCESS_KEY_ID=bench-key AWS_SECRET_ACCESS_KEY=bench-secret AWS_DEFAULT_REGION=us-east-1 \
  S3_ENDPOINT_URL=http://127.0.0.1:$PORT S3_PATH_STYLE=true IMMICH_STREAM_STATE_DIR=$D/state HOME=$D \
  RESTIC_REPOSITORY=s3:http://127.0.0.1:$PORT/restic RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$D/restic-cache
run() {  # name command...
  local name=$1; shift; sync
  /usr/bin/time -f "$name wall %e cpu %U+%S rss %MkB load $(cut -d' ' -f1 /proc/loadavg)" "$@" 2>&1 \
    | grep -E "^$name wall|failed [1-9]" || true
}
NEW=(env S3_BUCKET=new "$HERE/.venv/bin/python" "$HERE/bench/files_stage.py" "$L")
OLDCMD=(env S3_BUCKET=old PYTHONPATH="${OLD:-}" "$HERE/.venv/bin/python" "${OLD:-}/bench/files_stage.py" "$L")
${RESTIC:-/usr/bin/restic} init -q
run restic-first ${RESTIC:-/usr/bin/restic} backup -q --host bench "$L"
[ -n "${OLD:-}" ] && run old-first "${OLDCMD[@]}"
run new-first "${NEW[@]}"
for _ in $(seq "$ROUNDS"); do
  run restic-nochange ${RESTIC:-/usr/bin/restic} backup -q --host bench "$L"
  [ -n "${OLD:-}" ] && run old-nochange "${OLDCMD[@]}" --incremental
  run new-nochange "${NEW[@]}" --incremental
done
