"""HTTP rules shared by every listener: hop-by-hop headers, forwarded headers, paths."""

from __future__ import annotations

import os
import re

from multidict import CIMultiDict, CIMultiDictProxy, istr

def new_request_id() -> str:
    """A fresh X-Request-ID (128 random bits, hex)."""
    return os.urandom(16).hex()


# RFC 9110 7.6.1, plus the legacy names every proxy strips (nginx, Envoy).
HOP_BY_HOP = frozenset(istr(h) for h in (
    "Connection", "Proxy-Connection", "Keep-Alive", "TE", "Transfer-Encoding",
    "Upgrade", "Proxy-Authorization", "Proxy-Authenticate", "Trailer",
))
_HOP_LOWER = frozenset(h.lower() for h in HOP_BY_HOP)


def strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers, including those named in ``Connection``."""
    # Copy in C, then drop the few names present: 3x faster than filtering
    # every header in Python (docs/performance.md).
    out = CIMultiDict(headers)
    conn = out.get("Connection")
    for name in HOP_BY_HOP:
        if name in out:
            out.popall(name)
    if conn:
        for token in conn.split(","):
            token = token.strip()
            if token:
                out.popall(token, None)
    return out


# Dot segments, also percent-encoded (%2e), that could climb out of an
# upstream's base path once the upstream decodes them (CVE-2021-41773 style).
# An encoded slash (%2f) or a backslash (raw or %5c) separates segments too
# for upstreams that decode before normalising (Apache AllowEncodedSlashes,
# Tomcat, IIS): "/..%2f" climbs like "/../".
_SEP = r"(?:/|\\|%2f|%5c)"
_DOT_SEGMENT = re.compile(rf"(?:^|{_SEP})(?:\.|%2e){{1,2}}(?:{_SEP}|$)", re.IGNORECASE)


def has_dot_segment(raw_path: str) -> bool:
    if "." not in raw_path and "%" not in raw_path:
        return False
    return _DOT_SEGMENT.search(raw_path) is not None


# RFC 9110 5.6.2: a field name is a token; these characters are not tchars.
_NOT_TCHAR = frozenset(' :\r\n\t\x00"(),/;<=>?@[\\]{}')


def check_header_name(name: str, *, forwardable: bool = True) -> str:
    """Validate a header name from config (a ValueError becomes file: field: reason).

    With ``forwardable`` (the default) hop-by-hop names are refused too: a
    proxy drops them, so a plugin setting one would be silently ignored.
    """
    if not name or any(c in _NOT_TCHAR for c in name):
        raise ValueError(f"{name!r} is not a valid header name")
    if forwardable and name.lower() in _HOP_LOWER:
        raise ValueError(f"{name!r} is a hop-by-hop header; a proxy does not forward it")
    return name


def check_header_value(name: str, value: str) -> str:
    """Validate a header value from config. RFC 9110 5.5: no control characters
    but HTAB; CR or LF would split the message (CWE-113), and aiohttp refuses
    the others when it writes the response, failing every request."""
    for c in value:
        if (c < " " and c != "\t") or c == "\x7f":
            raise ValueError(f"header {name!r}: value must not contain a control character "
                             f"(CR, LF or NUL included), found {c!r}")
    return value
