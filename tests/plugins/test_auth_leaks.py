"""No secret value in any log line, error body, metric or admin response.

One sidecar with every source (env, file, Vault via AppRole, AWS Secrets
Manager on moto) and every type (aws_sigv4 included),
driven through successes and failures (provider 500s, provider down, unknown
tenant, unset secret, Vault sealed, token endpoint refusing, a rejected
reload of a policy holding a literal credential); everything observable is
collected and searched for every secret value and every Vault token issued.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from aiohttp import web

from tests.plugins.test_auth_oauth2 import TokenServer
from tests.support.aws import MotoServer, isolate_aws_env
from tests.support.sidecar import free_port
from tests.support.upstream import FakeUpstream, Seen, echo, wait_for
from tests.support.vault import FakeVault

S = {
    "env": "sk-live-LEAK-env-0001",
    "file": "file-LEAK-0002-value",
    "vault": "vault-LEAK-0003-value",
    "query": "query-LEAK-0004-value",
    "basic": "basic-LEAK-0005-pass",
    "client": "client-LEAK-0006-secret",
    "tenant": "tenant-LEAK-0007-key",
    "org": "org-LEAK-0008-value",
    "awssm": "awssm-LEAK-0009-value",
    "aws_secret": "aws-LEAK-0010-secret-access-key",
    "aws_token": "aws-LEAK-0011-session-token",
}


async def test_no_secret_reaches_logs_errors_metrics_or_admin(sidecar_factory, client, tmp_path, monkeypatch, caplog):
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    moto = await asyncio.to_thread(MotoServer().start)
    # Written by the test's own client before the capture starts (not the sidecar's doing).
    moto.client("secretsmanager").create_secret(Name="leak/x", SecretString='{"key": "%s"}' % S["awssm"])
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("LEAK_ENV", S["env"])
    monkeypatch.setenv("LEAK_QUERY", S["query"])
    monkeypatch.setenv("LEAK_BASIC", S["basic"])
    monkeypatch.setenv("LEAK_CLIENT", S["client"])
    monkeypatch.setenv("LEAK_TENANT", S["tenant"])
    monkeypatch.delenv("LEAK_UNSET", raising=False)
    (tmp_path / "file-secret").write_text(S["file"])
    monkeypatch.setenv("LEAK_AWS_SECRET", S["aws_secret"])
    monkeypatch.setenv("LEAK_AWS_TOKEN", S["aws_token"])
    vault = await FakeVault().start()
    role_id, secret_id = vault.add_approle("sidecar", ttl=1)   # renewals happen during the test
    monkeypatch.setenv("LEAK_SECRET_ID", secret_id)
    vault.write("providers/x", {"key": S["vault"], "org": S["org"]})
    ts = await TokenServer(expires_in=3600).start()
    bad_ts = await TokenServer().start()
    bad_ts.fail_status = 400

    async def provider(request: web.Request, seen: Seen) -> web.StreamResponse:
        if "fail" in seen.path_qs:
            return web.json_response({"error": "provider broke"}, status=500)
        return await echo(request, seen)

    up = await FakeUpstream(provider).start()
    dead = f"http://127.0.0.1:{free_port()}"

    def pol(route: str, auth: str, upstream: str | None = None) -> str:
        return f'route = "/{route}"\nupstream = "{upstream or up.url}"\n[auth]\n{auth}\n'

    policies = {
        "bearer": pol("bearer", 'type = "bearer"\nsecret = "env:LEAK_ENV"'),
        "file": pol("file", f'type = "header"\nheader = "X-Api-Key"\nsecret = "file:{tmp_path}/file-secret"'),
        "vault": pol("vault", 'type = "bearer"\nsecret = "vault:providers/x#key"\n'
                              '[auth.headers]\n"X-Org" = "vault:providers/x#org"'),
        "query": pol("query", 'type = "query"\nparam = "api_key"\nsecret = "env:LEAK_QUERY"'),
        "basic": pol("basic", 'type = "basic"\nusername = "u"\npassword = "env:LEAK_BASIC"'),
        "oauth": pol("oauth", f'type = "oauth2_client_credentials"\ntoken_url = "{ts.url}"\n'
                              'client_id = "c"\nclient_secret = "env:LEAK_CLIENT"'),
        "badtoken": pol("badtoken", f'type = "oauth2_client_credentials"\ntoken_url = "{bad_ts.url}"\n'
                                    'client_id = "c"\nclient_secret = "env:LEAK_CLIENT"'),
        "tenants": pol("tenants", 'type = "bearer"\nunknown_tenant = "reject"\n'
                                  '[auth.tenants.acme]\nsecret = "env:LEAK_TENANT"'),
        "unset": pol("unset", 'type = "bearer"\nsecret = "env:LEAK_UNSET"'),
        "down": pol("down", 'type = "bearer"\nsecret = "env:LEAK_ENV"', dead),
        "awssm": pol("awssm", 'type = "bearer"\nsecret = "aws-sm:leak/x#key"'),
        "awsmissing": pol("awsmissing", 'type = "bearer"\nsecret = "aws-sm:leak/absent"'),
        "sigv4": pol("sigv4", 'type = "aws_sigv4"\nservice = "s3"\nregion = "us-east-1"\n'
                              'access_key_id = "AKIDLEAKTEST"\nsecret_access_key = "env:LEAK_AWS_SECRET"\n'
                              'session_token = "env:LEAK_AWS_TOKEN"'),
        "sigv4down": pol("sigv4down", 'type = "aws_sigv4"\nservice = "s3"\nregion = "us-east-1"\n'
                                      'access_key_id = "AKIDLEAKTEST"\nsecret_access_key = "env:LEAK_AWS_SECRET"\n'
                                      'session_token = "env:LEAK_AWS_TOKEN"', dead),
    }
    config = f'''
[secrets.vault]
address = "{vault.address}"
auth = "approle"
role_id = "{role_id}"
secret_id = "env:LEAK_SECRET_ID"
refresh = "0.2s"
max_stale = "1h"

[secrets.aws]
region = "us-east-1"
endpoint_url = "{moto.url}"
refresh = "0.2s"
'''
    observed: list[str] = []
    try:
        sc = await sidecar_factory(policies, config)

        async def hit(path: str, **kw) -> int:
            async with client.get(sc.url + path, **kw) as r:
                body = await r.text()
                if r.headers.get("X-Sidecar-Error"):
                    observed.append(body)
                    observed.append(str(dict(r.headers)))
                return r.status

        for route in ("bearer", "file", "vault", "query", "basic", "oauth", "awssm", "sigv4"):
            assert await hit(f"/{route}/ok?x=1") == 200, route
            assert await hit(f"/{route}/fail") == 500, route
        assert await hit("/tenants/x", headers={"X-Tenant-ID": "acme"}) == 200
        assert await hit("/tenants/x", headers={"X-Tenant-ID": "nobody"}) == 403
        assert await hit("/unset/x") == 503
        assert await hit("/badtoken/x") == 503
        assert await hit("/down/x") == 502
        assert await hit("/sigv4down/x") == 502
        assert await hit("/awsmissing/x") == 503
        # Vault sealed for a while: refresh failures are logged, values keep serving.
        vault.sealed = True
        n = len(vault.calls)
        await wait_for(lambda: len(vault.calls) > n + 3)
        assert await hit("/vault/ok") == 200
        vault.sealed = False
        # Token renewals and re-logins happen (ttl 1s) while traffic runs.
        await wait_for(lambda: vault.count("/auth/token/renew-self") >= 1, timeout=5)
        assert await hit("/vault/ok") == 200
        # A reload that would put a literal credential in a policy is refused.
        sc.write_policy("bearer", pol("bearer", f'type = "bearer"\nsecret = "{S["env"]}"'))
        for method, path in (("POST", "/admin/reload"), ("GET", "/admin/secrets"),
                             ("POST", "/admin/secrets/refresh"), ("GET", "/admin/routes"),
                             ("GET", "/metrics"), ("GET", "/ready")):
            async with client.request(method, sc.admin + path) as r:
                observed.append(await r.text())
        sc.runtime.accesslog.flush()
        observed.append((sc.dir / "access.log").read_text())
        assert len([s for s in up.seen if s.headers.get("Authorization") == f"Bearer {S['env']}"]) == 2
    finally:
        await up.stop()
        await ts.stop()
        await bad_ts.stop()
        await vault.stop()
        moto.stop()
    sigv4 = [s for s in up.seen if s.headers.get("X-Amz-Security-Token") == S["aws_token"]]
    assert len(sigv4) == 2 and all("Credential=AKIDLEAKTEST/" in s.headers["Authorization"] for s in sigv4)
    assert any(s.headers.get("Authorization") == f"Bearer {S['awssm']}" for s in up.seen)
    fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
    observed += [fmt.format(rec) for rec in caplog.records]
    text = "\n".join(observed)
    assert "secret_unavailable" in text and "oauth2_token_unavailable" in text and "vault" in text
    assert "policy reload rejected" in text   # the refused reload was logged...
    # The SigV4 signing key derived from the secret access key (for today and yesterday's scope).
    import datetime
    import hmac
    from hashlib import sha256

    def signing_key(day: str) -> str:
        k = ("AWS4" + S["aws_secret"]).encode()
        for part in (day, "us-east-1", "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), sha256).digest()
        return k.hex()

    today = datetime.datetime.now(datetime.timezone.utc)
    keys = {f"signing_key_{d}": signing_key(d) for d in
            (today.strftime("%Y%m%d"), (today - datetime.timedelta(days=1)).strftime("%Y%m%d"))}
    secrets = {**S, **keys, "secret_id": secret_id, "access_token": ts.issued[0],
               **{f"vault_token_{i}": t for i, t in enumerate(vault.tokens)}}
    assert len(vault.tokens) >= 2
    for name, value in secrets.items():
        assert value not in text, f"{name} leaked: " + text[max(0, text.find(value) - 300):text.find(value) + 100]
    assert os.environ["LEAK_ENV"] == S["env"]


async def test_no_secret_in_a_real_process_output(tmp_path, client, monkeypatch):
    """`sidecar run` as a subprocess (real logging set-up): stderr, stdout and the
    access log hold no secret, through Vault reads, rotations and failures."""
    import signal

    from tests.support.sidecar import SidecarProcess, write_config

    vault = await FakeVault().start()
    up = await FakeUpstream().start()
    value_1, value_2, env_value = "proc-LEAK-v1-" + os.urandom(4).hex(), "proc-LEAK-v2-" + os.urandom(4).hex(), \
        "proc-LEAK-env-" + os.urandom(4).hex()
    vault.write("p/k", {"v": value_1})
    monkeypatch.setenv("PROC_VAULT_TOKEN", vault.root_token)
    monkeypatch.setenv("PROC_ENV", env_value)
    out_port, admin_port = free_port(), free_port()
    path = write_config(tmp_path, {
        "v": f'route = "/v"\nupstream = "{up.url}"\n[auth]\ntype = "bearer"\nsecret = "vault:p/k#v"\n',
        "e": f'route = "/e"\nupstream = "{up.url}"\n[auth]\ntype = "query"\nparam = "key"\nsecret = "env:PROC_ENV"\n',
        "x": f'route = "/x"\nupstream = "{up.url}"\n[auth]\ntype = "bearer"\nsecret = "env:PROC_UNSET"\n',
    }, f'[secrets.vault]\naddress = "{vault.address}"\ntoken = "env:PROC_VAULT_TOKEN"\nrefresh = "0.2s"\n',
        outbound_port=out_port, admin_port=admin_port)
    monkeypatch.delenv("PROC_UNSET", raising=False)
    proc = SidecarProcess(path, out_port, admin_port)
    await asyncio.to_thread(proc.start)   # the fake Vault answers on this loop meanwhile
    try:
        async with client.get(f"{proc.url}/v/a") as r:
            assert r.status == 200
        vault.write("p/k", {"v": value_2})
        end = time.monotonic() + 5
        while up.seen[-1].headers.get("Authorization") != f"Bearer {value_2}":   # rotation picked up
            assert time.monotonic() < end
            await asyncio.sleep(0.05)
            async with client.get(f"{proc.url}/v/a") as r:
                assert r.status == 200
        async with client.get(f"{proc.url}/e/a?key=mine") as r:
            assert r.status == 200
        async with client.get(f"{proc.url}/x/a") as r:
            assert r.status == 503
        vault.sealed = True
        n = len(vault.calls)
        await wait_for(lambda: len(vault.calls) > n + 2)
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait) == 0
        out, err = await asyncio.to_thread(proc.output)
    finally:
        proc.kill()
        await up.stop()
        await vault.stop()
    assert "vault read failed" in err
    text = out + err + (tmp_path / "access.log").read_text()
    for value in (value_1, value_2, env_value, vault.root_token):
        assert value not in text
    assert up.seen[-1].path_qs.endswith(f"key={env_value}")
