"""The one way the sidecar reads a body up to a limit.

Request bodies (``Exchange.read_body``), upstream answers a filter buffers
(``ProxyResponse.read``), and every answer the sidecar's own HTTP client gets
(OAuth2 tokens, JWKS, forward_auth denials, webhook deliveries) go through
``read_limited``. ``StreamReader.read(n)`` returns only what has arrived so
far (the first chunk of a chunked answer), and ``client_max_size`` is not
enforced on a streamed body: joining chunks while counting is the only
correct bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol


class _Chunked(Protocol):
    def iter_any(self) -> AsyncIterator[bytes]: ...


Source = bytes | bytearray | AsyncIterator[bytes] | _Chunked | None

#: ``isinstance(x, WHOLE)``: a body that is all there. A constant: written
#: ``bytes | bytearray`` in place, the union is built again at every call
#: (~50 ns on the per-request path, issue 10).
WHOLE = bytes | bytearray


async def read_limited(source: Source, limit: int | None,
                       too_large: Callable[[], BaseException]) -> bytes:
    """The whole body of ``source`` (bytes, an async iterator of chunks, or an
    aiohttp ``StreamReader`` such as ``ClientResponse.content``), raising
    ``too_large()`` as soon as it passes ``limit`` bytes (None: no limit)."""
    if source is None:
        return b""
    if isinstance(source, WHOLE):
        if limit is not None and len(source) > limit:
            raise too_large()
        return bytes(source)
    chunks: Any = source.iter_any() if hasattr(source, "iter_any") else source
    parts = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if limit is not None and size > limit:
            raise too_large()
        parts.append(chunk)
    return b"".join(parts)
