"""Per-runtime state of the auth plugin: its metrics, the Vault and AWS backends, the staleness ticker."""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

from proxy.secrets import RemoteSecret, SecretRef, SecretUnavailable

from .aws_sm import PREFIX as AWS_SM_PREFIX
from .aws_sm import AwsSecretsBackend, AwsSmSecret
from .inject import Tally
from .sigv4 import ChainCredentials
from .vault import PREFIX as VAULT_PREFIX
from .vault import SecretsSettings, VaultBackend, VaultSecret

if TYPE_CHECKING:
    from proxy.runtime import Runtime

NAME = "auth"


class AuthState:
    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime
        m = runtime.metrics
        self.resolutions = m.counter(
            "sidecar_secret_resolutions",
            "Secret resolutions on the data plane, by reference, source and result (ok | unavailable).",
            ["reference", "source", "result"])
        self.refreshes = m.counter(
            "sidecar_secret_refreshes",
            "Background reads of a secret from its source (Vault, AWS), by reference and result (ok | error).",
            ["reference", "source", "result"])
        self.staleness = m.gauge(
            "sidecar_secret_staleness_seconds",
            "Seconds since the secret's value was last confirmed by its source (0 for a set env var).",
            ["reference", "source"], multiprocess_mode="livemax")   # workers > 1: the stalest worker
        self.available = m.gauge(
            "sidecar_secret_available", "1 when the secret resolves now, else 0.", ["reference", "source"],
            multiprocess_mode="livemin")   # workers > 1: 0 when any worker lacks it
        self.vault_ops = m.counter(
            "sidecar_vault_operations", "Vault calls by operation (login, renew, read, metadata) and result.",
            ["operation", "result"])
        self.oauth2_fetches = m.counter(
            "sidecar_oauth2_token_fetches", "OAuth2 client-credentials token fetches, by route and result.",
            ["route", "result"])
        settings = runtime.extra_settings.get("secrets")
        self.settings: SecretsSettings = settings if isinstance(settings, SecretsSettings) else SecretsSettings()
        self.vault: VaultBackend | None = None
        self.aws: AwsSecretsBackend | None = None
        self.chain: ChainCredentials | None = None
        self._tallies: dict[str, tuple[SecretRef, Tally]] = {}
        self._ticker: asyncio.Task[None] | None = None
        runtime.secrets.register(VAULT_PREFIX, self._vault_ref)
        runtime.secrets.register(AWS_SM_PREFIX, self._aws_ref)

    def tally(self, ref: SecretRef) -> Tally:
        got = self._tallies.get(ref.raw)
        if got is None:
            got = self._tallies[ref.raw] = (ref, Tally())
        return got[1]

    def _vault_ref(self, raw: str) -> VaultSecret:
        if self.vault is None:
            self.vault = VaultBackend(self.settings.vault, self.runtime.secrets, self.vault_ops,
                                      self.refreshes)
        return self.vault(raw)

    def _aws_ref(self, raw: str) -> AwsSmSecret:
        if self.aws is None:
            self.aws = AwsSecretsBackend(self.settings.aws, self.refreshes)
        return self.aws(raw)

    def aws_chain(self) -> ChainCredentials:
        """botocore's standard credential chain, shared by every aws_sigv4 route."""
        if self.chain is None:
            s = self.settings.aws
            self.chain = ChainCredentials(refresh=min(s.refresh, 60.0), startup_wait=s.startup_wait)
        return self.chain

    # ---- lifecycle (hooks) ---------------------------------------------

    def start(self) -> None:
        """Called on every policy load: start what the loaded references need,
        and re-read env values (read at load and reload only, issue 10)."""
        self.runtime.secrets.reread()
        for backend in (self.vault, self.aws, self.chain):
            if backend is not None:
                backend.start()
        if self._ticker is None and self.runtime.secrets.refs():
            self._ticker = asyncio.create_task(self._tick_loop(), name="sidecar-secret-metrics")

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
            self._ticker = None
        for backend in (self.vault, self.aws, self.chain):
            if backend is not None:
                await backend.close()

    async def _tick_loop(self) -> None:
        while True:
            self.update_metrics()
            await asyncio.sleep(1.0)

    def update_metrics(self) -> None:
        """Flush resolution counts and refresh the per-reference gauges."""
        for ref, tally in self._tallies.values():
            ok, fail = tally.flush()
            if ok:
                self.resolutions.labels(ref.raw, ref.source, "ok").inc(ok)
            if fail:
                self.resolutions.labels(ref.raw, ref.source, "unavailable").inc(fail)
        now = time.time()
        for r in self.runtime.secrets.refs():
            ok = _resolves(r)
            if isinstance(r, RemoteSecret):
                stale = r.staleness()
            else:
                stale = 0.0 if ok else (now - r.updated if r.updated else 0.0)
            self.staleness.labels(r.raw, r.source).set(round(stale, 3))
            self.available.labels(r.raw, r.source).set(1 if ok else 0)

    def describe(self) -> dict[str, Any]:
        self.update_metrics()
        store = self.runtime.secrets
        secrets = []
        for r in store.refs():
            d = r.describe()
            if store.optional_only(r):
                d["optional"] = True
            secrets.append(d)
        return {"secrets": secrets,
                "vault": self.vault.describe() if self.vault is not None else None,
                "aws": self.aws.describe() if self.aws is not None else None,
                "aws_credentials": self.chain.describe() if self.chain is not None else None}

    async def refresh(self) -> dict[str, Any]:
        self.runtime.secrets.reread()
        for r in self.runtime.secrets.refs():
            if hasattr(r, "_checked"):
                r._checked = -math.inf   # file: re-check now, not at the next interval
            _resolves(r)
        if self.vault is not None:
            await self.vault.refresh(force=True)
        if self.aws is not None:
            await self.aws.refresh(force=True)
        if self.chain is not None:
            await self.chain.resolve()
        return self.describe()


def _resolves(r: SecretRef) -> bool:
    try:
        r.get()
        return True
    except SecretUnavailable:
        return False


def auth_state(runtime: "Runtime") -> AuthState:
    return runtime.service(NAME, lambda: AuthState(runtime))
