"""Issue 13: the provider's own X-Request-ID reaches the client; the sidecar's
id only when the upstream sent none; both in the access log."""

from __future__ import annotations

from aiohttp import web

from tests.support.upstream import FakeUpstream


def policy(url: str, extra: str = "") -> str:
    return f'route = "/p"\nupstream = "{url}"\n{extra}\n'


async def test_upstream_request_id_reaches_the_client_and_the_log(sidecar_factory, client):
    async def with_id(request: web.Request, seen) -> web.Response:
        return web.json_response({"ok": True}, headers={"X-Request-ID": "req_provider_42"})

    up = await FakeUpstream(with_id).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})
        async with client.get(f"{sc.url}/p/v1/models", headers={"X-Request-ID": "svc-1"}) as r:
            assert r.status == 200
            assert r.headers.getall("X-Request-ID") == ["req_provider_42"]
        # The sidecar's id still went to the provider.
        assert up.seen[-1].headers["X-Request-ID"] == "svc-1"
        (line,) = await sc.wait_access_lines(1)
        assert line["request_id"] == "svc-1"
        assert line["upstream_request_id"] == "req_provider_42"
    finally:
        await up.stop()


async def test_sidecar_id_when_upstream_sends_none(sidecar_factory, client, upstream):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 200
        rid = r.headers["X-Request-ID"]
    assert upstream.seen[-1].headers["X-Request-ID"] == rid
    (line,) = await sc.wait_access_lines(1)
    assert line["request_id"] == rid and "upstream_request_id" not in line


async def test_anthropic_request_id_is_logged_and_kept(sidecar_factory, client):
    async def anthropic_like(request: web.Request, seen) -> web.Response:
        return web.json_response({}, headers={"request-id": "req_011CV"})

    up = await FakeUpstream(anthropic_like).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})
        async with client.get(f"{sc.url}/p/v1/messages") as r:
            assert r.headers["request-id"] == "req_011CV"
            rid = r.headers["X-Request-ID"]
        (line,) = await sc.wait_access_lines(1)
        assert line["request_id"] == rid and line["upstream_request_id"] == "req_011CV"
    finally:
        await up.stop()


async def test_sidecar_error_carries_the_sidecar_id(sidecar_factory, client, upstream, monkeypatch):
    monkeypatch.delenv("P_TOKEN_UNSET", raising=False)
    sc = await sidecar_factory({"p": policy(upstream.url, '[auth]\ntype = "bearer"\nsecret = "env:P_TOKEN_UNSET"')})
    async with client.get(f"{sc.url}/p/x", headers={"X-Request-ID": "svc-9"}) as r:
        assert r.status == 503
        assert r.headers["X-Request-ID"] == "svc-9"
        body = await r.json()
    assert body["type"] == "error" and body["error"]["type"] == "secret_unavailable"
    assert body["error"]["request_id"] == "svc-9"
    assert not upstream.seen
