"""AWS test parts: moto's server in a subprocess on a free port, and a fake
upstream that recomputes each request's SigV4 signature with botocore from
what arrived on the wire and refuses a mismatch (as AWS does)."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

from aiohttp import web
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.support.sidecar import free_port
from tests.support.upstream import FakeUpstream, Seen


class MotoServer:
    """``python -m moto.server`` on a free port; ``stop()`` makes AWS unreachable.

    ``auth=True`` turns on moto's IAM authentication after the three calls
    ``make_key()`` makes: from then on moto verifies every request's SigV4
    signature against the key it issued (SignatureDoesNotMatch otherwise).
    """

    def __init__(self, auth: bool = False) -> None:
        self.port = free_port()
        self.auth = auth
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "MotoServer":
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3") if self.auth else None
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("moto server exited at start")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("moto server did not listen in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def client(self, service: str, key_id: str = "testing", secret: str = "testing"):  # noqa: ANN201
        import boto3
        from botocore.config import Config

        return boto3.client(service, region_name="us-east-1", endpoint_url=self.url,
                            aws_access_key_id=key_id, aws_secret_access_key=secret,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def make_key(self) -> tuple[str, str]:
        """An IAM user allowed everything, and its access key (the last unauthenticated calls)."""
        import json

        iam = self.client("iam")
        iam.create_user(UserName="sidecar")
        iam.put_user_policy(UserName="sidecar", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="sidecar")["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]


def isolate_aws_env(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    """No shared config, no instance metadata: only what the test sets."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class SigV4Upstream(FakeUpstream):
    """Answers 403 ``SignatureDoesNotMatch`` unless the request's signature,
    recomputed with botocore from the received method, Host, raw path, raw
    query, signed headers and body (its SHA-256 when the payload is signed),
    matches; else echoes. ``keys`` maps access key ids to secret keys."""

    def __init__(self, keys: dict[str, str]) -> None:
        super().__init__(self._verify)
        self.keys = keys
        self.verdicts: list[str] = []

    async def _verify(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        why = self.check(seen)
        self.verdicts.append(why or "ok")
        if why:
            return web.json_response({"error": "SignatureDoesNotMatch", "why": why}, status=403)
        return web.json_response({"ok": True, "path": seen.path_qs, "body_len": len(seen.body),
                                  "payload": seen.headers.get("X-Amz-Content-Sha256")})

    def check(self, seen: Seen) -> str | None:
        auth = seen.headers.get("Authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 "):
            return "no SigV4 Authorization"
        fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 "):].split(","))
        key_id, date, region, service, term = fields["Credential"].split("/")
        secret = self.keys.get(key_id)
        if secret is None or term != "aws4_request":
            return "unknown access key"
        amz_date = seen.headers.get("X-Amz-Date", "")
        if amz_date[:8] != date:
            return "X-Amz-Date does not match the credential scope"
        signed = fields["SignedHeaders"].split(";")
        if "host" not in signed:
            return "host is not signed"
        for name in seen.headers:
            if name.lower().startswith("x-amz-") and name.lower() not in signed:
                return f"{name} is not signed"
        declared = seen.headers.get("X-Amz-Content-Sha256")
        s3 = service.startswith("s3")
        if s3 and declared is None:
            return "S3 request without X-Amz-Content-Sha256"
        if declared not in (None, "UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER") \
                and declared != hashlib.sha256(seen.body).hexdigest():
            return "payload hash does not match the body"
        req = AWSRequest(method=seen.method, url="http://" + seen.headers["Host"] + seen.path_qs)
        for name in signed:
            for value in seen.headers.getall(name, []):
                req.headers[name] = value
        req.context["timestamp"] = amz_date
        token = seen.headers.get("X-Amz-Security-Token")
        cls = S3SigV4Auth if s3 else SigV4Auth
        signer = cls(Credentials(key_id, secret, token), service, region)
        if not s3:
            req.data = seen.body
        canonical = signer.canonical_request(req)
        expected = signer.signature(signer.string_to_sign(req, canonical), req)
        if not hmac.compare_digest(expected, fields["Signature"]):
            return "signature mismatch"
        if urlsplit(req.url).path != seen.path_qs.split("?")[0]:
            return "path changed"
        return None
