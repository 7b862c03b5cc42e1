"""HTTP rules from shared/specs/http-rules.md, table-driven, through real sockets."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from tests.support.upstream import FakeUpstream


def policy(url: str, extra: str = "") -> str:
    return f'route = "/p"\nupstream = "{url}"\n{extra}\n'


# (request headers sent, headers the upstream must not see, headers it must see)
HOP_CASES = [
    ({"Connection": "close, X-Secret-Hop", "X-Secret-Hop": "1", "X-Keep": "k"}, ["X-Secret-Hop", "Connection"], {"X-Keep": "k"}),
    ({"Keep-Alive": "timeout=5", "X-A": "a"}, ["Keep-Alive"], {"X-A": "a"}),
    ({"Proxy-Connection": "keep-alive"}, ["Proxy-Connection"], {}),
    ({"TE": "trailers"}, ["TE"], {}),
    ({"Upgrade": "websocket"}, ["Upgrade"], {}),
    ({"Proxy-Authorization": "Basic Zm9vOmJhcg=="}, ["Proxy-Authorization"], {}),
    ({"Connection": "x-one,  X-Two ", "X-One": "1", "X-Two": "2", "X-Three": "3"}, ["X-One", "X-Two"], {"X-Three": "3"}),
]


@pytest.mark.parametrize("sent,dropped,kept", HOP_CASES)
async def test_request_hop_by_hop_headers_are_dropped(sidecar_factory, upstream, client, sent, dropped, kept):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    async with client.get(f"{sc.url}/p/x", headers=sent) as r:
        assert r.status == 200
    seen = upstream.seen[-1].headers
    for name in dropped:
        assert name not in seen, name
    for name, value in kept.items():
        assert seen[name] == value


async def test_response_hop_by_hop_headers_are_dropped(sidecar_factory, upstream, client):
    async def responder(request, seen):
        return web.Response(text="ok", headers={"Connection": "X-Internal", "X-Internal": "secret",
                                                "Keep-Alive": "timeout=9", "Proxy-Authenticate": "Basic",
                                                "X-Public": "yes"})
    upstream.responder = responder
    sc = await sidecar_factory({"p": policy(upstream.url)})
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 200
        assert r.headers["X-Public"] == "yes"
        for name in ("X-Internal", "Keep-Alive", "Proxy-Authenticate"):
            assert name not in r.headers


async def test_forwarded_headers_and_host(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    async with client.get(f"{sc.url}/p/x", headers={"X-Forwarded-For": "6.6.6.6",
                                                    "X-Forwarded-Host": "evil.example"}) as r:
        assert r.status == 200
    seen = upstream.seen[-1].headers
    # The peer is not a trusted proxy: its forwarded headers are replaced, not extended.
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == sc.url.removeprefix("http://")
    assert seen["Host"] == f"127.0.0.1:{upstream.port}"


async def test_trusted_proxy_forwarded_headers_are_extended(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url)}, outbound='trusted_proxies = ["127.0.0.0/8"]')
    async with client.get(f"{sc.url}/p/x", headers={
            "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}) as r:
        assert r.status == 200
    seen = upstream.seen[-1].headers
    assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "https"


async def test_request_id_is_kept_or_generated(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    async with client.get(f"{sc.url}/p/x", headers={"X-Request-ID": "abc-123"}) as r:
        assert r.headers["X-Request-ID"] == "abc-123"
    assert upstream.seen[-1].headers["X-Request-ID"] == "abc-123"
    async with client.get(f"{sc.url}/p/x") as r:
        generated = r.headers["X-Request-ID"]
    assert len(generated) == 32
    assert upstream.seen[-1].headers["X-Request-ID"] == generated


async def test_redirects_are_not_followed(sidecar_factory, client):
    other = await FakeUpstream().start()

    async def redirect(request, seen):
        return web.Response(status=302, headers={"Location": f"{other.url}/steal"})
    up = await FakeUpstream(redirect).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})
        async with client.get(f"{sc.url}/p/x", allow_redirects=False,
                              headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 302
            assert r.headers["Location"] == f"{other.url}/steal"
        assert other.seen == []
    finally:
        await up.stop()
        await other.stop()


# An encoded slash or a backslash is a separator to many upstreams once decoded
# (Apache AllowEncodedSlashes, Tomcat, IIS): "..%2f" climbs just as "../" does.
@pytest.mark.parametrize("path", ["/p/../admin", "/p/%2e%2e/admin", "/p/./x", "/p/a/%2E%2E",
                                  "/p/..%2fadmin", "/p/%2e%2e%2Fadmin", "/p/x%2f..%2f..%2fadmin",
                                  "/p/..%5cadmin", "/p/x%5C%2e%2e"])
async def test_dot_segments_are_rejected(sidecar_factory, upstream, path):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    status, _, body = await raw_request(sc.url, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 400
    assert b'"bad_request"' in body
    assert upstream.seen == []


async def raw_request(base: str, data: bytes, timeout: float = 5.0) -> tuple[int, bytes, bytes]:
    """Send raw bytes; return (status, head, body) of the first response."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
        return status, head, body
    finally:
        writer.close()


SMUGGLING = [
    ("cl_and_te", b"POST /p/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("duplicate_conflicting_cl", b"POST /p/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"),
    ("non_numeric_cl", b"POST /p/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4x\r\n\r\nabcd"),
    ("negative_cl", b"POST /p/x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
    ("obs_fold", b"GET /p/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n"),
    ("nul_in_value", b"GET /p/x HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    ("cr_in_value", b"GET /p/x HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n"),
    ("te_not_chunked_last", b"POST /p/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
    ("space_before_colon", b"GET /p/x HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n"),
]


@pytest.mark.parametrize("name,data", SMUGGLING, ids=[c[0] for c in SMUGGLING])
async def test_smuggling_attempts_get_400_and_reach_nobody(sidecar_factory, upstream, name, data):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    status, head, body = await raw_request(sc.url, data)
    assert status == 400, (name, head)
    assert b"X-Sidecar-Error: bad_request" in head
    assert b'"code":"bad_request"' in body
    await asyncio.sleep(0.05)
    assert upstream.seen == []


async def test_expect_100_continue_is_answered_by_the_sidecar(sidecar_factory, upstream):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    host, port = sc.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /p/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert upstream.seen[-1].body == b"hello"
    assert "Expect" not in upstream.seen[-1].headers


async def test_unknown_expectation_is_417(sidecar_factory, upstream):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    status, head, body = await raw_request(sc.url, b"GET /p/x HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n")
    assert status == 417 and b"expectation_failed" in body
    assert upstream.seen == []


async def test_upgrade_that_is_not_relayed_is_refused_clearly(sidecar_factory, upstream):
    # WebSocket is relayed by the fast server (tests/proxy/test_websocket.py); h2c is not.
    sc = await sidecar_factory({"p": policy(upstream.url)})
    status, head, body = await raw_request(sc.url, b"GET /p/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                           b"Upgrade: h2c\r\n\r\n")
    assert status == 501 and b"upgrade_not_supported" in body
    assert upstream.seen == []


async def test_head_answered_by_the_sidecar_has_no_body(sidecar_factory, upstream):
    """RFC 9110 9.3.2: a HEAD response carries no content, errors included;
    otherwise the error body is read as the next response on the connection."""
    sc = await sidecar_factory({"p": policy(upstream.url)})
    host, port = sc.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"HEAD /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /p/x HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 404")
        assert b"X-Sidecar-Error: no_route" in head
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert second.startswith(b"HTTP/1.1 200"), second[:80]
    finally:
        writer.close()
