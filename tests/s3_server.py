"""A real S3 API server for the tests: moto's standalone server (moto[server]) in its own process on 127.0.0.1.

The tests reach it as any user reaches an S3-compatible store: s3:// URIs, credentials from the AWS_* environment and
the endpoint from AWS_ENDPOINT_URL_S3 (what run.s3_endpoint sets), read by pyarrow, boto3 and Ray's workers alike.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "loft-dist-test", "AWS_SECRET_ACCESS_KEY": "loft-dist-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


class S3Server:
    """`auth_after`: moto checks credentials and IAM policies after that many requests (the set-up's), as S3 does."""

    def __init__(self, auth_after: int | None = None):
        self.auth_after = auth_after
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> "S3Server":
        env = dict(os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": str(self.auth_after)} if self.auth_after else {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     env=env)
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on {self.endpoint} "
                                       f"(exit {self.proc.poll()}); is moto[server] installed?")
                time.sleep(0.2)

    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def client(self, service: str = "s3"):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, **{
            "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"})

    def bucket(self, prefix: str = "loft") -> str:
        """A fresh, empty bucket; its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
