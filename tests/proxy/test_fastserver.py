"""The fast outbound server: hand-driven requests, lazy headers, client timeouts,
the connection cap, a client leaving mid-request. Real sockets throughout."""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
import pytest
from aiohttp import web

from tests.support.upstream import FakeUpstream, wait_for

AWAITING_PLUGIN = '''
import asyncio
import contextvars

from proxy.chain import Filter, ProxyResponse
from proxy.config import Model
from proxy.hookspecs import hookimpl
from proxy.plugins import PluginSpec

TAG = contextvars.ContextVar("tag", default=None)


class Config(Model):
    pass


class Awaiting(Filter):
    """Awaits the way Redis/Vault-backed filters do: futures, asyncio.timeout, a contextvar."""

    async def handle(self, ex, call_next):
        tag = ex.headers.get("X-Tag")
        TAG.set(tag)
        runner = type(asyncio.current_task()).__name__
        await asyncio.sleep(0.01)
        if ex.path == "/timeout":
            try:
                async with asyncio.timeout(0.05):
                    await asyncio.sleep(5)
            except TimeoutError:
                return ProxyResponse(599, body=b"timed out inside the filter")
        async with asyncio.timeout(5):
            await asyncio.sleep(0)
            resp = await call_next(ex)
        resp.headers["X-Tag-Seen"] = str(TAG.get())
        resp.headers["X-Runner"] = runner
        return resp


@hookimpl
def sidecar_plugins_register():
    return [PluginSpec("awaiting", Config, 450, lambda cfg, ctx: Awaiting(), description="awaits")]
'''


def policy(url: str, extra: str = "") -> str:
    return f'route = "/p"\nupstream = "{url}"\n{extra}\n'


async def test_filters_that_await_run_unchanged_without_a_task(tmp_path, monkeypatch, sidecar_factory,
                                                               upstream, client):
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "awaiting_plugin.py").write_text(AWAITING_PLUGIN)
    monkeypatch.syspath_prepend(str(mod))
    try:
        sc = await sidecar_factory({"p": policy(upstream.url, "[awaiting]\n")},
                                   sidecar='plugins = ["awaiting_plugin"]')

        async def one(i: int) -> tuple[int, str, str]:
            async with client.get(f"{sc.url}/p/x", headers={"X-Tag": f"t{i}"}) as r:
                await r.read()
                return r.status, r.headers["X-Tag-Seen"], r.headers["X-Runner"]
        got = await asyncio.gather(*(one(i) for i in range(20)))
        # Each request kept its own context across its awaits, concurrently.
        assert [g[1] for g in got] == [f"t{i}" for i in range(20)]
        assert {g[0] for g in got} == {200}
        # issue 10: no asyncio Task per request; the driver stands in for one.
        assert {g[2] for g in got} == {"Driven"}
        async with client.get(f"{sc.url}/p/timeout") as r:
            assert r.status == 599 and await r.read() == b"timed out inside the filter"
    finally:
        sys.modules.pop("awaiting_plugin", None)


async def test_headers_stay_bytes_unless_a_filter_reads_them(sidecar_factory, upstream, client):
    """The forwarded head is the same whether built from the raw bytes (no
    filter, or one editing through Exchange's header API) or from ex.headers
    (a filter reads them)."""
    added = '[headers.request.set]\n"X-Added" = "1"\n'
    sc = await sidecar_factory({
        "p": policy(upstream.url, "[peek]\n"),
        "h": 'route = "/h"\nupstream = "' + upstream.url + '"\n[peek]\n' + added,
        "m": 'route = "/m"\nupstream = "' + upstream.url + '"\n[peek]\nread = true\n' + added,
    }, sidecar='plugins = ["tests.support.peek"]')
    hdrs = {"X-Dup": "1", "Connection": "X-Gone", "X-Gone": "x", "X-Request-ID": "same"}
    raw = []
    for prefix in ("/p", "/h", "/m"):
        async with client.post(f"{sc.url}{prefix}/x?q=1", data=b"abc", headers=hdrs) as r:
            assert r.status == 200
            raw.append(r.headers["X-Peek-Raw"])
    assert raw == ["1", "1", "0"]
    plain, edited, mapped = upstream.seen[-3:]
    a = sorted((k.lower(), v) for k, v in plain.headers.items())
    b = sorted((k.lower(), v) for k, v in edited.headers.items() if k.lower() != "x-added")
    assert a == b
    # Same lines in the same order from the bytes and from the mapping (the
    # fast client writes Content-Length where its framing goes, not in place).
    assert [h for h in edited.raw_headers if h[0] != b"Content-Length"] == \
        [h for h in mapped.raw_headers if h[0] != b"Content-Length"]
    assert edited.headers["X-Added"] == "1"
    assert plain.body == edited.body == mapped.body == b"abc"
    assert "X-Gone" not in plain.headers and plain.headers["Content-Length"] == "3"


async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


@pytest.mark.parametrize("listener", ["fast", "aiohttp", "admin"])
async def test_silent_connection_gets_408_then_closed(sidecar_factory, upstream, listener):
    server = "aiohttp" if listener == "aiohttp" else "fast"
    sc = await sidecar_factory({"p": policy(upstream.url)}, config='[limits]\nheader_timeout = "500ms"\n',
                               outbound=f'server = "{server}"')
    port = sc.sidecar.ports["admin" if listener == "admin" else "outbound"]
    for first in (b"", b"GET /p/x HTTP/1.1\r\nHost: x\r\n"):  # nothing, or a head that never ends
        reader, writer = await raw(port)
        t0 = time.monotonic()
        writer.write(first)
        data = await read_until_closed(reader, 10)
        took = time.monotonic() - t0
        writer.close()
        assert data.startswith(b"HTTP/1.1 408 "), (listener, data[:60])
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"X-Sidecar-Error: request_timeout" in head
        err = orjson.loads(body)["error"]
        assert err["code"] == "request_timeout" and len(err["request_id"]) == 32
        assert 0.4 < took < 5, took
    assert upstream.seen == []


async def test_header_timeout_per_listener_override(sidecar_factory, upstream):
    sc = await sidecar_factory({"p": policy(upstream.url)}, config='[limits]\nheader_timeout = "30s"\n',
                               outbound='header_timeout = "300ms"')
    reader, writer = await raw(sc.sidecar.ports["outbound"])
    data = await read_until_closed(reader, 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize("server", ["fast", "aiohttp"])
async def test_idle_keepalive_connection_is_closed(sidecar_factory, upstream, server):
    sc = await sidecar_factory({"p": policy(upstream.url)}, config='[limits]\nkeepalive_timeout = "500ms"\n',
                               outbound=f'server = "{server}"')
    reader, writer = await raw(sc.sidecar.ports["outbound"])
    writer.write(b"GET /p/x HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    t0 = time.monotonic()
    rest = await read_until_closed(reader, 10)  # EOF: the sidecar closed the idle connection
    writer.close()
    assert rest == b"" and 0.3 < time.monotonic() - t0 < 5


@pytest.mark.parametrize("server", ["fast", "aiohttp"])
async def test_max_connections_holds_new_ones_in_the_backlog(sidecar_factory, upstream, server):
    sc = await sidecar_factory({"p": policy(upstream.url)}, config="[limits]\nmax_connections = 2\n",
                               outbound=f'server = "{server}"')
    port = sc.sidecar.ports["outbound"]
    acceptor = sc.sidecar._fast[0].acceptor if server == "fast" else sc.sidecar._acceptors[0]
    conns = [await raw(port) for _ in range(2)]
    for reader, writer in conns:
        writer.write(b"GET /p/x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    await wait_for(lambda: acceptor.open == 2)
    # The third connects (the kernel's backlog) but is not served...
    reader3, writer3 = await raw(port)
    writer3.write(b"GET /p/third HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises((TimeoutError, asyncio.TimeoutError)):
        await asyncio.wait_for(reader3.readuntil(b"\r\n\r\n"), 0.7)
    assert not any(s.path_qs == "/third" for s in upstream.seen)
    # ...until one of the first two closes.
    conns[0][1].close()
    head = await asyncio.wait_for(reader3.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer3.close()
    conns[1][1].close()


async def test_client_leaving_mid_request_cancels_the_upstream_exchange(sidecar_factory):
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(request, seen):
        started.set()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if request.transport is None or request.transport.is_closing():
                cancelled.set()  # the sidecar closed the upstream connection
                break
            await asyncio.sleep(0.02)
        return web.Response(text="late")
    up = await FakeUpstream(hang).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})
        reader, writer = await raw(sc.sidecar.ports["outbound"])
        writer.write(b"GET /p/slow HTTP/1.1\r\nHost: x\r\nX-Request-ID: gone-1\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)
        writer.close()
        # The upstream exchange is cancelled: its connection is closed...
        await asyncio.wait_for(cancelled.wait(), 5)
        # ...and the request is logged as 499 client_closed.
        await wait_for(lambda: any(ln["request_id"] == "gone-1" for ln in sc.access_lines()))
        line = next(ln for ln in sc.access_lines() if ln["request_id"] == "gone-1")
        assert line["status"] == 499 and line["error"] == "client_closed"
    finally:
        await up.stop()


async def test_slow_upstream_reader_pauses_the_client_upload(sidecar_factory):
    """Backpressure toward the client: while the upstream does not read, the
    sidecar stops reading the client (its socket buffers fill, the client's
    writes stall) instead of buffering the body in memory."""
    release = asyncio.Event()
    got = []

    async def slow_reader(request, seen):
        await release.wait()
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        got.append(n)
        return web.Response(text=str(n))
    up = await FakeUpstream(slow_reader, read_body=False).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url, '[limits]\nmax_request_body = "1GB"\n')})
        reader, writer = await raw(sc.sidecar.ports["outbound"])
        total = 64 * 1024 * 1024
        writer.write(b"POST /p/up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
        piece = b"u" * 65536
        sent = 0
        stalled = False
        while sent < total:
            writer.write(piece)
            sent += len(piece)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except (TimeoutError, asyncio.TimeoutError):
                stalled = True
                break
        assert stalled and sent < total // 2, sent
        release.set()
        while sent < total:
            writer.write(piece)
            sent += len(piece)
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200")
        assert got == [total]
        writer.close()
    finally:
        release.set()
        await up.stop()


def test_client_connection_limits_config(tmp_path):
    from proxy.config import load_settings
    from proxy.errors import ConfigError
    from proxy.runtime import Runtime
    from tests.support.sidecar import write_config

    cfg = write_config(tmp_path, {"p": policy("http://127.0.0.1:9")},
                       '[limits]\nheader_timeout = "3s"\nmax_connections = 7\n',
                       outbound='keepalive_timeout = "9s"')
    s = load_settings(cfg)
    assert s.limits.for_listener(s.outbound) == (3.0, 9.0, 7)
    assert s.limits.for_listener(s.admin) == (3.0, 75.0, 7)
    assert s.outbound.server == "fast"
    # They are listener settings: a policy's [limits] refuses them by name.
    cfg = write_config(tmp_path / "bad", {"p": policy("http://127.0.0.1:9", '[limits]\nheader_timeout = "1s"\n')})
    with pytest.raises(ConfigError) as e:
        Runtime(load_settings(cfg)).load_policies()
    assert any("limits.header_timeout: unknown key" in p for p in e.value.problems), e.value.problems
    with pytest.raises(ConfigError) as e:
        load_settings(write_config(tmp_path / "bad2", {}, "[limits]\nmax_connections = 0\n"))
    assert any("limits.max_connections" in p for p in e.value.problems)


async def test_header_timeout_applies_to_each_request_on_a_keepalive_connection(sidecar_factory, upstream):
    sc = await sidecar_factory({"p": policy(upstream.url)},
                               config='[limits]\nheader_timeout = "500ms"\nkeepalive_timeout = "30s"\n')
    reader, writer = await raw(sc.sidecar.ports["outbound"])
    for _ in range(2):  # slower than header_timeout in total, each head in time
        writer.write(b"GET /p/x HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                          if ln.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        await asyncio.sleep(0.4)
    writer.write(b"GET /p/x HTTP/1.1\r\nHo")  # a head that starts and stalls
    data = await read_until_closed(reader, 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")


SPLITTING_PLUGIN = '''
from proxy.chain import Filter
from proxy.config import Model
from proxy.hookspecs import hookimpl
from proxy.plugins import PluginSpec


class Config(Model):
    pass


class Splitter(Filter):
    async def handle(self, ex, call_next):
        resp = await call_next(ex)
        resp.headers["X-Split"] = "a\\r\\nSet-Cookie: injected=1"
        return resp


@hookimpl
def sidecar_plugins_register():
    return [PluginSpec("splitter", Config, 450, lambda cfg, ctx: Splitter(), description="bad header")]
'''


async def test_a_response_header_with_a_line_break_is_a_500_not_a_split(tmp_path, monkeypatch, sidecar_factory,
                                                                          upstream, client):
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "splitting_plugin.py").write_text(SPLITTING_PLUGIN)
    monkeypatch.syspath_prepend(str(mod))
    try:
        sc = await sidecar_factory({"p": policy(upstream.url, "[splitter]\n")},
                                   sidecar='plugins = ["splitting_plugin"]')
        async with client.get(f"{sc.url}/p/x") as r:
            assert r.status == 500
            assert r.headers["X-Sidecar-Error"] == "internal_error"
            assert "Set-Cookie" not in r.headers
    finally:
        sys.modules.pop("splitting_plugin", None)
