"""An Exchange whose request headers stay bytes until a filter looks.

The fast server (proxy/fastserver/) parses headers into a list of raw
``(name, value)`` byte pairs. Building a CIMultiDict from them, and the fast
client turning it back into bytes, cost ~3-5 µs per request (issue 10) that a
route whose filters never read ``ex.headers`` does not need to pay. So the
forwarded header lines are kept as one bytes string; ``ex.headers`` builds the
same CIMultiDict the aiohttp server would give on first access (a filter sees
no difference), and from then on that mapping is what is sent.

The header-editing methods of Exchange (``has_header``, ``set_header``,
``remove_header``, ``rename_header``) work on the bytes while nobody has
looked: the lines, the pairs and the extra headers are edited together, so
that a later ``ex.headers`` is exactly the mapping the same edits would have
produced there. An edit that cannot stay on bytes with that guarantee (a
name that is not an RFC 9110 token, ``Host`` or ``Content-Length``, which are
kept apart, a value with CR or LF that the fast client must refuse, CWE-113)
builds the mapping and edits it instead.
"""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

from .chain import Exchange, ProxyResponse
from .http import _NOT_TCHAR

_HEADERS_SLOT = Exchange.__dict__["headers"]  # the base class's __slots__ member
_set_headers = _HEADERS_SLOT.__set__
_new = object.__new__

# name -> its lowercase bytes, the key of ``RawExchange._names``; b"" for a
# name that is not an RFC 9110 token (such an edit is made on the mapping).
_KEYS: dict[str, bytes] = {}
_KEYS_MAX = 1024
# Kept apart from the lines (the upstream client writes its own).
_APART = frozenset({b"host", b"content-length"})


def _key(name: str) -> bytes:
    k = _KEYS.get(name)
    if k is None:
        if name.isascii() and name and not any(c in _NOT_TCHAR for c in name):
            k = name.lower().encode("ascii")
        else:
            k = b""
        if len(_KEYS) >= _KEYS_MAX:  # names made up per request: stay bounded
            _KEYS.clear()
        _KEYS[name] = k
    return k


def _line(name: str, value: str) -> bytes | None:
    """``name: value`` CRLF as the mapping path would send it, or None when
    the value cannot go out on bytes unchanged: a line break (the fast
    client refuses the request, CWE-113) or a string that does not survive
    the utf-8/surrogateescape round trip a later ``ex.headers`` makes."""
    if "\r" in value or "\n" in value:
        return None
    try:
        v = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    if v.decode("utf-8", "surrogateescape") != value:
        return None
    return name.encode("ascii") + b": " + v + b"\r\n"


class RawExchange(Exchange):
    """``headers`` is built on first access from ``_pairs`` (bytes) and ``_extra``.

    ``raw_head()`` gives the header lines to forward as bytes while nobody
    has looked (None afterwards). ``Host`` and ``Content-Length`` of the
    client are kept apart: the upstream client writes its own.
    """

    __slots__ = ("_lines", "_pairs", "_extra", "_host", "raw_length", "_names")

    _lines: bytes | None
    _pairs: list[tuple[bytes, bytes]]
    _extra: list[tuple[str, str]]
    _host: bytes | None
    raw_length: bytes | None  # the client's Content-Length value, as sent
    _names: set[bytes] | None  # lowercase names present (built by the first edit)

    @staticmethod
    def new(route: Any, method: str, path: str, query: str, lines: bytes | None,
            pairs: list[tuple[bytes, bytes]], extra: list[tuple[str, str]], host: bytes | None,
            length: bytes | None, request_id: str, started: float, max_body: int, target: str,
            body_length: int | None, tenant: str | None, client_ip: str | None,
            deadline: float | None) -> "RawExchange":
        """The exchange (made only this way), every argument positional: the
        fields of ``Exchange.__init__`` and RawExchange's own, set directly.
        A class call with an ``__init__`` chained to ``Exchange.__init__``,
        keywords at each hop, cost ~10k instructions of the 130k of a plain
        request (callgrind, issue 10); this is one plain function call.
        tests/proxy/test_header_edits.py checks every slot is set, as
        ``Exchange(...)`` sets it."""
        ex = _new(RawExchange)
        ex._lines = lines
        ex._pairs = pairs
        ex._extra = extra
        ex._host = host
        ex.raw_length = length
        ex._names = None
        _set_headers(ex, None)
        ex.route = route
        ex.method = method
        ex.path = path
        ex.query = query
        ex.body = None
        ex.target = target
        ex.body_length = body_length
        ex.tenant = tenant
        ex.request_id = request_id
        ex.client_ip = client_ip
        ex.started = started
        ex.deadline = deadline
        ex.response_headers = []
        ex.log = {}
        ex.attempt = 1
        ex.vars = {}
        ex._max_body = max_body
        return ex

    @property
    def headers(self) -> CIMultiDict[str]:
        h = _HEADERS_SLOT.__get__(self)
        if h is None:
            items: list[tuple[str, str]] = []
            if self._host is not None:
                items.append(("Host", self._host.decode("utf-8", "surrogateescape")))
            items.extend([(k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                          for k, v in self._pairs])
            if self.raw_length is not None:
                items.append(("Content-Length", self.raw_length.decode("latin-1")))
            items.extend(self._extra)
            h = CIMultiDict(items)
            _HEADERS_SLOT.__set__(self, h)
            self._lines = self._names = None
        return h

    @headers.setter
    def headers(self, value: CIMultiDict[str] | None) -> None:
        _HEADERS_SLOT.__set__(self, value)
        if value is not None:
            self._lines = self._names = None

    def raw_head(self) -> bytes | None:
        """The forwarded header lines (each ending CRLF, no Host, no
        Content-Length) while ``headers`` was never read; else None."""
        return self._lines

    # ---- header edits on the bytes (Exchange's API, same semantics) ----------
    # ``_names`` is the set of the lowercase names present (Host and
    # Content-Length included), built by the first edit; None again after an
    # edit that takes lines out, and once the mapping exists.

    def _lookup(self) -> set[bytes]:
        names: set[bytes] = set()
        add = names.add  # a plain loop: no comprehension frame (~0.2 µs)
        for k, _ in self._pairs:
            add(k.lower())
        for n, _ in self._extra:
            add(_KEYS.get(n) or _key(n))
        if self._host is not None:
            add(b"host")
        if self.raw_length is not None:
            add(b"content-length")
        self._names = names
        return names

    def has_header(self, name: str) -> bool:
        names = self._names
        if names is None:
            if self._lines is None:  # looked at: the mapping
                return name in self.headers
            names = self._lookup()
        k = _KEYS.get(name) or _key(name)
        if k:
            return k in names
        return name in self.headers

    def set_header(self, name: str, value: str) -> None:
        names = self._names
        if names is None:
            if self._lines is None:
                self.headers[name] = value
                return
            names = self._lookup()
        k = _KEYS.get(name) or _key(name)
        if k and k not in names and value.isascii() and value.isprintable() and k not in _APART:
            # The common case: a plain value for a header the request does not
            # have (a credential, a configured header), appended.
            self._lines += f"{name}: {value}\r\n".encode()  # type: ignore[operator]
            names.add(k)
            self._extra.append((name, value))
            return
        if k and k not in _APART:
            line = _line(name, value)
            if line is not None:
                if k in names:
                    self._edit(k, name, [value])
                else:
                    self._lines += line  # type: ignore[operator]
                    names.add(k)
                    self._extra.append((name, value))
                return
        self.headers[name] = value

    def remove_header(self, name: str) -> None:
        names = self._names
        if names is None:
            if self._lines is None:
                self.headers.popall(name, None)
                return
            names = self._lookup()
        k = _KEYS.get(name) or _key(name)
        if k and k not in _APART:
            if k in names:
                self._edit(k, None, [])
            return
        self.headers.popall(name, None)

    def rename_header(self, old: str, new: str) -> None:
        names = self._names
        if names is None:
            if self._lines is None:
                Exchange.rename_header(self, old, new)
                return
            names = self._lookup()
        k = _KEYS.get(old) or _key(old)
        kn = _KEYS.get(new) or _key(new)
        if k and kn and k not in _APART and kn not in _APART:
            if k in names:
                self._edit(k, new, None)
            return
        Exchange.rename_header(self, old, new)

    def save_headers(self) -> Any:
        if self._lines is not None:
            return (self._lines, self._pairs[:], self._extra[:])
        return Exchange.save_headers(self)

    def restore_headers(self, saved: Any) -> None:
        if saved.__class__ is tuple:
            lines, pairs, extra = saved
            _HEADERS_SLOT.__set__(self, None)
            self._lines, self._pairs, self._extra, self._names = lines, pairs[:], extra[:], None
        else:
            self.headers = saved.copy()

    def _edit(self, k: bytes, name: str | None, values: list[str] | None) -> None:
        """The headers named by key ``k`` (present) are taken out; then
        ``values`` = [v]: ``name: v`` takes the place of the first one (set);
        ``values`` = []: nothing more (remove); ``values`` None: each
        value taken out is appended as ``name: value`` (rename)."""
        lb = k
        ln = lb.decode("ascii")
        pairs: list[tuple[bytes, bytes]] = []
        extra: list[tuple[str, str]] = []
        taken: list[str] = []
        for p in self._pairs:
            if p[0].lower() != lb:
                pairs.append(p)
            elif values is None:
                taken.append(p[1].decode("utf-8", "surrogateescape"))
            elif values and not taken:
                assert name is not None
                pairs.append((name.encode("ascii"), values[0].encode("utf-8", "surrogateescape")))
                taken.append(values[0])
        for e in self._extra:
            if e[0].lower() != ln:
                extra.append(e)
            elif values is None:
                taken.append(e[1])
            elif values and not taken:
                assert name is not None
                extra.append((name, values[0]))
                taken.append(values[0])
        if values is None:
            assert name is not None
            extra.extend([(name, v) for v in taken])
        self._pairs = pairs
        self._extra = extra
        lines = [b"%b: %b\r\n" % p for p in pairs]
        lines.append("".join([f"{a}: {b}\r\n" for a, b in extra]).encode("utf-8", "surrogateescape"))
        self._lines = b"".join(lines)
        self._names = None


_RESP_HEADERS_SLOT = ProxyResponse.__dict__["headers"]
_set_resp_headers = _RESP_HEADERS_SLOT.__set__


class RawResponse(ProxyResponse):
    """An upstream response whose header fields stay bytes until someone
    looks (issue 10: "the same for response headers on the way back").

    ``headers`` builds the CIMultiDict on first access (reading or editing it
    is as with any ProxyResponse); until then ``raw_headers()`` gives the
    forwarded ``(name, value)`` byte pairs, and the fast server writes the
    answer from them (proxy/fastserver/express.py ``_raw_answer``). A filter
    whose ``after`` reads only the status (the circuit breaker) keeps it so.
    """

    __slots__ = ("_pairs",)

    _pairs: list[tuple[bytes, bytes]] | None

    @staticmethod
    def new(status: int, pairs: list[tuple[bytes, bytes]], body: Any, reason: str | None,
            release: Any) -> "RawResponse":
        """An upstream's response (made only this way, by the fast client),
        every argument positional: a plain call, not a class call with
        keywords (as ``RawExchange.new``)."""
        r = _new(RawResponse)
        r.status = status
        r.reason = reason
        _set_resp_headers(r, None)
        r._pairs = pairs
        r.body = body
        r._release = release
        r.upstream = True
        return r

    @property
    def headers(self) -> CIMultiDict[str]:
        h = _RESP_HEADERS_SLOT.__get__(self)
        if h is None:
            pairs = self._pairs or ()
            h = CIMultiDict([(k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                             for k, v in pairs])
            _RESP_HEADERS_SLOT.__set__(self, h)
            self._pairs = None
        return h

    @headers.setter
    def headers(self, value: CIMultiDict[str]) -> None:
        _RESP_HEADERS_SLOT.__set__(self, value)
        self._pairs = None

    def raw_headers(self) -> list[tuple[bytes, bytes]] | None:
        """The header fields as bytes while ``headers`` was never read; else None."""
        return self._pairs

    # The header API on the bytes while nobody looked (same results as on
    # the mapping: tests/proxy/test_express.py compares both answers line
    # for line). A name that is not ASCII or a value with a line break goes
    # to the mapping, whose serialisation refuses it (CWE-113).

    def has_header(self, name: str) -> bool:
        pairs = self._pairs
        if pairs is None or not name.isascii():
            return name in self.headers
        lk = name.lower().encode("ascii")
        return any(k.lower() == lk for k, _ in pairs)

    def set_header(self, name: str, value: str) -> None:
        pairs = self._pairs
        edited = None if pairs is None else set_fields(pairs, [(name, value)])
        if edited is None:
            self.headers[name] = value
            return
        self._pairs = edited

    def remove_header(self, name: str) -> None:
        pairs = self._pairs
        if pairs is None or not name.isascii():
            self.headers.popall(name, None)
            return
        lk = name.lower().encode("ascii")
        self._pairs = [(k, v) for k, v in pairs if k.lower() != lk]

    def rename_header(self, old: str, new: str) -> None:
        pairs = self._pairs
        if pairs is None or not old.isascii() or not new.isascii() or "\r" in new or "\n" in new:
            ProxyResponse.rename_header(self, old, new)
            return
        lk = old.lower().encode("ascii")
        values = [v for k, v in pairs if k.lower() == lk]
        if values:
            name = new.encode("ascii")
            self._pairs = [(k, v) for k, v in pairs if k.lower() != lk] + [(name, v) for v in values]


def raw_settable(name: str, value: str) -> bool:
    """Whether ``name: value`` can go into header bytes as they are: an ASCII
    name and no line break (else the mapping, whose serialisation refuses it)."""
    return name.isascii() and "\r" not in name and "\n" not in name and "\r" not in value and "\n" not in value


# Header names set on response bytes (rate_limit's five, the headers
# plugin's): name -> (as sent, lowercase), or None when it cannot go out as
# bytes (not ASCII, a line break). Bounded like _KEYS.
_FIELD_NAMES: dict[str, tuple[bytes, bytes] | None] = {}


def _field_name(name: str) -> tuple[bytes, bytes] | None:
    got = _FIELD_NAMES.get(name, False)
    if got is False:
        got = None
        if raw_settable(name, ""):
            raw = name.encode("ascii")
            got = (raw, raw.lower())
        if len(_FIELD_NAMES) >= _KEYS_MAX:
            _FIELD_NAMES.clear()
        _FIELD_NAMES[name] = got
    return got  # type: ignore[return-value]


def set_fields(pairs: list[tuple[bytes, bytes]], edits: list[tuple[str, str]]) -> list[tuple[bytes, bytes]] | None:
    """``pairs`` after consecutive ``CIMultiDict.__setitem__(name, value)``
    for each of ``edits``: the first field of a name replaced in place with the
    last edit's spelling and value, the others of that name dropped, names not
    there (rate_limit's, the common case) appended in the order first set.
    None when a name or value needs the mapping's checks (not ASCII, a line
    break; see ``raw_settable``). One pass over the fields, whatever the
    number of edits."""
    if not edits:
        return pairs
    emap: dict[bytes, tuple[bytes, bytes]] = {}   # lowercase name -> the field as it goes out
    for name, value in edits:
        nm = _FIELD_NAMES.get(name) or _field_name(name)
        if nm is None or "\r" in value or "\n" in value:
            return None
        emap[nm[1]] = (nm[0], value.encode("utf-8", "surrogateescape"))
    placed: set[bytes] = set()
    out: list[tuple[bytes, bytes]] = []
    for k, v in pairs:
        lk = k.lower()
        if lk in emap:
            if lk not in placed:
                placed.add(lk)
                out.append(emap[lk])
            continue
        out.append((k, v))
    for lk, field in emap.items():
        if lk not in placed:
            out.append(field)
    return out
