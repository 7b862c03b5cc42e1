"""The auth filter: inject a route's (or a tenant's) credentials into each request.

Everything is resolved to small slot objects in build(); per request the
filter picks the credential set for the tenant and each slot reads its
secret with ``ref.get()`` (never blocks) and writes one header or query
parameter. A secret that does not resolve answers 503 ``secret_unavailable``
and nothing is forwarded: never the literal reference, never an empty value.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_plus

from proxy.chain import Exchange, Filter, Handler, ProxyResponse
from proxy.errors import SidecarError
from proxy.logs import Identity
from proxy.secrets import SecretRef, SecretUnavailable

if TYPE_CHECKING:
    from .oauth2 import CachedToken
    from .sigv4 import Signer
    from .state import AuthState


class UnknownTenant(SidecarError):
    status, code, message = 403, "unknown_tenant", "no credentials are configured for this tenant"


class Tally:
    """Per-reference resolution counts, kept as plain ints on the data plane
    (a prometheus-client ``inc()`` costs ~3 us here) and flushed to the
    metrics once a second and before each admin view."""

    __slots__ = ("ok", "fail", "_ok_sent", "_fail_sent")

    def __init__(self) -> None:
        self.ok = self.fail = self._ok_sent = self._fail_sent = 0

    def flush(self) -> tuple[int, int]:
        ok, fail = self.ok - self._ok_sent, self.fail - self._fail_sent
        self._ok_sent, self._fail_sent = self._ok_sent + ok, self._fail_sent + fail
        return ok, fail


class Secret:
    """A reference plus the tally of its resolutions.

    ``get()`` returns None for an optional reference (``env:X?``) that is not
    set: the slot then injects nothing (issue 12).
    """

    __slots__ = ("ref", "tally")

    def __init__(self, ref: SecretRef, state: "AuthState") -> None:
        self.ref = ref
        self.tally = None if ref.source == "literal" else state.tally(ref)

    def get(self) -> str | None:
        try:
            v = self.ref.get_optional()
        except SecretUnavailable:
            if self.tally is not None:
                self.tally.fail += 1
            raise
        if self.tally is not None and v is not None:
            self.tally.ok += 1
        return v


class HeaderSlot:
    __slots__ = ("name", "prefix", "secret")

    def __init__(self, name: str, prefix: str, secret: Secret) -> None:
        self.name, self.prefix, self.secret = name, prefix, secret

    def apply(self, ex: Exchange, override: bool) -> None:
        if not override and ex.has_header(self.name):
            return
        v = self.secret.get()
        if v is not None:
            # A value with a line break (a secret can hold one) is never sent:
            # the upstream client refuses the request (CWE-113).
            ex.set_header(self.name, self.prefix + v)


class BasicSlot:
    __slots__ = ("user", "password", "_last", "_value")

    def __init__(self, user: Secret, password: Secret) -> None:
        self.user, self.password = user, password
        self._last: tuple[str, str] | None = None
        self._value = ""

    def apply(self, ex: Exchange, override: bool) -> None:
        if not override and ex.has_header("Authorization"):
            return
        user, password = self.user.get(), self.password.get()
        if user is None or password is None:
            return
        pair = (user, password)
        if pair != self._last:   # encode once per rotation, not per request
            self._value = "Basic " + base64.b64encode(f"{pair[0]}:{pair[1]}".encode()).decode()
            self._last = pair
        ex.set_header("Authorization", self._value)


class QuerySlot:
    __slots__ = ("param", "enc", "secret", "_last", "_quoted")

    def __init__(self, param: str, secret: Secret) -> None:
        self.param = param
        self.enc = quote(param, safe="")
        self.secret = secret
        self._last: str | None = None
        self._quoted = ""

    def apply(self, ex: Exchange, override: bool) -> None:
        v = self.secret.get()
        if v is None:
            return
        q = ex.query
        if q:
            parts = q.split("&")
            mine = [p for p in parts if unquote_plus(p.partition("=")[0]) == self.param]
            if mine:
                if not override:
                    return
                q = "&".join(p for p in parts if p not in mine)
        if v != self._last:
            self._quoted, self._last = quote(v, safe=""), v
        pair = f"{self.enc}={self._quoted}"
        ex.query = f"{q}&{pair}" if q else pair


Slot = HeaderSlot | BasicSlot | QuerySlot


class Credentials:
    """What one tenant (or the default) injects."""

    __slots__ = ("label", "slots", "token", "signer")

    def __init__(self, label: str, slots: list[Slot], token: "CachedToken | None" = None,
                 signer: "Signer | None" = None) -> None:
        self.label = label
        self.slots = slots
        self.token = token
        self.signer = signer


class AuthFilter(Filter):
    def __init__(self, default: Credentials | None, tenants: dict[str, Credentials], reject: bool,
                 override: bool, replay_limit: int, summary: dict[str, Any]) -> None:
        self.default = default
        self.tenants = tenants
        self.reject = reject
        self.override = override
        self.replay_limit = replay_limit
        self.summary = summary
        # Static credentials (env, file, Vault, literal headers) never await:
        # a sync layer (proxy/chain.py). An OAuth2 token may need a fetch and
        # a 401 retry around the call, and SigV4 may hash the body off the
        # loop, so such a route keeps handle().
        sets = [default, *tenants.values()]
        self.sync = all(c is None or (c.token is None and c.signer is None) for c in sets)

    def before(self, ex: Exchange) -> None:
        self._inject(ex)

    def _inject(self, ex: Exchange) -> Credentials:
        creds = self._select(ex)
        override = self.override
        for slot in creds.slots:
            slot.apply(ex, override)
        if creds.label != "default":
            ex.log["auth_tenant"] = Identity(creds.label)
        return creds

    def _select(self, ex: Exchange) -> Credentials:
        t = ex.tenant
        if t is not None:
            c = self.tenants.get(t)
            if c is not None:
                return c
        if self.reject and self.tenants:
            raise UnknownTenant()
        if self.default is None:
            raise UnknownTenant()
        return self.default

    async def handle(self, ex: Exchange, call_next: Handler) -> ProxyResponse:
        creds = self._inject(ex)
        if creds.signer is not None:
            # After the slots: a header they add (x-amz-*) is signed too.
            await creds.signer.sign(ex)
            return await call_next(ex)
        source = creds.token
        if source is None or (not self.override and ex.has_header("Authorization")):
            return await call_next(ex)
        return await self._oauth2(ex, call_next, source)

    async def _oauth2(self, ex: Exchange, call_next: Handler, source: "CachedToken") -> ProxyResponse:
        token = await source.get()
        ex.set_header("Authorization", "Bearer " + token)
        body = ex.body
        replayable = body is None or isinstance(body, bytes | bytearray)
        if not replayable and ex.body_length is not None and ex.body_length <= self.replay_limit:
            await ex.read_body()
            replayable = True
        resp = await call_next(ex)
        if resp.status != 401:
            return resp
        # The provider refused the token (revoked or rotated early): fetch a new
        # one (single-flight across requests) and, when the body can be resent, retry once.
        try:
            fresh = await source.renew(token)
        except SidecarError:
            return resp   # no new token: the provider's 401 is the honest answer
        if not replayable:
            return resp
        try:
            await resp.read(64 * 1024)
        except Exception:
            resp.close()
        ex.set_header("Authorization", "Bearer " + fresh)
        ex.attempt += 1
        ex.log["auth"] = "oauth2_token_refreshed"
        return await call_next(ex)

    def describe(self) -> dict[str, Any]:
        return self.summary
