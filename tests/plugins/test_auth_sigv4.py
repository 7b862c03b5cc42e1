"""auth type = "aws_sigv4" (issue 15): config validation, canonical forms, and
requests through a real sidecar to (a) a fake upstream that recomputes every
signature with botocore and refuses a mismatch, (b) moto's S3 driven by boto3."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from plugins.auth.config import Config
from plugins.auth.sigv4 import canonical_path, canonical_query
from tests.support.aws import MotoServer, SigV4Upstream, isolate_aws_env
from tests.support.sidecar import write_config

KEY_ID, SECRET = "AKIDSIDECAR0000TEST", "sidecar/secret+KEY-0123456789abcdefSIGV4"


def policy(up: str, auth: str, route: str = "/aws") -> str:
    return f'route = "{route}"\nupstream = "{up}"\n[limits]\nmax_request_body = "30MB"\n[auth]\n{auth}\n'


S3_AUTH = ('type = "aws_sigv4"\nservice = "s3"\nregion = "us-east-1"\n'
           'access_key_id = "env:T_AWS_KEY_ID"\nsecret_access_key = "env:T_AWS_SECRET"\n'
           'session_token = "env:T_AWS_TOKEN?"\n')


@pytest.fixture
def aws_env(monkeypatch, tmp_path):  # noqa: ANN001, ANN201
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("T_AWS_KEY_ID", KEY_ID)
    monkeypatch.setenv("T_AWS_SECRET", SECRET)
    monkeypatch.delenv("T_AWS_TOKEN", raising=False)


# ---- config ------------------------------------------------------------------

@pytest.mark.parametrize("table,error", [
    ({"type": "aws_sigv4"}, "needs service"),
    ({"type": "aws_sigv4", "service": "execute-api", "payload": "unsigned"}, "S3 only"),
    ({"type": "aws_sigv4", "service": "s3", "access_key_id": "env:A"}, "go together"),
    ({"type": "aws_sigv4", "service": "s3", "session_token": "env:T"}, "session_token needs"),
    ({"type": "aws_sigv4", "service": "s3", "override": False}, "override = false"),
    ({"type": "aws_sigv4", "service": "s3", "secret": "env:X"}, "secret is not used"),
    ({"type": "bearer", "secret": "env:X", "service": "s3"}, "service is for type"),
    ({"type": "aws_sigv4", "service": "s3", "payload": "maybe"}, "payload"),
    ({"type": "aws_sigv4", "service": "s3", "tenants": {"a": {"access_key_id": "env:A"}}}, "tenants.a"),
    ({"type": "bearer", "secret": "env:X", "tenants": {"a": {"access_key_id": "env:A"}}}, "not used by"),
])
def test_config_is_refused_with_reason(table, error):
    with pytest.raises(ValueError) as e:
        Config.model_validate(table)
    assert error in str(e.value)


def test_config_accepts_chain_and_references():
    assert Config.model_validate({"type": "aws_sigv4", "service": "bedrock", "region": "eu-west-1"}).payload is None
    c = Config.model_validate({"type": "aws_sigv4", "service": "s3", "access_key_id": "AKIDLITERALOK",
                               "secret_access_key": "aws-sm:prod/s3#secret", "session_token": "env:T?"})
    assert c.secret_access_key == "aws-sm:prod/s3#secret"


async def test_literal_secret_key_is_refused(tmp_path, aws_env):
    from proxy.cli import check

    path = write_config(tmp_path, {"p": policy("http://127.0.0.1:1", 'type = "aws_sigv4"\nservice = "s3"\n'
                                               'region = "us-east-1"\naccess_key_id = "AKID"\n'
                                               'secret_access_key = "wJalrLITERAL"')})
    problems = await asyncio.to_thread(check, str(path))
    assert len(problems) == 1 and "auth.secret_access_key: must be a secret reference" in problems[0]
    assert "wJalrLITERAL" not in problems[0]


@pytest.mark.parametrize("raw,want", [
    ("/bucket/key", "/bucket/key"),
    ("/b/a b", "/b/a%20b"),
    ("/b/a%20b", "/b/a%20b"),
    ("/b/it's(1)!*", "/b/it%27s%281%29%21%2A"),
    ("/b/a%2Fb/c", "/b/a%2Fb/c"),
    ("/b/%7Etilde~", "/b/~tilde~"),
    ("/b/caf\u00e9", "/b/caf%C3%A9"),
])
def test_canonical_path(raw, want):
    assert canonical_path(raw) == want


@pytest.mark.parametrize("raw,want", [
    ("list-type=2&prefix=a/b", "list-type=2&prefix=a%2Fb"),
    ("uploads", "uploads"),
    ("a=1+2&b=%2b&c=x y", "a=1%202&b=%2B&c=x%20y"),
    ("k=!*'();:@&=$,", "k=%21%2A%27%28%29%3B%3A%40&=%24%2C"),
    ("X-Amz-Signature=abc&X-Amz-Credential=x&keep=1", "keep=1"),
    ("a=1&&b=", "a=1&b="),
])
def test_canonical_query(raw, want):
    assert canonical_query(raw) == want


# ---- through the sidecar to a verifying upstream ---------------------------------

DUMMY = {"Authorization": "AWS4-HMAC-SHA256 Credential=dummy/20200101/us-east-1/s3/aws4_request, "
                          "SignedHeaders=host, Signature=00",
         "X-Amz-Date": "20200101T000000Z", "X-Amz-Security-Token": "client-token",
         "X-Amz-Content-Sha256": "UNSIGNED-PAYLOAD"}


async def test_verifier_refuses_a_bad_signature(client):
    """The fake upstream can fail: a wrong key, a tampered path, a changed body."""
    up = await SigV4Upstream({KEY_ID: SECRET}).start()
    try:
        async with client.put(up.url + "/b/k", data=b"x", headers=DUMMY) as r:
            assert r.status == 403
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        def signed(path: str, body: bytes, secret: str) -> dict[str, str]:
            req = AWSRequest(method="PUT", url=f"{up.url}/b/k", data=body,
                             headers={"Host": f"127.0.0.1:{up.port}"})
            S3SigV4Auth(Credentials(KEY_ID, secret), "s3", "us-east-1").add_auth(req)
            return dict(req.headers.items())

        async with client.put(up.url + "/b/k", data=b"body", headers=signed("/b/k", b"body", SECRET)) as r:
            assert r.status == 200, await r.text()
        async with client.put(up.url + "/b/k", data=b"body", headers=signed("/b/k", b"body", "wrong")) as r:
            assert r.status == 403
        async with client.put(up.url + "/b/other", data=b"body", headers=signed("/b/k", b"body", SECRET)) as r:
            assert r.status == 403
        async with client.put(up.url + "/b/k", data=b"BODY", headers=signed("/b/k", b"body", SECRET)) as r:
            assert r.status == 403
        assert up.verdicts == ["unknown access key", "ok", "signature mismatch", "signature mismatch",
                               "payload hash does not match the body"]
    finally:
        await up.stop()


async def test_s3_unsigned_and_signed_payloads_base_path_and_reserved_query(sidecar_factory, client, aws_env,
                                                                          monkeypatch):
    up = await SigV4Upstream({KEY_ID: SECRET}).start()
    monkeypatch.setenv("T_AWS_TOKEN", "session-token-SIGV4-0001")
    try:
        sc = await sidecar_factory({
            "unsigned": policy(up.url + "/storage/v1", S3_AUTH, "/u"),
            "signed": policy(up.url, S3_AUTH + 'payload = "signed"\n', "/s"),
        })
        body = os.urandom(300_000)
        async with client.put(sc.url + "/u/bucket/dir/it's a key!.bin?x-id=PutObject", data=body,
                              headers={**DUMMY, "Content-Type": "application/octet-stream",
                                       "x-amz-meta-owner": "team a"}) as r:
            assert r.status == 200, await r.text()
            got = await r.json()
        assert got["path"] == "/storage/v1/bucket/dir/it%27s%20a%20key%21.bin?x-id=PutObject"
        assert got["payload"] == "UNSIGNED-PAYLOAD" and got["body_len"] == len(body)
        seen = up.seen[-1]
        assert seen.body == body
        assert seen.headers["X-Amz-Security-Token"] == "session-token-SIGV4-0001"
        assert "Credential=" + KEY_ID in seen.headers["Authorization"]
        assert "x-amz-meta-owner" in seen.headers["Authorization"]
        async with client.put(sc.url + "/s/bucket/k", data=body, headers=DUMMY) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["payload"] == hashlib.sha256(body).hexdigest()
        query = "prefix=a%2Fb c&delimiter=/&marker=x%2By&k=!*'()&list-type=2&uploads"
        async with client.get(sc.url + "/s/bucket?" + query, headers=DUMMY) as r:
            assert r.status == 200, await r.text()
            got = await r.json()
        assert got["path"] == "/bucket?prefix=a%2Fb%20c&delimiter=%2F&marker=x%2By&k=%21%2A%27%28%29&list-type=2&uploads"
        async with client.get(sc.url + "/s/bucket/k", headers=DUMMY) as r:   # empty body, signed
            assert r.status == 200
            assert (await r.json())["payload"] == hashlib.sha256(b"").hexdigest()
        assert up.verdicts == ["ok"] * 4
        # The client's own signing headers never reach the upstream.
        assert all("dummy" not in s.headers["Authorization"] and s.headers["X-Amz-Date"] != "20200101T000000Z"
                   for s in up.seen)
        # Optional session token: unset at the next reload, then omitted (and still signed right).
        monkeypatch.delenv("T_AWS_TOKEN")
        assert await sc.runtime.reload() == []
        async with client.get(sc.url + "/s/bucket/k", headers=DUMMY) as r:
            assert r.status == 200, await r.text()
        assert "X-Amz-Security-Token" not in up.seen[-1].headers
        # aws-chunked with an unsigned trailer (boto3 over TLS): forwarded as framed, marker kept.
        framed = b"5\r\nhello\r\n0\r\nx-amz-checksum-crc32:NhCmhg==\r\n\r\n"
        async with client.put(sc.url + "/s/bucket/k", data=framed, headers={
                "X-Amz-Content-Sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER", "Content-Encoding": "aws-chunked",
                "X-Amz-Decoded-Content-Length": "5", "X-Amz-Trailer": "x-amz-checksum-crc32"}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["payload"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
        assert up.seen[-1].body == framed and up.verdicts[-1] == "ok"
        # A client that signed its body in aws-chunked frames cannot be re-signed: 400, nothing sent.
        n = len(up.seen)
        async with client.put(sc.url + "/u/bucket/k", data=b"0;chunk-signature=00\r\n\r\n",
                              headers={"X-Amz-Content-Sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"}) as r:
            assert r.status == 400
            assert r.headers["X-Sidecar-Error"] == "aws_chunked_signed_unsupported"
        assert len(up.seen) == n
    finally:
        await up.stop()


async def test_non_s3_service_signs_the_body_and_uses_the_credential_chain(sidecar_factory, client, aws_env,
                                                                          monkeypatch):
    """execute-api: signed payload by default; keys from botocore's standard
    chain (AWS_* variables here), not from the policy."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDCHAIN00000000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "chain-secret-SIGV4-0002")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "chain-token-SIGV4-0003")
    up = await SigV4Upstream({"AKIDCHAIN00000000001": "chain-secret-SIGV4-0002"}).start()
    try:
        sc = await sidecar_factory({"api": policy(
            up.url + "/prod", 'type = "aws_sigv4"\nservice = "execute-api"\nregion = "eu-west-1"\n', "/api")})
        async with client.post(sc.url + "/api/items/a b?q=1&q=0&z=%3D", json={"n": 1}, headers=DUMMY) as r:
            assert r.status == 200, await r.text()
            got = await r.json()
        assert got["path"] == "/prod/items/a%20b?q=1&q=0&z=%3D"
        seen = up.seen[-1]
        assert "/eu-west-1/execute-api/aws4_request" in seen.headers["Authorization"]
        assert seen.headers["X-Amz-Security-Token"] == "chain-token-SIGV4-0003"
        assert "X-Amz-Content-Sha256" not in seen.headers   # S3 only
        async with client.get(sc.admin + "/admin/secrets") as r:
            creds = (await r.json())["aws_credentials"]
        assert creds == {"available": True, "method": "env", "error": None}
        assert up.verdicts == ["ok"]
    finally:
        await up.stop()


async def test_no_credentials_in_the_chain_is_503(sidecar_factory, client, aws_env, upstream):
    sc = await sidecar_factory({"api": policy(
        upstream.url, 'type = "aws_sigv4"\nservice = "execute-api"\nregion = "eu-west-1"\n', "/api")})
    async with client.get(sc.url + "/api/x") as r:
        assert r.status == 503
        assert r.headers["X-Sidecar-Error"] == "secret_unavailable"
    assert upstream.seen == []


# ---- boto3 -> sidecar -> moto's S3 ------------------------------------------------

async def test_boto3_s3_through_the_sidecar_to_moto(sidecar_factory, aws_env, monkeypatch):
    """A service with dummy credentials and endpoint_url at the sidecar: the
    sidecar re-signs with its own keys, and moto (IAM auth on) verifies every
    signature; a 20 MB object goes up (streamed, unsigned payload) and comes
    back byte-identical."""
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import ClientError

    moto = MotoServer(auth=True).start()
    try:
        key_id, secret = await asyncio.to_thread(moto.make_key)
        # Authentication is on: the service's dummy keys are refused by moto itself.
        with pytest.raises(ClientError) as e:
            await asyncio.to_thread(moto.client("s3", "dummy", "dummy").list_buckets)
        assert e.value.response["Error"]["Code"] == "InvalidAccessKeyId"
        monkeypatch.setenv("T_AWS_KEY_ID", key_id)
        monkeypatch.setenv("T_AWS_SECRET", secret)
        monkeypatch.setenv("T_AWS_WRONG", secret[::-1])
        await _boto3_scenario(sidecar_factory, moto, boto3, BotoConfig, key_id, secret)
    finally:
        moto.stop()


async def _boto3_scenario(sidecar_factory, moto, boto3, BotoConfig, key_id, secret) -> None:  # noqa: ANN001
    from botocore.exceptions import ClientError

    wrong = S3_AUTH.replace("env:T_AWS_SECRET", "env:T_AWS_WRONG")
    sc = await sidecar_factory({"s3": policy(moto.url, S3_AUTH, "/s3"), "bad": policy(moto.url, wrong, "/bad")})
    bad = boto3.client("s3", region_name="us-east-1", endpoint_url=sc.url + "/bad",
                       aws_access_key_id="dummy", aws_secret_access_key="dummy",
                       config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    with pytest.raises(ClientError) as e:   # moto checks the sidecar's signature: a wrong key fails
        await asyncio.to_thread(bad.list_buckets)
    assert e.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=sc.url + "/s3",
                      aws_access_key_id="dummy", aws_secret_access_key="dummy",
                      config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    data = os.urandom(20 * 1024 * 1024)
    bucket = "sidecar-" + os.urandom(4).hex()

    def scenario() -> tuple[bytes, list[str], list[str]]:
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="big/obj one.bin", Body=data)
        s3.put_object(Bucket=bucket, Key="small.txt", Body=b"hello")
        got = s3.get_object(Bucket=bucket, Key="big/obj one.bin")["Body"].read()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
        names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
        return got, keys, names

    got, keys, names = await asyncio.to_thread(scenario)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest() and len(got) == len(data)
    assert sorted(keys) == ["big/obj one.bin", "small.txt"]
    assert bucket in names
    # Seen by moto directly (a client with the real key): the object is there.
    direct = await asyncio.to_thread(moto.client("s3", key_id, secret).head_object,
                                     Bucket=bucket, Key="big/obj one.bin")
    assert direct["ContentLength"] == len(data)


async def test_shipped_storage_example_validates_and_signs(tmp_path, sidecar_factory, client, aws_env, monkeypatch):
    """policies/storage.toml.example, enabled as storage.toml, pointed at a verifying upstream."""
    from pathlib import Path

    text = (Path(__file__).parents[2] / "policies" / "storage.toml.example").read_text()
    monkeypatch.setenv("STORAGE_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("STORAGE_SECRET_ACCESS_KEY", SECRET)
    up = await SigV4Upstream({KEY_ID: SECRET}).start()
    try:
        sc = await sidecar_factory({"storage": text.replace('"http://127.0.0.1:9000"', f'"{up.url}"')})
        async with client.put(sc.url + "/storage/bucket/key.txt", data=b"x" * 1000, headers=DUMMY) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["payload"] == "UNSIGNED-PAYLOAD"
        assert up.verdicts == ["ok"] and "X-Amz-Security-Token" not in up.seen[-1].headers
    finally:
        await up.stop()


async def test_chain_credentials_rotate_without_restart(tmp_path, sidecar_factory, client, aws_env):
    """Temporary credentials from the chain (a credential_process with an
    Expiration: botocore RefreshableCredentials, as IRSA and instance roles
    give) are renewed in the background and used without a restart."""
    import json
    import sys
    import time

    keys = tmp_path / "current-keys.json"
    script = tmp_path / "creds.py"
    script.write_text(
        "import datetime, json, sys\n"
        f"k = json.load(open({str(keys)!r}))\n"
        "exp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=12)\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': k['id'], 'SecretAccessKey': k['secret'],\n"
        "                  'SessionToken': 'tok-' + k['id'], 'Expiration': exp.isoformat()}))\n")
    (tmp_path / "no-aws-config").write_text(f"[default]\ncredential_process = {sys.executable} {script}\n")
    keys.write_text(json.dumps({"id": "AKIDROTATE000000001", "secret": "first-secret"}))
    up = await SigV4Upstream({"AKIDROTATE000000001": "first-secret", "AKIDROTATE000000002": "second-secret"}).start()
    try:
        sc = await sidecar_factory({"api": policy(
            up.url, 'type = "aws_sigv4"\nservice = "execute-api"\nregion = "us-east-1"\n', "/api")},
            '[secrets.aws]\nrefresh = "0.3s"\n')
        async with client.get(sc.url + "/api/x") as r:
            assert r.status == 200, await r.text()
        assert "Credential=AKIDROTATE000000001/" in up.seen[-1].headers["Authorization"]
        keys.write_text(json.dumps({"id": "AKIDROTATE000000002", "secret": "second-secret"}))
        end = time.monotonic() + 15
        while "Credential=AKIDROTATE000000002/" not in up.seen[-1].headers["Authorization"]:
            assert time.monotonic() < end, "rotated credentials not picked up"
            await asyncio.sleep(0.1)
            async with client.get(sc.url + "/api/x") as r:
                assert r.status == 200, await r.text()
        assert up.seen[-1].headers["X-Amz-Security-Token"] == "tok-AKIDROTATE000000002"
        assert set(up.verdicts) == {"ok"}
        async with client.get(sc.admin + "/admin/secrets") as r:
            assert (await r.json())["aws_credentials"]["method"] == "custom-process"
    finally:
        await up.stop()


async def test_unsigned_payload_streams_the_body(sidecar_factory, client, aws_env):
    """payload = "unsigned": the upstream gets the first bytes of the body
    while the client is still holding back the rest (nothing is buffered), and
    the signature still verifies."""
    from aiohttp import web
    from multidict import CIMultiDict

    from tests.support.upstream import Seen, serve

    first = asyncio.Event()
    verifier = SigV4Upstream({KEY_ID: SECRET})
    verdicts: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        head = await request.content.readexactly(64 * 1024)
        first.set()
        rest = await request.content.read()
        seen = Seen(request.method, request.path_qs, CIMultiDict(request.headers), head + rest)
        verdicts.append(verifier.check(seen))
        return web.json_response({"len": len(seen.body)})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner, port = await serve(app)
    try:
        sc = await sidecar_factory({"s3": policy(f"http://127.0.0.1:{port}", S3_AUTH, "/s3")})

        async def body():
            yield b"a" * (64 * 1024)
            await asyncio.wait_for(first.wait(), 10)   # a buffering proxy would never get here
            yield b"b" * (1024 * 1024)

        async with client.put(sc.url + "/s3/bucket/streamed", data=body(),
                              headers={"Content-Length": str(64 * 1024 + 1024 * 1024)}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["len"] == 64 * 1024 + 1024 * 1024
        assert verdicts == [None]
    finally:
        await runner.cleanup()
