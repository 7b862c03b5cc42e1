"""OAuth2 tokens: fetch once, cache, refresh single-flight (``CachedToken``), for
client credentials (RFC 6749 section 4.4, ``TokenSource``) and the JWT bearer
grant (RFC 7523, ``jwt_bearer.JwtBearerTokenSource``).

A token is used until ``refresh_before`` ahead of its expiry (capped at half
its lifetime); inside that window one background fetch replaces it while
requests keep using the current one. When the provider answers 401 the
filter calls ``renew(used)``: only the first caller with that token fetches,
the others wait for the same fetch.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import orjson

from proxy.body import read_limited
from proxy.errors import SidecarError
from proxy.secrets import SecretRef

if TYPE_CHECKING:
    from prometheus_client import Counter

    from proxy.client import HttpClient

log = logging.getLogger("sidecar.auth.oauth2")


class TokenUnavailable(SidecarError):
    status, code, message = 503, "oauth2_token_unavailable", "could not obtain an OAuth2 access token"


class _TooLarge(Exception):
    pass


class CachedToken:
    """The caching, refresh-ahead and single-flight part every token grant shares;
    a grant says how to ask for a token (``_request``)."""

    def __init__(self, *, token_url: str, refresh_before: float, timeout: float, http: "HttpClient",
                 fetches: "Counter", label: str) -> None:
        self.token_url = token_url
        self.refresh_before = refresh_before
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.http = http
        self.ok = fetches.labels(label, "ok")
        self.failed = fetches.labels(label, "error")
        self.token: str | None = None
        self.expires = 0.0
        self.refresh_at = 0.0
        self._inflight: asyncio.Future[str] | None = None
        # After a failed refresh-ahead, wait before the next one instead of
        # trying again on every request while the current token is still valid.
        self._next_try = 0.0

    def _request(self) -> tuple[str, dict[str, str], dict[str, str]]:
        """(token URL, form, headers) of one token request; raises SidecarError."""
        raise NotImplementedError

    async def get(self) -> str:
        tok = self.token
        if tok is not None:
            now = time.monotonic()
            if now < self.refresh_at:
                return tok
            if now < self.expires:
                if now >= self._next_try:
                    self._fetch_shared()   # refresh ahead; this request keeps the current token
                return tok
        return await asyncio.shield(self._fetch_shared())

    async def renew(self, used: str) -> str:
        """The provider refused ``used`` (401): fetch a new token once for all callers."""
        if self.token is not None and self.token != used:
            return self.token   # another request already replaced it
        self.token = None
        return await asyncio.shield(self._fetch_shared())

    def _fetch_shared(self) -> "asyncio.Future[str]":
        if self._inflight is None:
            fut = asyncio.ensure_future(self._fetch())
            self._inflight = fut
            fut.add_done_callback(self._done)
        return self._inflight

    def _done(self, fut: "asyncio.Future[str]") -> None:
        self._inflight = None
        if not fut.cancelled() and fut.exception() is not None:
            # Retrieved here (the failure was logged in _fetch); back off the refresh-ahead.
            self._next_try = time.monotonic() + 1.0

    async def _fetch(self) -> str:
        try:
            url, form, headers = self._request()
        except SidecarError:
            self.failed.inc()
            raise
        try:
            async with self.http.request("POST", url, data=form, headers=headers,
                                         timeout=self.timeout) as resp:
                raw = await read_limited(resp.content, 256 * 1024, _TooLarge)
                status = resp.status
        except _TooLarge:
            self.failed.inc()
            log.warning("oauth2 token endpoint %s answered more than 256 KiB", url)
            raise TokenUnavailable("OAuth2 token endpoint answer too large") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self.failed.inc()
            log.warning("oauth2 token endpoint %s unreachable (%s)", url, type(e).__name__)
            raise TokenUnavailable("OAuth2 token endpoint unreachable") from None
        if status != 200:
            self.failed.inc()
            # The body may echo credentials: log the status only.
            log.warning("oauth2 token endpoint %s answered %d", url, status)
            raise TokenUnavailable(f"OAuth2 token endpoint answered {status}")
        try:
            data = orjson.loads(raw)
            token = data["access_token"]
            if not isinstance(token, str) or not token:
                raise ValueError
            lifetime = float(data.get("expires_in") or 3600)
            # "nan", "inf", 0 or negatives would cache a token forever or never.
            if not 0 < lifetime < 10 * 365 * 86400:
                raise ValueError
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            self.failed.inc()
            log.warning("oauth2 token endpoint %s answered without a usable access_token", url)
            raise TokenUnavailable("OAuth2 token endpoint answered without an access token") from None
        now = time.monotonic()
        self.token = token
        self.expires = now + lifetime
        self.refresh_at = self.expires - min(self.refresh_before, lifetime / 2)
        self.ok.inc()
        return token

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"token_url": self.token_url, "has_token": self.token is not None,
                "expires_in_seconds": round(self.expires - now, 1) if self.token else None}


class TokenSource(CachedToken):
    """OAuth2 client credentials (RFC 6749 section 4.4) of one client (one per tenant credential set)."""

    def __init__(self, *, token_url: str, client_id: SecretRef, client_secret: SecretRef,
                 scopes: list[str], audience: str | None, params: dict[str, str], client_auth: str,
                 refresh_before: float, timeout: float, http: "HttpClient",
                 fetches: "Counter", label: str) -> None:
        super().__init__(token_url=token_url, refresh_before=refresh_before, timeout=timeout, http=http,
                         fetches=fetches, label=label)
        self.client_id = client_id
        self.client_secret = client_secret
        form = {"grant_type": "client_credentials", **params}
        if scopes:
            form["scope"] = " ".join(scopes)
        if audience:
            form["audience"] = audience
        self.form = form
        self.client_auth = client_auth

    def _request(self) -> tuple[str, dict[str, str], dict[str, str]]:
        cid, secret = self.client_id.get(), self.client_secret.get()
        form = dict(self.form)
        headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
        if self.client_auth == "basic":
            # RFC 6749 section 2.3.1: both parts form-urlencoded before base64.
            pair = f"{quote(cid, safe='')}:{quote(secret, safe='')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        else:
            form["client_id"], form["client_secret"] = cid, secret
        return self.token_url, form, headers

