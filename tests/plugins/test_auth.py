"""auth: config validation, injection of every type through real sockets, tenants,
override, unavailable secrets, file rotation under load, admin, validate warnings."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest
from pydantic import ValidationError

from plugins.auth.config import Config
from proxy.cli import main as cli_main
from tests.support.sidecar import write_config
from tests.support.upstream import wait_for


def policy(up: str, auth: str, route: str = "/httpbin") -> str:
    return f'route = "{route}"\nupstream = "{up}"\n{auth}\n'


# ---- config validation (table-driven) ----------------------------------------

@pytest.mark.parametrize("table,error", [
    ({}, "set type"),
    ({"type": "bearer"}, "needs secret"),
    ({"type": "header", "secret": "env:X"}, "needs header"),
    ({"type": "header", "secret": "env:X", "header": "Bad Name"}, "not a valid header name"),
    ({"type": "header", "secret": "env:X", "header": "Content-Length"}, "cannot carry a credential"),
    ({"type": "query", "secret": "env:X"}, "needs param"),
    ({"type": "bearer", "secret": "env:X", "param": "k"}, "param is for type = \"query\""),
    ({"type": "basic", "username": "u"}, "needs password"),
    ({"type": "oauth2_client_credentials", "client_id": "a", "client_secret": "env:S"}, "needs token_url"),
    ({"type": "bearer", "secret": "vault:providers/openai"}, "vault:<path>#<key>"),
    ({"type": "bearer", "tenants": {"acme": {"secret": "env:A"}}}, "needs secret"),
    ({"type": "bearer", "secret": "env:X", "tenants": {"acme": {"password": "env:P"}}},
     "password is not used"),
    ({"type": "bearer", "secret": "env:X", "unknown_tenant": "maybe"}, "unknown_tenant"),
    ({"headers": {"X-A": "1"}, "tenants": {"a": {"secret": "env:A"}}}, "needs a type"),
    ({"type": "bearer", "secret": "env:X", "colour": "red"}, "Extra inputs"),
    ({"type": "bearer", "secret": "env:X", "headers": {"authorization": "env:Y"}}, "cannot set 'authorization'"),
    ({"type": "header", "header": "X-Key", "secret": "env:X", "tenants": {"a": {"headers": {"x-key": "1"}}}},
     "cannot set 'x-key'"),
])
def test_config_rejects(table, error):
    with pytest.raises(ValidationError) as e:
        Config(**table)
    assert error in str(e.value)


@pytest.mark.parametrize("table", [
    {"type": "bearer", "secret": "env:X"},
    {"type": "header", "header": "X-Api-Key", "prefix": "Token ", "secret": "file:/run/key"},
    {"type": "basic", "username": "literal-user", "password": "vault:p#pw@2"},
    {"type": "query", "param": "api_key", "secret": "env:K"},
    {"type": "oauth2_client_credentials", "token_url": "https://id.example/token", "client_id": "cid",
     "client_secret": "env:S", "scopes": ["a", "b"], "audience": "api"},
    {"headers": {"Notion-Version": "2022-06-28"}},
    {"type": "bearer", "unknown_tenant": "reject", "tenants": {"a": {"secret": "env:A"}}},
])
def test_config_accepts(table):
    Config(**table)


@pytest.mark.parametrize("auth,field", [
    ('type = "bearer"\nsecret = "sk-LITERAL-1"', "secret"),
    ('type = "basic"\nusername = "u"\npassword = "sk-LITERAL-1"', "password"),
    ('type = "bearer"\nsecret = "env:X"\n[auth.tenants.a]\nsecret = "sk-LITERAL-1"', "tenants.a.secret"),
    ('type = "oauth2_client_credentials"\ntoken_url = "https://x/t"\nclient_id = "c"\nclient_secret = "sk-LITERAL-1"',
     "client_secret"),
])
def test_literal_credential_is_refused_with_file_and_field(tmp_path, auth, field):
    path = write_config(tmp_path, {"p": policy("http://127.0.0.1:1", "[auth]\n" + auth)})
    from proxy.cli import check

    problems = check(str(path))
    assert problems == [f"{tmp_path / 'policies' / 'p.toml'}: auth.{field}: must be a secret reference "
                        "(env:NAME, file:/path, vault:path#key or aws-sm:id#key), never the credential itself"]


# ---- injection of every type ---------------------------------------------------

async def test_bearer_replaces_service_credential(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("HTTPBIN_TOKEN", "tok-bearer-1")
    sc = await sidecar_factory({"httpbin": policy(upstream.url, '[auth]\ntype = "bearer"\nsecret = "env:HTTPBIN_TOKEN"')})
    async with client.get(f"{sc.url}/httpbin/get", headers={"Authorization": "Bearer service-own"}) as r:
        assert r.status == 200
    h = upstream.seen[-1].raw_headers
    assert [v for k, v in h if k.lower() == b"authorization"] == [b"Bearer tok-bearer-1"]


async def test_header_type_with_prefix_and_extra_headers(sidecar_factory, upstream, client, monkeypatch, tmp_path):
    key = tmp_path / "key"
    key.write_text("k-file-42\n")
    monkeypatch.setenv("OPENAI_ORG", "org-7")
    sc = await sidecar_factory({"p": policy(upstream.url, f'''
        [auth]
        type = "header"
        header = "X-Api-Key"
        prefix = "Key "
        secret = "file:{key}"
        [auth.headers]
        "OpenAI-Organization" = "env:OPENAI_ORG"
        "Notion-Version" = "2022-06-28"
        '''.replace("        ", ""))})
    async with client.get(f"{sc.url}/httpbin/x", headers={"x-api-key": "service", "Notion-Version": "old"}) as r:
        assert r.status == 200
    seen = upstream.seen[-1].headers
    assert seen.getall("X-Api-Key") == ["Key k-file-42"]
    assert seen["OpenAI-Organization"] == "org-7"
    assert seen.getall("Notion-Version") == ["2022-06-28"]
    # Injected secret header names are redacted in logs from now on.
    assert "openai-organization" in sc.runtime.redactor.headers
    assert "notion-version" not in sc.runtime.redactor.headers


async def test_basic(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("U", "user@x")
    monkeypatch.setenv("P", "pa:ss wörd")
    sc = await sidecar_factory({"p": policy(upstream.url, '[auth]\ntype = "basic"\nusername = "env:U"\npassword = "env:P"')})
    async with client.get(f"{sc.url}/httpbin/") as r:
        assert r.status == 200
    auth = upstream.seen[-1].headers["Authorization"]
    assert base64.b64decode(auth.removeprefix("Basic ")).decode() == "user@x:pa:ss wörd"


async def test_query_replaces_service_param_and_is_redacted(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("K", "k&=/ 1")
    sc = await sidecar_factory({"p": policy(upstream.url, '[auth]\ntype = "query"\nparam = "api_key"\nsecret = "env:K"')})
    async with client.get(f"{sc.url}/httpbin/s?q=1&api_key=service&z=2") as r:
        assert r.status == 200
    assert upstream.seen[-1].path_qs == "/s?q=1&z=2&api_key=k%26%3D%2F%201"
    async with client.get(f"{sc.url}/httpbin/s") as r:
        assert r.status == 200
    assert upstream.seen[-1].path_qs == "/s?api_key=k%26%3D%2F%201"


async def test_override_false_keeps_service_credential(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("T", "sidecar-token")
    sc = await sidecar_factory({"p": policy(upstream.url, '[auth]\ntype = "bearer"\nsecret = "env:T"\noverride = false')})
    async with client.get(f"{sc.url}/httpbin/", headers={"Authorization": "Bearer service-own"}) as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == "Bearer service-own"
    async with client.get(f"{sc.url}/httpbin/") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == "Bearer sidecar-token"


TENANTS = '''
[auth]
type = "bearer"
secret = "env:DEFAULT_KEY"
unknown_tenant = "{mode}"
[auth.tenants.acme]
secret = "env:ACME_KEY"
headers = {{ "X-Org" = "acme-org" }}
[auth.tenants.globex]
secret = "env:GLOBEX_KEY"
'''


@pytest.mark.parametrize("mode", ["default", "reject"])
async def test_per_tenant_selection(sidecar_factory, upstream, client, monkeypatch, mode):
    for k, v in {"DEFAULT_KEY": "d-key", "ACME_KEY": "a-key", "GLOBEX_KEY": "g-key"}.items():
        monkeypatch.setenv(k, v)
    sc = await sidecar_factory({"p": policy(upstream.url, TENANTS.format(mode=mode))})
    for tenant, want in (("acme", "a-key"), ("globex", "g-key")):
        async with client.get(f"{sc.url}/httpbin/", headers={"X-Tenant-ID": tenant}) as r:
            assert r.status == 200
        assert upstream.seen[-1].headers["Authorization"] == f"Bearer {want}"
    assert upstream.seen[0].headers["X-Org"] == "acme-org" and "X-Org" not in upstream.seen[1].headers
    n = len(upstream.seen)
    for headers in ({"X-Tenant-ID": "initech"}, {}):
        async with client.get(f"{sc.url}/httpbin/", headers=headers) as r:
            if mode == "default":
                assert r.status == 200
                assert upstream.seen[-1].headers["Authorization"] == "Bearer d-key"
            else:
                assert r.status == 403
                assert r.headers["X-Sidecar-Error"] == "unknown_tenant"
                assert len(upstream.seen) == n
    lines = [line for line in sc.access_lines() if line.get("tenant") == "acme"]
    assert lines and lines[0]["decisions"]["auth_tenant"] == "acme"


async def test_unresolvable_secret_is_503_and_never_forwarded(sidecar_factory, upstream, client, monkeypatch, tmp_path):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    sc = await sidecar_factory({
        "a": policy(upstream.url, '[auth]\ntype = "bearer"\nsecret = "env:NOT_SET_ANYWHERE"', "/a"),
        "b": policy(upstream.url, f'[auth]\ntype = "query"\nparam = "k"\nsecret = "file:{tmp_path}/missing"', "/b"),
        "c": policy(upstream.url, "", "/c"),
    })
    for path in ("/a/x", "/b/x"):
        async with client.get(sc.url + path, headers={"Authorization": "Bearer service"}) as r:
            assert r.status == 503
            assert r.headers["X-Sidecar-Error"] == "secret_unavailable"
            body = await r.json()
            assert body["error"]["code"] == "secret_unavailable"
    assert upstream.seen == []
    async with client.get(sc.url + "/c/x") as r:   # other routes keep serving
        assert r.status == 200
    async with client.get(sc.admin + "/ready") as r:
        assert r.status == 200
    async with client.get(sc.admin + "/admin/secrets") as r:
        listed = {s["reference"]: s for s in (await r.json())["secrets"]}
    assert listed["env:NOT_SET_ANYWHERE"]["available"] is False
    assert "not set" in listed["env:NOT_SET_ANYWHERE"]["error"]
    # env: values are read at load, not per request (issue 10): a variable set
    # afterwards is seen at the next reload, no restart.
    monkeypatch.setenv("NOT_SET_ANYWHERE", "now-set")
    async with client.get(sc.url + "/a/x") as r:
        assert r.status == 503
    assert await sc.runtime.reload() == []
    async with client.get(sc.url + "/a/x") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == "Bearer now-set"
    # Resolution counts reach /metrics within the one-second flush.
    want = ['sidecar_secret_resolutions_total{reference="env:NOT_SET_ANYWHERE",result="unavailable",source="env"} 2.0',
            'sidecar_secret_resolutions_total{reference="env:NOT_SET_ANYWHERE",result="ok",source="env"} 1.0',
            'sidecar_secret_available{reference="env:NOT_SET_ANYWHERE",source="env"} 1.0']
    for _ in range(60):
        metrics = await (await client.get(sc.admin + "/metrics")).text()
        if all(w in metrics for w in want):
            break
        await asyncio.sleep(0.05)
    assert all(w in metrics for w in want), metrics


async def test_file_rotation_under_load(sidecar_factory, upstream, client, tmp_path):
    """Kubernetes-style rotation (atomic rename) while requests run: none fails,
    and requests after the change carry the new value."""
    key = tmp_path / "token"
    key.write_text("old-value-1")
    sc = await sidecar_factory({"p": policy(upstream.url, f'[auth]\ntype = "bearer"\nsecret = "file:{key}"')})
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            async with client.get(f"{sc.url}/httpbin/") as r:
                statuses.append(r.status)
                await r.read()

    tasks = [asyncio.create_task(load()) for _ in range(4)]
    await wait_for(lambda: len(statuses) > 20)
    tmp = tmp_path / "token.new"
    tmp.write_text("new-value-2\n")
    os.replace(tmp, key)
    await wait_for(lambda: upstream.seen[-1].headers["Authorization"] == "Bearer new-value-2", timeout=5)
    mark = len(upstream.seen)
    await wait_for(lambda: len(upstream.seen) > mark + 20)
    stop.set()
    await asyncio.gather(*tasks)
    assert statuses and set(statuses) == {200}
    values = [s.headers["Authorization"] for s in upstream.seen]
    assert set(values) == {"Bearer old-value-1", "Bearer new-value-2"}
    assert set(values[mark:]) == {"Bearer new-value-2"}
    # Once switched, never back to the old value.
    first_new = values.index("Bearer new-value-2")
    assert set(values[first_new:]) == {"Bearer new-value-2"}


async def test_admin_refresh_rereads_file_at_once(sidecar_factory, upstream, client, tmp_path):
    key = tmp_path / "k"
    key.write_text("v1-abcdef")
    sc = await sidecar_factory({"p": policy(upstream.url, f'[auth]\ntype = "bearer"\nsecret = "file:{key}"')})
    async with client.get(f"{sc.url}/httpbin/") as r:
        assert r.status == 200
    key.write_text("v2-abcdefgh")
    async with client.post(sc.admin + "/admin/secrets/refresh") as r:
        assert r.status == 200
        body = await r.text()
    assert "v2-abcdefgh" not in body and "v1-abcdef" not in body
    async with client.get(f"{sc.url}/httpbin/") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == "Bearer v2-abcdefgh"


async def test_reload_switches_credentials(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("ONE", "first-key")
    monkeypatch.setenv("TWO", "second-key")
    sc = await sidecar_factory({"p": policy(upstream.url, '[auth]\ntype = "bearer"\nsecret = "env:ONE"')})
    sc.write_policy("p", policy(upstream.url, '[auth]\ntype = "bearer"\nsecret = "env:TWO"'))
    assert await sc.runtime.reload() == []
    async with client.get(f"{sc.url}/httpbin/") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == "Bearer second-key"


def test_validate_warns_but_passes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MISSING_TOKEN_FOR_VALIDATE", raising=False)
    path = write_config(tmp_path, {
        "a": policy("http://127.0.0.1:1", '[auth]\ntype = "bearer"\nsecret = "env:MISSING_TOKEN_FOR_VALIDATE"', "/a"),
        "b": policy("http://127.0.0.1:1", f'[auth]\ntype = "bearer"\nsecret = "file:{tmp_path}/nope"', "/b"),
        "c": policy("http://127.0.0.1:1", '[auth]\ntype = "bearer"\nsecret = "vault:p#k"', "/c"),
    })
    assert cli_main(["validate", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: env:MISSING_TOKEN_FOR_VALIDATE: does not resolve now" in err
    assert f"warning: file:{tmp_path}/nope: does not resolve now" in err
    assert "vault:" not in err   # validate does not contact Vault


async def test_secrets_hook_registers_a_source(tmp_path):
    """sidecar_secrets_register runs before policies compile: a plugin's source is usable in build()."""
    from proxy.config import load_settings
    from proxy.runtime import Runtime

    path = write_config(tmp_path, {"a": policy("http://127.0.0.1:1", '[auth]\ntype = "bearer"\nsecret = "vault:a/b#c@2"')})
    rt = Runtime(load_settings(path))
    assert rt.secrets.ref("vault:x#y").source == "vault"
    rt.compile(rt.load_policies())
    assert {r.raw for r in rt.secrets.refs()} >= {"vault:a/b#c@2", "vault:x#y"}
    await rt.pools.close()


async def test_example_policy_injects_httpbin_token(sidecar_factory, upstream, client, monkeypatch):
    """The shipped policies/httpbin.toml, pointed at a fake upstream."""
    from tests.support.sidecar import REPO

    text = (REPO / "policies" / "httpbin.toml").read_text()
    text = "\n".join(f'upstream = "{upstream.url}"' if line.startswith("upstream =") else line
                     for line in text.splitlines())
    monkeypatch.setenv("HTTPBIN_TOKEN", "httpbin-token-value")
    sc = await sidecar_factory({"httpbin": text})
    async with client.get(f"{sc.url}/httpbin/anything") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == "Bearer httpbin-token-value"


def test_repo_config_validates_with_a_warning(capsys, monkeypatch):
    from tests.support.sidecar import REPO

    monkeypatch.delenv("HTTPBIN_TOKEN", raising=False)
    assert cli_main(["validate", "--config", str(REPO / "config.toml")]) == 0
    assert "warning: env:HTTPBIN_TOKEN: does not resolve now" in capsys.readouterr().err


async def test_third_party_secret_source_through_the_hook(tmp_path, monkeypatch):
    """A plugin module adds a ``const:`` source with sidecar_secrets_register; the
    auth plugin's build() resolves it like any built-in source."""
    from proxy.config import load_settings
    from proxy.plugins import make_plugin_manager
    from proxy.runtime import Runtime

    (tmp_path / "const_source.py").write_text(
        "from proxy.hookspecs import hookimpl\n"
        "from proxy.secrets import LiteralSecret\n"
        "class Const(LiteralSecret):\n"
        "    source = 'const'\n"
        "    def __init__(self, raw):\n"
        "        super().__init__(raw)\n"
        "        self.value = raw.split(':', 1)[1][::-1]\n"
        "@hookimpl\n"
        "def sidecar_secrets_register(runtime):\n"
        "    runtime.secrets.register('const:', Const)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_config(tmp_path / "sc", {"a": policy("http://127.0.0.1:1", '[auth]\ntype = "bearer"\nsecret = "const:cba"')})
    rt = Runtime(load_settings(path), pm=make_plugin_manager(["const_source"]))
    try:
        rt.compile(rt.load_policies())
        [ref] = [r for r in rt.secrets.refs() if r.source == "const"]
        assert ref.get() == "abc"
    finally:
        await rt.pools.close()


async def test_each_retry_carries_the_current_credential(sidecar_factory, client, tmp_path):
    """auth (500) is inside retry (750): every try is injected afresh, so a try
    after a rotation carries the new value and the service's own is never sent."""
    from aiohttp import web

    from tests.support.upstream import FakeUpstream, Seen

    key = tmp_path / "k"
    key.write_text("before-rotation-1")

    async def flaky(request: web.Request, seen: Seen) -> web.StreamResponse:
        if len(up.seen) == 1:
            # Rotate while the first try is in flight; the next try must carry the new value.
            key.write_text("after-rotation-2")
            sc.runtime.secrets.ref(f"file:{key}")._checked = 0.0   # no 1 s wait for the re-check
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"ok": True})

    up = await FakeUpstream(flaky).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url, f'''
[auth]
type = "bearer"
secret = "file:{key}"

[retry]
attempts = 2
backoff = {{ base = "10ms", max = "10ms" }}
on = [503]
''')})
        async with client.get(f"{sc.url}/httpbin/x", headers={"Authorization": "Bearer service"}) as r:
            assert r.status == 200
        assert [s.headers.getall("Authorization") for s in up.seen] == [
            ["Bearer before-rotation-1"], ["Bearer after-rotation-2"]]
    finally:
        await up.stop()
