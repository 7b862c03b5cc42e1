"""Route admission, shared by every HTTP listener (both outbound servers, inbound).

What a request must pass before its route's chain runs, and how the sidecar
finishes the response headers, live here once, so the aiohttp server and the
fast server (proxy/fastserver/) cannot drift apart. A check that applies to
every request (allowed client networks, request-target rules, X-Request-ID
handling...) belongs in ``Admission.admit``.

A listener hands a ``RequestHead``: the request line, a case-insensitive
``get`` over the client's headers, and ``build`` which makes the Exchange
with the forwarded headers (the aiohttp side copies into a CIMultiDict; the
fast server keeps the raw bytes until a filter looks).
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote

from .clients import ClientAllowList
from .errors import (BadRequest, ExpectationFailed, HeadersTooLarge, NoRoute, RequestBodyTooLarge,
                     UpgradeNotSupported)
from .http import has_dot_segment, new_request_id
from .response_id import set_response_request_id

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from .chain import Exchange, ProxyResponse
    from .routes import Route
    from .runtime import Runtime


# RFC 3986 2.3: the unreserved characters (ALPHA, DIGIT, "-", ".", "_", "~"), percent-encoded.
_UNRESERVED_ESCAPE = re.compile(r"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DEde]|5[Ff]|7[Ee])")


def _unescape(m: "re.Match[str]") -> str:
    return chr(int(m.group(0)[1:], 16))


class TrustedProxies:
    """Peers whose X-Forwarded-* headers are kept and extended."""

    def __init__(self, entries: list[str]) -> None:
        self.nets = [ipaddress.ip_network(e, strict=False) for e in entries]

    def __contains__(self, addr: str | None) -> bool:
        if not self.nets or not addr:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in n for n in self.nets)


class RequestHead(Protocol):
    """What admission reads from a listener's parsed request."""

    method: str
    target: str           # the raw request target as sent
    peer: str | None
    content_length: int | None
    has_body: bool
    header_count: int
    header_size: int      # sum of len(name) + len(value) + 4 per header
    special: bool         # an Upgrade or Expect field is present (rare: else not looked up)

    def get(self, name: str) -> str | None: ...

    def build(self, route: "Route", path: str, query: str, extra: list[tuple[str, str]],
              drop_expect: bool, *, request_id: str, started: float, max_body: int,
              target: str | None = None, body_length: int | None = None, tenant: str | None = None,
              client_ip: str | None = None, deadline: float | None = None) -> "Exchange": ...


def request_id(head: RequestHead) -> str:
    """The client's X-Request-ID, or a fresh one."""
    return head.get("X-Request-ID") or new_request_id()


class Admission:
    """The checks and header rules every request passes, for one listener."""

    def __init__(self, trusted: list[str], scheme: str = "http", *, websocket: bool = False,
                 clients: ClientAllowList | None = None, keep_path: bool = False) -> None:
        self.trusted = TrustedProxies(trusted)
        self.scheme = scheme
        # The listener can relay a WebSocket (the fast server, issue 10).
        self.websocket = websocket
        # [outbound] allowed_clients (issue 12): None admits every peer (and
        # so does a list that restricts nothing: no call per request).
        self.clients = clients if clients is not None and clients.restricted else None
        # The inbound listener forwards the whole path, not the rest after the prefix.
        self.keep_path = keep_path

    def admit(self, head: RequestHead, match, rid: str, started: float) -> "tuple[Route, Exchange, bool]":
        """The route and Exchange for ``head`` (raises a SidecarError to answer);
        the flag says the client waits for ``100 Continue``."""
        if self.clients is not None:
            self.clients.check(head.peer)
        raw = head.target
        path, _, query = raw.partition("?")
        if not path.startswith("/"):
            raise BadRequest("request target must be a path (origin-form)")
        if "#" in raw:
            # RFC 9112 3.2: a fragment is never part of a request target; an
            # upstream that cuts it climbs out of its base path (issue 11).
            raise BadRequest("request target must not contain '#'")
        if has_dot_segment(path):
            raise BadRequest("path must not contain '.' or '..' segments")
        if self.keep_path and "%" in path:
            # Inbound, the service's framework routes the decoded path.
            # Escaped unreserved characters are the same URI (RFC 3986
            # 6.2.2.2): normalised, so what filters match (rate_limit's
            # per-path limits) is what the service routes ("/log%69n" is
            # "/login"). Routes are matched fully decoded, or "/api%2Fx"
            # would take a less protected enclosing route to the service's /api.
            path = _UNRESERVED_ESCAPE.sub(_unescape, path)
            m = match(unquote(path))
        else:
            m = match(path)
        if m is None:
            raise NoRoute(f"no route for {path}")
        route, rest = m
        if head.header_count > route.max_headers:
            raise HeadersTooLarge(f"more than {route.max_headers} request headers")
        if head.header_size > route.max_header_size:
            raise HeadersTooLarge(f"request headers exceed {route.max_header_size} bytes")
        get = head.get
        length = head.content_length
        upgrade = expect = None
        websocket = continue_ = False
        if head.special:
            upgrade = get("Upgrade")
            if upgrade is not None and "upgrade" in (get("Connection") or "").lower():
                # RFC 6455 4.1: a WebSocket opens with a GET. Other upgrades (h2c)
                # and listeners or upstream clients that cannot relay one are
                # refused clearly rather than forwarded without their Upgrade.
                if not (self.websocket and upgrade.strip().lower() == "websocket" and head.method == "GET"
                        and getattr(route.upstream, "upgrades", False)):
                    raise UpgradeNotSupported()
                websocket = True
            expect = get("Expect")
        if length is not None and length > route.max_body:
            raise RequestBodyTooLarge(f"request body exceeds {route.max_body} bytes")
        if expect is not None:
            # RFC 9110 10.1.1: the sidecar answers 100-continue itself once the
            # request passed the route and size checks (as nginx does) and does
            # not forward it; any other expectation is 417.
            if expect.lower() != "100-continue":
                raise ExpectationFailed(f"unsupported expectation {expect[:40]!r}")
            continue_ = head.has_body
        peer = head.peer
        host = get("Host") or ""
        extra: list[tuple[str, str]]
        if self.trusted.nets and peer in self.trusted:
            xff = get("X-Forwarded-For")
            extra = [("X-Forwarded-For", f"{xff}, {peer}" if xff else (peer or ""))]
            xfp = get("X-Forwarded-Proto")
            xfh = get("X-Forwarded-Host")
            extra.append(("X-Forwarded-Proto", xfp if xfp is not None else self.scheme))
            extra.append(("X-Forwarded-Host", xfh if xfh is not None else host))
        else:
            extra = [("X-Forwarded-For", peer or ""), ("X-Forwarded-Proto", self.scheme),
                     ("X-Forwarded-Host", host)]
        extra.append(("X-Request-ID", rid))
        if websocket:
            extra += [("Connection", "Upgrade"), ("Upgrade", upgrade or "websocket")]
        ex = head.build(route, path if self.keep_path else rest, query, extra, expect is not None,
                        request_id=rid, started=started, max_body=route.max_body, target=raw,
                        body_length=length, tenant=get(route.tenant_header), client_ip=peer,
                        deadline=started + route.total_timeout if route.total_timeout else None)
        if websocket:
            ex.vars["_websocket"] = True
        return route, ex, continue_


def admission_for(runtime: "Runtime", listener: str, *, websocket: bool = False,
                  keep_path: bool = False) -> Admission:
    """The admission of one listener: ``[outbound] allowed_clients`` binds the
    outbound listener alone (the inbound one faces the providers)."""
    out = runtime.settings.outbound
    clients = ClientAllowList(out.allowed_clients) if listener == "outbound" else None
    return Admission(out.trusted_proxies, websocket=websocket, clients=clients, keep_path=keep_path)


def finish_headers(resp: "ProxyResponse", ex: "Exchange | None", rid: str) -> "CIMultiDict[str]":
    """The response headers as they leave: the filters' ``response_headers``
    (errors included) and the X-Request-ID (the provider's own when it sent
    one: proxy/response_id.py)."""
    headers = resp.headers
    if ex is not None and ex.response_headers:
        for k, v in ex.response_headers:
            headers[k] = v
    set_response_request_id(headers, rid, ex)
    return headers


#: The extra-header names admission sets; a forwarded copy from the client is replaced.
SET_BY_SIDECAR = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-ID")
