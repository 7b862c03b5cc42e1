"""jwt: admit requests carrying a valid ``Authorization: Bearer <JWT>``.

```toml
[inbound.routes."/api".jwt]
secret = "env:JWT_SECRET"          # HS256 (a secret reference), or:
# jwks_url = "https://id.example/.well-known/jwks.json"   # RS256/ES256, cached
issuer = "https://id.example"
audience = "orders"
leeway = "30s"
```
A missing, malformed, badly signed, expired or mis-addressed token gets 401
``token_invalid`` (with ``WWW-Authenticate: Bearer error="invalid_token"``,
RFC 6750 3.1). The verified claims are left in ``ex.vars["jwt"]``.
"""

from __future__ import annotations

import asyncio
import math
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import jwt
import orjson
from pydantic import Field, model_validator

from proxy.body import read_limited
from proxy.chain import Exchange, Filter, Handler, ProxyResponse
from proxy.client import HttpClient
from proxy.logs import Identity
from proxy.config import Model
from proxy.errors import SidecarError
from proxy.hookspecs import hookimpl
from proxy.plugins import BuildContext, PluginSpec
from proxy.secrets import SecretRef
from proxy.units import Duration

if TYPE_CHECKING:
    from jwt.types import Options

NAME = "jwt"
PRIORITY = 850  # after tracing and headers, before rate limiting: reject strangers early

log = logging.getLogger("sidecar.jwt")

_ASYMMETRIC = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA")
_HMAC = ("HS256", "HS384", "HS512")


class TokenInvalid(SidecarError):
    status, code, message = 401, "token_invalid", "bearer token missing or invalid"


class JwksUnavailable(SidecarError):
    status, code, message = 503, "auth_unavailable", "the token signing keys cannot be fetched"


class Config(Model):
    secret: str | None = None           # HMAC key (reference or literal)
    jwks_url: str | None = None         # JSON Web Key Set for RS*/ES*/PS*/EdDSA tokens
    algorithms: list[str] | None = None  # default: HS256 with secret, RS256+ES256 with jwks_url
    issuer: str | None = None
    audience: str | list[str] | None = None
    leeway: Duration = 0.0
    jwks_cache_ttl: Duration = 300.0
    # Claims every token must carry.
    required_claims: list[str] = Field(default_factory=lambda: ["exp"])

    @model_validator(mode="after")
    def _one_key_source(self) -> "Config":
        if (self.secret is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of secret (HS256) or jwks_url (RS256/ES256)")
        if self.jwks_url is not None and not self.jwks_url.startswith(("http://", "https://")):
            raise ValueError("jwks_url must be an http:// or https:// URL")
        allowed = _HMAC if self.secret is not None else _ASYMMETRIC
        for alg in self.algorithms or []:
            if alg not in allowed:
                # Mixing HMAC and public-key algorithms is the classic
                # algorithm-confusion hole (CVE-2015-9235 family).
                raise ValueError(f"algorithm {alg!r} does not fit {'secret' if self.secret else 'jwks_url'}"
                                 f" (allowed: {', '.join(allowed)})")
        return self


# Seconds between fetches after an unknown kid or a failed fetch.
_REFETCH = 10.0
_JWKS_MAX = 1024 * 1024


class JwksTooLarge(ValueError):
    """A JWKS answer past 1 MiB: refused like an unreachable endpoint."""


class Jwks:
    """A cached key set, refetched by the first request that finds it stale
    (others wait on the lock); a token with an unknown ``kid`` triggers a
    refresh (key rotation), at most one per 10 s. A failed fetch is not retried
    for 10 s either: the cached keys go on serving meanwhile, and no request
    queues behind another fetch with its 5 s timeout."""

    def __init__(self, url: str, ttl: float, http: HttpClient) -> None:
        self.url = url
        self.http = http
        self.ttl = ttl
        self.keys: dict[str | None, Any] = {}
        # -inf, not 0.0: time.monotonic() counts from boot, and on a machine up
        # for less than the TTL a 0.0 made the first fetch look like a recent miss.
        self.fetched = -math.inf
        self._last_miss = -math.inf
        self._retry_at = 0.0
        self._lock = asyncio.Lock()

    async def _fetch(self) -> None:
        async with self.http.request("GET", self.url, timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status != 200:
                raise JwksUnavailable(f"JWKS endpoint answered {r.status}")
            # Bounded like every body the sidecar reads for itself (a key set is a few KiB).
            data = orjson.loads(await read_limited(r.content, _JWKS_MAX, JwksTooLarge))
        keys: dict[str | None, Any] = {}
        for k in jwt.PyJWKSet.from_dict(data).keys:
            keys[k.key_id] = k
        self.keys, self.fetched = keys, time.monotonic()

    def _due(self, kid: str | None) -> bool:
        now = time.monotonic()
        if now < self._retry_at:
            return False
        # An unknown kid (key rotation) refetches at once, then at most every 10 s,
        # so tokens with made-up kids cannot hammer the identity provider.
        return now - self.fetched > self.ttl or (kid not in self.keys and now - self._last_miss > _REFETCH)

    async def key(self, kid: str | None) -> Any:
        if self._due(kid):
            async with self._lock:
                if self._due(kid):
                    if time.monotonic() - self.fetched <= self.ttl:
                        self._last_miss = time.monotonic()
                    try:
                        await self._fetch()
                    except Exception as e:
                        self._retry_at = time.monotonic() + _REFETCH
                        if not self.keys:
                            if isinstance(e, JwksUnavailable):
                                raise
                            raise JwksUnavailable(f"JWKS fetch failed: {type(e).__name__}") from None
                        log.warning("JWKS refresh from %s failed (%s); using the cached keys",
                                    self.url, type(e).__name__)
        if not self.keys:
            raise JwksUnavailable("JWKS fetch failed recently; retrying shortly")
        got = self.keys.get(kid)
        if got is None and kid is None and len(self.keys) == 1:
            got = next(iter(self.keys.values()))
        if got is None:
            raise TokenInvalid("token signed with an unknown key")
        return got


class JwtFilter(Filter):
    def __init__(self, config: Config, secret: SecretRef | None, http: HttpClient) -> None:
        self.config = config
        self.secret = secret
        self.jwks = Jwks(config.jwks_url, config.jwks_cache_ttl, http) if config.jwks_url else None
        self.algorithms = config.algorithms or (["HS256"] if secret is not None else ["RS256", "ES256"])
        self.options: Options = {"require": list(config.required_claims), "verify_aud": config.audience is not None,
                        "verify_iss": config.issuer is not None}
        self.challenge = {"WWW-Authenticate": 'Bearer error="invalid_token"'}

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        auth = ex.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenInvalid("bearer token missing", headers={"WWW-Authenticate": "Bearer"})
        token = token.strip()
        try:
            if self.jwks is not None:
                kid = jwt.get_unverified_header(token).get("kid")
                jwk = await self.jwks.key(kid)
                key = jwk.key
            else:
                assert self.secret is not None
                key = self.secret.get()
            claims = jwt.decode(token, key, algorithms=self.algorithms, audience=self.config.audience,
                                issuer=self.config.issuer, leeway=self.config.leeway, options=self.options)
        except jwt.ExpiredSignatureError:
            raise TokenInvalid("bearer token expired", headers=self.challenge) from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise TokenInvalid("bearer token is not for this audience or issuer", headers=self.challenge) from None
        except jwt.PyJWTError:
            raise TokenInvalid("bearer token invalid", headers=self.challenge) from None
        ex.vars[NAME] = claims
        sub = claims.get("sub")
        ex.log[NAME] = {"sub": None if sub is None else Identity(str(sub))}
        return await call_next(ex)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"key": "jwks" if c.jwks_url else "secret", "jwks_url": c.jwks_url, "issuer": c.issuer,
                "audience": c.audience, "algorithms": self.algorithms, "leeway": c.leeway}


def build(config: Config, ctx: BuildContext) -> Filter:
    secret = ctx.runtime.secrets.ref(config.secret) if config.secret is not None else None
    return JwtFilter(config, secret, ctx.runtime.http)


@hookimpl
def sidecar_plugins_register() -> list[PluginSpec]:
    return [PluginSpec(NAME, Config, PRIORITY, build, scope="both",
                       description="verify bearer JWTs (HS256 secret or JWKS)")]
