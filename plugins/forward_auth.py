"""forward_auth: ask an identity service whether to admit a request.

```toml
[inbound.routes."/internal".forward_auth]
url = "http://127.0.0.1:8001/auth/validate"
cache_ttl = "30s"
```
The request's ``Authorization`` (and ``Cookie``) go to ``url`` with
``X-Forwarded-Method``/``-Uri``/``-For``. A 2xx admits the request and its
``X-User-*`` headers are passed on to the service (the client's own
``X-User-*`` headers are always dropped, so they cannot be forged); 401 and
403 are relayed; anything else, or no answer, is 503 ``auth_unavailable``.
Positive answers are cached per credential for ``cache_ttl``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import aiohttp
from multidict import CIMultiDict
from pydantic import Field, field_validator

from proxy.body import read_limited
from proxy.chain import Exchange, Filter, Handler, ProxyResponse
from proxy.client import HttpClient
from proxy.config import Model
from proxy.errors import SidecarError
from proxy.hookspecs import hookimpl
from proxy.plugins import BuildContext, PluginSpec
from proxy.units import Duration

NAME = "forward_auth"
PRIORITY = 840

log = logging.getLogger("sidecar.forward_auth")


_MAX_DENIAL = 64 * 1024


class _DenialTooLarge(Exception):
    pass


class AuthUnavailable(SidecarError):
    status, code, message = 503, "auth_unavailable", "the identity service is unavailable"


class Config(Model):
    url: str
    cache_ttl: Duration = 0.0
    timeout: Duration = 2.0
    # Request headers sent to the identity service.
    forward_headers: list[str] = Field(default_factory=lambda: ["Authorization", "Cookie"])
    # Headers of the identity service's 2xx answer passed on, by prefix.
    copy_prefix: str = "X-User-"
    cache_size: int = Field(default=10_000, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("url must be an http:// or https:// URL")
        return v


class ForwardAuthFilter(Filter):
    def __init__(self, config: Config, http: HttpClient) -> None:
        self.config = config
        self.http = http
        self.prefix = config.copy_prefix.lower()
        self.cache: dict[bytes, tuple[float, list[tuple[str, str]]]] = {}
        self.timeout = aiohttp.ClientTimeout(total=config.timeout)

    def _key(self, ex: Exchange) -> bytes | None:
        parts = [ex.headers.get(h, "") for h in self.config.forward_headers]
        if not any(parts):
            return None
        # surrogateescape: aiohttp keeps a non-UTF-8 header byte as a surrogate.
        return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogateescape")).digest()

    async def _ask(self, ex: Exchange) -> tuple[int, CIMultiDict[str], bytes]:
        headers: CIMultiDict[str] = CIMultiDict()
        for h in self.config.forward_headers:
            for v in ex.headers.getall(h, []):
                headers.add(h, v)
        headers["X-Forwarded-Method"] = ex.method
        headers["X-Forwarded-Uri"] = ex.target
        headers["X-Forwarded-For"] = ex.client_ip or ""
        headers["X-Request-ID"] = ex.request_id
        try:
            async with self.http.request("GET", self.config.url, headers=headers, timeout=self.timeout) as r:
                body = b""
                if r.status in (401, 403):
                    # Relayed to the client: the whole body, bounded.
                    body = await read_limited(r.content, _MAX_DENIAL, _DenialTooLarge)
                return r.status, CIMultiDict(r.headers), body
        except _DenialTooLarge:
            log.warning("identity service %s: denial body over %d bytes", self.config.url, _MAX_DENIAL)
            raise AuthUnavailable() from None
        except Exception as e:
            log.warning("identity service %s unreachable: %s", self.config.url, type(e).__name__)
            raise AuthUnavailable() from None

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        for name in [k for k in ex.headers if k.lower().startswith(self.prefix)]:
            ex.headers.popall(name, None)
        key = self._key(ex) if self.config.cache_ttl else None
        now = time.monotonic()
        hit = self.cache.get(key) if key is not None else None
        if hit is not None and hit[0] > now:
            user = hit[1]
            ex.log[NAME] = "cached"
        else:
            status, headers, body = await self._ask(ex)
            if status in (401, 403):
                out: CIMultiDict[str] = CIMultiDict()
                for h in ("Content-Type", "WWW-Authenticate"):
                    if h in headers:
                        out[h] = headers[h]
                ex.log[NAME] = f"denied {status}"
                return ProxyResponse(status, out, body)
            if not 200 <= status < 300:
                log.warning("identity service %s answered %d", self.config.url, status)
                raise AuthUnavailable()
            user = [(k, v) for k, v in headers.items() if k.lower().startswith(self.prefix)]
            if key is not None:
                if len(self.cache) >= self.config.cache_size:
                    self.cache = {k: v for k, v in self.cache.items() if v[0] > now}
                    if len(self.cache) >= self.config.cache_size:
                        self.cache.clear()
                self.cache[key] = (now + self.config.cache_ttl, user)
            ex.log[NAME] = "admitted"
        for k, v in user:
            ex.headers.add(k, v)
        return await call_next(ex)

    def describe(self) -> dict[str, Any]:
        return {"url": self.config.url, "cache_ttl": self.config.cache_ttl, "cached": len(self.cache)}


def build(config: Config, ctx: BuildContext) -> Filter:
    return ForwardAuthFilter(config, ctx.runtime.http)


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build, scope="both",
                       description="admit requests by asking an identity service")]
