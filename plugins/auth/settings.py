"""``[secrets.vault]`` in config.toml (owned through ``sidecar_settings_register``)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from proxy.config import Model
from proxy.units import Duration

K8S_JWT = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def _secret_ref(value: str | None, field: str) -> str | None:
    if value is not None and not value.startswith(("env:", "file:")):
        raise ValueError(f"{field} must be an env: or file: reference, not a literal value")
    return value


class VaultSettings(Model):
    """``[secrets.vault]`` in config.toml; the usual VAULT_* variables fill what is absent."""

    address: str | None = None          # VAULT_ADDR
    auth: Literal["token", "approle", "kubernetes"] = "token"
    mount: str = "secret"
    refresh: Duration = 60.0
    max_stale: Duration = 3600.0
    timeout: Duration = 5.0             # per Vault HTTP call
    startup_wait: Duration = 5.0        # how long start-up waits for the first reads
    namespace: str | None = None        # VAULT_NAMESPACE
    ca_bundle: str | None = None        # VAULT_CACERT
    skip_verify: bool | None = None     # VAULT_SKIP_VERIFY
    # token auth: a reference to the token (default: VAULT_TOKEN)
    token: str | None = None
    # approle auth
    role_id: str | None = None          # literal or reference
    secret_id: str | None = None        # reference
    approle_mount: str = "approle"
    # kubernetes auth
    role: str | None = None
    jwt_path: str = K8S_JWT
    kubernetes_mount: str = "kubernetes"

    @model_validator(mode="after")
    def _auth_fields(self) -> "VaultSettings":
        _secret_ref(self.token, "token")
        _secret_ref(self.secret_id, "secret_id")
        if self.auth == "approle" and not (self.role_id and self.secret_id):
            raise ValueError("auth = \"approle\" needs role_id and secret_id")
        if self.auth == "kubernetes" and not self.role:
            raise ValueError("auth = \"kubernetes\" needs role")
        if self.refresh <= 0:
            raise ValueError("refresh must be greater than 0")
        if self.max_stale <= self.refresh:
            # Values are re-read every refresh: a shorter max_stale would make
            # each one unavailable for part of every cycle, with the service up.
            raise ValueError("max_stale must be longer than refresh")
        if self.address is not None and not self.address.startswith(("http://", "https://")):
            raise ValueError("address must be an http:// or https:// URL")
        return self


class AwsSettings(Model):
    """``[secrets.aws]``: where ``aws-sm:`` references are read. Credentials come
    from botocore's standard chain (env, shared config, web identity, container
    and instance metadata); the usual AWS_* variables fill what is absent."""

    region: str | None = None           # AWS_REGION / AWS_DEFAULT_REGION
    endpoint_url: str | None = None     # a local endpoint (LocalStack, moto)
    refresh: Duration = 60.0
    max_stale: Duration = 3600.0
    timeout: Duration = 5.0             # per AWS HTTP call (connect and read)
    startup_wait: Duration = 5.0        # how long start-up waits for the first reads

    @field_validator("endpoint_url", "region", mode="before")
    @classmethod
    def _empty_is_absent(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _check(self) -> "AwsSettings":
        if self.refresh <= 0:
            raise ValueError("refresh must be greater than 0")
        if self.max_stale <= self.refresh:
            # Values are re-read every refresh: a shorter max_stale would make
            # each one unavailable for part of every cycle, with the service up.
            raise ValueError("max_stale must be longer than refresh")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError("endpoint_url must be an http:// or https:// URL")
        return self


class SecretsSettings(Model):
    """The ``[secrets]`` table of config.toml."""

    vault: VaultSettings = VaultSettings()
    aws: AwsSettings = AwsSettings()
