"""Limits (431, 413), timeouts (504), unreachable upstreams (502): JSON errors."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from tests.proxy.test_http_rules import raw_request
from tests.support.sidecar import free_port
from tests.support.upstream import FakeUpstream


def policy(url: str, extra: str = "") -> str:
    return f'route = "/p"\nupstream = "{url}"\n{extra}\n'


def assert_error(status: int, headers, body: dict, code: str, expected: int) -> None:
    assert status == expected
    assert headers["X-Sidecar-Error"] == code
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert "Traceback" not in body["error"]["message"]


async def test_too_many_headers_is_431(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url, "[limits]\nmax_headers = 10\n")})
    headers = {f"X-H{i}": "v" for i in range(12)}
    async with client.get(f"{sc.url}/p/x", headers=headers) as r:
        assert_error(r.status, r.headers, await r.json(), "request_headers_too_large", 431)
    async with client.get(f"{sc.url}/p/x", headers={"X-H": "v"}) as r:
        assert r.status == 200
    assert len(upstream.seen) == 1


async def test_header_size_limit_is_431(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url, '[limits]\nmax_header_size = "1KB"\n')})
    async with client.get(f"{sc.url}/p/x", headers={"X-Big": "a" * 2000}) as r:
        assert_error(r.status, r.headers, await r.json(), "request_headers_too_large", 431)
    assert upstream.seen == []


async def test_header_line_past_the_parser_limit_is_431_json(sidecar_factory, upstream):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    status, head, body = await raw_request(
        sc.url, b"GET /p/x HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 70_000 + b"\r\n\r\n")
    assert status == 431
    assert b"request_headers_too_large" in body
    assert upstream.seen == []


async def test_declared_body_over_limit_is_413_before_upstream(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url, '[limits]\nmax_request_body = "1KB"\n')})
    async with client.post(f"{sc.url}/p/x", data=b"x" * 2048) as r:
        assert_error(r.status, r.headers, await r.json(), "request_body_too_large", 413)
    assert upstream.seen == []


async def test_streamed_body_over_limit_is_413(sidecar_factory, client):
    up = await FakeUpstream(read_body=True).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url, '[limits]\nmax_request_body = "64KB"\n')})

        async def chunks():
            for _ in range(40):
                yield b"y" * 4096
        async with client.post(f"{sc.url}/p/x", data=chunks()) as r:  # chunked: no Content-Length
            assert_error(r.status, r.headers, await r.json(), "request_body_too_large", 413)
        # The upstream never got a complete request.
        assert all(len(s.body) <= 64 * 1024 for s in up.seen)
    finally:
        await up.stop()


async def test_body_within_limit_streams_through(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": policy(upstream.url, '[limits]\nmax_request_body = "1MB"\n')})

    async def chunks():
        for _ in range(100):
            yield b"z" * 1000
    async with client.post(f"{sc.url}/p/x", data=chunks()) as r:
        assert r.status == 200
    assert upstream.seen[-1].body == b"z" * 100_000
    async with client.post(f"{sc.url}/p/x", data=b"q" * 5000) as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Content-Length"] == "5000"
    assert "Transfer-Encoding" not in upstream.seen[-1].headers


async def test_unreachable_upstream_is_502(sidecar_factory, client):
    port = free_port()
    sc = await sidecar_factory({"p": policy(f"http://127.0.0.1:{port}")})
    async with client.get(f"{sc.url}/p/x?token=secret") as r:
        body = await r.json()
        assert_error(r.status, r.headers, body, "upstream_unavailable", 502)
        assert "secret" not in body["error"]["message"]


@pytest.mark.parametrize("timeouts", ['total = "300ms"', 'total = "10s"\nidle = "200ms"'],
                         ids=["total", "idle_before_headers"])
async def test_slow_upstream_is_504(sidecar_factory, client, timeouts):
    async def hang(request, seen):
        await asyncio.sleep(5)
        return web.Response(text="late")
    up = await FakeUpstream(hang).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url, f"[timeouts]\n{timeouts}\n")})
        async with client.get(f"{sc.url}/p/x") as r:
            assert_error(r.status, r.headers, await r.json(), "upstream_timeout", 504)
    finally:
        await up.stop()


async def test_upstream_errors_are_passed_through_untouched(sidecar_factory, client):
    async def err(request, seen):
        return web.json_response({"provider": "error"}, status=503)
    up = await FakeUpstream(err).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})
        async with client.get(f"{sc.url}/p/x") as r:
            assert r.status == 503
            assert "X-Sidecar-Error" not in r.headers
            assert await r.json() == {"provider": "error"}
    finally:
        await up.stop()


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS", "PATCH", "PUT", "POST"])
async def test_methods_are_forwarded(sidecar_factory, upstream, client, method):
    sc = await sidecar_factory({"p": policy(upstream.url)})
    async with client.request(method, f"{sc.url}/p/m") as r:
        assert r.status == 200
        if method == "HEAD":
            assert await r.read() == b""
    assert upstream.seen[-1].method == method


async def test_no_body_responses(sidecar_factory, client):
    async def answer(request, seen):
        return web.Response(status=int(request.query["s"]))
    up = await FakeUpstream(answer).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})
        for status in (204, 304):
            async with client.get(f"{sc.url}/p/x?s={status}") as r:
                assert r.status == status
                assert await r.read() == b""
        # The connection is still usable afterwards (keep-alive framing intact).
        async with client.get(f"{sc.url}/p/x?s=200") as r:
            assert r.status == 200
    finally:
        await up.stop()


def _post_refused_body(port: int, body_bytes: int) -> bytes:
    """A client that sends a refused body on regardless, then reads the answer
    (blocking socket: the whole exchange as the kernel sees it)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /p/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        chunk = b"x" * 65536
        sent = 0
        while sent < body_bytes:          # the sidecar answers 413 after the head
            s.sendall(chunk)
            sent += len(chunk)
        data = b""
        while True:
            piece = s.recv(65536)
            if not piece:
                return data
            data += piece


async def test_a_refused_body_still_being_sent_does_not_cost_the_client_its_413(sidecar_factory, upstream):
    """Lingering close (errors.LINGER): the sidecar answers 413 as soon as the
    head declares too much, then closes. Closing with the client's body bytes
    unread made the kernel send RST, and the client, still sending, got
    ECONNRESET instead of the answer. The sidecar now half-closes and drops
    what still comes, as nginx's lingering_close does."""
    sc = await sidecar_factory({"p": policy(upstream.url, '[limits]\nmax_request_body = "1KB"\n')})
    port = int(sc.url.rsplit(":", 1)[1])
    data = await asyncio.to_thread(_post_refused_body, port, 4 * 1024 * 1024)
    assert data.startswith(b"HTTP/1.1 413 "), data[:80]
    assert b"request_body_too_large" in data
    assert upstream.seen == []
