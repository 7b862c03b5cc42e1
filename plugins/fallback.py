"""fallback: answer with a configured static response when the upstream fails.

```toml
[fallback]
status = 200
headers = { "Content-Type" = "application/json" }
body = '{"items": [], "degraded": true}'
on_status = [500, 502, 503, 504]     # upstream statuses replaced by the fallback
```

Used when the circuit is open, when the upstream cannot be reached or does
not answer in time (after any retries), or when it answers with one of
``on_status``. The answer carries ``X-Sidecar-Fallback: 1``. Other sidecar
errors (404 no route, 413, a missing credential) are not replaced: they are
the client's or the operator's to fix, not the provider's.
"""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict
from pydantic import Field, field_validator

from proxy.chain import Exchange, Filter, Handler, ProxyResponse
from proxy.config import Model
from proxy.errors import CircuitOpen, UpstreamError
from proxy.hookspecs import hookimpl
from proxy.http import HOP_BY_HOP, check_header_name, check_header_value
from proxy.plugins import BuildContext, PluginSpec

NAME = "fallback"
PRIORITY = 760  # outermost of the resilience trio: replaces what retry gave up on

_HOP = {h.lower() for h in HOP_BY_HOP}


class Config(Model):
    status: int = Field(default=200, ge=200, le=599)
    headers: dict[str, str] = Field(default_factory=dict)
    body: str = ""
    on_status: list[int] = Field(default_factory=lambda: [500, 502, 503, 504])

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            check_header_name(name, forwardable=False)
            if name.lower() in _HOP or name.lower() == "content-length":
                raise ValueError(f"{name!r} is set by the sidecar, not by a fallback")
            check_header_value(name, value)
        return v

    @field_validator("on_status")
    @classmethod
    def _on_status(cls, v: list[int]) -> list[int]:
        for s in v:
            if not 500 <= s <= 599:
                raise ValueError(f"{s}: a fallback replaces 5xx upstream answers only")
        return v


class FallbackFilter(Filter):
    def __init__(self, config: Config) -> None:
        self.config = config
        self.status = config.status
        self.body = config.body.encode()
        self.headers = CIMultiDict(config.headers)
        self.headers["X-Sidecar-Fallback"] = "1"
        self.on_status = frozenset(config.on_status)

    def _answer(self, ex: Exchange, why: str) -> ProxyResponse:
        ex.log[NAME] = why
        return ProxyResponse(self.status, self.headers.copy(), self.body)

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        try:
            resp = await call_next(ex)
        except (UpstreamError, CircuitOpen) as e:
            # By class, not by code string: any plugin that fails fast the
            # way a breaker does raises CircuitOpen (issue 11, item 6).
            return self._answer(ex, e.code)
        if resp.status in self.on_status and resp.upstream:
            resp.close()
            return self._answer(ex, str(resp.status))
        return resp

    def describe(self) -> dict[str, Any]:
        return {"status": self.status, "on_status": sorted(self.on_status),
                "body_bytes": len(self.body)}


def build(config: Config, ctx: BuildContext) -> Filter:
    return FallbackFilter(config)


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build,
                       description="answer with a static response when the upstream fails")]
