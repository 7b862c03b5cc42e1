"""The response head as bytes, framed the way aiohttp's server frames it.

The differential test (tests/proxy/test_server_differential.py) holds the two
servers to the same output: the headers the upstream or a filter gave, plus
``Date`` when absent, ``Transfer-Encoding: chunked`` for a streamed body of
unknown length on HTTP/1.1, and ``Connection`` only where HTTP/1.x needs it.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

REASONS = {s.value: s.phrase for s in HTTPStatus}
# RFC 9110 6.4.1 / 9.3.2: never a body, whatever the headers say.
EMPTY_STATUS = frozenset({204, 304, *range(100, 200)})

_date_at = 0
_date_text = ""


def http_date() -> str:
    """The Date value, formatted once per second."""
    global _date_at, _date_text
    now = int(time.time())
    if _date_at != now:
        _date_at = now
        _date_text = formatdate(now, usegmt=True)
    return _date_text


class BadHeader(ValueError):
    """A header name or value would split the response (CWE-113)."""


def serialize(version: str, status: int, reason: str | None, headers: Any) -> bytes:
    """Status line and header lines, ending with the empty line."""
    if reason is None:
        reason = REASONS.get(status, "")
    lines = [f"HTTP/{version} {status} {reason}"]
    lines.extend([f"{k}: {v}" for k, v in headers.items()])
    lines.append("\r\n")
    text = "\r\n".join(lines)
    n = len(lines)
    if text.count("\n") != n or text.count("\r") != n:
        raise BadHeader("a response header contains a line break")
    return text.encode("utf-8", "surrogateescape")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
