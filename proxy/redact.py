"""Redaction, in one place: every header or query that reaches a log passes here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode

REDACTED = "[redacted]"

# Always redacted (http-rules.md: credentials); policies and config add more.
SENSITIVE_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie",
    "x-api-key", "api-key", "x-auth-token",
})


class Redactor:
    """Knows which header names and query parameters carry secrets. (The
    access log records the path only; recorded cassettes and
    /admin/simulated keep queries, with credential parameters replaced.)"""

    def __init__(self, headers: Iterable[str] = (), query_params: Iterable[str] = ()) -> None:
        self.headers = SENSITIVE_HEADERS | {h.lower() for h in headers}
        self.query_params = frozenset(q.lower() for q in query_params)

    def add(self, headers: Iterable[str] = (), query_params: Iterable[str] = ()) -> None:
        self.headers = self.headers | {h.lower() for h in headers}
        self.query_params = self.query_params | {q.lower() for q in query_params}

    def headers_dict(self, headers: Mapping[str, str], only: Iterable[str] | None = None) -> dict[str, str]:
        """The headers as a dict, secret values replaced; ``only`` limits the names kept."""
        keep = None if only is None else {h.lower() for h in only}
        out = {}
        for k, v in headers.items():
            lk = k.lower()
            if keep is not None and lk not in keep:
                continue
            out[str(k)] = REDACTED if lk in self.headers else v
        return out

    def query(self, query: str) -> str:
        """The query with credential parameters (an ``[auth] type = "query"``
        param, for instance) replaced."""
        if not query or not self.query_params:
            return query
        pairs = parse_qsl(query, keep_blank_values=True)
        return urlencode([(k, REDACTED if k.lower() in self.query_params else v) for k, v in pairs])
