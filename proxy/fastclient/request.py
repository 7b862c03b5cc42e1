"""The request head the fast client writes (compiled with the request path, setup.py).

From the fast server's header bytes when no filter looked at ``ex.headers``
(issue 10: no CIMultiDict either way), else from the mapping. Both return
``(head, payload, stream, chunked)``: the head's bytes, a bytes body (b""
when none or streamed), the body stream, and whether it goes chunked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..body import WHOLE
from ..chain import Exchange
from ..errors import UpstreamUnavailable
from ..http import HeaderLineBreak, message_head
from ..rawexchange import RawExchange

Prepared = tuple[bytes, bytes, AsyncIterator[bytes] | None, bool]

# aiohttp sends "Content-Length: 0" on bodiless requests of other methods; so do we.
NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def prepare(base_path: str, host_line: bytes, authority: str, ex: Exchange) -> Prepared:
    """The request of ``ex`` to the upstream at ``base_path`` (its ``Host``
    header prebuilt as ``host_line``, the value ``authority``)."""
    lines = ex.raw_head() if type(ex) is RawExchange else None
    if lines is not None:
        return raw_request(base_path, host_line, ex, lines)  # type: ignore[arg-type]
    return mapped_request(base_path, authority, ex)


def raw_request(base_path: str, host_line: bytes, ex: RawExchange, lines: bytes) -> Prepared:
    """The head from the forwarded header lines (``ex.raw_head()``)."""
    body = ex.body
    method = ex.method
    length = ex.raw_length
    stream = None
    payload = b""
    if body is None:
        if length is not None:
            frame = b"Content-Length: " + length + b"\r\n"
        elif method not in NO_BODY_METHODS:
            frame = b"Content-Length: 0\r\n"
        else:
            frame = b""
    elif isinstance(body, WHOLE):
        payload = bytes(body)
        if payload or length is not None or method not in NO_BODY_METHODS:
            frame = b"Content-Length: %d\r\n" % len(payload)
        else:
            frame = b""
    else:
        stream = body
        frame = (b"Content-Length: " + length + b"\r\n") if length is not None \
            else b"Transfer-Encoding: chunked\r\n"
    target = base_path + ex.path
    if ex.query:
        target += "?" + ex.query
    if "\n" in target or "\r" in target or "\n" in method or "\r" in method:
        raise UpstreamUnavailable("request line contains a line break; not sent")
    head = b"".join((f"{method} {target} HTTP/1.1\r\n".encode("utf-8", "surrogateescape"), host_line,
                     lines, frame, b"\r\n"))
    return head, payload, stream, stream is not None and length is None


def mapped_request(base_path: str, authority: str, ex: Exchange) -> Prepared:
    """The head from ``ex.headers`` (a filter looked at or replaced them)."""
    headers = ex.headers
    headers["Host"] = authority
    body = ex.body
    method = ex.method
    stream = None
    if body is None:
        payload = b""
        if method not in NO_BODY_METHODS and "Content-Length" not in headers \
                and "Transfer-Encoding" not in headers:
            headers["Content-Length"] = "0"
    elif isinstance(body, WHOLE):
        payload = bytes(body)
        if payload or "Content-Length" in headers or method not in NO_BODY_METHODS:
            headers["Content-Length"] = str(len(payload))
    else:
        payload = b""
        stream = body
        if "Content-Length" not in headers:
            headers["Transfer-Encoding"] = "chunked"
    target = base_path + ex.path
    if ex.query:
        target += "?" + ex.query
    try:
        data = message_head(f"{method} {target} HTTP/1.1", headers)
    except HeaderLineBreak:
        raise UpstreamUnavailable("request header contains a line break; not sent") from None
    return data, payload, stream, stream is not None and "Transfer-Encoding" in headers
