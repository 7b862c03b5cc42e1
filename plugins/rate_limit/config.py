"""The ``[rate_limit]`` policy table, validated once at load time."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from proxy.config import Model
from proxy.units import Duration

from .upstream import UpstreamQuota

KEY_KINDS = ("tenant", "client_ip", "route", "const")


def per_text(per: float) -> str:
    """"1m", "1d", "1500ms": how a window reads in a limit's default name."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if per >= size and per % size == 0:
            return f"{int(per // size)}{unit}"
    return f"{round(per * 1000)}ms"


class Limit(Model):
    requests: int = Field(ge=1)
    per: Duration
    # Requests a fresh (or long idle) key may send at once; defaults to ``requests``.
    burst: int | None = Field(default=None, ge=1)
    # Shown in RateLimit-Policy, metrics and logs; defaults to "<requests>/<per>".
    name: str | None = None

    @field_validator("per")
    @classmethod
    def _per(cls, v: float) -> float:
        if v < 0.001:
            raise ValueError("per must be at least 1ms")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        # An sf-string in RateLimit-Policy (RFC 8941 3.3.3): printable ASCII.
        if v is not None and (not v or any(not 0x20 <= ord(c) < 0x7F or c in '"\\' for c in v)):
            raise ValueError("name must be printable ASCII without quotes or backslashes")
        return v

    @property
    def label(self) -> str:
        return self.name or f"{self.requests}/{per_text(self.per)}"


def _unique(limits: list[Limit]) -> list[Limit]:
    names = [lim.label for lim in limits]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"two limits named {sorted(dup)[0]!r}: give them distinct names")
    return limits


class Override(Model):
    # "METHOD /path", "METHOD /path*" (prefix), "/path*" or "* /path*" (any method).
    match: str
    limits: list[Limit] = Field(min_length=1)

    @field_validator("match")
    @classmethod
    def _match(cls, v: str) -> str:
        parts = v.split()
        if len(parts) == 1:
            parts = ["*", parts[0]]
        if len(parts) != 2:
            raise ValueError(f"match must be \"METHOD /path\" or \"/path\", got {v!r}")
        method, path = parts
        if method != "*" and not method.isalpha():
            raise ValueError(f"{method!r} is not an HTTP method")
        if not path.startswith("/"):
            raise ValueError("the path in match must start with '/' (it is matched after the route prefix)")
        if "*" in path[:-1]:
            raise ValueError("'*' is only allowed at the end of the path (a prefix match)")
        return v

    @field_validator("limits")
    @classmethod
    def _limits(cls, v: list[Limit]) -> list[Limit]:
        return _unique(v)

    def parsed(self) -> tuple[str | None, str, bool]:
        """(method or None for any, path, is_prefix)."""
        parts = self.match.split()
        method, path = (parts if len(parts) == 2 else ["*", parts[0]])
        prefix = path.endswith("*")
        return (None if method == "*" else method.upper()), path.rstrip("*"), prefix


class Config(Model):
    # Whose quota a request uses: "header:<name>", "tenant", "client_ip", "route" or "const".
    key: str = "const"
    limits: list[Limit] = Field(default_factory=list)
    overrides: list[Override] = Field(default_factory=list)
    on_limit: Literal["reject", "queue"] = "reject"
    # Longest a queued request waits for room before it gets the 429.
    max_wait: Duration = 0.0
    # False: shadow mode (decide, count, log and send headers, refuse nothing).
    enforce: bool = True
    # Redis unreachable: True lets traffic through (counted, logged); False answers 503.
    fail_open: bool = True
    # [rate_limit.upstream]: pace to the quota the provider announces (upstream.py).
    upstream: UpstreamQuota | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if v.startswith("header:"):
            name = v[len("header:"):].strip()
            if not name or any(c in name for c in " :\r\n\t"):
                raise ValueError(f"{v!r}: header:<name> needs a valid header name")
            return "header:" + name
        if v not in KEY_KINDS:
            raise ValueError(f"key must be \"header:<name>\" or one of {', '.join(KEY_KINDS)}; got {v!r}")
        return v

    @field_validator("limits")
    @classmethod
    def _limits(cls, v: list[Limit]) -> list[Limit]:
        return _unique(v)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if not self.limits and not self.overrides and self.upstream is None:
            raise ValueError("set limits (or overrides, or [rate_limit.upstream]): "
                             "a rate limit without limits limits nothing")
        if self.on_limit == "queue" and self.max_wait <= 0:
            raise ValueError("on_limit = \"queue\" needs max_wait (how long a request may wait), e.g. \"10s\"")
        if self.on_limit == "reject" and self.max_wait > 0:
            raise ValueError("max_wait only applies with on_limit = \"queue\"")
        return self
