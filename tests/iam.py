"""A moto S3 server that enforces IAM, with a bucket and three keys on it: a "backup key" that
cannot delete, a "read key" that cannot write, and a "prune key" that may (README, "Keys that cannot delete";
the policies: docs/providers.md).

moto checks every request against IAM once INITIAL_NO_AUTH_ACTION_COUNT requests have been
made: the first ones (counted by moto, one per API call) create the bucket, the two users,
their policies and their access keys with the root credentials; from then on each request
is judged by its signer's policy. The server runs as a process of its own (the count is read
from its environment at start), one per test session.

    with IamServer() as iam:          # or the `iam_s3` fixture of tests/conftest.py
        env["S3_ENDPOINT_URL"] = iam.endpoint
        env["S3_BUCKET"] = iam.bucket
        env.update(iam.backup_key)    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.helpers import Bucket

ROOT_KEY, ROOT_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

# What `backup --append-only` needs (README): write, read, list, and abort its own failed
# multipart uploads. No s3:DeleteObject.
BACKUP_ACTIONS = ["s3:PutObject", "s3:GetObject", "s3:ListBucket", "s3:AbortMultipartUpload"]
# What prune, unlock and doctor's full check need besides.
PRUNE_ACTIONS = [*BACKUP_ACTIONS, "s3:DeleteObject", "s3:ListBucketMultipartUploads"]
# A key that may read and list but not write (init must refuse the bucket: tests/test_init.py).
READ_ACTIONS = ["s3:GetObject", "s3:ListBucket"]

SETUP_CALLS = 13  # the unauthenticated requests _setup makes (moto counts one per API call)


def policy(bucket: str, actions: list[str]) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": actions,
                    "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                }
            ],
        }
    )


class IamServer:
    """moto_server enforcing IAM, with `bucket`, `backup_key` and `prune_key` (env dicts)."""

    def __init__(self, bucket: str = "iam-backups") -> None:
        from tests.conftest import free_port, wait_port

        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_CALLS)}
        moto = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(self.port)
            self.backup_key, self.prune_key, self.read_key = self._setup()
        except BaseException:
            self.stop()
            raise

    def client(self, service: str, key: dict[str, str] | None = None) -> Any:
        key = key or {"AWS_ACCESS_KEY_ID": ROOT_KEY, "AWS_SECRET_ACCESS_KEY": ROOT_SECRET}
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=key["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def _setup(self) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        s3, iam = self.client("s3"), self.client("iam")
        s3.create_bucket(Bucket=self.bucket)  # 1
        keys = []
        for user, actions in (("backup", BACKUP_ACTIONS), ("prune", PRUNE_ACTIONS), ("read", READ_ACTIONS)):  # 4 each
            iam.create_user(UserName=user)
            arn = iam.create_policy(PolicyName=user, PolicyDocument=policy(self.bucket, actions))["Policy"]["Arn"]
            iam.attach_user_policy(UserName=user, PolicyArn=arn)
            ak = iam.create_access_key(UserName=user)["AccessKey"]
            keys.append({"AWS_ACCESS_KEY_ID": ak["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": ak["SecretAccessKey"]})
        return keys[0], keys[1], keys[2]

    def env(self, base: dict[str, str], key: dict[str, str], prefix: str) -> dict[str, str]:
        """A CLI run's environment: `base` (a test's env) on this server's bucket under
        `prefix`, signed with `key` (backup_key or prune_key)."""
        return {**base, "S3_ENDPOINT_URL": self.endpoint, "S3_BUCKET": self.bucket, "S3_PREFIX": prefix, **key}

    def view(self, prefix: str) -> Bucket:
        """The repository under `prefix` as tests/helpers.Bucket, read with the prune key."""
        k = self.prune_key
        return Bucket(self.endpoint, self.bucket, k["AWS_ACCESS_KEY_ID"], k["AWS_SECRET_ACCESS_KEY"], prefix)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> IamServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
