"""``type = "oauth2_jwt_bearer"``: the JWT bearer grant (RFC 7523 section 2.1),
as Google service accounts use it.

The credential is the service account's JSON key (``client_email``,
``private_key``, ``private_key_id``, ``token_uri``) from a secret reference.
Each token fetch signs a fresh assertion (RS256; ``iss`` = client_email,
``aud`` = the token URL, ``scope``, one hour of life, ``sub`` for domain-wide
delegation) and posts it to the JSON's ``token_uri`` (or ``token_url``); the
access token is cached and refreshed by ``CachedToken`` like client credentials.
The key never leaves this object: not in logs, not in errors.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import jwt
import orjson

from proxy.secrets import SecretRef

from .oauth2 import CachedToken, TokenUnavailable

if TYPE_CHECKING:
    from prometheus_client import Counter

    from proxy.client import HttpClient

log = logging.getLogger("sidecar.auth.oauth2")

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Google refuses assertions that live longer than an hour.
ASSERTION_LIFETIME = 3600


class ServiceAccount:
    __slots__ = ("email", "key", "key_id", "token_uri")

    def __init__(self, email: str, key: Any, key_id: str | None, token_uri: str | None) -> None:
        self.email, self.key, self.key_id, self.token_uri = email, key, key_id, token_uri


def parse_service_account(raw: str) -> ServiceAccount:
    """The parts of a service-account JSON key; ValueError names the missing part (never a value)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("is not a JSON object")
    email, pem = data.get("client_email"), data.get("private_key")
    if not isinstance(email, str) or not email:
        raise ValueError("has no client_email")
    if not isinstance(pem, str) or not pem:
        raise ValueError("has no private_key")
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError("has a private_key that is not an unencrypted PEM key") from None
    key_id = data.get("private_key_id")
    token_uri = data.get("token_uri")
    return ServiceAccount(email, key, key_id if isinstance(key_id, str) else None,
                          token_uri if isinstance(token_uri, str) and token_uri.startswith(("https://", "http://"))
                          else None)


class JwtBearerTokenSource(CachedToken):
    def __init__(self, *, credentials: SecretRef, token_url: str | None, scopes: list[str],
                 subject: str | None, refresh_before: float, timeout: float, http: "HttpClient",
                 fetches: "Counter", label: str) -> None:
        super().__init__(token_url=token_url or "", refresh_before=refresh_before, timeout=timeout,
                         http=http, fetches=fetches, label=label)
        self.credentials = credentials
        self.fixed_url = token_url
        self.scope = " ".join(scopes)
        self.subject = subject
        self._parsed: tuple[str, ServiceAccount] | None = None

    def _account(self) -> ServiceAccount:
        raw = self.credentials.get()
        if self._parsed is not None and self._parsed[0] == raw:
            return self._parsed[1]
        try:
            account = parse_service_account(raw)
        except ValueError as e:
            log.warning("oauth2_jwt_bearer: the service account in %s %s", self.credentials.raw, e)
            raise TokenUnavailable(f"the service-account credentials {e}") from None
        self._parsed = (raw, account)
        return account

    def _request(self) -> tuple[str, dict[str, str], dict[str, str]]:
        account = self._account()
        url = self.fixed_url or account.token_uri
        if not url:
            raise TokenUnavailable("the service-account credentials name no token_uri; set token_url")
        self.token_url = url
        now = int(time.time())
        claims: dict[str, Any] = {"iss": account.email, "aud": url, "iat": now, "exp": now + ASSERTION_LIFETIME}
        if self.scope:
            claims["scope"] = self.scope
        if self.subject:
            claims["sub"] = self.subject
        headers = {"kid": account.key_id} if account.key_id else None
        try:
            assertion = jwt.encode(claims, account.key, algorithm="RS256", headers=headers)
        except (ValueError, TypeError, jwt.PyJWTError) as e:   # an EC key given for RS256...
            log.warning("oauth2_jwt_bearer: signing the assertion failed (%s)", type(e).__name__)
            raise TokenUnavailable("the service-account key cannot sign RS256") from None
        form = {"grant_type": GRANT_TYPE, "assertion": assertion}
        return url, form, {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}

