"""The ceiling of any proxy built on the aiohttp server: aiohttp answering by
itself (low-level server, uvloop, no upstream). Not a proxy; it shows how much
of the sidecar's cost is the server it keeps.
Run: ``python -m bench.baselines.aiohttp_alone PORT``.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

BODY = b'{"ok":true,"service":"bench","items":[1,2,3,4,5,6,7,8]}'


async def handle(request: web.BaseRequest) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


def main() -> None:
    import uvloop

    port = int(sys.argv[1])

    async def run() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(web.Server(handle, access_log=None), "127.0.0.1", port, backlog=4096)
        await asyncio.Event().wait()

    uvloop.run(run())


if __name__ == "__main__":
    main()
