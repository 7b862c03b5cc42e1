"""cors: CORS for browser-facing services behind the inbound listener (Fetch standard, "CORS protocol").

```toml
[inbound.routes."/api".cors]
allow_origins = ["https://app.example.com"]   # exact origins; "*" only without credentials
allow_methods = ["GET", "POST"]
allow_headers = ["Authorization", "Content-Type"]
expose_headers = []
allow_credentials = false
max_age = "10m"
```

- A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
  from an allowed origin is answered ``204`` by the sidecar, never reaching the
  service; from any other origin ``403 cors_origin_not_allowed``.
- An actual request from an allowed origin gets ``Access-Control-Allow-Origin``
  (and ``-Allow-Credentials``, ``-Expose-Headers``), the sidecar's own errors
  included, so the page can read a 401; from another origin it is passed on
  but gets no CORS headers, and the browser keeps the answer from the page.
- The sidecar owns CORS on the route: the service's own ``Access-Control-*``
  response headers are replaced (allowed origins) or removed (others).
- Unless the origin list is ``"*"``, every answer carries ``Vary: Origin``
  (RFC 9110 12.5.5): it differs by origin, and a shared cache must not hand
  one origin's answer to another.

PRIORITY 950: inside tracing, outside headers and authentication (jwt,
forward_auth): a preflight carries no credentials, so it must be answered
before they would refuse it. Scope "inbound" (what a browser calls is the
service behind the inbound listener; outbound calls come from the service).

aiohttp-cors is not used: it configures CORS on an aiohttp ``Application``'s
router resources, and the sidecar's listeners have no router (one low-level
handler, routes compiled into filter chains), so it has nothing to attach to.
"""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict
from pydantic import Field, field_validator, model_validator

from proxy.chain import Exchange, Filter, Handler, ProxyResponse
from proxy.config import Model
from proxy.errors import SidecarError
from proxy.hookspecs import hookimpl
from proxy.http import check_header_name
from proxy.plugins import BuildContext, PluginSpec
from proxy.units import Duration

NAME = "cors"
PRIORITY = 950

_TCHAR = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# The response headers this plugin owns on its route.
_OWNED = ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Access-Control-Expose-Headers",
          "Access-Control-Allow-Methods", "Access-Control-Allow-Headers", "Access-Control-Max-Age")


class OriginNotAllowed(SidecarError):
    status, code, message = 403, "cors_origin_not_allowed", "this origin may not call this route"


class Config(Model):
    allow_origins: list[str] = Field(min_length=1)
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "HEAD", "POST"])
    allow_headers: list[str] = Field(default_factory=list)
    expose_headers: list[str] = Field(default_factory=list)
    allow_credentials: bool = False
    max_age: Duration = 0.0    # 0: no Access-Control-Max-Age (browsers then cache a preflight ~5 s)

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        out = []
        for o in v:
            if o == "*":
                out.append(o)
                continue
            scheme, sep, rest = o.partition("://")
            # An origin is scheme://host[:port] (RFC 6454 6.2), nothing after it.
            if scheme.lower() not in ("http", "https") or not sep or not rest or any(c in rest for c in "/?#*@ \t"):
                raise ValueError(f"{o!r}: an origin is \"https://host[:port]\" exactly, or \"*\"")
            # Browsers serialize scheme and host in lower case.
            out.append(o.lower())
        if "*" in out and len(out) > 1:
            raise ValueError('"*" allows every origin: list it alone')
        return out

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        for m in v:
            if m != "*" and (not m or any(c not in _TCHAR for c in m)):
                raise ValueError(f"{m!r} is not a method name")
        # Method names are case-sensitive (RFC 9110 9.1): kept as written.
        return v

    @field_validator("allow_headers", "expose_headers")
    @classmethod
    def _headers(cls, v: list[str]) -> list[str]:
        for h in v:
            if h != "*":
                check_header_name(h, forwardable=False)
        return v

    @model_validator(mode="after")
    def _credentials(self) -> "Config":
        # Fetch standard: with credentials, "*" is not a wildcard (a browser
        # refuses Access-Control-Allow-Origin: * on a credentialed request).
        if self.allow_credentials and "*" in (*self.allow_origins, *self.allow_methods, *self.allow_headers,
                                              *self.expose_headers):
            raise ValueError('"*" cannot be used with allow_credentials = true: list the origins, '
                             "methods and headers")
        return self


class CorsFilter(Filter):
    def __init__(self, config: Config) -> None:
        self.config = config
        self.any_origin = config.allow_origins == ["*"]
        self.origins = frozenset(config.allow_origins)
        self.credentials = config.allow_credentials
        self.expose = ", ".join(config.expose_headers)
        preflight = []
        if config.allow_methods:
            preflight.append(("Access-Control-Allow-Methods", ", ".join(config.allow_methods)))
        if config.allow_headers:
            preflight.append(("Access-Control-Allow-Headers", ", ".join(config.allow_headers)))
        if config.max_age:
            preflight.append(("Access-Control-Max-Age", str(int(config.max_age))))
        self.preflight = tuple(preflight)

    def _allowed(self, origin: str) -> bool:
        return self.any_origin or origin.lower() in self.origins

    def _grant(self, origin: str) -> list[tuple[str, str]]:
        h = [("Access-Control-Allow-Origin", "*" if self.any_origin else origin)]
        if self.credentials:
            h.append(("Access-Control-Allow-Credentials", "true"))
        return h

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        origin = ex.headers.get("Origin")
        vary = not self.any_origin
        if origin is not None and ex.method == "OPTIONS" and "Access-Control-Request-Method" in ex.headers:
            if not self._allowed(origin):
                ex.log[NAME] = "preflight refused"
                if vary:
                    ex.response_headers.append(("Vary", "Origin"))
                raise OriginNotAllowed()
            ex.log[NAME] = "preflight"
            headers: CIMultiDict[str] = CIMultiDict(self._grant(origin))
            headers.extend(self.preflight)
            if vary:
                headers["Vary"] = "Origin"
            return ProxyResponse(204, headers, b"")
        allowed = origin is not None and self._allowed(origin)
        if allowed:
            assert origin is not None
            # On every answer, the sidecar's own errors included (a page must
            # be able to read the 401 of an expired token).
            ex.response_headers.extend(self._grant(origin))
            if self.expose:
                ex.response_headers.append(("Access-Control-Expose-Headers", self.expose))
        try:
            resp = await call_next(ex)
        except SidecarError:
            if vary:
                ex.response_headers.append(("Vary", "Origin"))
            raise
        h = resp.headers
        for name in _OWNED:
            h.popall(name, None)
        if vary:
            # Vary may come on several lines (one list, RFC 9110 5.3); its
            # members are compared whole ("X-Origin-Hint" is not "Origin").
            lines = h.getall("Vary", [])
            tokens = {t.strip().lower() for v in lines for t in v.split(",")}
            if "origin" not in tokens and "*" not in tokens:
                h["Vary"] = ", ".join([*lines, "Origin"])
        return resp

    def describe(self) -> dict[str, Any]:
        return self.config.model_dump()


def build(config: Config, ctx: BuildContext) -> Filter:
    return CorsFilter(config)


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build, scope="inbound",
                       description="CORS preflights and response headers for browser-facing inbound routes")]
