"""forward_auth on an inbound route, against a real identity service on a socket."""

from __future__ import annotations

import pytest
from aiohttp import web

from plugins.forward_auth import Config
from tests.support.inbound import inbound_config, inbound_url
from tests.support.upstream import FakeUpstream, dribble


async def identity(request: web.Request, seen) -> web.StreamResponse:
    auth = request.headers.get("Authorization", "")
    if auth == "Bearer good":
        return web.Response(status=200, headers={"X-User-Id": "42", "X-User-Roles": "admin", "X-Other": "no"})
    if auth == "Bearer forbidden":
        return web.json_response({"reason": "forbidden"}, status=403)
    if auth == "Bearer broken":
        return web.Response(status=500)
    return web.Response(status=401, text="who are you", headers={"WWW-Authenticate": 'Bearer realm="x"'})


@pytest.fixture
async def setup(sidecar_factory, upstream):
    idp = await FakeUpstream(identity).start()
    sc = await sidecar_factory({}, inbound_config(upstream.url, extra=f"""
        [inbound.routes."/internal".forward_auth]
        url = "{idp.url}/auth/validate"
        cache_ttl = "30s"
        """))
    yield inbound_url(sc), idp
    await idp.stop()


async def get(client, url, token=None, **headers):
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with client.get(url, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def test_admitted_with_user_headers_and_cached(setup, client, upstream):
    url, idp = setup
    status, _, _ = await get(client, f"{url}/internal/report?q=1", "good", **{"X-User-Id": "forged"})
    assert status == 200
    seen = upstream.seen[0]
    assert seen.path_qs == "/internal/report?q=1"
    assert seen.headers.getall("X-User-Id") == ["42"]
    assert seen.headers["X-User-Roles"] == "admin"
    assert "X-Other" not in seen.headers
    asked = idp.seen[0]
    assert asked.path_qs == "/auth/validate"
    assert asked.headers["Authorization"] == "Bearer good"
    assert asked.headers["X-Forwarded-Uri"] == "/internal/report?q=1"
    assert asked.headers["X-Forwarded-Method"] == "GET"
    assert (await get(client, f"{url}/internal/again", "good"))[0] == 200
    assert len(idp.seen) == 1  # cached positive answer


async def test_401_and_403_are_relayed(setup, client, upstream):
    url, _ = setup
    status, headers, body = await get(client, f"{url}/internal/x", "nobody")
    assert status == 401 and body == b"who are you" and headers["WWW-Authenticate"] == 'Bearer realm="x"'
    status, _, body = await get(client, f"{url}/internal/x", "forbidden")
    assert status == 403 and b"forbidden" in body
    assert upstream.seen == []


async def test_identity_service_down_or_failing_is_503(setup, client, upstream):
    url, idp = setup
    status, headers, _ = await get(client, f"{url}/internal/x", "broken")
    assert status == 503 and headers["X-Sidecar-Error"] == "auth_unavailable"
    assert (await get(client, f"{url}/internal/x", "good"))[0] == 200
    await idp.stop()
    status, headers, _ = await get(client, f"{url}/internal/x", "other")
    assert status == 503 and headers["X-Sidecar-Error"] == "auth_unavailable"
    # A credential admitted before the outage stays admitted for cache_ttl.
    assert (await get(client, f"{url}/internal/x", "good"))[0] == 200
    assert len(upstream.seen) == 2


def test_config_errors():
    with pytest.raises(ValueError):
        Config(url="ftp://x")
    with pytest.raises(ValueError):
        Config(url="http://x", bogus=1)


async def test_denial_body_arriving_in_pieces_is_relayed_whole(sidecar_factory, upstream, client):
    deny = b'{"reason": "' + b"r" * 3000 + b'"}'
    idp = await FakeUpstream(dribble(deny, status=403)).start()
    try:
        sc = await sidecar_factory({}, inbound_config(upstream.url, extra=f"""
            [inbound.routes."/internal".forward_auth]
            url = "{idp.url}/auth/validate"
            """))
        status, headers, body = await get(client, f"{inbound_url(sc)}/internal/x", "someone")
        assert status == 403
        assert body == deny
        assert upstream.seen == []
    finally:
        await idp.stop()


async def test_non_utf8_credential_is_asked_about_not_500(setup, upstream):
    """A credential header with a non-UTF-8 byte goes to the identity service
    like any other (here: unknown, so 401), never a 500 from the cache key."""
    import asyncio

    url, idp = setup
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /internal/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xe9\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 401"), head
    assert upstream.seen == []
