"""aws-sm: secret references (issue 15) against moto's Secrets Manager, started
on a free port: values injected as bearer tokens and headers, JSON keys,
version stages and pinned versions, rotation picked up by the background
refresh, AWS unreachable -> last value until max_stale -> 503, and
``sidecar validate`` resolving each reference once."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from plugins.auth.aws_sm import extract, parse_reference
from plugins.auth.config import Config
from tests.support.aws import MotoServer, isolate_aws_env
from tests.support.sidecar import write_config


@pytest.fixture(scope="module")
def moto() -> MotoServer:
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):  # noqa: ANN001, ANN201
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def aws_config(url: str, refresh: str = "0.2s", max_stale: str = "1h") -> str:
    return (f'[secrets.aws]\nregion = "us-east-1"\nendpoint_url = "{url}"\n'
            f'refresh = "{refresh}"\nmax_stale = "{max_stale}"\n')


def policy(up: str, auth: str, route: str) -> str:
    return f'route = "{route}"\nupstream = "{up}"\n[auth]\n{auth}\n'


def unique(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


# ---- references ------------------------------------------------------------------

VID = "a1b2c3d4-0000-1111-2222-333344445555"


@pytest.mark.parametrize("raw,want", [
    ("aws-sm:prod/openai", ("prod/openai", None, None)),
    ("aws-sm:prod/openai#OPENAI_API_KEY", ("prod/openai", "OPENAI_API_KEY", None)),
    ("aws-sm:prod/openai#OPENAI_API_KEY@AWSPREVIOUS", ("prod/openai", "OPENAI_API_KEY", ("stage", "AWSPREVIOUS"))),
    ("aws-sm:prod/openai@AWSPENDING", ("prod/openai", None, ("stage", "AWSPENDING"))),
    ("aws-sm:prod/openai#k@AWSCURRENT", ("prod/openai", "k", None)),
    (f"aws-sm:prod/openai#k@{VID}", ("prod/openai", "k", ("version", VID))),
    ("aws-sm:team@example/key", ("team@example/key", None, None)),   # '@' in a secret name
    ("aws-sm:arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/x-AbCdEf#k",
     ("arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/x-AbCdEf", "k", None)),
])
def test_parse_reference(raw, want):
    assert parse_reference(raw) == want


@pytest.mark.parametrize("raw", ["aws-sm:", "aws-sm:#key", "aws-sm:id#", "aws-sm:@AWSPREVIOUS"])
def test_bad_reference_is_refused_at_load(raw):
    with pytest.raises(ValueError) as e:
        Config.model_validate({"type": "bearer", "secret": raw})
    assert "aws-sm:<secret id>" in str(e.value)


def test_extract():
    doc = json.dumps({"s": "v", "n": 42, "f": 1.5, "o": {"x": 1}, "b": True, "e": ""})
    assert extract(doc, "s") == "v" and extract(doc, "n") == "42" and extract(doc, "f") == "1.5"
    assert extract("plain", None) == "plain"
    for key, why in (("o", "not a string"), ("b", "not a string"), ("e", "is not in"), ("zz", "is not in")):
        with pytest.raises(ValueError, match=why):
            extract(doc, key)
    with pytest.raises(ValueError, match="not a JSON object"):
        extract("plain", "k")
    with pytest.raises(ValueError, match="empty"):
        extract("", None)


# ---- through a sidecar -----------------------------------------------------------------

async def _bearer(client, url: str) -> tuple[int, str | None, dict]:  # noqa: ANN001
    async with client.get(url) as r:
        body = await r.json()
        return r.status, (body.get("headers") or {}).get("Authorization"), body


async def test_values_keys_stages_versions_and_rotation(sidecar_factory, client, upstream, aws_env, moto):
    sm = moto.client("secretsmanager")
    name, plain = unique("prod/openai"), unique("plain")
    v1 = sm.create_secret(Name=name, SecretString=json.dumps(
        {"OPENAI_API_KEY": "sk-v1", "ORG": "org-1", "N": 42}))["VersionId"]
    sm.create_secret(Name=plain, SecretString="plain-token-1")
    sm.put_secret_value(SecretId=name, SecretString=json.dumps({"OPENAI_API_KEY": "sk-v2", "ORG": "org-1", "N": 42}))
    sc = await sidecar_factory({
        "cur": policy(upstream.url, f'type = "bearer"\nsecret = "aws-sm:{name}#OPENAI_API_KEY"\n'
                                    f'[auth.headers]\n"X-Org" = "aws-sm:{name}#ORG"\n"X-N" = "aws-sm:{name}#N"\n'
                                    f'"X-Plain" = "aws-sm:{plain}"', "/cur"),
        "prev": policy(upstream.url, f'type = "bearer"\nsecret = "aws-sm:{name}#OPENAI_API_KEY@AWSPREVIOUS"', "/prev"),
        "pin": policy(upstream.url, f'type = "bearer"\nsecret = "aws-sm:{name}#OPENAI_API_KEY@{v1}"', "/pin"),
        "nokey": policy(upstream.url, f'type = "bearer"\nsecret = "aws-sm:{name}#NOPE"', "/nokey"),
        "nosecret": policy(upstream.url, f'type = "bearer"\nsecret = "aws-sm:{unique("absent")}"', "/nosecret"),
    }, aws_config(moto.url))
    status, auth, body = await _bearer(client, sc.url + "/cur/x")
    assert (status, auth) == (200, "Bearer sk-v2")
    assert (body["headers"]["X-Org"], body["headers"]["X-N"], body["headers"]["X-Plain"]) == ("org-1", "42", "plain-token-1")
    assert (await _bearer(client, sc.url + "/prev/x"))[:2] == (200, "Bearer sk-v1")
    assert (await _bearer(client, sc.url + "/pin/x"))[:2] == (200, "Bearer sk-v1")
    for path in ("/nokey/x", "/nosecret/x"):
        async with client.get(sc.url + path) as r:
            assert r.status == 503 and r.headers["X-Sidecar-Error"] == "secret_unavailable"
    # Rotation: a new AWSCURRENT is picked up by the background refresh, no restart.
    v3 = sm.put_secret_value(SecretId=name, SecretString=json.dumps(
        {"OPENAI_API_KEY": "sk-v3", "ORG": "org-3", "N": 42}))["VersionId"]
    end = time.monotonic() + 10
    while (await _bearer(client, sc.url + "/cur/x"))[1] != "Bearer sk-v3":
        assert time.monotonic() < end, "rotation not picked up"
        await asyncio.sleep(0.05)
    assert (await _bearer(client, sc.url + "/prev/x"))[:2] == (200, "Bearer sk-v2")   # same refresh cycle
    assert (await _bearer(client, sc.url + "/pin/x"))[:2] == (200, "Bearer sk-v1")    # pinned: unchanged
    async with client.get(sc.admin + "/admin/secrets") as r:
        text = await r.text()
        listed = {s["reference"]: s for s in json.loads(text)["secrets"]}
    cur = listed[f"aws-sm:{name}#OPENAI_API_KEY"]
    assert cur["source"] == "aws-sm" and cur["available"] is True and cur["version"] == v3
    assert cur["stale_seconds"] < 5
    assert listed[f"aws-sm:{name}#OPENAI_API_KEY@AWSPREVIOUS"]["pinned"] == "AWSPREVIOUS"
    assert "is not in the secret" in listed[f"aws-sm:{name}#NOPE"]["error"]
    assert "ResourceNotFoundException" in [s for k, s in listed.items() if "absent" in k][0]["error"]
    assert json.loads(text)["aws"]["endpoint_url"] == moto.url
    for value in ("sk-v1", "sk-v2", "sk-v3", "org-1", "plain-token-1"):
        assert value not in text


async def test_aws_unreachable_serves_last_value_until_max_stale(sidecar_factory, client, upstream, aws_env):
    own = MotoServer().start()
    try:
        sm = own.client("secretsmanager")
        sm.create_secret(Name="svc/key", SecretString="kept-while-down")
        sc = await sidecar_factory({"p": policy(upstream.url, 'type = "bearer"\nsecret = "aws-sm:svc/key"', "/p")},
                                   aws_config(own.url, refresh="0.2s", max_stale="2s"))
        assert (await _bearer(client, sc.url + "/p/x"))[:2] == (200, "Bearer kept-while-down")
        stopped = time.monotonic()
    finally:
        own.stop()
    # The last value keeps serving while AWS is down...
    assert (await _bearer(client, sc.url + "/p/x"))[:2] == (200, "Bearer kept-while-down")
    end = time.monotonic() + 15
    while True:
        async with client.get(sc.admin + "/admin/secrets") as r:
            state = await r.json()
        if state["aws"]["last_error"]:
            break
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    assert "cannot reach AWS Secrets Manager" in state["aws"]["last_error"]
    # ...until max_stale after the last successful read, then 503.
    while True:
        async with client.get(sc.url + "/p/x") as r:
            if r.status == 503:
                assert r.headers["X-Sidecar-Error"] == "secret_unavailable"
                break
            assert r.status == 200
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    # Not before max_stale (2s) after the last successful read, which came at
    # most one refresh interval (0.2s) before the stop, plus a cycle's slack.
    assert time.monotonic() - stopped >= 1.3
    async with client.get(sc.admin + "/admin/secrets") as r:
        ref = (await r.json())["secrets"][0]
    assert ref["available"] is False and ref["stale_seconds"] >= 2


def test_validate_resolves_each_reference_once(tmp_path, moto, aws_env, capsys):
    from proxy.cli import main

    sm = moto.client("secretsmanager")
    name = unique("validate/ok")
    sm.create_secret(Name=name, SecretString=json.dumps({"k": "v"}))
    missing = unique("validate/missing")
    path = write_config(tmp_path, {
        "ok": policy("http://127.0.0.1:1", f'type = "bearer"\nsecret = "aws-sm:{name}#k"', "/ok"),
        "nokey": policy("http://127.0.0.1:1", f'type = "bearer"\nsecret = "aws-sm:{name}#other"', "/nokey"),
        "missing": policy("http://127.0.0.1:1", f'type = "bearer"\nsecret = "aws-sm:{missing}"', "/missing"),
    }, aws_config(moto.url))
    assert main(["validate", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err
    assert any(f"aws-sm:{name}#other" in w and "not in the secret" in w for w in warnings)
    assert any(f"aws-sm:{missing}" in w and "ResourceNotFoundException" in w for w in warnings)
    assert main(["validate", "--offline", "--config", str(path)]) == 0
    assert "warning:" not in capsys.readouterr().err


async def test_optional_reference_fails_closed_while_aws_is_unreachable(sidecar_factory, client, upstream,
                                                                       aws_env, moto, monkeypatch):
    """`?` omits a secret that does not exist; AWS being unreachable is an outage
    (docs/auth.md), so the header is not silently dropped then: 503."""
    from tests.support.sidecar import free_port

    monkeypatch.setenv("T_BEARER", "tok")
    down = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    sc = await sidecar_factory({
        "p": policy(upstream.url, 'type = "bearer"\nsecret = "env:T_BEARER"\n'
                                  '[auth.headers]\n"X-Org" = "aws-sm:svc/org#ORG?"', "/p"),
    }, aws_config(down) + 'startup_wait = "1s"\n')
    async with client.get(sc.url + "/p/x") as r:
        assert r.status == 503, (r.status, await r.text())
        assert r.headers["X-Sidecar-Error"] == "secret_unavailable"
    assert upstream.seen == []
    # A secret AWS says does not exist is omitted, as documented.
    sc2 = await sidecar_factory({
        "p": policy(upstream.url, 'type = "bearer"\nsecret = "env:T_BEARER"\n'
                                  f'[auth.headers]\n"X-Org" = "aws-sm:{unique("absent")}#ORG?"', "/p"),
    }, aws_config(moto.url))
    status, auth, body = await _bearer(client, sc2.url + "/p/x")
    assert (status, auth) == (200, "Bearer tok") and "X-Org" not in body["headers"]


@pytest.mark.parametrize("table", ["aws", "vault"])
def test_max_stale_shorter_than_refresh_is_refused(tmp_path, table):
    """A value is re-read every `refresh` and served until `max_stale` after
    its last read: with max_stale <= refresh every value would go 503 for part
    of each cycle while AWS (or Vault) is healthy."""
    from proxy.cli import check

    path = write_config(tmp_path, {}, f'[secrets.{table}]\nrefresh = "5m"\nmax_stale = "5m"\n')
    problems = check(str(path))
    assert len(problems) == 1 and f"secrets.{table}" in problems[0] and "max_stale" in problems[0], problems
    ok = write_config(tmp_path / "ok", {}, f'[secrets.{table}]\nrefresh = "5m"\nmax_stale = "6m"\n')
    assert check(str(ok)) == []


async def test_webhook_secret_from_aws_sm_is_read_at_start_up(sidecar_factory, client, upstream, aws_env, moto,
                                                              tmp_path):
    """A webhook secret held in Secrets Manager is read with the other
    references at start-up: the first webhook after a start is verified (not
    503 while the reference is read for the first time), and ``sidecar
    validate`` resolves it like any other aws-sm: reference."""
    import hashlib
    import hmac

    from proxy.cli import check
    from tests.support.inbound import inbound_config, inbound_url, webhook_policy

    name = unique("hooks/github")
    moto.client("secretsmanager").create_secret(Name=name, SecretString='{"secret": "gh-hook-secret"}')
    hook = webhook_policy("/webhooks/gh", "github", [f"aws-sm:{name}#secret"], delivery="passthrough")
    sc = await sidecar_factory({"gh": hook}, inbound_config(upstream.url, extra=aws_config(moto.url)))
    body = b'{"zen": "first"}'
    mac = hmac.new(b"gh-hook-secret", body, hashlib.sha256).hexdigest()
    async with client.post(inbound_url(sc) + "/webhooks/gh", data=body, headers={
            "X-Hub-Signature-256": f"sha256={mac}", "X-GitHub-Event": "push", "X-GitHub-Delivery": "d-1"}) as r:
        assert r.status == 200, await r.text()
    assert upstream.seen[-1].body == body
    warnings: list[str] = []
    missing = write_config(tmp_path / "v", {"gh": webhook_policy("/webhooks/gh", "github",
                                                                  [f"aws-sm:{unique('absent')}#secret"])},
                           aws_config(moto.url))
    assert await asyncio.to_thread(check, str(missing), warnings, offline=False) == []
    assert len(warnings) == 1 and "cannot be resolved now" in warnings[0], warnings


async def test_optional_reference_to_a_deleted_secret_is_omitted_once_stale(sidecar_factory, client, upstream,
                                                                            aws_env, moto, monkeypatch):
    """A secret deleted from Secrets Manager: its last value serves until
    max_stale (as for any reference), then an optional reference is omitted
    (AWS said it does not exist), not 503 for ever."""
    monkeypatch.setenv("T_BEARER", "tok")
    sm = moto.client("secretsmanager")
    name = unique("svc/org")
    sm.create_secret(Name=name, SecretString='{"ORG": "org-1"}')
    sc = await sidecar_factory({
        "p": policy(upstream.url, 'type = "bearer"\nsecret = "env:T_BEARER"\n'
                                  f'[auth.headers]\n"X-Org" = "aws-sm:{name}#ORG?"', "/p"),
    }, aws_config(moto.url, refresh="0.2s", max_stale="1s"))
    status, _, body = await _bearer(client, sc.url + "/p/x")
    assert status == 200 and body["headers"]["X-Org"] == "org-1"
    sm.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
    end = time.monotonic() + 10
    while True:
        async with client.get(sc.url + "/p/x") as r:
            assert r.status == 200, (r.status, await r.text())
            if "X-Org" not in (await r.json())["headers"]:
                break
        assert time.monotonic() < end, "the deleted secret was never omitted"
        await asyncio.sleep(0.05)
