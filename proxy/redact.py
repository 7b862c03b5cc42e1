"""Redaction, in one place: every header or query that reaches a log passes here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

REDACTED = "[redacted]"

# Always redacted (http-rules.md: credentials); policies and config add more.
SENSITIVE_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie",
    "x-api-key", "api-key", "x-auth-token",
})


class Redactor:
    """Knows which header names carry secrets. (No query string reaches a
    log: the access log records the path only.)"""

    def __init__(self, headers: Iterable[str] = ()) -> None:
        self.headers = SENSITIVE_HEADERS | {h.lower() for h in headers}

    def add(self, headers: Iterable[str] = ()) -> None:
        self.headers = self.headers | {h.lower() for h in headers}

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
