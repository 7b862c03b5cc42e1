"""A test plugin, innermost in a route's chain: ``[peek]`` says (response
header ``X-Peek-Raw``) whether the request head was still bytes when it ran
(proxy/rawexchange.py); ``read = true`` makes it read ``ex.headers`` first,
which builds the mapping, so a route can be put on either path;
``read_response = true`` reads ``resp.headers`` in an ``after`` (the fast
server then answers from the mapping, not from the upstream's header bytes).

Load it with ``sidecar='plugins = ["tests.support.peek"]'``.
"""

from __future__ import annotations

from proxy.chain import Exchange, Filter, ProxyResponse
from proxy.config import Model
from proxy.hookspecs import hookimpl
from proxy.plugins import BuildContext, PluginSpec
from proxy.rawexchange import RawExchange


class Config(Model):
    read: bool = False
    report: bool = True
    read_response: bool = False


class Peek(Filter):
    sync = True

    def __init__(self, config: Config) -> None:
        self.read = config.read
        self.report = config.report
        if not config.read_response:
            self.after = None  # type: ignore[assignment]

    def before(self, ex: Exchange) -> None:
        if self.read:
            ex.headers.get("X-Anything")
        if self.report:
            raw = type(ex) is RawExchange and ex.raw_head() is not None
            ex.response_headers.append(("X-Peek-Raw", "1" if raw else "0"))

    def after(self, ex: Exchange, resp: ProxyResponse) -> None:
        resp.headers.get("X-Anything")


def build(config: Config, ctx: BuildContext) -> Filter:
    return Peek(config)


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec("peek", Config, 1, build, description="reports whether the request head is still bytes")]
