"""The fast outbound server: asyncio protocols + llhttp (httptools), issue 10.

aiohttp's server costs ~24 µs of a ~70 µs proxied request (its request loop
and Task, StreamResponse, StreamWriter). This package does the same job the
way proxy/fastclient/ does the upstream side: a Protocol per connection
driving llhttp, request headers kept as bytes until a filter reads them
(proxy/rawexchange.py), the route's chain driven from the protocol callbacks,
and the response head written as one bytes buffer. Route admission is shared
with the aiohttp server (proxy/admission.py).

- ``listener``: the listening socket, max_connections, deadlines, drain
- ``protocol``: one connection: parsing, pipelining, flow control, timeouts
- ``head``: one parsed request head (raw headers, lookups on demand)
- ``body``: a request body as an async iterator with backpressure
- ``express``: a request answered from callbacks alone when nothing waits
- ``exchange``: admission, the chain, the response of one request (the coroutine path)
- ``response``: the response head as bytes
- ``drive``: running a request's coroutine without a Task when it can
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from .listener import FastServer

if TYPE_CHECKING:
    from ..admission import Admission
    from ..runtime import Runtime

__all__ = ["FastServer", "start_fast"]


async def start_fast(rt: "Runtime", match: Any, admission: "Admission", section: Any,
                     sock: socket.socket) -> FastServer:
    """Serve ``sock`` with the fast server; ``section`` is the listener's config."""
    header_timeout, keepalive, max_conns = rt.settings.limits.for_listener(section)
    limits = [rt.settings.limits] + [p.core.limits for p in rt.policies]
    size = max(lim.max_header_size for lim in limits)
    # The same parser bounds as the aiohttp server (proxy/server.py:
    # parser_limits); below them the per-route checks answer 431.
    server = FastServer(rt, match, admission, header_timeout=header_timeout, keepalive_timeout=keepalive,
                        max_connections=max_conns, max_line=max(size, 8190), max_field=max(size, 8190),
                        max_headers=max(lim.max_headers for lim in limits) + 1)
    await server.start(sock)
    server.port = sock.getsockname()[1]
    return server
