"""The naive Python reverse proxy: aiohttp server + one ClientSession, uvloop.

This is what most Python proxies look like; it is the reference the sidecar
must beat by 3.5x. Run: ``python -m bench.baselines.naive_aiohttp PORT UPSTREAM_URL``.
"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection", "host"}


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    import uvloop

    uvloop.install()
    session: aiohttp.ClientSession | None = None

    async def on_startup(app: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(auto_decompress=False,
                                        connector=aiohttp.TCPConnector(limit=100))

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.raw_path.removeprefix("/bench")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        data = request.content if request.body_exists else None
        assert session is not None  # on_startup ran
        async with session.request(request.method, upstream + path, headers=headers, data=data,
                                   allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status,
                                      headers={k: v for k, v in up.headers.items() if k.lower() not in HOP
                                               and k.lower() != "content-length"})
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=1024**4)
    app.on_startup.append(on_startup)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=lambda *a: print("ready", flush=True))


if __name__ == "__main__":
    main()
