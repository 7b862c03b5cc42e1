"""Vault secret references: ``vault:<path>#<key>`` (KV v2), optionally pinned ``@<version>``.

```toml
[secrets.vault]
address = "http://127.0.0.1:8200"   # VAULT_ADDR when absent
auth = "token"                      # token (VAULT_TOKEN) | approle | kubernetes
mount = "secret"
refresh = "60s"                     # how often cached secrets are re-read
max_stale = "1h"                    # serve the last value this long while Vault is down
```

hvac is synchronous (requests): every hvac call runs in ONE dedicated thread
(``ThreadPoolExecutor(max_workers=1)``), never on the event loop; a 200 ms
Vault call made on the loop would stall every request for 200 ms. The thread
owns the hvac client and the token; the loop owns the cached values and only
applies results the thread hands back, so the data plane reads plain
attributes (``VaultSecret.get()`` never blocks and never awaits).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.secrets import RemoteSecret, RemoteSource, SecretStore, SecretUnavailable

from .settings import SecretsSettings, VaultSettings

__all__ = ["PREFIX", "SecretsSettings", "VaultBackend", "VaultSecret", "VaultSettings", "parse_reference"]

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger("sidecar.vault")

PREFIX = "vault:"


def parse_reference(raw: str) -> tuple[str, str, int | None]:
    """``vault:providers/openai#api_key@3`` -> ("providers/openai", "api_key", 3)."""
    path, sep, key = raw[len(PREFIX):].partition("#")
    path = path.strip("/")
    version: int | None = None
    if "@" in key:
        key, _, pin = key.rpartition("@")
        if not pin.isdigit() or int(pin) < 1:
            raise ValueError(f"{raw}: the version after '@' must be a positive integer")
        version = int(pin)
    if not sep or not path or not key:
        raise ValueError(f"{raw}: a Vault reference is vault:<path>#<key> (optionally @<version>)")
    return path, key, version


class VaultSecret(RemoteSecret):
    """One key of one KV v2 secret; refreshed in the background by its VaultBackend."""

    source = "vault"
    # ``sidecar validate`` does not contact Vault; only a running sidecar reads it.
    validate_offline = False

    def __init__(self, raw: str, backend: "VaultBackend") -> None:
        super().__init__(raw, backend.settings.max_stale)
        self.path, self.key, self.pin = parse_reference(raw)
        self.error = "not read from Vault yet"

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["pinned"] = self.pin is not None
        return d


_STATUS = {400: "InvalidRequest", 401: "Unauthorized", 403: "Forbidden", 404: "InvalidPath",
           429: "RateLimitExceeded", 500: "InternalServerError", 501: "VaultNotInitialized",
           502: "BadGateway", 503: "VaultDown"}


class LoginError(Exception):
    """A login that cannot be attempted; its message is safe to log."""


def _why(e: BaseException) -> str:
    """A short, value-free reason for a failed Vault call."""
    import hvac.exceptions as hx

    if isinstance(e, hx.VaultError):
        status = next((code for code, cls in _STATUS.items() if isinstance(e, getattr(hx, cls))), None)
        errors = e.errors if isinstance(e.errors, list) else []
        first = f": {str(errors[0])[:120]}" if errors else ""
        return f"Vault answered {status or '?'} ({type(e).__name__}){first}"
    if isinstance(e, SecretUnavailable):
        return f"Vault login credential unavailable: {e.message}"
    if isinstance(e, LoginError):
        return str(e)
    if isinstance(e, OSError) or type(e).__module__.startswith(("requests", "urllib3")):
        return f"cannot reach Vault ({type(e).__name__})"
    return f"Vault call failed ({type(e).__name__})"


class VaultBackend(RemoteSource):
    """The ``vault:`` source of one runtime: a factory for refs, a token, a refresh loop."""

    name = "vault"
    settings: VaultSettings

    def __init__(self, settings: VaultSettings, store: SecretStore, ops: "Counter",
                 refreshes: "Counter") -> None:
        super().__init__(settings)
        self.store = store
        self.ops = ops
        self.refreshes = refreshes
        self.address = settings.address or os.environ.get("VAULT_ADDR") or "http://127.0.0.1:8200"
        # References used to log in, resolved in the thread at login time.
        token = settings.token or ("env:VAULT_TOKEN" if settings.auth == "token" else None)
        self._token_ref = store.ref(token) if token else None
        self._secret_id_ref = store.ref(settings.secret_id) if settings.secret_id else None
        self._role_id_ref = store.ref(settings.role_id) if settings.role_id else None
        self._client: Any = None            # hvac.Client, touched only in the thread
        self._renew_at: float | None = None
        self._expires_at: float | None = None
        self._renewable = False
        self.authenticated = False
        self.last_error: str | None = None
        self.last_success: float | None = None   # wall time

    def new_ref(self, raw: str) -> VaultSecret:
        return VaultSecret(raw, self)

    # ---- loop side -------------------------------------------------------

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await self.refresh(force=False)
            except asyncio.CancelledError:
                raise
            except Exception:   # never let the loop die; the next tick retries
                log.exception("vault refresh failed unexpectedly")
            wait = self.settings.refresh
            if self._renew_at is not None:
                wait = min(wait, self._renew_at - time.monotonic())
            retry = max(0.2, min(self.settings.refresh / 4, 5.0))
            if any(r.value is None for r in self.refs):
                # A secret still missing: retry sooner than a full interval.
                wait = min(wait, retry)
            # Never spin: at least 0.2 s between cycles, a full retry delay while Vault fails.
            wait = max(wait, retry if self.last_error else 0.2)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def refresh(self, force: bool = True) -> None:
        """Read every reference due (all of them when ``force``) in the Vault thread."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            now = time.monotonic()
            due = self.due(force)
            renew_due = self._renew_at is not None and now >= self._renew_at
            if not due and not renew_due:
                return
            # One read per (path, version) however many keys a secret has.
            meta_only: dict[tuple[str, int | None], bool] = {}
            for r in due:
                k = (r.path, r.pin)
                meta_only[k] = meta_only.get(k, True) and r.pin is not None and r.value is not None
            groups = [(p, v, m) for (p, v), m in meta_only.items()]
            results = await self.run(self._cycle, groups)
            self._apply(due, results)

    def _apply(self, due: list[VaultSecret], results: dict[tuple[str, int | None], Any]) -> None:
        now, wall = time.monotonic(), time.time()
        for r in due:
            got = results.get((r.path, r.pin))
            if got is None:
                continue
            kind, payload, version = got
            r.tried = True
            if kind in ("error", "absent"):
                r.error, r.absent = payload, kind == "absent"
                self.refreshes.labels(r.raw, "vault", "error").inc()
                continue
            if kind == "data":
                value = payload.get(r.key)
                if value is None or value == "":
                    r.error, r.absent = f"key {r.key!r} is not in {r.path} (version {version})", True
                    self.refreshes.labels(r.raw, "vault", "error").inc()
                    continue
                value = str(value)
                if value != r.value and r.value is not None:
                    log.info("secret %s rotated to version %s", r.raw, version)
                r.value = value
                r.version = str(version)
            r.confirmed, r.updated, r.error, r.absent = now, wall, None, False
            self.refreshes.labels(r.raw, "vault", "ok").inc()

    def describe(self) -> dict[str, Any]:
        """For /admin/secrets: never a token or a value."""
        now = time.monotonic()
        return {"address": self.address, "auth": self.settings.auth, "mount": self.settings.mount,
                "authenticated": self.authenticated,
                "token_ttl_seconds": None if self._expires_at is None else round(self._expires_at - now, 1),
                "refresh_seconds": self.settings.refresh, "max_stale_seconds": self.settings.max_stale,
                "last_success_age_seconds": None if self.last_success is None
                else round(time.time() - self.last_success, 3),
                "last_error": self.last_error}

    # ---- thread side: every hvac call lives below --------------------------

    def _cycle(self, groups: list[tuple[str, int | None, bool]]) -> dict[tuple[str, int | None], Any]:
        out: dict[tuple[str, int | None], Any] = {}
        try:
            self._ensure_token()
        except Exception as e:
            self._failed("login", e)
            return {(p, v): ("error", self.last_error, None) for p, v, _ in groups}
        for path, pin, meta_only in groups:
            try:
                out[(path, pin)] = self._read(path, pin, meta_only)
            except Exception as e:
                import hvac.exceptions as hx

                if isinstance(e, hx.Forbidden):
                    # The token was revoked or expired early: log in again once.
                    self.authenticated = False
                    try:
                        self._ensure_token()
                        out[(path, pin)] = self._read(path, pin, meta_only)
                        continue
                    except Exception as e2:
                        e = e2
                self._failed("read", e)
                # 404: the secret (or that version) does not exist.
                out[(path, pin)] = ("absent" if isinstance(e, hx.InvalidPath) else "error", self.last_error, None)
        return out

    def _failed(self, op: str, e: BaseException) -> None:
        self.ops.labels(op, "error").inc()
        why = _why(e)
        if why != self.last_error:
            log.warning("vault %s failed: %s", op, why)
        self.last_error = why

    def _read(self, path: str, pin: int | None, meta_only: bool) -> tuple[str, Any, Any]:
        kv = self._client.secrets.kv.v2
        mount = self.settings.mount
        if meta_only:
            # A pinned version never changes: confirm it still exists (KV v2 metadata)
            # instead of fetching the value again.
            meta = kv.read_secret_metadata(path=path, mount_point=mount)["data"]
            info = (meta.get("versions") or {}).get(str(pin))
            self.ops.labels("metadata", "ok").inc()
            if info is None or info.get("destroyed") or info.get("deletion_time"):
                return ("absent", f"version {pin} of {path} is deleted or destroyed", None)
            self._ok()
            return ("meta", None, pin)
        resp = kv.read_secret_version(path=path, version=pin, mount_point=mount,
                                      raise_on_deleted_version=True)
        self.ops.labels("read", "ok").inc()
        self._ok()
        data = resp["data"]
        return ("data", data.get("data") or {}, (data.get("metadata") or {}).get("version"))

    def _ok(self) -> None:
        self.last_error, self.last_success = None, time.time()

    def _make_client(self) -> Any:
        import hvac

        s = self.settings
        verify: bool | str = True
        skip = s.skip_verify
        if skip is None:
            skip = os.environ.get("VAULT_SKIP_VERIFY", "").lower() in ("1", "true", "yes")
        if skip:
            verify = False
        elif s.ca_bundle or os.environ.get("VAULT_CACERT"):
            verify = s.ca_bundle or os.environ["VAULT_CACERT"]
        # types-hvac says int; hvac hands it to requests, which takes seconds as a float.
        client = hvac.Client(url=self.address, timeout=s.timeout, verify=verify,  # type: ignore[arg-type]
                             namespace=s.namespace or os.environ.get("VAULT_NAMESPACE") or None)
        return client

    def _ensure_token(self) -> None:
        now = time.monotonic()
        if self._client is None:
            self._client = self._make_client()
        if not self.authenticated or (self._expires_at is not None and now >= self._expires_at):
            self._login()
            return
        if self._renew_at is not None and now >= self._renew_at:
            if self._renewable:
                try:
                    auth = self._client.auth.token.renew_self()["auth"]
                    self.ops.labels("renew", "ok").inc()
                    self._token_times(int(auth.get("lease_duration") or 0), bool(auth.get("renewable")))
                    return
                except Exception as e:
                    self._failed("renew", e)
            self._login()   # not renewable, or renewal refused: log in again

    def _login(self) -> None:
        s, c = self.settings, self._client
        self.authenticated = False
        if s.auth == "token":
            if self._token_ref is None:
                raise LoginError("no Vault token configured")
            c.token = self._token_ref.get()
            data = c.auth.token.lookup_self()["data"]
            ttl, renewable = int(data.get("ttl") or 0), bool(data.get("renewable"))
        else:
            if s.auth == "approle":
                assert self._role_id_ref is not None and self._secret_id_ref is not None
                resp = c.auth.approle.login(role_id=self._role_id_ref.get(),
                                            secret_id=self._secret_id_ref.get(),
                                            mount_point=s.approle_mount)
            else:
                try:
                    jwt = Path(s.jwt_path).read_text().strip()
                except OSError as e:
                    raise LoginError(f"cannot read the service-account token {s.jwt_path}: {e.strerror}") from None
                resp = c.auth.kubernetes.login(role=s.role, jwt=jwt, mount_point=s.kubernetes_mount)
            auth = resp["auth"]
            ttl, renewable = int(auth.get("lease_duration") or 0), bool(auth.get("renewable"))
        self.ops.labels("login", "ok").inc()
        self._token_times(ttl, renewable)
        self.authenticated = True

    def _token_times(self, ttl: int, renewable: bool) -> None:
        """Renew at two thirds of the TTL (Vault Agent renews at a similar point)."""
        now = time.monotonic()
        self._renewable = renewable
        if ttl <= 0:   # a root or periodic-free token that never expires
            self._expires_at = self._renew_at = None
        else:
            self._expires_at = now + ttl
            self._renew_at = now + ttl * 2 / 3

    def known_tokens(self) -> list[str]:
        """Values to scrub from any text before it is logged."""
        t = getattr(getattr(self._client, "adapter", None), "token", None)
        return [t] if t else []
