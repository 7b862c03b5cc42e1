"""WebSocket passthrough on the fast server (issue 10): a real aiohttp client,
a local aiohttp WebSocket upstream, closes from each side, the chain on the
handshake, the idle timeout, the access log."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.support.upstream import serve, wait_for


class WsUpstream:
    """An echo WebSocket server recording each handshake's headers."""

    def __init__(self) -> None:
        self.handshakes: list[dict[str, str]] = []
        self.closed_by_client = asyncio.Event()
        self.flood_sent = 0
        self.runner = None
        self.port = 0

    async def start(self) -> "WsUpstream":
        app = web.Application()
        app.router.add_get("/ws/{tail:.*}", self.handle)
        self.runner, self.port = await serve(app)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(dict(request.headers))
        if request.match_info["tail"] == "refuse":
            return web.json_response({"error": "no"}, status=403)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if request.match_info["tail"] == "flood":
            frame = b"f" * (1 << 20)
            for _ in range(64):  # send_bytes waits while the socket buffer is full
                await ws.send_bytes(frame)
                self.flood_sent += 1
            await ws.close()
            return ws
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data == "bye":
                    await ws.close(code=4000, message=b"upstream says bye")
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        if ws.close_code != 4000:
            self.closed_by_client.set()
        return ws

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def ws_up():
    up = await WsUpstream().start()
    yield up
    await up.stop()


def policy(url: str, extra: str = "") -> str:
    return f'route = "/p"\nupstream = "{url}"\n{extra}\n'


AUTH = '[auth]\ntype = "bearer"\nsecret = "env:SIDECAR_TEST_WS_TOKEN"\n'


async def test_echo_through_the_sidecar_with_auth_and_close_from_client(sidecar_factory, ws_up, client,
                                                                        monkeypatch):
    monkeypatch.setenv("SIDECAR_TEST_WS_TOKEN", "sk-ws-secret")
    sc = await sidecar_factory({"p": policy(ws_up.url, AUTH)})
    async with client.ws_connect(f"{sc.url}/p/ws/echo", headers={"X-Request-ID": "ws-1"}) as ws:
        await ws.send_str("hello")
        assert (await asyncio.wait_for(ws.receive(), 5)).data == "echo:hello"
        big = bytes(range(256)) * 4096  # 1 MiB each way, several TCP reads
        await ws.send_bytes(big)
        got = await asyncio.wait_for(ws.receive(), 10)
        assert got.type == WSMsgType.BINARY and got.data == big
    # The client closed: the upstream saw a proper close, not a reset.
    await asyncio.wait_for(ws_up.closed_by_client.wait(), 5)
    # The chain ran on the handshake: the credential was injected.
    assert ws_up.handshakes[-1]["Authorization"] == "Bearer sk-ws-secret"
    assert ws_up.handshakes[-1]["Upgrade"].lower() == "websocket"
    await wait_for(lambda: any(ln["request_id"] == "ws-1" for ln in sc.access_lines()))
    line = next(ln for ln in sc.access_lines() if ln["request_id"] == "ws-1")
    assert line["status"] == 101 and line["route"] == "p"
    ws_log = line["decisions"]["websocket"]
    assert ws_log["ended_by"] in ("client", "upstream")  # the WebSocket server closes TCP first
    assert ws_log["to_upstream_bytes"] > len(big) and ws_log["to_client_bytes"] > len(big)
    assert line["duration_ms"] > 0
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    up_bytes = next(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                    if x.startswith('sidecar_websocket_bytes_total{direction="to_upstream",route="p"}'))
    assert up_bytes == ws_log["to_upstream_bytes"]
    assert 'sidecar_requests_total{method="GET",route="p",status="101"} 1.0' in text


async def test_close_from_upstream_reaches_the_client(sidecar_factory, ws_up, client):
    sc = await sidecar_factory({"p": policy(ws_up.url)})
    async with client.ws_connect(f"{sc.url}/p/ws/echo", headers={"X-Request-ID": "ws-2"}) as ws:
        await ws.send_str("bye")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == WSMsgType.CLOSE and msg.data == 4000
    await wait_for(lambda: any(ln["request_id"] == "ws-2" for ln in sc.access_lines()))
    line = next(ln for ln in sc.access_lines() if ln["request_id"] == "ws-2")
    assert line["status"] == 101
    assert line["decisions"]["websocket"]["ended_by"] in ("upstream", "client")


async def test_upstream_refusal_reaches_the_client(sidecar_factory, ws_up, client):
    sc = await sidecar_factory({"p": policy(ws_up.url)})
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect(f"{sc.url}/p/ws/refuse")
    assert e.value.status == 403
    # The connection is usable afterwards for plain requests on a new one.
    async with client.get(f"{sc.url}/p/ws/refuse") as r:
        assert r.status == 403


async def test_rate_limit_counts_the_handshake(sidecar_factory, ws_up, client):
    sc = await sidecar_factory({"p": policy(ws_up.url, '[rate_limit]\nlimits = [{ requests = 2, per = "1m" }]\n')})
    for _ in range(2):
        async with client.ws_connect(f"{sc.url}/p/ws/echo") as ws:
            await ws.send_str("x")
            assert (await asyncio.wait_for(ws.receive(), 5)).data == "echo:x"
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect(f"{sc.url}/p/ws/echo")
    assert e.value.status == 429
    assert len(ws_up.handshakes) == 2


async def test_quiet_tunnel_is_closed_after_the_route_idle_timeout(sidecar_factory, ws_up, client):
    sc = await sidecar_factory({"p": policy(ws_up.url, '[timeouts]\nidle = "400ms"\n')},
                               config='[limits]\nheader_timeout = "1s"\n')
    async with client.ws_connect(f"{sc.url}/p/ws/echo", autoping=False, heartbeat=None,
                                 headers={"X-Request-ID": "ws-idle"}) as ws:
        await ws.send_str("hi")
        assert (await asyncio.wait_for(ws.receive(), 5)).data == "echo:hi"
        msg = await asyncio.wait_for(ws.receive(), 10)  # nothing more is sent: the sidecar cuts it
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
    await wait_for(lambda: any(ln["request_id"] == "ws-idle" for ln in sc.access_lines()))
    line = next(ln for ln in sc.access_lines() if ln["request_id"] == "ws-idle")
    assert line["decisions"]["websocket"]["ended_by"] == "idle"


@pytest.mark.parametrize("variant", ["aiohttp_server", "aiohttp_client", "h2c"])
async def test_upgrades_that_cannot_be_relayed_are_501(sidecar_factory, ws_up, variant):
    from tests.proxy.test_http_rules import raw_request

    kw = {"outbound": 'server = "aiohttp"'} if variant == "aiohttp_server" else \
        {"outbound": 'client = "aiohttp"'} if variant == "aiohttp_client" else {}
    sc = await sidecar_factory({"p": policy(ws_up.url)}, **kw)
    proto = b"h2c" if variant == "h2c" else b"websocket"
    status, _, body = await raw_request(sc.url, b"GET /p/ws/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                        b"Upgrade: " + proto + b"\r\nSec-WebSocket-Version: 13\r\n"
                                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert status == 501 and b"upgrade_not_supported" in body
    assert ws_up.handshakes == []


async def test_slow_client_stalls_the_upstream_instead_of_buffering(sidecar_factory, ws_up, client):
    """Backpressure through the tunnel: a client that does not read makes the
    upstream's writes wait (socket buffers fill), the sidecar does not buffer
    the 64 MiB in between."""
    sc = await sidecar_factory({"p": policy(ws_up.url)})
    async with client.ws_connect(f"{sc.url}/p/ws/flood", max_msg_size=0) as ws:
        await asyncio.sleep(1.0)  # not reading
        stalled_at = ws_up.flood_sent
        assert stalled_at < 40, stalled_at
        got = 0
        while True:
            msg = await asyncio.wait_for(ws.receive(), 10)
            if msg.type != WSMsgType.BINARY:
                break
            got += 1
        assert got == 64 and ws_up.flood_sent == 64
