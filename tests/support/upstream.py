"""Fake upstreams: small aiohttp servers on port 0 that record what they received."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


@dataclass
class Seen:
    """One request as the fake upstream received it."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Responder = Callable[[web.Request, Seen], Awaitable[web.StreamResponse]]


async def serve(app: web.Application, port: int = 0, **site_kw: Any) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1 (port 0: a free one); returns the runner and the port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, **site_kw)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def echo(request: web.Request, seen: Seen) -> web.StreamResponse:
    return web.json_response({"method": seen.method, "path": seen.path_qs,
                              "headers": dict(seen.headers), "body_len": len(seen.body)})


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


class FakeUpstream:
    """Records every request; answers with ``responder`` (default: JSON echo).

    Replace ``responder`` in a test to script failures, hangs, streams.
    """

    def __init__(self, responder: Responder = echo, *, read_body: bool = True) -> None:
        self.responder = responder
        self.read_body = read_body
        self.seen: list[Seen] = []
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read() if self.read_body else b""
        seen = Seen(request.method, request.path_qs, CIMultiDict(request.headers), body,
                    list(request.raw_headers))
        self.seen.append(seen)
        return await self.responder(request, seen)

    async def start(self, port: int = 0) -> "FakeUpstream":
        app = web.Application(client_max_size=1024**4)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner, self.port = await serve(app, port)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll until ``predicate()`` is truthy (fails the test after ``timeout``)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


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
