"""The fast server's express path (proxy/fastserver/express.py), through real sockets.

Most of the suite already runs on it (every bodiless request of an all-sync
route on the fast server); these pin what is particular to it: which routes
take it, pipelined answers in order without recursion, a client that leaves
while the upstream is answering, a filter that answers or fails before the
upstream, and the hand-over of a streamed answer to the coroutine path.
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from proxy.fastserver.express import ExpressRequest
from tests.support.upstream import FakeUpstream, wait_for


def policy(url: str, extra: str = "") -> str:
    return f'route = "/p"\nupstream = "{url}"\n{extra}\n'


def route(sc, path: str = "/p/x"):
    return sc.runtime.tables["outbound"].match(path)[0]


def pool_stats(sc) -> dict[str, int]:
    (stats,) = sc.runtime.pools.stats().values()
    return stats


async def test_only_all_sync_routes_on_the_fast_client_take_it(sidecar_factory, upstream):
    sc = await sidecar_factory({
        "p": policy(upstream.url, '[headers.response]\nset = { "X-Seen" = "1" }\n'),
        "r": policy(upstream.url, "[retry]\nattempts = 2\n").replace('"/p"', '"/r"'),
        "c": policy(upstream.url, "[cache]\n").replace('"/p"', '"/c"'),
    })
    assert route(sc).express is not None                   # headers: a sync filter
    assert route(sc, "/r/x").express is not None           # retry: sync, Again when it retries
    assert route(sc, "/c/x").express is None               # cache awaits its store: the coroutine path
    slow = await sidecar_factory({"p": policy(upstream.url)}, outbound='client = "aiohttp"')
    assert route(slow).express is None                     # the aiohttp client has no callbacks


async def test_pipelined_requests_are_answered_in_order_without_recursion(sidecar_factory, upstream):
    """300 requests in one packet: each answer is written as the upstream's
    arrives, and the next request starts from a loop, not a nested call."""
    sc = await sidecar_factory({"p": policy(upstream.url)})
    port = int(sc.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(b"GET /p/n%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(300)))
        await writer.drain()
        paths = []
        for _ in range(300):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = await reader.readexactly(length)
            paths.append(body)
    finally:
        writer.close()
    assert [s.path_qs for s in upstream.seen] == [f"/n{i}" for i in range(300)]
    assert [orjson.loads(p)["path"] for p in paths] == [f"/n{i}" for i in range(300)]


async def test_a_client_leaving_before_the_answer_is_logged_499_and_frees_the_connection(sidecar_factory):
    gate = asyncio.Event()

    async def slow(request, seen):
        await gate.wait()
        return web.Response(text="late")

    up = await FakeUpstream(slow).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})
        gate.set()
        assert (await sc.request("GET", "/p/warm"))[0] == 200  # a pooled connection for the express path
        gate.clear()
        port = int(sc.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /p/gone HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await wait_for(lambda: len(up.seen) == 2)
        conns = [c for c in sc.sidecar._fast[0].conns if isinstance(c.task, ExpressRequest)]
        assert len(conns) == 1                           # it is waiting on the express path
        writer.close()
        lines = await sc.wait_access_lines(2)
        gone = [line for line in lines if line["path"] == "/p/gone"]
        assert gone and gone[0]["status"] == 499 and gone[0]["error"] == "client_closed"
        await wait_for(lambda: pool_stats(sc)["in_use"] == 0)  # the upstream connection was closed
        gate.set()
        assert (await sc.request("GET", "/p/after"))[0] == 200
    finally:
        gate.set()
        await up.stop()


async def test_a_filter_answering_or_failing_before_the_upstream(sidecar_factory, upstream):
    sc = await sidecar_factory({"p": policy(upstream.url, '[rate_limit]\nkey = "client_ip"\n'
                                                          'limits = [{ requests = 1, per = "1m" }]\n')})
    assert route(sc).express is not None
    assert (await sc.request("GET", "/p/1"))[0] == 200
    status, headers, body = await sc.request("GET", "/p/2")
    assert status == 429
    assert headers["X-Sidecar-Error"] == "rate_limited"
    assert orjson.loads(body)["error"]["code"] == "rate_limited"
    assert len(upstream.seen) == 1


async def test_a_streamed_answer_is_handed_to_the_coroutine_path(sidecar_factory):
    async def stream(request, seen):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(b"part%d;" % i)
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    up = await FakeUpstream(stream).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})
        for _ in range(2):                               # the second one on a pooled connection
            status, _, body = await sc.request("GET", "/p/s")
            assert (status, body) == (200, b"part0;part1;part2;part3;part4;")
        lines = await sc.wait_access_lines(2)
        assert [line["status"] for line in lines] == [200, 200]
        assert all(line["upstream_ms"] is not None for line in lines)
    finally:
        await up.stop()


async def test_pipelined_answers_made_at_once_do_not_recurse(sidecar_factory, upstream):
    """Answers that need no upstream (here 404s) finish inside the call that
    started them: 500 of them in one packet must not nest 500 calls deep."""
    sc = await sidecar_factory({"p": policy(upstream.url)})
    port = int(sc.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" * 500)
        await writer.drain()
        for _ in range(500):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 404 "), head
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            assert b"no_route" in await reader.readexactly(length)
    finally:
        writer.close()


async def _head(port: int, path: str) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET %b HTTP/1.1\r\nHost: x\r\nX-Request-ID: same\r\n\r\n" % path.encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    return [b"Date: -" if line.startswith(b"Date: ") else line for line in head.split(b"\r\n")]


async def test_an_answer_from_the_upstreams_header_bytes_is_the_mappings_byte_for_byte(sidecar_factory):
    """The same route twice, one with a filter that reads ``resp.headers``
    (the mapping path), one without (the answer is written from the upstream's
    header bytes): the same lines in the same order, with the filters' edits
    (rate_limit's response headers set over the upstream's own fields of that
    name; the headers plugin's remove, set and rename on the bytes)."""
    from tests.support.upstream import varied

    up = await FakeUpstream(varied).start()
    try:
        rl = ('[rate_limit]\nkey = "client_ip"\nlimits = [{ requests = 100000000, per = "1s" }]\n[circuit_breaker]\n'
              '[headers.response]\nremove = ["Server"]\nset = { "x-kind" = "set", "X-New" = "n" }\n'
              'rename = { "Set-Cookie" = "X-Was-Cookie" }\n')
        sc = await sidecar_factory(
            {"raw": policy(up.url, rl).replace('"/p"', '"/raw"'),
             "map": policy(up.url, rl + "[peek]\nreport = false\nread_response = true\n").replace('"/p"', '"/map"')},
            sidecar='plugins = ["tests.support.peek"]')
        port = int(sc.url.rsplit(":", 1)[1])
        await _head(port, "/raw/warm")          # an idle pooled connection: the express path from here on
        for path in ("/clash", "/cookies", "/hop", "/json"):
            raw, mapped = await _head(port, "/raw" + path), await _head(port, "/map" + path)
            assert raw == mapped, (path, raw, mapped)
            assert any(line.lower().startswith(b"ratelimit-policy: ") for line in raw)
        clash = await _head(port, "/raw/clash")
        policies = [line for line in clash if line.lower().startswith(b"ratelimit-policy:")]
        assert len(policies) == 1 and b"upstream" not in policies[0]   # set over the upstream's two
        assert clash[1] == b"x-kind: set"                              # set in place, this spelling
        assert not any(line.startswith(b"Server:") for line in clash)
        cookies = await _head(port, "/raw/cookies")
        assert [line for line in cookies if line.startswith(b"X-Was-Cookie")] == [
            b"X-Was-Cookie: a=1; Path=/", b"X-Was-Cookie: b=2; HttpOnly"]
    finally:
        await up.stop()


async def test_a_retry_from_the_express_path(sidecar_factory):
    """retry's after answers Again for a retryable status: the request goes on
    on the coroutine path (the rest of the chain again), and the filters
    outside see only the final answer."""
    calls: list[str] = []

    async def flaky(request, seen):
        calls.append(request.path)
        if len(calls) == 2:                              # the first try on the express path
            return web.Response(status=503, text="busy")
        return web.Response(text="ok")

    up = await FakeUpstream(flaky).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url, '[retry]\nattempts = 3\nbackoff = { base = "1ms", max = "1ms" }\n'
                                                        '[headers.response]\nset = { "X-Outer" = "1" }\n')})
        assert route(sc).express is not None
        assert (await sc.request("GET", "/p/warm"))[0] == 200    # a pooled connection
        status, headers, body = await sc.request("GET", "/p/x")
        assert (status, body) == (200, b"ok")
        assert headers["X-Sidecar-Attempts"] == "2" and headers["X-Outer"] == "1"
        assert calls == ["/warm", "/x", "/x"]
        lines = await sc.wait_access_lines(2)
        assert lines[-1]["status"] == 200 and lines[-1]["attempts"] == 2
    finally:
        await up.stop()
