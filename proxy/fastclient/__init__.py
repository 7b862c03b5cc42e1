"""The fast upstream client: pooled HTTP/1.1 on asyncio protocols and llhttp.

aiohttp's ClientSession costs ~75 µs per request on these machines (13k/s
alone); a bare asyncio Protocol driving httptools' llhttp parser does the same
work in ~6 µs. This module is that protocol plus what makes it correct for a
proxy: keep-alive pools with limits and idle expiry, stale-connection retry,
streaming both ways with backpressure, the no-body responses (HEAD, 204, 304),
1xx interim responses, ``Connection: close``, TLS with verification and SNI,
and connect / per-read idle / total timeouts.

It honours the same contract as ``proxy.upstream.Upstream.send``: the
response headers come back as a ProxyResponse whose body streams, and whose
``release`` returns the connection to the pool (or closes it).
"""


from .conn import Conn
from .pool import FastPools, Pool, ResumingContext, make_client_context
from .send import IDEMPOTENT, FastUpstream

__all__ = ["IDEMPOTENT", "Conn", "FastPools", "FastUpstream", "Pool", "ResumingContext", "make_client_context"]
