"""vault: references through hvac against a Vault HTTP API: the fake in tests/support,
and ``vault server -dev`` too when a ``vault`` binary is on PATH."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.sidecar import free_port
from tests.support.upstream import wait_for
from tests.support.vault import FakeVault


class VaultHandle:
    """What a test needs from a Vault: its address, a token, and writes."""

    def __init__(self, address: str, token: str, fake: FakeVault | None) -> None:
        self.address, self.token, self.fake = address, token, fake

    async def write(self, path: str, data: dict[str, str]) -> int:
        if self.fake is not None:
            return self.fake.write(path, data)

        def put() -> int:
            import hvac

            c = hvac.Client(url=self.address, token=self.token)
            return c.secrets.kv.v2.create_or_update_secret(path=path, secret=data)["data"]["version"]

        return await asyncio.to_thread(put)


async def _dev_vault() -> AsyncIterator[VaultHandle]:
    binary = shutil.which("vault")
    if binary is None:
        pytest.skip("no vault binary on PATH: the vault server -dev variant is skipped")
    port, token = free_port(), "root-" + os.urandom(8).hex()
    proc = subprocess.Popen([binary, "server", "-dev", f"-dev-root-token-id={token}",
                             f"-dev-listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{port}"
    try:
        import hvac

        end = time.monotonic() + 20
        while True:
            try:
                if await asyncio.to_thread(lambda: hvac.Client(url=address).sys.is_initialized()):
                    break
            except Exception:
                pass
            if time.monotonic() > end:
                pytest.fail("vault server -dev did not start")
            await asyncio.sleep(0.1)
        yield VaultHandle(address, token, None)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["fake", "dev"])
async def vault(request) -> AsyncIterator[VaultHandle]:
    if request.param == "fake":
        fake = await FakeVault().start()
        try:
            yield VaultHandle(fake.address, fake.root_token, fake)
        finally:
            await fake.stop()
    else:
        async for handle in _dev_vault():
            yield handle


@pytest.fixture
async def fake_vault() -> AsyncIterator[FakeVault]:
    fake = await FakeVault().start()
    yield fake
    await fake.stop()


def vault_config(address: str, extra: str = "", refresh: str = "0.2s", max_stale: str = "1h") -> str:
    return f'''
[secrets.vault]
address = "{address}"
refresh = "{refresh}"
max_stale = "{max_stale}"
startup_wait = "3s"
{extra}
'''


def bearer(up: str, route: str, ref: str) -> str:
    return f'route = "{route}"\nupstream = "{up}"\n[auth]\ntype = "bearer"\nsecret = "{ref}"\n'


async def get_auth(client: Any, url: str, upstream: Any) -> tuple[int, str | None]:
    async with client.get(url) as r:
        await r.read()
        status = r.status
    return status, (upstream.seen[-1].headers.get("Authorization") if status == 200 else None)


async def eventually(client: Any, url: str, upstream: Any, want: tuple[int, str | None],
                     timeout: float = 5.0) -> None:
    """Poll the route until it answers ``want`` (status, injected Authorization)."""
    end = time.monotonic() + timeout
    while (got := await get_auth(client, url, upstream)) != want:
        assert time.monotonic() < end, f"still {got}, wanted {want}"
        await asyncio.sleep(0.05)


# ---- against both the fake and a dev server ---------------------------------

async def test_read_latest_and_pinned_versions(vault, sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("TEST_VAULT_TOKEN", vault.token)
    await vault.write("providers/openai", {"api_key": "sk-v1-aaaa", "org": "org-1"})
    await vault.write("providers/openai", {"api_key": "sk-v2-bbbb", "org": "org-1"})
    sc = await sidecar_factory({
        "latest": bearer(upstream.url, "/latest", "vault:providers/openai#api_key"),
        "pinned": bearer(upstream.url, "/pinned", "vault:providers/openai#api_key@1"),
        "missing": bearer(upstream.url, "/missing", "vault:providers/openai#nope"),
    }, vault_config(vault.address, 'token = "env:TEST_VAULT_TOKEN"'))
    assert await get_auth(client, f"{sc.url}/latest/x", upstream) == (200, "Bearer sk-v2-bbbb")
    assert await get_auth(client, f"{sc.url}/pinned/x", upstream) == (200, "Bearer sk-v1-aaaa")
    status, _ = await get_auth(client, f"{sc.url}/missing/x", upstream)
    assert status == 503
    async with client.get(sc.admin + "/admin/secrets") as r:
        text = await r.text()
        listed = {s["reference"]: s for s in (await r.json())["secrets"]}
    assert listed["vault:providers/openai#api_key"]["version"] == "2"
    assert listed["vault:providers/openai#api_key@1"]["version"] == "1"
    assert listed["vault:providers/openai#api_key@1"]["pinned"] is True
    assert "not in providers/openai" in listed["vault:providers/openai#nope"]["error"]
    for value in ("sk-v1-aaaa", "sk-v2-bbbb", vault.token):
        assert value not in text


async def test_rotation_under_load(vault, sidecar_factory, upstream, client, monkeypatch):
    """A new Vault version while requests run: every request succeeds and, once
    the refresh ran, every request carries the new value."""
    monkeypatch.setenv("TEST_VAULT_TOKEN", vault.token)
    await vault.write("providers/notion", {"token": "secret_old_1111"})
    sc = await sidecar_factory({"notion": bearer(upstream.url, "/notion", "vault:providers/notion#token")},
                               vault_config(vault.address, 'token = "env:TEST_VAULT_TOKEN"'))
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            async with client.get(f"{sc.url}/notion/v1/pages") as r:
                statuses.append(r.status)
                await r.read()

    tasks = [asyncio.create_task(load()) for _ in range(4)]
    await wait_for(lambda: len(statuses) > 20)
    await vault.write("providers/notion", {"token": "secret_new_2222"})
    await wait_for(lambda: upstream.seen[-1].headers["Authorization"] == "Bearer secret_new_2222", timeout=5)
    mark = len(upstream.seen)
    await wait_for(lambda: len(upstream.seen) > mark + 20)
    stop.set()
    await asyncio.gather(*tasks)
    assert set(statuses) == {200}
    values = [s.headers["Authorization"] for s in upstream.seen]
    first_new = values.index("Bearer secret_new_2222")
    assert set(values[:first_new]) == {"Bearer secret_old_1111"}
    assert set(values[first_new:]) == {"Bearer secret_new_2222"}


# ---- fake-only: auth methods, renewal, outage ------------------------------

async def test_approle_login_and_token_renewal(fake_vault, sidecar_factory, upstream, client, monkeypatch):
    role_id, secret_id = fake_vault.add_approle("sidecar", ttl=2)
    monkeypatch.setenv("TEST_SECRET_ID", secret_id)
    fake_vault.write("p/stripe", {"key": "rk_live_abc123"})
    sc = await sidecar_factory({"s": bearer(upstream.url, "/s", "vault:p/stripe#key")}, vault_config(
        fake_vault.address, f'auth = "approle"\nrole_id = "{role_id}"\nsecret_id = "env:TEST_SECRET_ID"'))
    assert await get_auth(client, f"{sc.url}/s/x", upstream) == (200, "Bearer rk_live_abc123")
    # Two renewals take the token past its original 2s TTL: still one login.
    await wait_for(lambda: fake_vault.count("/auth/token/renew-self") >= 2, timeout=6)
    reads = fake_vault.count("/secret/data/p/stripe")
    await wait_for(lambda: fake_vault.count("/secret/data/p/stripe") > reads + 2)
    assert fake_vault.count("/auth/approle/login") == 1
    assert await get_auth(client, f"{sc.url}/s/x", upstream) == (200, "Bearer rk_live_abc123")
    metrics = await (await client.get(sc.admin + "/metrics")).text()
    assert 'sidecar_vault_operations_total{operation="renew",result="ok"}' in metrics
    assert 'sidecar_vault_operations_total{operation="read",result="error"}' not in metrics


async def test_non_renewable_token_logs_in_again(fake_vault, sidecar_factory, upstream, client, monkeypatch):
    role_id, secret_id = fake_vault.add_approle("sidecar", ttl=1, renewable=False)
    monkeypatch.setenv("TEST_SECRET_ID", secret_id)
    fake_vault.write("p/k", {"v": "value-xyz-1"})
    sc = await sidecar_factory({"s": bearer(upstream.url, "/s", "vault:p/k#v")}, vault_config(
        fake_vault.address, f'auth = "approle"\nrole_id = "{role_id}"\nsecret_id = "env:TEST_SECRET_ID"'))
    await wait_for(lambda: fake_vault.count("/auth/approle/login") >= 3, timeout=6)
    assert fake_vault.count("/auth/token/renew-self") == 0
    assert await get_auth(client, f"{sc.url}/s/x", upstream) == (200, "Bearer value-xyz-1")


async def test_revoked_token_triggers_login(fake_vault, sidecar_factory, upstream, client, monkeypatch):
    role_id, secret_id = fake_vault.add_approle("sidecar", ttl=3600)
    monkeypatch.setenv("TEST_SECRET_ID", secret_id)
    fake_vault.write("p/k", {"v": "one-1111"})
    sc = await sidecar_factory({"s": bearer(upstream.url, "/s", "vault:p/k#v")}, vault_config(
        fake_vault.address, f'auth = "approle"\nrole_id = "{role_id}"\nsecret_id = "env:TEST_SECRET_ID"'))
    assert await get_auth(client, f"{sc.url}/s/x", upstream) == (200, "Bearer one-1111")
    fake_vault.tokens = {k: v for k, v in fake_vault.tokens.items() if k == fake_vault.root_token}
    fake_vault.write("p/k", {"v": "two-2222"})
    await eventually(client, f"{sc.url}/s/x", upstream, (200, "Bearer two-2222"))
    assert fake_vault.count("/auth/approle/login") == 2


async def test_kubernetes_login(fake_vault, sidecar_factory, upstream, client, tmp_path):
    jwt = "eyJhbGciOiJSUzI1NiJ9.sa-token-" + os.urandom(6).hex()
    (tmp_path / "sa-token").write_text(jwt + "\n")
    fake_vault.add_k8s_role("sidecar", jwt)
    fake_vault.write("p/k", {"v": "k8s-value-1"})
    sc = await sidecar_factory({"s": bearer(upstream.url, "/s", "vault:p/k#v")}, vault_config(
        fake_vault.address, f'auth = "kubernetes"\nrole = "sidecar"\njwt_path = "{tmp_path}/sa-token"'))
    assert await get_auth(client, f"{sc.url}/s/x", upstream) == (200, "Bearer k8s-value-1")
    assert fake_vault.count("/auth/kubernetes/login") == 1


async def test_outage_serves_stale_then_fails_closed_then_recovers(fake_vault, sidecar_factory, upstream, client,
                                                                   monkeypatch):
    monkeypatch.setenv("TEST_VAULT_TOKEN", fake_vault.root_token)
    fake_vault.write("p/k", {"v": "stale-ok-1"})
    sc = await sidecar_factory({"s": bearer(upstream.url, "/s", "vault:p/k#v")}, vault_config(
        fake_vault.address, 'token = "env:TEST_VAULT_TOKEN"', max_stale="1.5s"))
    assert await get_auth(client, f"{sc.url}/s/x", upstream) == (200, "Bearer stale-ok-1")
    fake_vault.sealed = True
    # The last value keeps serving while Vault is down...
    assert await get_auth(client, f"{sc.url}/s/x", upstream) == (200, "Bearer stale-ok-1")
    # ...until max_stale, then the route fails closed.
    last: list[int] = []

    async def probe() -> None:
        while True:
            status, _ = await get_auth(client, f"{sc.url}/s/x", upstream)
            last.append(status)
            if status == 503:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(probe(), 6)
    async with client.get(f"{sc.url}/s/x") as r:
        assert r.headers["X-Sidecar-Error"] == "secret_unavailable"
    async with client.get(sc.admin + "/admin/secrets") as r:
        body = await r.json()
    [ref] = [s for s in body["secrets"] if s["reference"] == "vault:p/k#v"]
    assert ref["available"] is False and "503" in ref["error"]
    assert "503" in body["vault"]["last_error"]
    metrics = await (await client.get(sc.admin + "/metrics")).text()
    [stale] = [line for line in metrics.splitlines()
               if line.startswith('sidecar_secret_staleness_seconds{reference="vault:p/k#v"')]
    assert float(stale.rsplit(" ", 1)[1]) > 1.5
    assert 'sidecar_secret_available{reference="vault:p/k#v",source="vault"} 0.0' in metrics
    assert 'sidecar_secret_refreshes_total{reference="vault:p/k#v",result="error",source="vault"}' in metrics
    async with client.get(sc.admin + "/ready") as r:
        assert r.status == 200
    # While Vault fails the loop retries at its retry delay (0.2 s here), never spinning.
    n = len(fake_vault.calls)
    await asyncio.sleep(1.0)
    assert len(fake_vault.calls) - n <= 10
    fake_vault.sealed = False
    fake_vault.write("p/k", {"v": "recovered-2"})

    await eventually(client, f"{sc.url}/s/x", upstream, (200, "Bearer recovered-2"))


async def test_starts_with_vault_down_and_recovers(sidecar_factory, upstream, client, monkeypatch):
    fake = FakeVault()
    port = free_port()
    monkeypatch.setenv("TEST_VAULT_TOKEN", fake.root_token)
    sc = await sidecar_factory({
        "s": bearer(upstream.url, "/s", "vault:p/k#v"),
        "plain": f'route = "/plain"\nupstream = "{upstream.url}"\n',
    }, vault_config(f"http://127.0.0.1:{port}", 'token = "env:TEST_VAULT_TOKEN"', refresh="0.4s"))
    assert (await get_auth(client, f"{sc.url}/s/x", upstream))[0] == 503
    assert (await get_auth(client, f"{sc.url}/plain/x", upstream))[0] == 200
    async with client.get(sc.admin + "/ready") as r:
        assert r.status == 200
    async with client.get(sc.admin + "/admin/secrets") as r:
        [ref] = [s for s in (await r.json())["secrets"] if s["source"] == "vault"]
    assert ref["available"] is False and "cannot reach Vault" in ref["error"]
    fake.write("p/k", {"v": "late-value-1"})
    await fake.start(port)
    try:
        await eventually(client, f"{sc.url}/s/x", upstream, (200, "Bearer late-value-1"))
    finally:
        await fake.stop()


async def test_forced_refresh_and_pinned_metadata(fake_vault, sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("TEST_VAULT_TOKEN", fake_vault.root_token)
    fake_vault.write("p/k", {"v": "first-1111"})
    sc = await sidecar_factory({
        "s": bearer(upstream.url, "/s", "vault:p/k#v"),
        "pin": bearer(upstream.url, "/pin", "vault:p/k#v@1"),
    }, vault_config(fake_vault.address, 'token = "env:TEST_VAULT_TOKEN"', refresh="1h", max_stale="2h"))
    fake_vault.write("p/k", {"v": "second-2222"})
    assert await get_auth(client, f"{sc.url}/s/x", upstream) == (200, "Bearer first-1111")
    async with client.post(sc.admin + "/admin/secrets/refresh") as r:
        assert r.status == 200
        assert "second-2222" not in await r.text()
    assert await get_auth(client, f"{sc.url}/s/x", upstream) == (200, "Bearer second-2222")
    # A pinned version is confirmed through KV v2 metadata, not re-read.
    assert fake_vault.count("/secret/metadata/p/k") >= 1
    assert await get_auth(client, f"{sc.url}/pin/x", upstream) == (200, "Bearer first-1111")


async def test_slow_vault_never_stalls_the_data_plane(fake_vault, sidecar_factory, upstream, client, monkeypatch):
    """hvac runs in its own thread: with Vault answering after 1s, other requests
    are served meanwhile (a call on the loop would stall them, and the fake Vault
    running on this same loop could not even answer)."""
    monkeypatch.setenv("TEST_VAULT_TOKEN", fake_vault.root_token)
    monkeypatch.setenv("PLAIN_TOKEN", "plain-token-1")
    fake_vault.write("p/k", {"v": "v-1111"})
    sc = await sidecar_factory({
        "s": bearer(upstream.url, "/s", "vault:p/k#v"),
        "e": bearer(upstream.url, "/e", "env:PLAIN_TOKEN"),
    }, vault_config(fake_vault.address, 'token = "env:TEST_VAULT_TOKEN"', refresh="1h", max_stale="2h"))
    fake_vault.delay = 1.5
    n = len(fake_vault.calls)
    refresh = asyncio.create_task(client.post(sc.admin + "/admin/secrets/refresh"))
    await wait_for(lambda: len(fake_vault.calls) > n)
    for _ in range(10):
        assert (await get_auth(client, f"{sc.url}/e/x", upstream))[0] == 200
        assert (await get_auth(client, f"{sc.url}/s/x", upstream))[0] == 200
    # Twenty requests answered while the Vault call was still in flight.
    assert not refresh.done()
    resp = await refresh
    assert resp.status == 200
    resp.release()
    vault_threads = [t for t in __import__("threading").enumerate() if t.name.startswith("sidecar-vault")]
    assert len(vault_threads) == 1


def test_vault_settings_validation():
    from pydantic import ValidationError

    from plugins.auth.vault import VaultSettings, parse_reference

    for table, error in (({"auth": "approle", "role_id": "r"}, "needs role_id and secret_id"),
                         ({"auth": "kubernetes"}, "needs role"),
                         ({"token": "hvs.literal"}, "must be an env: or file: reference"),
                         ({"refresh": "0s"}, "greater than 0"),
                         ({"address": "vault:8200"}, "http:// or https://"),
                         ({"colour": "x"}, "Extra inputs")):
        with pytest.raises(ValidationError, match=error):
            VaultSettings(**table)
    assert parse_reference("vault:providers/openai#api_key@3") == ("providers/openai", "api_key", 3)
    assert parse_reference("vault:/a/b/#k") == ("a/b", "k", None)
    for bad in ("vault:a", "vault:#k", "vault:a#k@0", "vault:a#k@x", "vault:a#"):
        with pytest.raises(ValueError):
            parse_reference(bad)


async def test_bad_vault_settings_are_config_errors(tmp_path):
    from proxy.cli import check
    from tests.support.sidecar import write_config

    path = write_config(tmp_path, {}, '[secrets.vault]\nrefresh = "soon"\n')
    problems = await asyncio.to_thread(check, str(path))
    assert len(problems) == 1 and f"{path}: secrets.vault.refresh: invalid duration" in problems[0]
    path = write_config(tmp_path, {}, '[secrets.vault]\nauth = "approle"\n')
    problems = await asyncio.to_thread(check, str(path))
    assert len(problems) == 1 and "needs role_id and secret_id" in problems[0]


@pytest.mark.parametrize("extra,why", [
    ('token = "env:SURELY_NOT_SET_VAULT_TOKEN"', "Vault login credential unavailable: secret env:SURELY_NOT_SET_VAULT_TOKEN"),
    ('auth = "kubernetes"\nrole = "r"\njwt_path = "/nonexistent/sa-token"',
     "cannot read the service-account token /nonexistent/sa-token"),
])
async def test_login_problems_are_reported(fake_vault, sidecar_factory, upstream, client, monkeypatch, extra, why):
    monkeypatch.delenv("SURELY_NOT_SET_VAULT_TOKEN", raising=False)
    fake_vault.write("p/k", {"v": "x-1234"})
    sc = await sidecar_factory({"s": bearer(upstream.url, "/s", "vault:p/k#v")}, vault_config(fake_vault.address, extra))
    assert (await get_auth(client, f"{sc.url}/s/x", upstream))[0] == 503
    async with client.get(sc.admin + "/admin/secrets") as r:
        body = await r.json()
    assert body["vault"]["last_error"].startswith(why)
    assert body["vault"]["authenticated"] is False


async def test_optional_reference_omitted_only_when_vault_says_it_does_not_exist(
        fake_vault, sidecar_factory, upstream, client, monkeypatch):
    """`?`: a path or key Vault does not have is omitted (docs/auth.md); Vault
    unreachable from the start is an outage (503), not an absent setting."""
    monkeypatch.setenv("TEST_VAULT_TOKEN", fake_vault.root_token)
    monkeypatch.setenv("T_BEARER", "tok")
    fake_vault.write("providers/openai", {"api_key": "sk-1"})

    def opt(route: str, ref: str) -> str:
        return (f'route = "{route}"\nupstream = "{upstream.url}"\n[auth]\ntype = "bearer"\nsecret = "env:T_BEARER"\n'
                f'[auth.headers]\n"X-Opt" = "{ref}"\n')

    sc = await sidecar_factory({"k": opt("/k", "vault:providers/openai#nope?"),
                                "p": opt("/p", "vault:providers/absent#key?")},
                               vault_config(fake_vault.address, 'token = "env:TEST_VAULT_TOKEN"'))
    for route in ("/k", "/p"):
        async with client.get(f"{sc.url}{route}/x") as r:
            assert r.status == 200, (route, await r.text())
        assert "X-Opt" not in upstream.seen[-1].headers
    down = f"http://127.0.0.1:{free_port()}"
    sc2 = await sidecar_factory({"k": opt("/k", "vault:providers/openai#api_key?")},
                                vault_config(down, 'token = "env:TEST_VAULT_TOKEN"').replace('"3s"', '"1s"'))
    seen = len(upstream.seen)
    async with client.get(f"{sc2.url}/k/x") as r:
        assert r.status == 503 and r.headers["X-Sidecar-Error"] == "secret_unavailable"
    assert len(upstream.seen) == seen
