"""The ``[webhook]`` policy table, and the plugin's own ``[webhook]`` table in config.toml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from proxy.config import Model
from proxy.units import Duration, Size

from .schemes import _PLACEHOLDER


class WebhookSettings(Model):
    """config.toml ``[webhook]``: where the embedded queue lives, how long
    delivered events are kept. Unset keys fall back to the same keys in
    ``[inbound]`` (their former home), then to the defaults."""

    # The embedded durable queue (SQLite) lives here; relative to config.toml. Default "data".
    data_dir: str | None = None
    # Delivered webhooks are kept this long for /admin/webhooks/events, then pruned. Default 7d.
    retention: Duration | None = None


class RetryPolicy(Model):
    attempts: int = Field(default=8, ge=1, le=1000)
    base: Duration = 1.0
    max: Duration = 300.0

    @model_validator(mode="after")
    def _order(self) -> "RetryPolicy":
        if self.base <= 0:
            raise ValueError("base must be greater than zero")
        if self.max < self.base:
            raise ValueError("max must be at least base")
        return self


class Config(Model):
    path: str                                  # on the inbound listener
    forward_to: str | None = None              # on the service; default: path
    scheme: Literal["stripe", "github", "slack", "shopify", "standard-webhooks", "svix",
                    "twilio", "square", "sendgrid", "generic"]
    secrets: list[str] = Field(min_length=1)   # references (env:, file:, vault:) or literals
    tolerance: Duration = 300.0
    max_body: Size = 1024 * 1024
    delivery: Literal["durable", "passthrough"] = "durable"
    retry: RetryPolicy = RetryPolicy()
    dedupe_ttl: Duration = 86400.0             # 0 turns de-duplication off
    timeout: Duration = 10.0                   # one delivery attempt to the service
    publish: bool = False                      # XADD delivered events to webhook.<source>.<type>
    public_url: str | None = None              # twilio, square: the URL the provider signs
    # generic scheme
    header: str | None = None
    prefix: str = ""
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    signed: str = "{body}"
    timestamp_header: str | None = None
    id_header: str | None = None
    type_header: str | None = None

    @field_validator("path", "forward_to")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("/") or any(c in v for c in "?#* \t"):
            raise ValueError("must be a plain path starting with '/'")
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("a secret must not be empty")
        return v

    @model_validator(mode="after")
    def _scheme_fields(self) -> "Config":
        if self.scheme in ("twilio", "square"):
            if not self.public_url or not self.public_url.startswith(("http://", "https://")):
                raise ValueError(f"scheme {self.scheme!r} signs the public URL: set public_url = \"https://...\"")
        if self.scheme == "generic":
            if not self.header:
                raise ValueError("scheme 'generic' needs header (the signature header's name)")
            names = set(_PLACEHOLDER.findall(self.signed))
            if "body" not in names:
                raise ValueError("signed must include {body}")
            stray = self.signed
            for n in ("{body}", "{timestamp}", "{id}"):
                stray = stray.replace(n, "")
            if "{" in stray or "}" in stray:
                raise ValueError("signed may only use {body}, {timestamp} and {id}")
            if "timestamp" in names and not self.timestamp_header:
                raise ValueError("signed uses {timestamp}: set timestamp_header")
            if "id" in names and not self.id_header:
                raise ValueError("signed uses {id}: set id_header")
        elif self.header or self.timestamp_header or self.id_header or self.type_header:
            raise ValueError("header, timestamp_header, id_header and type_header are for scheme 'generic'")
        return self

    @property
    def target(self) -> str:
        return self.forward_to or self.path
