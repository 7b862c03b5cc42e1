"""Fake upstreams: the kit's (proxy.testing) plus what only this repository's tests use."""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Callable

import orjson
from aiohttp import web

from proxy.testing import FakeUpstream, Responder, Seen, echo, serve, wait_for

__all__ = ["FakeUpstream", "Responder", "Seen", "ThreadedApp", "dribble", "echo", "serve", "wait_for"]


def dribble(body: bytes, *, status: int = 200, piece: int = 1000, pause: float = 0.02) -> Responder:
    """A responder that sends ``body`` in pieces with pauses, so a reader sees
    several chunks (a slow link, chunked encoding), not one."""
    async def respond(request: web.Request, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), piece):
            await resp.write(body[i:i + piece])
            await asyncio.sleep(pause)
        await resp.write_eof()
        return resp
    return respond


class ThreadedApp:
    """An aiohttp app served from its own thread and loop, for tests whose
    sidecar is a subprocess and whose client runs under ``asyncio.run``."""

    def __init__(self, make_app: Callable[[], web.Application]) -> None:
        import threading

        self.make_app = make_app
        self.port = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        async def main() -> None:
            runner, self.port = await serve(self.make_app())
            self._ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.05)
            await runner.cleanup()
        asyncio.run(main())

    def start(self) -> "ThreadedApp":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("threaded upstream did not start")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def held_app(release: threading.Event, arrived: threading.Event | None = None) -> web.Application:
    """An app (for ThreadedApp) whose every request waits until ``release``
    is set, then answers "finished"; ``arrived`` is set when one came in."""
    async def held(request):
        if arrived is not None:
            arrived.set()
        while not release.is_set():
            await asyncio.sleep(0.02)
        return web.Response(text="finished")
    app = web.Application()
    app.router.add_get("/{tail:.*}", held)
    return app


async def varied(request: web.Request, seen: Seen) -> web.StreamResponse:
    """The upstream of the differential tests (both upstream clients, both
    servers): chunked, 204, 304, repeated Set-Cookie, gzip, hop-by-hop response
    headers, a chosen status, else what it received as JSON."""
    p = request.path
    if p.endswith("/chunked"):
        resp = web.StreamResponse(headers={"X-Kind": "chunked"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(b"part-%d;" % i)
        await resp.write_eof()
        return resp
    if p.endswith("/204"):
        return web.Response(status=204, headers={"X-Kind": "empty"})
    if p.endswith("/304"):
        return web.Response(status=304, headers={"ETag": '"v1"'})
    if p.endswith("/cookies"):
        resp = web.Response(status=201, reason="Custom Reason", text="made")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; HttpOnly")
        resp.headers["X-Odd"] = "  spaced  value"
        return resp
    if p.endswith("/gzip"):
        return web.Response(body=gzip.compress(b"z" * 1000, mtime=0),
                            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
    if p.endswith("/hop"):
        # Hop-by-hop response headers, one named in Connection: all stripped.
        return web.Response(text="hop", headers={"Connection": "X-Secret-Hop", "X-Secret-Hop": "1",
                                                 "Keep-Alive": "timeout=5", "Proxy-Authenticate": "Basic"})
    if p.endswith("/clash"):
        # Fields a filter also sets (rate_limit's RateLimit-Policy), twice and in two spellings.
        resp = web.Response(text="clash", headers={"X-Kind": "clash"})
        resp.headers.add("ratelimit-policy", "upstream-1")
        resp.headers.add("RateLimit-Policy", "upstream-2")
        return resp
    if p.endswith("/status"):
        return web.Response(status=int(request.query["s"]), text="s")
    body = orjson.dumps({"method": seen.method, "path": seen.path_qs, "len": len(seen.body)})
    return web.Response(body=body, content_type="application/json")
