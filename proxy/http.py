"""HTTP rules shared by every listener: hop-by-hop headers, forwarded headers, paths."""

from __future__ import annotations

import re
import unicodedata
from email.utils import parsedate_to_datetime
from random import getrandbits as _getrandbits
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy, istr

def new_request_id() -> str:
    """A fresh X-Request-ID (128 random bits, hex).

    From the ``random`` module's generator (seeded from the OS at import and
    reseeded in every forked worker), not ``os.urandom``: a request id must be
    unique, not secret, and ``getrandom`` was one syscall per request
    (issue 10; ~2 µs end to end). ``to_bytes().hex()`` is half the cost of
    ``"%032x" %`` (~120 against ~230 ns), the same 32 hex digits."""
    return _getrandbits(128).to_bytes(16, "big").hex()


def authority(raw_host: str, port: int | None, scheme: str) -> str:
    """The Host header value for an upstream: the port only when not the
    scheme's default, and an IPv6 literal bracketed (RFC 9110 7.2, RFC 3986
    3.2.2; yarl's ``raw_host`` drops the brackets)."""
    host = f"[{raw_host}]" if ":" in raw_host else raw_host
    return host if port == (443 if scheme == "https" else 80) else f"{host}:{port}"


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


# Path segments an upstream (or something behind it) may take for "." or
# "..", so that a request climbs out of the upstream's base path: CVE-2021-41773
# (%2e), CVE-2021-42013 (%%32%65: decoded twice), IIS %u002e and overlong
# UTF-8 %c0%ae (CVE-2000-0884, CVE-2001-0333), "..;x" path parameters that
# Tomcat drops behind a proxy that did not (Orange Tsai, "Breaking Parser
# Logic", 2018), trailing NUL/space that Windows and some decoders drop, and
# NFKC look-alikes (U+FF0E, U+2024) that .NET/Java normalisers fold.
# An encoded slash (%2f) or a backslash (raw or %5c) separates segments too
# for upstreams that decode before normalising (Apache AllowEncodedSlashes,
# Tomcat, IIS): "/..%2f" climbs like "/../".
_PCT = re.compile(rb"%[uU]([0-9a-fA-F]{4})|%([0-9a-fA-F]{2})")
_OVERLONG = re.compile(rb"[\xc0\xc1][\x80-\xbf]|\xe0[\x80-\x9f][\x80-\xbf]|\xf0[\x80-\x8f][\x80-\xbf]{2}")
# Rounds of decoding tried after the raw form: "decoded twice" attacks need
# two; a third costs nothing on paths that stop changing.
_DECODE_ROUNDS = 3


def _pct(m: re.Match[bytes]) -> bytes:
    u, x = m.group(1), m.group(2)
    if u is not None:
        return chr(int(u, 16)).encode("utf-8", "surrogatepass")
    return bytes((int(x, 16),))


def _overlong(m: re.Match[bytes]) -> bytes:
    # The code point an overlong sequence spells, which a lenient decoder yields.
    b = m.group(0)
    if len(b) == 2:
        cp = ((b[0] & 0x1F) << 6) | (b[1] & 0x3F)
    elif len(b) == 3:
        cp = ((b[0] & 0x0F) << 12) | ((b[1] & 0x3F) << 6) | (b[2] & 0x3F)
    else:
        cp = ((b[0] & 0x07) << 18) | ((b[1] & 0x3F) << 12) | ((b[2] & 0x3F) << 6) | (b[3] & 0x3F)
    return chr(cp).encode("utf-8", "surrogatepass")


def _decode(path: str) -> str:
    """One round of what a lenient upstream does to a path: percent- and
    %u-decoding, overlong UTF-8 read as the code point it spells, NFKC."""
    b = path.encode("utf-8", "surrogateescape")
    if b"%" in b:
        b = _PCT.sub(_pct, b)
    if not b.isascii():
        b = _OVERLONG.sub(_overlong, b)
    out = b.decode("utf-8", "surrogateescape")
    if not out.isascii():
        out = unicodedata.normalize("NFKC", out)
    return out


# A "." or ".." segment, once ";params" (Tomcat drops them) and trailing
# NUL/space/tab (dropped by Windows and some decoders) are taken off.
_CLIMB = re.compile(r"(?:^|[/\\])\.\.?[ \t\x00]*(?:;[^/\\]*)?(?:[/\\]|$)")


def has_dot_segment(raw_path: str) -> bool:
    """Whether any segment of ``raw_path`` (no query) is, or decodes to, "." or "..".

    Hot path: a plain ASCII path with neither '.' nor '%' returns at once.
    """
    if raw_path.isascii() and "." not in raw_path and "%" not in raw_path:
        return False
    path = raw_path
    search = _CLIMB.search
    for _ in range(_DECODE_ROUNDS):
        if search(path) is not None:
            return True
        if "%" not in path and path.isascii():
            return False  # nothing left to decode
        decoded = _decode(path)
        if decoded == path:
            return False
        path = decoded
    return search(path) is not None


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


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a Retry-After header asks to wait (RFC 9110 10.2.3: delay-seconds or an
    HTTP-date; a date in the past is 0); None when absent or unreadable. The retry
    plugin and upstream quota pacing read it the same way."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


class HeaderLineBreak(ValueError):
    """A start line, header name or value holding CR or LF (CWE-113)."""


def message_head(start_line: str, headers: Any) -> bytes:
    """An HTTP/1.1 message head: the start line, one line per header, the empty line.

    SECURITY: CR or LF inside the start line, a name or a value would split
    the message (CWE-113, request or response splitting); every line must end
    exactly where it is ended here, else HeaderLineBreak.
    """
    lines = [start_line]
    lines.extend([f"{k}: {v}" for k, v in headers.items()])
    lines.append("\r\n")
    text = "\r\n".join(lines)
    n = len(lines)
    if text.count("\n") != n or text.count("\r") != n:
        raise HeaderLineBreak("a header contains a line break")
    return text.encode("utf-8", "surrogateescape")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


#: The last chunk and the empty trailer section.
LAST_CHUNK = b"0\r\n\r\n"
