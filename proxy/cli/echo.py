"""``sidecar echo``: an upstream that answers every request with what it got.

For the Quick start and for trying policies: point a policy's upstream at it
and ``curl`` shows the headers the sidecar sent, the injected credential
included (this is a tool for a developer's own machine; it binds loopback by
default).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import orjson
from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    query: dict[str, str | list[str]] = {}
    for k in dict.fromkeys(request.query.keys()):
        values = request.query.getall(k)
        query[str(k)] = values[0] if len(values) == 1 else values
    headers = request.headers
    out = {
        "method": request.method,
        "path": request.path,
        "query": query,
        "headers": {str(k): ", ".join(headers.getall(k)) for k in dict.fromkeys(headers.keys())},
        "body": body.decode("utf-8", "replace") if body else "",
    }
    return web.Response(body=orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n",
                        content_type="application/json")


def make_app() -> web.Application:
    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"echo upstream on http://{host}:{bound} (Ctrl-C to stop)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(args: argparse.Namespace) -> int:
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        print(f"sidecar echo: --listen must be host:port, got {args.listen!r}", file=sys.stderr)
        return 2
    asyncio.run(serve(host.strip("[]") or "127.0.0.1", int(port)))
    return 0
