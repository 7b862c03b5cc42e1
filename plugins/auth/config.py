"""The ``[auth]`` policy table: what to inject, from which secrets, per tenant."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from proxy.config import Model
from proxy.http import check_header_name
from proxy.units import Duration, Size

AuthType = Literal["bearer", "header", "basic", "query", "oauth2_client_credentials", "oauth2_jwt_bearer",
                   "aws_sigv4"]

# The fields that carry a secret, per type; each must be a reference, never a literal.
SECRET_FIELDS: dict[str, tuple[str, ...]] = {
    "bearer": ("secret",), "header": ("secret",), "query": ("secret",),
    "basic": ("username", "password"), "oauth2_client_credentials": ("client_id", "client_secret"),
    "oauth2_jwt_bearer": ("credentials",),
    # aws_sigv4: keys are optional (absent: botocore's standard credential chain).
    "aws_sigv4": (),
}
# aws_sigv4 (issue 15): secret-reference fields, all optional.
AWS_KEY_FIELDS = ("access_key_id", "secret_access_key", "session_token")
LITERAL_OK = {"username", "client_id", "access_key_id"}
CREDENTIAL_FIELDS = ("secret", "username", "password", "client_id", "client_secret", "credentials")
_TYPE_ONLY = {"header": {"header", "prefix"}, "query": {"param"},
              "oauth2_client_credentials": {"token_url", "scopes", "audience", "token_params"},
              "oauth2_jwt_bearer": {"credentials", "subject", "token_url", "scopes"},
              "aws_sigv4": {"service", "region", "payload", *AWS_KEY_FIELDS}}
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
        "upgrade", "host", "content-length"}


def credential_header(name: str) -> str:
    check_header_name(name, forwardable=False)
    if name.lower() in _HOP:
        raise ValueError(f"{name!r} cannot carry a credential (hop-by-hop or framing header)")
    return name


LITERAL_CREDENTIAL = ("must be a secret reference (env:NAME, file:/path, vault:path#key or aws-sm:id#key), "
                      "never the credential itself")


def _check_ref(field: str, value: str | None) -> None:
    """Syntax only; build() refuses a literal (a plugin may add sources beyond these)."""
    if value is None:
        return
    if value.startswith("vault:") and "#" not in value:
        raise ValueError(f"{field}: a Vault reference is vault:<path>#<key> (optionally @<version>)")
    if value.startswith("aws-sm:"):
        from .aws_sm import parse_reference

        try:
            parse_reference(value.removesuffix("?"))
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None


class TenantCredentials(Model):
    """``[auth.tenants.<tenant>]``: what differs for this tenant; the rest comes from [auth]."""

    secret: str | None = None
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    credentials: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _refs(self) -> "TenantCredentials":
        for f in (*CREDENTIAL_FIELDS, *AWS_KEY_FIELDS):
            _check_ref(f, getattr(self, f))
        for name in self.headers:
            credential_header(name)
        return self


def _check_keys(c: "Config | TenantCredentials", where: str = "") -> None:
    if (c.access_key_id is None) != (c.secret_access_key is None):
        raise ValueError(f"{where}access_key_id and secret_access_key go together "
                         "(or neither: botocore's standard credential chain)")
    if c.session_token is not None and c.access_key_id is None:
        raise ValueError(f"{where}session_token needs access_key_id and secret_access_key")


def _check_sigv4(c: "Config") -> None:
    if not c.service:
        raise ValueError("type = \"aws_sigv4\" needs service (the signing name: s3, execute-api, ...)")
    if c.payload == "unsigned" and not c.service.startswith("s3"):
        raise ValueError("payload = \"unsigned\" is for S3 only (other AWS services require a signed payload)")
    if not c.override:
        raise ValueError("type = \"aws_sigv4\" always replaces the client's signature: "
                         "override = false does not apply")
    _check_keys(c)
    for f in CREDENTIAL_FIELDS:
        if getattr(c, f) is not None:
            raise ValueError(f"{f} is not used by type = \"aws_sigv4\"")


class Config(Model):
    type: AuthType | None = None
    secret: str | None = None
    header: str | None = None            # type = "header"
    prefix: str = ""                     # type = "header": sent before the secret
    username: str | None = None          # type = "basic"
    password: str | None = None
    param: str | None = None             # type = "query"
    # type = "oauth2_client_credentials"
    token_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    scopes: list[str] = Field(default_factory=list)
    audience: str | None = None
    token_params: dict[str, str] = Field(default_factory=dict)
    client_auth: Literal["basic", "body"] = "basic"
    # type = "oauth2_jwt_bearer" (RFC 7523): the service-account JSON (a reference),
    # and the user to act for (Google domain-wide delegation).
    credentials: str | None = None
    subject: str | None = None
    refresh_before: Duration = 60.0
    token_timeout: Duration = 10.0
    # type = "aws_sigv4" (issue 15)
    service: str | None = None           # the signing name: s3, execute-api, bedrock...
    region: str | None = None
    access_key_id: str | None = None     # secret references; absent: the standard chain
    secret_access_key: str | None = None
    session_token: str | None = None
    payload: Literal["signed", "unsigned"] | None = None   # default: unsigned for s3, signed otherwise
    # A request body up to this size is kept so a 401-refresh can resend it.
    replay_body_limit: Size = 1024 * 1024
    # Extra headers, static or secret-backed (a value that is not a reference is sent literally).
    headers: dict[str, str] = Field(default_factory=dict)
    tenants: dict[str, TenantCredentials] = Field(default_factory=dict)
    unknown_tenant: Literal["default", "reject"] = "default"
    override: bool = True

    @field_validator("headers")
    @classmethod
    def _header_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            credential_header(name)
        return v

    @model_validator(mode="after")
    def _per_type(self) -> "Config":
        t = self.type
        if t is None:
            if not self.headers:
                raise ValueError("set type (bearer, header, basic, query, oauth2_client_credentials, "
                                 "oauth2_jwt_bearer, aws_sigv4) "
                                 "or [auth.headers]")
            if self.tenants:
                raise ValueError("[auth.tenants] needs a type")
            return self
        own = _TYPE_ONLY.get(t, set())
        for other, fields in _TYPE_ONLY.items():
            if other != t:
                for f in fields - own:
                    if f in self.model_fields_set:
                        raise ValueError(f"{f} is for type = \"{other}\", not \"{t}\"")
        for f in (*CREDENTIAL_FIELDS, *AWS_KEY_FIELDS):
            _check_ref(f, getattr(self, f))
        if t == "aws_sigv4":
            _check_sigv4(self)
        if t == "header":
            if not self.header:
                raise ValueError("type = \"header\" needs header (for example header = \"X-Api-Key\")")
            credential_header(self.header)
        if t == "query" and not self.param:
            raise ValueError("type = \"query\" needs param (for example param = \"api_key\")")
        if t == "oauth2_client_credentials":
            if not self.token_url or not self.token_url.startswith(("https://", "http://")):
                raise ValueError("type = \"oauth2_client_credentials\" needs token_url (an https:// URL)")
        if t == "oauth2_jwt_bearer" and self.token_url and not self.token_url.startswith(("https://", "http://")):
            raise ValueError("token_url must be an https:// URL (default: the credentials' token_uri)")
        injected = {"header": (self.header or "").lower(), "query": ""}.get(t, "authorization")
        names = {n.lower() for n in self.headers}
        for tc in self.tenants.values():
            names |= {n.lower() for n in tc.headers}
        if injected and injected in names:
            raise ValueError(f"[auth.headers] cannot set {injected!r}: type = \"{t}\" sets it")
        needed = SECRET_FIELDS[t]
        if self.unknown_tenant == "default" or not self.tenants:
            missing = [f for f in needed if getattr(self, f) is None]
            if missing:
                raise ValueError(f"type = \"{t}\" needs {' and '.join(missing)}"
                                 + (" (or unknown_tenant = \"reject\" with only per-tenant credentials)"
                                    if self.tenants else ""))
        for name, tc in self.tenants.items():
            for f in needed:
                if getattr(tc, f) is None and getattr(self, f) is None:
                    raise ValueError(f"tenants.{name}: needs {f} (no default in [auth] to fall back to)")
            if t == "aws_sigv4":
                _check_keys(tc, f"tenants.{name}: ")
            else:
                for f in AWS_KEY_FIELDS:
                    if getattr(tc, f) is not None:
                        raise ValueError(f"tenants.{name}: {f} is not used by type = \"{t}\"")
            for f in CREDENTIAL_FIELDS:
                if f not in needed and getattr(tc, f) is not None:
                    raise ValueError(f"tenants.{name}: {f} is not used by type = \"{t}\"")
        return self
