"""The fast upstream client (proxy/fastclient.py) through real sockets.

Scripted upstreams speak raw bytes so framing edge cases (1xx, EOF-delimited
bodies, 101, resets on reused connections) are exact; the pool is inspected
through ``runtime.pools.stats()``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.config import load_settings
from proxy.server import Sidecar
from tests.support.sidecar import RunningSidecar, write_config
from tests.support.upstream import FakeUpstream, wait_for


def policy(url: str, extra: str = "") -> str:
    return f'route = "/up"\nupstream = "{url}"\n{extra}\n'


async def start(tmp: Path, policies: dict[str, str], outbound: str = "", config: str = "") -> RunningSidecar:
    """A sidecar with extra ``[outbound]`` keys (client, pool_size...)."""
    path = write_config(tmp, policies, config)
    text = path.read_text().replace("[outbound]\n", f"[outbound]\n{outbound}\n", 1)
    path.write_text(text)
    sc = Sidecar(load_settings(path))
    await sc.start()
    return RunningSidecar(sc, path)


@pytest.fixture
async def make(tmp_path):
    started: list[RunningSidecar] = []

    async def _make(policies, outbound="", config=""):
        sc = await start(tmp_path / f"sc{len(started)}", policies, outbound, config)
        started.append(sc)
        return sc

    yield _make
    for sc in started:
        await sc.sidecar.stop()


def pool_stats(sc: RunningSidecar) -> dict[str, int]:
    (stats,) = sc.runtime.pools.stats().values()
    return stats


class Scripted:
    """A raw TCP upstream: ``script(reader, writer, n)`` handles connection number n."""

    def __init__(self, script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> "Scripted":
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        body = b""
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                body = await reader.readexactly(int(line.split(b":")[1]))
        self.requests.append(head + body)
        return head

    async def reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Read one request, then write ``data`` as its answer."""
        await self.read_request(reader)
        writer.write(data)
        await writer.drain()

    async def _conn(self, reader, writer) -> None:
        self.connections += 1
        try:
            await self.script(self, reader, writer, self.connections)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def scripted():
    made: list[Scripted] = []

    async def _make(script):
        s = await Scripted(script).start()
        made.append(s)
        return s

    yield _make
    for s in made:
        await s.stop()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# ---- framing ---------------------------------------------------------------

async def test_interim_1xx_responses_are_skipped(make, scripted, client):
    async def script(up, r, w, n):
        await up.reply(r, w, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
        await up.reply(r, w, OK)
        await r.read()

    up = await scripted(script)
    sc = await make({"p": policy(up.url)})
    for _ in range(2):
        async with client.get(f"{sc.url}/up/x") as resp:
            assert resp.status == 200
            assert "Link" not in resp.headers
            assert await resp.read() == b"ok"
    assert up.connections == 1  # the connection stayed usable after the 1xx


async def test_eof_delimited_body(make, scripted, client):
    async def script(up, r, w, n):
        await up.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nhello ")
        await w.drain()
        w.write(b"world")
        await w.drain()

    up = await scripted(script)
    sc = await make({"p": policy(up.url)})
    for _ in range(2):
        async with client.get(f"{sc.url}/up/x") as resp:
            assert resp.status == 200
            assert await resp.read() == b"hello world"
    assert up.connections == 2
    await wait_for(lambda: pool_stats(sc)["open"] == 0)


async def test_connection_close_is_not_reused(make, scripted, client):
    async def script(up, r, w, n):
        await up.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await r.read()

    up = await scripted(script)
    sc = await make({"p": policy(up.url)})
    for _ in range(3):
        async with client.get(f"{sc.url}/up/x") as resp:
            assert await resp.read() == b"ok"
            # The upstream's Connection: close is hop-by-hop: it ends the
            # upstream connection, not the client's keep-alive one.
            assert resp.headers.get("Connection", "").lower() != "close"
    assert up.connections == 3


@pytest.mark.parametrize("tail", [
    b"HTTP/1.1 200 OK\r\nX-Extra: 1\r\n",                      # a head cut short
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nzz",          # a whole second answer
    b"zz",                                                        # stray bytes
])
async def test_bytes_past_the_response_end_retire_the_connection(make, scripted, client, tail):
    # The response parser is kept for the next response of a keep-alive
    # connection (issue 10); bytes after a response, in the same read, must
    # neither be parsed into the next request's answer nor let the
    # connection be reused.
    async def script(up, r, w, n):
        await up.reply(r, w, OK + tail if n == 1 else OK)
        while True:
            await up.reply(r, w, OK)

    up = await scripted(script)
    sc = await make({"p": policy(up.url)})
    for _ in range(3):
        async with client.get(f"{sc.url}/up/x") as resp:
            assert resp.status == 200
            assert "X-Extra" not in resp.headers
            assert await resp.read() == b"ok"
    assert up.connections == 2  # the first one was not reused; the second was


async def test_keep_alive_connection_parses_many_responses(make, scripted, client):
    # The kept parser across responses of different framing on one connection.
    answers = [OK, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
               b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\nX-B: 2\r\n\r\nnope", OK]

    async def script(up, r, w, n):
        for a in answers:
            await up.reply(r, w, a)
        await r.read()

    up = await scripted(script)
    sc = await make({"p": policy(up.url)})
    got = []
    for _ in answers:
        async with client.get(f"{sc.url}/up/x") as resp:
            got.append((resp.status, resp.headers.get("X-B"), await resp.read()))
    assert got == [(200, None, b"ok"), (200, None, b"abc"), (404, "2", b"nope"), (200, None, b"ok")]
    assert up.connections == 1


@pytest.mark.parametrize("status,head", [(204, False), (304, False), (200, True)])
async def test_no_body_responses_keep_the_connection(make, scripted, client, status, head):
    # Content-Length on a HEAD answer and on 304 describes the representation,
    # not bytes that follow: the next response must parse on the same socket.
    async def script(up, r, w, n):
        while True:
            await up.read_request(r)
            reason = {204: b"No Content", 304: b"Not Modified", 200: b"OK"}[status]
            extra = b"Content-Length: 1234\r\n" if status != 204 else b""
            w.write(b"HTTP/1.1 %d %b\r\n%bETag: \"e\"\r\n\r\n" % (status, reason, extra))
            await w.drain()

    up = await scripted(script)
    sc = await make({"p": policy(up.url)})
    method = "HEAD" if head else "GET"
    for _ in range(3):
        async with client.request(method, f"{sc.url}/up/x") as resp:
            assert resp.status == status
            assert resp.headers["ETag"] == '"e"'
            if head:
                assert resp.headers["Content-Length"] == "1234"
            assert await resp.read() == b""
    assert up.connections == 1


async def test_unasked_upgrade_is_refused_clearly(make, scripted, client):
    async def script(up, r, w, n):
        await up.read_request(r)
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        await w.drain()
        await r.read()

    up = await scripted(script)
    sc = await make({"p": policy(up.url)})
    # A 101 is relayed only for a WebSocket handshake (tests/proxy/test_websocket.py);
    # an upstream that switches protocols unasked gets a 502.
    async with client.get(f"{sc.url}/up/ws") as resp:
        assert resp.status == 502
        body = await resp.json()
        assert "switched protocols (101) unasked" in body["error"]["message"]
    await wait_for(lambda: pool_stats(sc)["open"] == 0)


async def test_malformed_response_is_502(make, scripted, client):
    async def script(up, r, w, n):
        await up.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello")
        await w.drain()
        await r.read()

    up = await scripted(script)
    sc = await make({"p": policy(up.url)})
    async with client.get(f"{sc.url}/up/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Sidecar-Error"] == "upstream_bad_response"


async def test_header_injection_is_never_sent(make, upstream, client, tmp_path):
    # A value with a line break must not split the upstream request (CWE-113).
    # Config values are refused at load time (proxy.http.check_header_value);
    # a secret resolved at run time is the way such a value can still arrive.
    secret = tmp_path / "evil-secret"
    secret.write_text("a\r\nX-Injected: 1")
    sc = await make({"p": policy(upstream.url, f'[auth]\ntype = "header"\nheader = "X-Api-Key"\n'
                                               f'secret = "file:{secret.as_posix()}"')})
    async with client.get(f"{sc.url}/up/x") as resp:
        assert resp.status == 502
    assert upstream.seen == []


# ---- stale connections and retries ----------------------------------------

async def test_upstream_closing_after_n_requests_never_fails_requests(make, scripted, client):
    # nginx closes after keepalive_requests; here after 2, without warning.
    async def script(up, r, w, n):
        for _ in range(2):
            await up.read_request(r)
            w.write(OK)
            await w.drain()

    up = await scripted(script)
    sc = await make({"p": policy(up.url)})
    for i in range(7):
        async with client.get(f"{sc.url}/up/{i}") as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.read() == b"ok"
    assert up.connections == 4


async def test_reset_before_response_retries_idempotent_only(make, scripted, client):
    # A reused connection that the upstream drops after reading the request
    # (the keep-alive race): GET is repeated once on a fresh connection,
    # POST is not (it may have been acted on).
    async def script(up, r, w, n):
        await up.read_request(r)
        w.write(OK)
        await w.drain()
        await up.read_request(r)  # second request on this connection: drop it
        w.transport.abort()

    up = await scripted(script)
    sc = await make({"p": policy(up.url)})
    async with client.get(f"{sc.url}/up/a") as resp:
        assert resp.status == 200
    async with client.get(f"{sc.url}/up/b") as resp:
        assert resp.status == 200
    assert [q.split(b" ")[1] for q in up.requests] == [b"/a", b"/b", b"/b"]
    # The /b retry left a once-used connection; POST /c is its second request.
    async with client.post(f"{sc.url}/up/c", data=b"x") as resp:
        assert resp.status == 502
    async with client.post(f"{sc.url}/up/d", data=b"x") as resp:
        assert resp.status == 200
    assert [q.split(b" ")[1] for q in up.requests][-2:] == [b"/c", b"/d"]


async def test_idle_connections_expire(make, upstream, client):
    # 1 s, not 200 ms: the connection must still be idle when checked below,
    # however slow a loaded machine is between the two lines.
    sc = await make({"p": policy(upstream.url)}, 'pool_idle_timeout = "1s"')
    async with client.get(f"{sc.url}/up/x") as resp:
        assert resp.status == 200
    assert pool_stats(sc)["idle"] == 1
    await wait_for(lambda: pool_stats(sc)["open"] == 0)


async def test_pool_limit_is_respected(make, client):
    inflight = peak = 0

    async def slow(request, seen):
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(0.05)
        inflight -= 1
        return web.Response(text="ok")

    up = await FakeUpstream(slow).start()
    try:
        sc = await make({"p": policy(up.url)}, "pool_size = 2")

        async def one(i):
            async with client.get(f"{sc.url}/up/{i}") as r:
                return r.status

        assert await asyncio.gather(*(one(i) for i in range(12))) == [200] * 12
        assert peak == 2
        assert pool_stats(sc)["open"] <= 2
    finally:
        await up.stop()


# ---- timeouts and errors ---------------------------------------------------

async def test_idle_timeout_before_headers_is_504(make, scripted, client):
    async def script(up, r, w, n):
        await up.read_request(r)
        await r.read()

    up = await scripted(script)
    sc = await make({"p": policy(up.url, '[timeouts]\nidle = "200ms"')})
    async with client.get(f"{sc.url}/up/x") as resp:
        assert resp.status == 504
        assert resp.headers["X-Sidecar-Error"] == "upstream_timeout"
    await wait_for(lambda: pool_stats(sc)["open"] == 0)


async def test_total_deadline_cuts_a_stalled_body(make, scripted, client):
    async def script(up, r, w, n):
        await up.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await w.drain()
        await r.read()

    up = await scripted(script)
    sc = await make({"p": policy(up.url, '[timeouts]\ntotal = "300ms"')})
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(f"{sc.url}/up/x") as resp:
            assert resp.status == 200
            await resp.read()
    await wait_for(lambda: pool_stats(sc)["open"] == 0)
    assert (await sc.wait_access_lines(1))[-1]["error"] == "upstream_timeout"


async def test_connect_refused_is_502(make, client):
    from tests.support.sidecar import free_port

    sc = await make({"p": policy(f"http://127.0.0.1:{free_port()}")})
    async with client.get(f"{sc.url}/up/x") as resp:
        assert resp.status == 502
        assert "cannot connect" in (await resp.json())["error"]["message"]


# ---- streaming, backpressure, cancellation ---------------------------------

async def test_large_streams_both_ways(make, client):
    size = 16 * 1024 * 1024
    blob = os.urandom(1024 * 1024)

    async def respond(request, seen):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(size // len(blob)):
            await resp.write(blob)
        await resp.write_eof()
        return resp

    up = await FakeUpstream(respond).start()
    try:
        sc = await make({"p": policy(up.url)})

        async def gen():
            for _ in range(size // len(blob)):
                yield blob

        async with client.post(f"{sc.url}/up/u", data=gen()) as resp:
            assert resp.status == 200
            h = hashlib.sha256()
            got = 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                h.update(chunk)
                got += len(chunk)
        assert got == size
        assert h.digest() == hashlib.sha256(blob * (size // len(blob))).digest()
        assert len(up.seen[-1].body) == size
        assert up.seen[-1].headers["Transfer-Encoding"] == "chunked"
        assert up.seen[-1].body == blob * (size // len(blob))
    finally:
        await up.stop()


async def test_download_backpressure_pauses_the_upstream_socket(make, client):
    blob = b"x" * (1024 * 1024)

    async def respond(request, seen):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(32):
            await resp.write(blob)
        await resp.write_eof()
        return resp

    up = await FakeUpstream(respond).start()
    try:
        sc = await make({"p": policy(up.url)})
        pool = next(iter(sc.runtime.pools.fast._pools.values()))
        async with client.get(f"{sc.url}/up/big") as resp:
            # The client reads nothing: the sidecar must stop reading the upstream.
            await wait_for(lambda: any(c._paused_reading for c in _conns(pool)))
            assert all(c._buffered < 8 * 1024 * 1024 for c in _conns(pool))
            assert len(await resp.read()) == 32 * len(blob)
    finally:
        await up.stop()


def _conns(pool):
    import gc

    return [o for o in gc.get_referrers(pool) if type(o).__name__ == "Conn" and not o.closed]


async def test_client_aborts_never_leak_connections(make, client):
    # Aborts at every stage: before headers, mid-body, and during an upload.
    async def respond(request, seen):
        if "slowhead" in request.path:
            await asyncio.sleep(0.05)
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(20):
            await resp.write(b"y" * 65536)
            await asyncio.sleep(0.001)
        await resp.write_eof()
        return resp

    up = await FakeUpstream(respond).start()
    try:
        sc = await make({"p": policy(up.url)}, "pool_size = 8")

        async def abort(i):
            kind = i % 3
            try:
                if kind == 0:
                    await asyncio.wait_for(client.get(f"{sc.url}/up/slowhead/{i}"), 0.01)
                elif kind == 1:
                    async with client.get(f"{sc.url}/up/body/{i}") as r:
                        await r.content.read(1000)
                        r.close()
                else:
                    async def gen():
                        yield b"z" * 1000
                        await asyncio.sleep(0.01)
                        raise RuntimeError("client gives up")

                    async with client.post(f"{sc.url}/up/upload/{i}", data=gen()) as r:
                        await r.read()
            except (asyncio.TimeoutError, aiohttp.ClientError, RuntimeError):
                pass

        for batch in range(10):
            await asyncio.gather(*(abort(batch * 30 + i) for i in range(30)))
        await wait_for(lambda: pool_stats(sc)["in_use"] == 0, timeout=10)
        stats = pool_stats(sc)
        assert stats["open"] <= 8 and stats["connecting"] == 0 and stats["waiting"] == 0
        async with client.get(f"{sc.url}/up/body/final") as r:
            assert r.status == 200
            assert len(await r.read()) == 20 * 65536
    finally:
        await up.stop()


# ---- TLS -------------------------------------------------------------------

@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


@pytest.fixture
async def tls_upstream(cert):
    crt, key = cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    names: list[str | None] = []
    ctx.sni_callback = lambda obj, name, c: names.append(name)
    reused: list[bool] = []

    async def handler(request):
        reused.append(request.transport.get_extra_info("ssl_object").session_reused)
        if request.path == "/close":
            return web.Response(text="bye", headers={"Connection": "close"})
        return web.Response(text="secure")

    app = web.Application()
    app.router.add_route("*", "/{t:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"https://localhost:{port}", names, reused
    await runner.cleanup()


async def test_tls_verifies_by_default(make, tls_upstream, client):
    url, names, _ = tls_upstream
    sc = await make({"p": policy(url)})
    async with client.get(f"{sc.url}/up/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Sidecar-Error"] == "upstream_tls_error"


async def test_tls_with_ca_bundle_sni_and_session_reuse(make, tls_upstream, cert, client):
    url, names, reused = tls_upstream
    sc = await make({"p": policy(url, f'[tls]\nca_bundle = "{cert[0]}"')})
    for path in ("/a", "/close", "/b"):
        async with client.get(f"{sc.url}/up{path}") as resp:
            assert resp.status == 200
    assert names[0] == "localhost"
    # Third request: a new connection after the upstream closed the first one,
    # resumed from the first connection's session.
    assert reused == [False, False, True]


async def test_tls_verify_false_is_an_explicit_opt_out(make, tls_upstream, client):
    url, _, _ = tls_upstream
    sc = await make({"p": policy(url, "[tls]\nverify = false")})
    async with client.get(f"{sc.url}/up/x") as resp:
        assert resp.status == 200
        assert await resp.text() == "secure"


async def test_a_cancelled_waiter_passes_its_wake_up_on(upstream):
    """A freed slot wakes one waiter; if that waiter's request is cancelled
    (client gone) before it runs, the next waiter must get the slot at once,
    not sit out its connect timeout while the pool has room."""
    from proxy.fastclient.pool import Pool

    host, port = upstream.url.removeprefix("http://").split(":")
    pool = Pool("http", host, int(port), 1, 30.0, None)
    held = await pool.acquire(5.0, None)
    b = asyncio.ensure_future(pool.acquire(5.0, None))
    c = asyncio.ensure_future(pool.acquire(5.0, None))
    await wait_for(lambda: len(pool._waiters) == 2)
    held.close()          # frees the slot: wakes b
    b.cancel()            # b's client went away before b ran
    got = await asyncio.wait_for(c, 1.0)
    assert got is not None
    got.close()
    pool.close()
