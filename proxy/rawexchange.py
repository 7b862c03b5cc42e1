"""An Exchange whose request headers stay bytes until a filter looks.

The fast server (proxy/fastserver/) parses headers into a list of raw
``(name, value)`` byte pairs. Building a CIMultiDict from them, and the fast
client turning it back into bytes, cost ~3-5 µs per request (issue 10) that a
route whose filters never read ``ex.headers`` does not need to pay. So the
forwarded header lines are kept as one bytes string; ``ex.headers`` builds the
same CIMultiDict the aiohttp server would give on first access (a filter sees
no difference), and from then on that mapping is what is sent.
"""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

from .chain import Exchange

_HEADERS_SLOT = Exchange.__dict__["headers"]  # the base class's __slots__ member


class RawExchange(Exchange):
    """``headers`` is built on first access from ``_pairs`` (bytes) and ``_extra``.

    ``raw_head()`` gives the header lines to forward as bytes while nobody
    has looked (None afterwards). ``Host`` and ``Content-Length`` of the
    client are kept apart: the upstream client writes its own.
    """

    __slots__ = ("_lines", "_pairs", "_extra", "_host", "_length")

    def __init__(self, route: Any, method: str, path: str, query: str, lines: bytes | None,
                 pairs: list[tuple[bytes, bytes]], extra: list[tuple[str, str]],
                 host: bytes | None, length: bytes | None, **kw: Any) -> None:
        self._lines: bytes | None = lines
        self._pairs = pairs
        self._extra = extra
        self._host = host
        self._length = length
        Exchange.__init__(self, route, method, path, query, None, **kw)  # type: ignore[arg-type]

    @property
    def headers(self) -> CIMultiDict[str]:
        h = _HEADERS_SLOT.__get__(self)
        if h is None:
            items: list[tuple[str, str]] = []
            if self._host is not None:
                items.append(("Host", self._host.decode("utf-8", "surrogateescape")))
            items.extend([(k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                          for k, v in self._pairs])
            if self._length is not None:
                items.append(("Content-Length", self._length.decode("latin-1")))
            items.extend(self._extra)
            h = CIMultiDict(items)
            _HEADERS_SLOT.__set__(self, h)
            self._lines = None
        return h

    @headers.setter
    def headers(self, value: CIMultiDict[str] | None) -> None:
        _HEADERS_SLOT.__set__(self, value)
        if value is not None:
            self._lines = None

    def raw_head(self) -> bytes | None:
        """The forwarded header lines (each ending CRLF, no Host, no
        Content-Length) while ``headers`` was never read; else None."""
        return self._lines

    @property
    def raw_length(self) -> bytes | None:
        """The client's Content-Length value, as sent."""
        return self._length
