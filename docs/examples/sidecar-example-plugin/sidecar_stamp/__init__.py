"""stamp: adds a header naming the team and route to every upstream request.

```toml
[stamp]
value = "team-a"
header = "X-Stamp"       # default
```
"""

from __future__ import annotations

from typing import Any

from proxy.plugin import (BuildContext, Duration, Exchange, Filter, Handler, Model, PluginSpec,
                          ProxyResponse, SidecarError, hookimpl)

NAME = "stamp"          # the policy table: [stamp]
PRIORITY = 450          # higher runs first (outermost); see docs/architecture.md


class Config(Model):
    header: str = "X-Stamp"
    value: str
    max_age: Duration = 60.0        # "1m", "250ms"... validated once, at load time


class Refused(SidecarError):
    status, code, message = 403, "stamp_refused", "this request may not be stamped"


class StampFilter(Filter):
    def __init__(self, config: Config, route: str) -> None:
        # Precompute here: handle() runs per request and must not parse config.
        self.header = config.header
        self.value = f"{config.value};route={route}"
        self.count = 0              # state lives on the filter and survives reloads

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        if ex.headers.get("X-No-Stamp"):
            raise Refused()                         # JSON 403 with X-Sidecar-Error: stamp_refused
        ex.headers[self.header] = self.value        # change the upstream request
        self.count += 1
        ex.log[NAME] = "stamped"                    # shows up in the access-log line
        resp = await call_next(ex)                  # the rest of the chain and the upstream
        resp.headers["X-Stamped"] = str(self.count)  # change the response
        return resp

    def describe(self) -> dict[str, Any]:
        return {"header": self.header, "count": self.count}   # shown by /admin/routes


def build(config: Config, ctx: BuildContext) -> Filter | None:
    # ctx.route is the route's name, ctx.policy the whole policy, ctx.scope
    # "outbound" or "inbound", ctx.runtime the runtime (metrics, state,
    # secrets, the shared HTTP client runtime.http). Return None to stay out
    # of this route's chain; raise ValueError for a problem only the runtime
    # can see (reported as "file: stamp: reason").
    return StampFilter(config, ctx.route)


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build, scope="both", description="stamps requests")]
