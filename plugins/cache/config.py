"""The ``[cache]`` policy table."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from proxy.config import Model
from proxy.http import check_header_name
from proxy.units import Duration, Size


# RFC 9110 15.1: statuses cacheable by default (heuristically), minus 206 (this
# cache does not store or combine partial content).
DEFAULT_STATUSES = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501]


def _header_names(v: list[str]) -> list[str]:
    out = []
    for name in v:
        out.append(check_header_name(name).lower())
    return sorted(set(out))


class Config(Model):
    # Freshness given to a response that carries none of its own (no s-maxage,
    # max-age or Expires). 0: store only what the response says is fresh.
    ttl: Duration = 0.0
    # Upper bound on any stored lifetime, whatever the response asks for.
    max_ttl: Duration = 86400.0
    # Largest response body kept; bigger ones are streamed through, not stored.
    max_body: Size = 1024 * 1024
    methods: list[str] = Field(default_factory=lambda: ["GET", "HEAD"])
    statuses: list[int] = Field(default_factory=lambda: list(DEFAULT_STATUSES))
    # Request headers a response may Vary on; a response that varies on any
    # other header is not stored (Envoy's allowed_vary_headers): each allowed
    # header multiplies the entries one URL can take.
    vary_headers: list[str] = Field(default_factory=lambda: ["Accept", "Accept-Encoding",
                                                             "Accept-Language", "Origin"],
                                    validate_default=True)
    # Extra request headers that are always part of the key.
    key_headers: list[str] = Field(default_factory=list)
    # Store responses to credentialed requests (a client Authorization header,
    # or a route whose [auth] injects one) even without public/s-maxage/
    # must-revalidate; their keys then include the tenant and credential.
    authorized: bool = False
    # Defaults for responses that do not say (RFC 5861); a response's own
    # stale-if-error / stale-while-revalidate wins.
    stale_if_error: Duration = 0.0
    stale_while_revalidate: Duration = 0.0
    # Keep entries with a validator (ETag, Last-Modified) this long after they
    # go stale, to revalidate them with a conditional request (Varnish's keep).
    keep: Duration = 0.0
    # "auto": Redis when [state] backend = "redis", memory otherwise.
    store: Literal["auto", "memory", "redis"] = "auto"
    # Memory store bounds (per route, least recently used entries go first).
    max_entries: int = Field(default=10_000, ge=1)
    max_memory: Size = 64 * 1024 * 1024
    # Concurrent misses for one key wait for the first one's response
    # (nginx proxy_cache_lock), at most lock_timeout.
    lock: bool = True
    lock_timeout: Duration = 5.0

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        out = sorted({m.upper() for m in v})
        for m in out:
            if m not in ("GET", "HEAD"):
                raise ValueError(f"{m} cannot be cached: only GET and HEAD are (a {m} body is not "
                                 "part of the key, and unsafe methods must reach the upstream)")
        if not out:
            raise ValueError("at least one method (GET or HEAD)")
        return out

    @field_validator("statuses")
    @classmethod
    def _statuses(cls, v: list[int]) -> list[int]:
        for s in v:
            if not 200 <= s <= 599:
                raise ValueError(f"{s} is not a final response status (200-599)")
            if s == 206:
                raise ValueError("206 partial content is not cached (range requests bypass the cache)")
            if s == 304:
                raise ValueError("304 is a revalidation answer, not a storable response")
        return sorted(set(v))

    @field_validator("vary_headers")
    @classmethod
    def _vary(cls, v: list[str]) -> list[str]:
        return _header_names(v)

    @field_validator("key_headers")
    @classmethod
    def _key(cls, v: list[str]) -> list[str]:
        names = _header_names(v)
        if "authorization" in names:
            raise ValueError("do not key on Authorization: set authorized = true, which keys "
                             "by tenant and credential")
        return names

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        if self.max_body > self.max_memory:
            raise ValueError(f"max_body ({self.max_body}) is larger than max_memory ({self.max_memory})")
        if self.ttl > self.max_ttl:
            raise ValueError(f"ttl ({self.ttl}s) is longer than max_ttl ({self.max_ttl}s)")
        return self
