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

from ..http import message_head

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


def serialize(version: str, status: int, reason: str | None, headers: Any) -> bytes:
    """Status line and header lines, ending with the empty line (HeaderLineBreak
    when a header would split the response)."""
    if reason is None:
        reason = REASONS.get(status, "")
    return message_head(f"HTTP/{version} {status} {reason}", headers)
