"""auth type = "oauth2_client_credentials": fetch once, cache, single-flight refresh, 401 retry."""

from __future__ import annotations

import asyncio
import base64
from urllib.parse import parse_qsl

import pytest
from aiohttp import web

from tests.support.upstream import FakeUpstream, Seen, dribble, serve


class TokenServer:
    """An OAuth2 token endpoint (RFC 6749 section 4.4) issuing numbered tokens."""

    def __init__(self, expires_in: float = 3600, delay: float = 0.0) -> None:
        self.expires_in = expires_in
        self.delay = delay
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []
        self.issued: list[str] = []
        self.fail_status: int | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth/token"

    async def _token(self, request: web.Request) -> web.Response:
        form = dict(parse_qsl((await request.read()).decode()))
        self.requests.append((form, dict(request.headers)))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_status:
            return web.json_response({"error": "invalid_client"}, status=self.fail_status)
        tok = f"at-{len(self.issued) + 1}-secretish"
        self.issued.append(tok)
        return web.json_response({"access_token": tok, "token_type": "Bearer", "expires_in": self.expires_in})

    async def start(self) -> "TokenServer":
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        self.runner, self.port = await serve(app)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def oauth_policy(up: str, token_url: str, extra: str = "") -> str:
    return f'''route = "/api"
upstream = "{up}"
[auth]
type = "oauth2_client_credentials"
token_url = "{token_url}"
client_id = "my-client"
client_secret = "env:CLIENT_SECRET"
scopes = ["read", "write"]
audience = "https://api.example"
{extra}
'''


async def test_token_fetched_once_and_cached(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("CLIENT_SECRET", "cs-very-secret")
    ts = await TokenServer(delay=0.05).start()
    try:
        sc = await sidecar_factory({"api": oauth_policy(upstream.url, ts.url)})

        async def one() -> int:
            async with client.post(f"{sc.url}/api/x", data=b"payload") as r:
                return r.status

        # 20 concurrent first requests: one token fetch (single flight).
        assert set(await asyncio.gather(*[one() for _ in range(20)])) == {200}
        assert len(ts.requests) == 1
        form, headers = ts.requests[0]
        assert form == {"grant_type": "client_credentials", "scope": "read write",
                        "audience": "https://api.example"}
        assert base64.b64decode(headers["Authorization"][6:]).decode() == "my-client:cs-very-secret"
        assert {s.headers["Authorization"] for s in upstream.seen} == {"Bearer at-1-secretish"}
    finally:
        await ts.stop()


async def test_client_secret_in_body(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("CLIENT_SECRET", "cs-2")
    ts = await TokenServer().start()
    try:
        sc = await sidecar_factory({"api": oauth_policy(upstream.url, ts.url, 'client_auth = "body"')})
        async with client.get(f"{sc.url}/api/x") as r:
            assert r.status == 200
        form, headers = ts.requests[0]
        assert form["client_id"] == "my-client" and form["client_secret"] == "cs-2"
        assert "Authorization" not in headers
    finally:
        await ts.stop()


async def test_refreshed_before_expiry(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("CLIENT_SECRET", "cs")
    ts = await TokenServer(expires_in=1).start()   # refresh window: half the lifetime
    try:
        sc = await sidecar_factory({"api": oauth_policy(upstream.url, ts.url)})
        async with client.get(f"{sc.url}/api/x") as r:
            assert r.status == 200

        async def until_second_token() -> None:
            while len(ts.issued) < 2:
                async with client.get(f"{sc.url}/api/x") as r:
                    assert r.status == 200
                await asyncio.sleep(0.05)

        await asyncio.wait_for(until_second_token(), 5)
        assert not [s for s in upstream.seen if s.headers["Authorization"] not in
                    ("Bearer at-1-secretish", "Bearer at-2-secretish")]

        async def uses_second() -> None:
            while True:
                async with client.get(f"{sc.url}/api/x") as r:
                    assert r.status == 200
                if upstream.seen[-1].headers["Authorization"] == "Bearer at-2-secretish":
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(uses_second(), 5)
    finally:
        await ts.stop()


async def test_401_refreshes_once_and_retries(sidecar_factory, client, monkeypatch):
    """The provider revokes the current token: the first 401 triggers one fetch,
    the request is resent with the new token (body included), the client sees 200."""
    monkeypatch.setenv("CLIENT_SECRET", "cs")
    ts = await TokenServer().start()
    valid: set[str] = set()

    async def provider(request: web.Request, seen: Seen) -> web.StreamResponse:
        tok = seen.headers.get("Authorization", "").removeprefix("Bearer ")
        if tok not in valid:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"ok": True, "body": seen.body.decode()})

    up = await FakeUpstream(provider).start()
    try:
        sc = await sidecar_factory({"api": oauth_policy(up.url, ts.url)})
        valid.add("at-1-secretish")
        async with client.post(f"{sc.url}/api/x", data=b"hello") as r:
            assert r.status == 200
        valid.clear()
        valid.add("at-2-secretish")   # rotated on the provider's side

        async def one(i: int) -> tuple[int, dict]:
            async with client.post(f"{sc.url}/api/x", data=f"body-{i}".encode()) as r:
                return r.status, await r.json()

        results = await asyncio.gather(*[one(i) for i in range(10)])
        assert [s for s, _ in results] == [200] * 10
        assert sorted(b["body"] for _, b in results) == sorted(f"body-{i}" for i in range(10))
        assert len(ts.issued) == 2   # one refresh however many requests saw the 401
        lines = await sc.wait_access_lines(10)
        assert any(line.get("decisions", {}).get("auth") == "oauth2_token_refreshed" for line in lines)
        # A provider that refuses the fresh token too: the 401 goes back, no loop.
        valid.clear()
        async with client.get(f"{sc.url}/api/x") as r:
            assert r.status == 401
        assert len(ts.issued) == 3
    finally:
        await up.stop()
        await ts.stop()


async def test_token_endpoint_failure_is_503(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("CLIENT_SECRET", "cs-do-not-leak")
    ts = await TokenServer().start()
    ts.fail_status = 401
    try:
        sc = await sidecar_factory({"api": oauth_policy(upstream.url, ts.url)})
        async with client.get(f"{sc.url}/api/x") as r:
            assert r.status == 503
            assert r.headers["X-Sidecar-Error"] == "oauth2_token_unavailable"
            assert "cs-do-not-leak" not in await r.text()
        assert upstream.seen == []
        ts.fail_status = None
        async with client.get(f"{sc.url}/api/x") as r:
            assert r.status == 200
        metrics = await (await client.get(sc.admin + "/metrics")).text()
        assert 'sidecar_oauth2_token_fetches_total{result="error",route="api"} 1.0' in metrics
        assert 'sidecar_oauth2_token_fetches_total{result="ok",route="api"} 1.0' in metrics
    finally:
        await ts.stop()


async def test_per_tenant_clients(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("CLIENT_SECRET", "cs-default")
    monkeypatch.setenv("ACME_SECRET", "cs-acme")
    ts = await TokenServer().start()
    try:
        sc = await sidecar_factory({"api": oauth_policy(upstream.url, ts.url, '''
[auth.tenants.acme]
client_id = "acme-client"
client_secret = "env:ACME_SECRET"
''')})
        for tenant in ("acme", "other", "acme"):
            async with client.get(f"{sc.url}/api/x", headers={"X-Tenant-ID": tenant}) as r:
                assert r.status == 200
        ids = sorted(base64.b64decode(h["Authorization"][6:]).decode() for _, h in ts.requests)
        assert ids == ["acme-client:cs-acme", "my-client:cs-default"]
        toks = [s.headers["Authorization"] for s in upstream.seen]
        assert toks[0] == toks[2] != toks[1]
    finally:
        await ts.stop()


async def test_token_response_arriving_in_pieces_is_read_whole(sidecar_factory, upstream, client, monkeypatch):
    """A token response streamed in several chunks (chunked encoding, a slow
    link) is read to its end before parsing, not cut at the first chunk."""
    monkeypatch.setenv("CLIENT_SECRET", "cs-3")
    body = b'{"access_token": "at-chunked-' + b"x" * 2000 + b'", "token_type": "Bearer", "expires_in": 3600}'

    idp = await FakeUpstream(dribble(body, piece=500)).start()
    try:
        sc = await sidecar_factory({"api": oauth_policy(upstream.url, f"{idp.url}/oauth/token")})
        async with client.get(f"{sc.url}/api/x") as r:
            assert r.status == 200, await r.text()
        assert upstream.seen[-1].headers["Authorization"] == "Bearer at-chunked-" + "x" * 2000
    finally:
        await idp.stop()


@pytest.mark.parametrize("expires_in", ["nan", "inf", -5, 0])
async def test_unusable_token_lifetime_is_refused(sidecar_factory, upstream, client, monkeypatch, expires_in):
    monkeypatch.setenv("CLIENT_SECRET", "cs-very-secret")
    ts = await TokenServer(expires_in=expires_in).start()  # type: ignore[arg-type]
    try:
        sc = await sidecar_factory({"api": oauth_policy(upstream.url, ts.url)})
        async with client.get(f"{sc.url}/api/x") as r:
            if expires_in == 0:
                # 0 means "not given" in OAuth2 practice: the default hour applies.
                assert r.status == 200
            else:
                assert r.status == 503
                assert r.headers["X-Sidecar-Error"] == "oauth2_token_unavailable"
    finally:
        await ts.stop()
