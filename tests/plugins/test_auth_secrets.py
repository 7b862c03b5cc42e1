"""Secret references shared by every source: optional references (``env:X?``,
issue 12) and env values read at load and reload, not per request (issue 10)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.secrets import SecretStore, SecretUnavailable
from tests.support.sidecar import write_config


def policy(up: str, auth: str, route: str) -> str:
    return f'route = "{route}"\nupstream = "{up}"\n[auth]\n{auth}\n'


def test_store_optional_reference_is_a_view_of_the_same_secret(monkeypatch):
    monkeypatch.delenv("T_OPT", raising=False)
    store = SecretStore()
    opt = store.ref("env:T_OPT?")
    assert opt.get_optional() is None
    with pytest.raises(SecretUnavailable):
        opt.get()
    assert [r.raw for r in store.refs()] == ["env:T_OPT"]      # listed once, plain form
    assert store.optional_only(store.refs()[0])
    assert store.check() == []                                  # an unset optional reference is no problem
    required = store.ref("env:T_OPT")
    assert required is opt.inner and not store.optional_only(required)
    assert store.check() == ["env:T_OPT: does not resolve now (environment variable T_OPT is not set)"]
    monkeypatch.setenv("T_OPT", "now")
    assert opt.get_optional() is None        # not re-read per call...
    store.reread()                           # ...but at the next (re)load
    assert opt.get_optional() == "now" and required.get() == "now"


async def test_optional_references_are_omitted_when_unset(sidecar_factory, client, upstream, monkeypatch):
    monkeypatch.setenv("T_KEY", "key-1")
    for name in ("T_ORG", "T_Q", "T_PASS"):
        monkeypatch.delenv(name, raising=False)
    sc = await sidecar_factory({
        "h": policy(upstream.url, 'type = "bearer"\nsecret = "env:T_KEY"\n[auth.headers]\n"X-Org" = "env:T_ORG?"', "/h"),
        "q": policy(upstream.url, 'type = "query"\nparam = "key"\nsecret = "env:T_Q?"', "/q"),
        "b": policy(upstream.url, 'type = "basic"\nusername = "u"\npassword = "env:T_PASS?"', "/b"),
        "r": policy(upstream.url, 'type = "bearer"\nsecret = "env:T_ORG"', "/r"),   # the same variable, required
    })
    for path in ("/h/x", "/q/x?a=1", "/b/x"):
        async with client.get(sc.url + path) as r:
            assert r.status == 200, path
    h, q, b = upstream.seen[-3:]
    assert h.headers["Authorization"] == "Bearer key-1" and "X-Org" not in h.headers
    assert q.path_qs == "/x?a=1"
    assert "Authorization" not in b.headers
    async with client.get(sc.url + "/h/x", headers={"X-Org": "client-own"}) as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["X-Org"] == "client-own"   # nothing injected: the client's value passes
    async with client.get(sc.url + "/r/x") as r:                 # required elsewhere: still 503
        assert r.status == 503 and r.headers["X-Sidecar-Error"] == "secret_unavailable"
    async with client.get(sc.admin + "/admin/secrets") as r:
        listed = {s["reference"]: s for s in (await r.json())["secrets"]}
    assert listed["env:T_Q"]["optional"] is True and "optional" not in listed["env:T_ORG"]
    # Set in the environment: seen at the next reload, not per request.
    monkeypatch.setenv("T_ORG", "org-1")
    monkeypatch.setenv("T_Q", "q-1")
    monkeypatch.setenv("T_PASS", "p-1")
    monkeypatch.setenv("T_KEY", "key-2")
    async with client.get(sc.url + "/h/x") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == "Bearer key-1" and "X-Org" not in upstream.seen[-1].headers
    assert await sc.runtime.reload() == []
    for path in ("/h/x", "/q/x?a=1", "/b/x"):
        async with client.get(sc.url + path) as r:
            assert r.status == 200, path
    h, q, b = upstream.seen[-3:]
    assert h.headers["Authorization"] == "Bearer key-2" and h.headers["X-Org"] == "org-1"
    assert q.path_qs == "/x?a=1&key=q-1"
    assert b.headers["Authorization"].startswith("Basic ")


async def test_validate_warns_for_required_not_optional(tmp_path, monkeypatch, capsys):
    from proxy.cli import main

    monkeypatch.delenv("T_UNSET_A", raising=False)
    monkeypatch.delenv("T_UNSET_B", raising=False)
    path = write_config(tmp_path, {
        "p": policy("http://127.0.0.1:1", 'type = "bearer"\nsecret = "env:T_UNSET_A"\n'
                                          '[auth.headers]\n"X-Opt" = "env:T_UNSET_B?"', "/p")})
    assert await asyncio.to_thread(main, ["validate", "--offline", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "env:T_UNSET_A: does not resolve now" in err and "T_UNSET_B" not in err


def test_optional_remote_secret_gone_stale_still_fails_closed():
    import time

    from proxy.secrets import OptionalSecret, RemoteSecret

    ref = RemoteSecret("vault:p#k", max_stale=1.0)
    opt = OptionalSecret("vault:p#k?", ref)
    with pytest.raises(SecretUnavailable):
        opt.get_optional()                       # never read (not yet, or unreachable): an outage
    ref.tried = ref.absent = True                # the service said it does not exist: omitted
    assert opt.get_optional() is None
    ref.value, ref.confirmed, ref.absent = "v", time.monotonic(), False
    assert opt.get_optional() == "v"
    ref.confirmed = time.monotonic() - 2.0       # last successful read older than max_stale
    with pytest.raises(SecretUnavailable):
        opt.get_optional()


@pytest.mark.parametrize("client_kind", ["fast", "aiohttp"])
async def test_an_env_secret_with_a_trailing_newline_is_sent_without_it(sidecar_factory, client, upstream,
                                                                        monkeypatch, client_kind):
    """A Kubernetes Secret made from a file (kubectl create secret --from-file)
    usually ends with a newline; as an env variable the credential must read
    as the key itself (as a file: secret does), not break every request."""
    monkeypatch.setenv("NL_SECRET_KEY", "sk-key-with-newline\n")
    sc = await sidecar_factory({"p": policy(upstream.url, 'type = "bearer"\nsecret = "env:NL_SECRET_KEY"', "/p")},
                               outbound=f'client = "{client_kind}"')
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 200, await r.text()
    assert upstream.seen[-1].headers["Authorization"] == "Bearer sk-key-with-newline"
