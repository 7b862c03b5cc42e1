"""Errors the sidecar itself answers with, and their JSON form.

Every response the sidecar produces on its own carries a JSON body
``{"type": "error", "error": {"type", "code", "message", "request_id"}}`` and ``X-Sidecar-Error: <code>``
so a service can tell a sidecar error from a provider's.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson


class SidecarError(Exception):
    """An error answered to the client as a JSON body with ``X-Sidecar-Error``."""

    status = 500
    code = "internal_error"
    message = "internal error"

    def __init__(self, message: str | None = None, *, status: int | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        if message is not None:
            self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = headers or {}
        super().__init__(self.message)


class BadRequest(SidecarError):
    status, code, message = 400, "bad_request", "malformed request"


class NoRoute(SidecarError):
    status, code, message = 404, "no_route", "no route matches this path"


class RequestTimeout(SidecarError):
    status, code, message = 408, "request_timeout", "the request head did not arrive in time"


class ExpectationFailed(SidecarError):
    status, code, message = 417, "expectation_failed", "unsupported Expect header"


class UpgradeNotSupported(SidecarError):
    status, code, message = 501, "upgrade_not_supported", "this protocol upgrade is not proxied here"


class RequestBodyTooLarge(SidecarError):
    status, code, message = 413, "request_body_too_large", "request body exceeds the configured limit"


class HeadersTooLarge(SidecarError):
    status, code, message = 431, "request_headers_too_large", "request headers exceed the configured limit"


class UpstreamError(SidecarError):
    """The upstream could not be reached or did not answer in time."""

    status, code, message = 502, "upstream_unavailable", "upstream unavailable"


class UpstreamUnavailable(UpstreamError):
    status, code, message = 502, "upstream_unavailable", "upstream unavailable"


class UpstreamTLSError(UpstreamError):
    status, code, message = 502, "upstream_tls_error", "upstream TLS handshake or certificate verification failed"


class UpstreamBadResponse(UpstreamError):
    """The upstream answered, but not with a response a proxy may relay: a
    head past the route's ``[limits]`` or one that does not parse (nginx's
    "upstream sent too big header", Envoy's UPE). Not retried: the same
    upstream would answer the same way."""

    status, code, message = 502, "upstream_bad_response", "upstream sent an invalid or oversized response head"


class UpstreamTimeout(UpstreamError):
    status, code, message = 504, "upstream_timeout", "upstream did not answer in time"


class CircuitOpen(SidecarError):
    """The upstream is known to be failing (a circuit breaker is open): not
    tried at all. Raised by the circuit_breaker plugin, or any plugin that
    fails fast the same way; ``fallback`` answers it like an UpstreamError."""

    status, code, message = 503, "circuit_open", "circuit breaker open: upstream is failing"


class ConfigError(Exception):
    """A configuration or policy set that must not reach traffic.

    ``problems`` holds one ``file: field: reason`` line per problem found.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class FieldError(ValueError):
    """A plugin's build() refusing one field of its table: reported as
    ``file: <table>.<field>: reason`` (a plain ValueError names only the table)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class RouteDisabled(SidecarError):
    status, code, message = 503, "route_disabled", "this route is turned off (enabled = false in its policy)"


def error_body(code: str, message: str, request_id: str | None) -> bytes:
    # "type" at the top and in "error" (= the code): the shape the OpenAI and
    # Anthropic SDKs read, so they show the message instead of a raw dict.
    return orjson.dumps({"type": "error", "error": {"type": code, "code": code, "message": message,
                                                    "request_id": request_id}})


#: Seconds a listener keeps reading (and discarding) what a client still sends
#: after an answer that ends the connection, before closing it: closing a socket
#: with unread bytes makes the kernel send RST, and a client that is still
#: sending (a trickled head, a body the sidecar refused) can then lose the
#: answer itself. nginx's ``lingering_close`` (30 s there; a local client needs
#: far less). The write side is shut (FIN) at once, so the client sees the end.
LINGER = 2.0


def closing_error_response(err: SidecarError, request_id: str) -> bytes:
    """A whole HTTP/1.1 response carrying ``err`` that ends the connection: what
    a listener writes to the socket itself, outside any route (a request head
    that did not arrive within header_timeout, a malformed request)."""
    body = error_body(err.code, err.message, request_id)
    try:
        reason = HTTPStatus(err.status).phrase.encode()
    except ValueError:
        reason = b""
    return (b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nX-Sidecar-Error: %b\r\n"
            b"X-Request-ID: %b\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
            % (err.status, reason, err.code.encode(), request_id.encode(), len(body), body))
