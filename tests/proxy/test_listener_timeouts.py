"""header_timeout on the aiohttp-served listeners (inbound, admin, outbound with
server = "aiohttp") for every request head of a keep-alive connection, not only
the first (issue 11 item 3); keepalive_timeout for a silent one; a slow body is
not a slow head. Raw sockets throughout: the client decides what bytes arrive when."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiohttp import web

from tests.support.inbound import inbound_config
from tests.support.upstream import FakeUpstream

LISTENERS = ["inbound", "admin", "outbound-aiohttp"]
# Small, so the tests are quick; every bound below leaves seconds of margin.
HEADER_TIMEOUT = 0.5


async def start(sidecar_factory, upstream, listener: str, limits: str):  # noqa: ANN001, ANN201
    """(sidecar, port, path that answers 200, path for a POST) for one listener."""
    config = "\n[limits]\n" + limits
    if listener == "inbound":
        sc = await sidecar_factory({}, inbound_config(upstream.url, extra='[inbound.routes."/"]\n') + config)
        return sc, sc.sidecar.ports["inbound"], "/x", "/x"
    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{upstream.url}"\n'}, config,
                               outbound='server = "aiohttp"')
    if listener == "admin":
        # The admin app reads no request body: the 404 comes before the body
        # ends, and aiohttp reads the rest of it (lingering) before the next head.
        return sc, sc.sidecar.ports["admin"], "/health", "/nope"
    return sc, sc.sidecar.ports["outbound"], "/p/x", "/p/x"


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.split(b"\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:] if ln)}
    if b"content-length" in fields:
        body = await asyncio.wait_for(reader.readexactly(int(fields[b"content-length"])), 10)
    else:
        assert fields.get(b"transfer-encoding") == b"chunked", head
        body = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 10)
    return int(lines[0].split()[1]), head, body


def assert_408(data: bytes) -> None:
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    head, _, body = data.partition(b"\r\n\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])}
    assert fields[b"x-sidecar-error"] == b"request_timeout"
    assert fields[b"connection"] == b"close"
    err = orjson.loads(body)["error"]
    assert err["code"] == "request_timeout"
    assert len(err["request_id"]) == 32 and fields[b"x-request-id"] == err["request_id"].encode()


async def until_closed(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything up to EOF, and when EOF came (monotonic)."""
    data = await asyncio.wait_for(reader.read(), 15)
    return data, time.monotonic()


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_later_head_that_stalls_gets_408_then_close(sidecar_factory, upstream, listener):
    _, port, path, _ = await start(sidecar_factory, upstream, listener,
                                   f'header_timeout = "{int(HEADER_TIMEOUT * 1000)}ms"\nkeepalive_timeout = "30s"\n')
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(2):
            writer.write(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
            status, _, _ = await read_response(reader)
            assert status == 200
            # Idle for longer than header_timeout: the next head's clock
            # starts at its first byte, not at the end of this response.
            await asyncio.sleep(HEADER_TIMEOUT * 1.6)
        writer.write(b"GET %b HTTP/1.1\r\nHo" % path.encode())  # half a head, then nothing
        t0 = time.monotonic()
        data, closed = await until_closed(reader)
    finally:
        writer.close()
    assert_408(data)
    # keepalive_timeout is 30 s: only the header timer closes it this soon.
    assert HEADER_TIMEOUT * 0.8 < closed - t0 < 6, closed - t0


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_later_head_trickled_byte_by_byte_still_gets_408(sidecar_factory, upstream, listener):
    """The whole head is due within header_timeout: bytes that keep coming do not extend it."""
    _, port, path, _ = await start(sidecar_factory, upstream, listener,
                                   f'header_timeout = "{int(HEADER_TIMEOUT * 1000)}ms"\nkeepalive_timeout = "30s"\n')
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        assert (await read_response(reader))[0] == 200
        t0 = time.monotonic()
        closing = asyncio.ensure_future(until_closed(reader))
        trickle = b"GET %b HTTP/1.1\r\nX-Slow: " % path.encode() + b"a" * 200
        for i in range(len(trickle)):
            if closing.done():
                break
            writer.write(trickle[i:i + 1])
            await asyncio.sleep(0.05)
        data, closed = await closing
    finally:
        writer.close()
    assert_408(data)
    assert HEADER_TIMEOUT * 0.8 < closed - t0 < 6, closed - t0


SHAPES = {
    # The next head starts in the same read as the end of the request before it.
    "get": lambda p: [b"GET %b HTTP/1.1\r\nHost: x\r\n\r\nGET %b HTTP/1.1\r\nHo" % (p, p)],
    "get-get": lambda p: [b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % p * 2 + b"GET %b HTTP/1.1\r\nHo" % p],
    "post": lambda p: [b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET %b HTTP/1.1\r\nHo"
                       % (p, p)],
    "post-then-body-end": lambda p: [b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello" % p,
                                     b"worldGET %b HTTP/1.1\r\nHo" % p],
    "chunked": lambda p: [b"POST %b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nhello\r\n0\r\n\r\nGET %b HTTP/1.1\r\nHo" % (p, p)],
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_head_begun_with_the_end_of_the_request_before_it_gets_408(sidecar_factory, upstream,
                                                                           listener, shape):
    """Pipelining: half a head right behind a request, in the same packet. It
    is due header_timeout after the response before it (the fast server's and
    nginx's order), not left to the keep-alive timer."""
    _, port, get_path, post_path = await start(
        sidecar_factory, upstream, listener,
        f'header_timeout = "{int(HEADER_TIMEOUT * 1000)}ms"\nkeepalive_timeout = "30s"\n')
    path = (get_path if shape.startswith("get") else post_path).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writes = SHAPES[shape](path)
        for i, chunk in enumerate(writes):
            if i:
                # Most often a read of its own on the server: then this read
                # ends the body and begins the next head.
                await asyncio.sleep(0.2)
            writer.write(chunk)
            await writer.drain()
        statuses = [(await read_response(reader))[0] for _ in range(2 if shape == "get-get" else 1)]
        answered = time.monotonic()
        data, closed = await until_closed(reader)
    finally:
        writer.close()
    assert set(statuses) == {404 if listener == "admin" and not shape.startswith("get") else 200}
    assert_408(data)
    assert closed - answered < 6, closed - answered
    if listener != "admin" and not shape.startswith("get"):
        assert upstream.seen[-1].body in (b"hello", b"helloworld")


QUIET_SHAPES = {
    # Requests whose end must not be taken for the start of a next head.
    "get": lambda p: [b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % p],
    "body-in-one-read": lambda p: [b"GET %b HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\nab\r\n\r\ncd" % p],
    "body-in-two-reads": lambda p: [b"GET %b HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello" % p,
                                    b"world"],
    "chunked": lambda p: [b"GET %b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n" % p,
                          b"0\r\n\r\n"],
}


@pytest.mark.parametrize("shape", list(QUIET_SHAPES))
@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_silent_connection_after_a_response_closes_at_keepalive_without_408(sidecar_factory, upstream,
                                                                                      listener, shape):
    _, port, path, _ = await start(sidecar_factory, upstream, listener,
                                   f'header_timeout = "{int(HEADER_TIMEOUT * 1000)}ms"\nkeepalive_timeout = "1500ms"\n')
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, chunk in enumerate(QUIET_SHAPES[shape](path.encode())):
            if i:
                await asyncio.sleep(0.2)
            else:
                t0 = time.monotonic()  # before the response ended, so before the idle time began
            writer.write(chunk)
            await writer.drain()
        assert (await read_response(reader))[0] == 200
        data, closed = await until_closed(reader)
    finally:
        writer.close()
    assert data == b""  # closed, nothing written: no 408 for a head that never began
    # Not before keepalive_timeout (1.5 s) after the response, well past header_timeout.
    assert 1.4 < closed - t0 < 12, closed - t0


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_slow_body_is_not_cut_by_header_timeout(sidecar_factory, upstream, listener):
    _, port, get_path, post_path = await start(
        sidecar_factory, upstream, listener,
        f'header_timeout = "{int(HEADER_TIMEOUT * 1000)}ms"\nkeepalive_timeout = "30s"\n')
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(2):  # on the first request of the connection, and on a later one
            writer.write(b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello" % post_path.encode())
            await writer.drain()
            await asyncio.sleep(HEADER_TIMEOUT * 3)  # the body stalls for three header_timeouts
            writer.write(b"world")
            status, _, _ = await read_response(reader)
            assert status == (404 if listener == "admin" else 200)
            if listener != "admin":
                assert upstream.seen[-1].body == b"helloworld"
        # The connection is still open and in step: the next request is answered.
        writer.write(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % get_path.encode())
        status, _, _ = await read_response(reader)
        assert status == 200
    finally:
        writer.close()


@pytest.mark.parametrize("listener", ["inbound", "outbound-aiohttp"])
async def test_a_head_begun_during_a_slow_request_is_timed_from_its_response(sidecar_factory, listener):
    """Half a head pipelined behind a request that takes longer than
    header_timeout: the request is answered in full, then the head has
    header_timeout from the end of that response."""
    async def slow(request, seen):  # noqa: ANN001, ANN202
        await asyncio.sleep(HEADER_TIMEOUT * 3)
        return web.Response(text="slow")
    up = await FakeUpstream(slow).start()
    try:
        _, port, path, _ = await start(sidecar_factory, up, listener,
                                       f'header_timeout = "{int(HEADER_TIMEOUT * 1000)}ms"\nkeepalive_timeout = "30s"\n')
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\nGET %b HTTP/1.1\r\nHo" % (path.encode(), path.encode()))
            status, _, body = await read_response(reader)
            answered = time.monotonic()
            data, closed = await until_closed(reader)
        finally:
            writer.close()
    finally:
        await up.stop()
    assert status == 200 and body == b"slow"
    assert_408(data)
    assert closed - answered < 6, closed - answered
