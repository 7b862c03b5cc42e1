"""Bodies stream both ways: chunks arrive before the upstream finishes, memory stays flat."""

from __future__ import annotations

import asyncio
import psutil
from aiohttp import web

from tests.support.sidecar import SidecarProcess, free_port, write_config
from tests.support.upstream import FakeUpstream, ThreadedApp


def policy(url: str, extra: str = "") -> str:
    return f'route = "/p"\nupstream = "{url}"\n{extra}\n'


async def test_sse_events_arrive_while_upstream_is_still_sending(sidecar_factory, client):
    release = asyncio.Event()

    async def sse(request, seen):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await release.wait()  # the upstream holds the stream open until the client saw event 1
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp
    up = await FakeUpstream(sse).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})
        async with client.get(f"{sc.url}/p/stream") as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert first == b"data: first\n\n"
            release.set()
            rest = await asyncio.wait_for(r.content.read(), 5)
            assert rest == b"data: second\n\n"
    finally:
        release.set()
        await up.stop()


async def test_client_leaving_mid_stream_is_logged_and_counted(sidecar_factory, client):
    """A stream the client ends (the usual end of an SSE stream) still gets its
    access-log line and request count: status 200, error client_closed."""
    release = asyncio.Event()

    async def sse(request, seen):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await release.wait()
        return resp
    up = await FakeUpstream(sse).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})
        host, port = sc.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /p/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"data: first\n\n"), 5)
        writer.close()
        from tests.support.upstream import wait_for
        await wait_for(lambda: any(ln["path"] == "/p/stream" for ln in sc.access_lines()))
        line = next(ln for ln in sc.access_lines() if ln["path"] == "/p/stream")
        assert line["status"] == 200 and line["error"] == "client_closed"
        async with client.get(f"{sc.admin}/metrics") as r:
            assert 'sidecar_requests_total{method="GET",route="p",status="200"} 1.0' in await r.text()
    finally:
        release.set()
        await up.stop()


async def test_request_body_reaches_upstream_before_client_finishes(sidecar_factory, client):
    got_first = asyncio.Event()

    async def reader(request, seen):
        chunk = await request.content.readany()
        got_first.set()
        rest = await request.content.read()
        return web.Response(text=str(len(chunk) + len(rest)))
    up = await FakeUpstream(reader, read_body=False).start()
    try:
        sc = await sidecar_factory({"p": policy(up.url)})

        async def body():
            yield b"a" * 1000
            await asyncio.wait_for(got_first.wait(), 5)  # proves streaming: upstream saw chunk 1
            yield b"b" * 1000
        async with client.post(f"{sc.url}/p/up", data=body()) as r:
            assert r.status == 200
            assert await r.text() == "2000"
    finally:
        await up.stop()


def download_app(size: int) -> web.Application:
    chunk = b"x" * 65536

    async def download(request):
        resp = web.StreamResponse(headers={"Content-Length": str(size)})
        await resp.prepare(request)
        sent = 0
        while sent < size:
            await resp.write(chunk)
            sent += len(chunk)
        await resp.write_eof()
        return resp

    async def upload(request):
        n = 0
        async for data in request.content.iter_any():
            n += len(data)
        return web.Response(text=str(n))
    app = web.Application(client_max_size=1024**4)
    app.router.add_get("/big", download)
    app.router.add_post("/up", upload)
    return app


def test_large_transfers_keep_memory_flat(tmp_path):
    """512 MB each way through a sidecar process; its RSS must not grow with the body."""
    size = 512 * 1024 * 1024
    out_port, admin_port = free_port(), free_port()
    up = ThreadedApp(lambda: download_app(size)).start()
    cfg = write_config(tmp_path, {"p": policy(up.url, '[limits]\nmax_request_body = "1GB"\n')},
                       outbound_port=out_port, admin_port=admin_port)
    sc = SidecarProcess(cfg, out_port, admin_port).start()
    peak = 0
    try:
        proc = psutil.Process(sc.proc.pid)
        base = proc.memory_info().rss

        async def run() -> tuple[int, int]:
            nonlocal peak
            import aiohttp
            async with aiohttp.ClientSession() as s:
                got = 0
                async with s.get(f"{sc.url}/p/big") as r:
                    assert r.status == 200
                    async for data in r.content.iter_any():
                        got += len(data)
                        peak = max(peak, proc.memory_info().rss) if got % (32 << 20) < 70000 else peak

                async def body():
                    nonlocal peak
                    chunk = b"u" * 65536
                    for i in range(size // 65536):
                        if i % 512 == 0:
                            peak = max(peak, proc.memory_info().rss)
                        yield chunk
                async with s.post(f"{sc.url}/p/up", data=body()) as r:
                    assert r.status == 200
                    uploaded = int(await r.text())
            return got, uploaded
        got, uploaded = asyncio.run(run())
        assert got == size
        assert uploaded == size
        peak = max(peak, proc.memory_info().rss)
        assert peak - base < 64 * 1024 * 1024, f"RSS grew by {(peak - base) >> 20} MB"
    finally:
        sc.kill()
        up.stop()
