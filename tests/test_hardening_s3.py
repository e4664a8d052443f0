"""Issue 22, the S3 group: what every S3 server stores of odd file names (3), a slow uplink
is progress (11), rclone's answer to listing multipart uploads before any (14), and doctor's
probes when doctor is interrupted (24).

Real servers throughout (SeaweedFS, rclone serve s3); the fault proxy only for a throttled
or frozen upload, which no real server can be told to do."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import (
    ImmichStack,
    RcloneServer,
    S3Server,
    bucket_of,
)
from tests.helpers import make_library, run_cli

MIB = 1024 * 1024

# -- 14: rclone answers NoSuchUpload to a listing of multipart uploads before the first -----


def test_prune_works_on_a_restarted_rclone_server(env: dict, stack: ImmichStack, tmp_path: Path) -> None:
    """rclone keeps multipart state in memory: a server started again (a reboot) answers
    NoSuchUpload to the listing until its first multipart upload in that bucket."""
    (tmp_path / "rclone-dir").mkdir()
    server = RcloneServer(tmp_path / "rclone-dir")
    try:
        env = dict(env, S3_ENDPOINT_URL=server.endpoint, S3_BUCKET=S3Server(server.endpoint, "rclone").new_bucket())
        make_library(stack.library, photos=3, odd_names=False)
        assert run_cli("backup", "--stop", "none", env=env).code == 0
        assert run_cli("backup", "--stop", "none", env=env).code == 0
        server.stop()
        server = RcloneServer(server.root)
        env["S3_ENDPOINT_URL"] = server.endpoint
        r = run_cli("prune", "--keep-last", "1", env=env)
        assert r.code == 0, r.err
        assert len(bucket_of(env).snapshots()) == 1
    finally:
        server.stop()
