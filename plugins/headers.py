"""headers: set, remove and rename request and response headers.

```toml
[headers]
request = { set = { "X-Env" = "prod" }, remove = ["X-Debug"], rename = { "X-Old" = "X-New" } }
response = { set = { "X-Served-By" = "sidecar" }, remove = ["Server"] }
```
Order within a direction: rename, then remove, then set.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from proxy.chain import Exchange, Filter, ProxyResponse
from proxy.config import Model
from proxy.hookspecs import hookimpl
from proxy.http import check_header_name, check_header_value
from proxy.plugins import BuildContext, PluginSpec

NAME = "headers"
PRIORITY = 900  # outermost after tracing: later plugins see the rewritten request


class HeaderOps(Model):
    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)
    rename: dict[str, str] = Field(default_factory=dict)

    @field_validator("set")
    @classmethod
    def _set_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            check_header_name(name)
            check_header_value(name, value)
        return v

    @field_validator("rename")
    @classmethod
    def _rename_names(cls, v: dict[str, str]) -> dict[str, str]:
        for old, new in v.items():
            check_header_name(old)
            check_header_name(new)
        return v

    @property
    def empty(self) -> bool:
        return not (self.set or self.remove or self.rename)


class Config(Model):
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()


class _Ops:
    """A direction's operations as tuples, built once (no pydantic attribute
    or dict-view work per request)."""

    __slots__ = ("rename", "remove", "set")

    def __init__(self, ops: HeaderOps) -> None:
        self.rename = tuple(ops.rename.items())
        self.remove = tuple(ops.remove)
        self.set = tuple(ops.set.items())


def _apply(ops: _Ops, target: Exchange | ProxyResponse) -> None:
    # Through the header API, not .headers: on the fast server the request
    # head and the upstream's response head then stay bytes
    # (proxy/rawexchange.py RawExchange, RawResponse).
    for old, new in ops.rename:
        target.rename_header(old, new)
    for name in ops.remove:
        target.remove_header(name)
    for name, value in ops.set:
        target.set_header(name, value)


class HeadersFilter(Filter):
    # Never awaits: a sync layer (proxy/chain.py), fused with its sync neighbours.
    sync = True

    def __init__(self, config: Config) -> None:
        self.req = None if config.request.empty else _Ops(config.request)
        self.resp = None if config.response.empty else _Ops(config.response)
        self.config = config
        # A direction with nothing to do is no step at all in the chain.
        if self.req is None:
            self.before = None  # type: ignore[assignment]
        if self.resp is None:
            self.after = None  # type: ignore[assignment]

    def before(self, ex: Exchange) -> None:
        _apply(self.req, ex)  # type: ignore[arg-type]

    def after(self, ex: Exchange, resp: ProxyResponse) -> None:
        _apply(self.resp, resp)  # type: ignore[arg-type]

    def describe(self) -> dict[str, Any]:
        return self.config.model_dump()


def build(config: Config, ctx: BuildContext) -> Filter | None:
    if config.request.empty and config.response.empty:
        return None
    return HeadersFilter(config)


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build, scope="both", description="set, remove and rename headers")]
