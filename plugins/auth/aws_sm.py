"""AWS Secrets Manager references: ``aws-sm:<secret id>#<json key>``, optionally
pinned ``@AWSPREVIOUS`` (a staging label) or ``@<version id>`` (issue 15).

```toml
[secrets.aws]                  # config.toml; every key optional
region = "us-east-1"           # AWS_REGION / AWS_DEFAULT_REGION when absent
endpoint_url = ""              # a local endpoint (LocalStack, moto) for tests
refresh = "60s"                # values re-read in the background, like vault:
max_stale = "1h"               # last value served this long while AWS is unreachable
```

Same semantics as ``vault:`` references: botocore is synchronous (urllib3),
so every AWS call runs in ONE dedicated thread, never on the event loop; the
thread owns the botocore client and its credentials (botocore's standard
chain: env, shared config, web identity / IRSA, container and instance
metadata, refreshed by botocore itself); the loop owns the cached values, so
``AwsSmSecret.get()`` never blocks. A value is served until ``max_stale``
after its last successful read, then the route answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

import orjson

from proxy.secrets import RemoteSecret, RemoteSource

from .settings import AwsSettings

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger("sidecar.aws")

PREFIX = "aws-sm:"
STAGES = ("AWSCURRENT", "AWSPREVIOUS", "AWSPENDING")
# Secrets Manager version ids are UUIDs (32 to 64 characters).
_VERSION_ID = re.compile(r"[A-Za-z0-9-]{32,64}")

Pin = tuple[str, str] | None     # ("stage", "AWSPREVIOUS") | ("version", "<id>") | None (AWSCURRENT)


def parse_reference(raw: str) -> tuple[str, str | None, Pin]:
    """``aws-sm:prod/openai#OPENAI_API_KEY@AWSPREVIOUS`` -> ("prod/openai", "OPENAI_API_KEY",
    ("stage", "AWSPREVIOUS")). A last ``@x`` is a pin only when x is a staging
    label AWS defines or a version id: secret names may contain '@' themselves."""
    body = raw[len(PREFIX):]
    pin: Pin = None
    head, at, tail = body.rpartition("@")
    if at and (tail in STAGES or _VERSION_ID.fullmatch(tail)):
        body = head
        pin = ("stage", tail) if tail in STAGES else ("version", tail)
    secret_id, sep, key = body.partition("#")
    if not secret_id or (sep and not key):
        raise ValueError(f"{raw}: an AWS Secrets Manager reference is aws-sm:<secret id>[#<json key>]"
                         "[@AWSPREVIOUS|@<version id>]")
    if pin == ("stage", "AWSCURRENT"):
        pin = None
    return secret_id, key or None, pin


class KeyMissing(ValueError):
    """The secret has no such key (an optional reference is then omitted)."""


def extract(secret_string: str, key: str | None) -> str:
    """The value a reference names in a SecretString (raises ValueError, value-free)."""
    if key is None:
        if not secret_string:
            raise ValueError("the secret is empty")
        return secret_string
    try:
        doc = orjson.loads(secret_string)
    except orjson.JSONDecodeError:
        raise ValueError(f"#{key}: the secret is not a JSON object") from None
    if not isinstance(doc, dict):
        raise ValueError(f"#{key}: the secret is not a JSON object")
    value = doc.get(key)
    if value is None or value == "":
        raise KeyMissing(f"key {key!r} is not in the secret")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"key {key!r} is not a string or a number")
    return str(value)


class AwsSmSecret(RemoteSecret):
    """One Secrets Manager secret (or one key of its JSON), refreshed by its backend."""

    source = "aws-sm"
    # Read by ``sidecar validate`` through probe(), not by the offline check.
    validate_offline = False

    def __init__(self, raw: str, backend: "AwsSecretsBackend") -> None:
        super().__init__(raw, backend.settings.max_stale)
        self.secret_id, self.key, self.pin = parse_reference(raw)
        self.backend = backend
        self.error = "not read from AWS yet"

    @property
    def group(self) -> tuple[str, Pin]:
        return (self.secret_id, self.pin)

    async def probe(self) -> str | None:
        """Read once now (``sidecar validate``); the reason when it cannot be resolved."""
        got = await self.backend.run(self.backend.read_groups, [self.group])
        kind, payload, _ = got[self.group]
        if kind in ("error", "absent"):
            return payload
        try:
            extract(payload, self.key)
        except ValueError as e:
            return str(e)
        return None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["pinned"] = None if self.pin is None else self.pin[1] if self.pin[0] == "stage" else "version"
        return d


def _why(e: BaseException) -> str:
    """A short, value-free reason for a failed AWS call."""
    from botocore import exceptions as bx

    if isinstance(e, bx.ClientError):
        err = e.response.get("Error") or {}
        meta = e.response.get("ResponseMetadata")
        status = meta.get("HTTPStatusCode", "?") if meta else "?"
        msg = str(err.get("Message") or "")[:120]
        return f"AWS answered {status} {err.get('Code') or '?'}" + (f": {msg}" if msg else "")
    if isinstance(e, bx.NoRegionError):
        return "no AWS region: set [secrets.aws] region or AWS_REGION"
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError | bx.CredentialRetrievalError):
        return f"no usable AWS credentials from the standard chain ({type(e).__name__})"
    if isinstance(e, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError
                  | bx.ConnectionClosedError) or isinstance(e, OSError):
        return f"cannot reach AWS Secrets Manager ({type(e).__name__})"
    return f"AWS call failed ({type(e).__name__})"


def _not_found(e: BaseException) -> bool:
    """AWS answered that the secret (or the pinned version) does not exist."""
    from botocore import exceptions as bx

    return isinstance(e, bx.ClientError) and (e.response.get("Error") or {}).get("Code") == \
        "ResourceNotFoundException"


class AwsSecretsBackend(RemoteSource):
    """The ``aws-sm:`` source of one runtime: a factory for refs and a refresh loop."""

    name = "aws-sm"
    settings: AwsSettings

    def __init__(self, settings: AwsSettings, refreshes: "Counter") -> None:
        super().__init__(settings)
        self.refreshes = refreshes
        self.region = settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self._client: Any = None            # botocore client, touched only in the thread
        self.last_error: str | None = None
        self.last_success: float | None = None   # wall time
        self._logged: dict[tuple[str, Pin], str] = {}   # each secret's failure logged once, not per cycle

    def new_ref(self, raw: str) -> AwsSmSecret:
        return AwsSmSecret(raw, self)

    # ---- loop side -------------------------------------------------------

    async def _loop(self) -> None:
        assert self._wake is not None
        retry = max(0.2, min(self.settings.refresh / 4, 5.0))
        while True:
            try:
                await self.refresh(force=False)
            except asyncio.CancelledError:
                raise
            except Exception:   # never let the loop die; the next tick retries
                log.exception("aws-sm refresh failed unexpectedly")
            wait = self.settings.refresh
            if self.last_error or any(r.value is None for r in self.refs):
                wait = min(wait, retry)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.2))
            except asyncio.TimeoutError:
                pass

    async def refresh(self, force: bool = True) -> None:
        """Read every reference due (all of them when ``force``) in the AWS thread."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            due = self.due(force)
            if not due:
                return
            # One GetSecretValue per (secret, pin) however many keys are read from it.
            groups = list(dict.fromkeys(r.group for r in due))
            results = await self.run(self.read_groups, groups)
            self._apply(due, results)

    def _apply(self, due: list[AwsSmSecret], results: dict[tuple[str, Pin], Any]) -> None:
        now, wall = time.monotonic(), time.time()
        for r in due:
            kind, payload, version = results[r.group]
            r.tried = True
            if kind in ("error", "absent"):
                r.error, r.absent = payload, kind == "absent"
                self.refreshes.labels(r.raw, "aws-sm", "error").inc()
                continue
            try:
                value = extract(payload, r.key)
            except ValueError as e:
                r.error = f"{e} (version {version})"
                r.absent = isinstance(e, KeyMissing)
                self.refreshes.labels(r.raw, "aws-sm", "error").inc()
                continue
            if r.value is not None and value != r.value:
                log.info("secret %s rotated to version %s", r.raw, version)
            r.value, r.version = value, version
            r.confirmed, r.updated, r.error, r.absent = now, wall, None, False
            self.refreshes.labels(r.raw, "aws-sm", "ok").inc()

    def describe(self) -> dict[str, Any]:
        """For /admin/secrets: never a credential or a value."""
        return {"region": self.region, "endpoint_url": self.settings.endpoint_url,
                "refresh_seconds": self.settings.refresh, "max_stale_seconds": self.settings.max_stale,
                "last_success_age_seconds": None if self.last_success is None
                else round(time.time() - self.last_success, 3),
                "last_error": self.last_error}

    # ---- thread side: every botocore call lives below ----------------------

    def read_groups(self, groups: list[tuple[str, Pin]]) -> dict[tuple[str, Pin], Any]:
        out: dict[tuple[str, Pin], Any] = {}
        for secret_id, pin in groups:
            group = (secret_id, pin)
            try:
                out[group] = self._read(secret_id, pin)
                self.last_error, self.last_success = None, time.time()
                if self._logged.pop(group, None) is not None:
                    log.info("aws-sm read of %s works again", secret_id)
            except Exception as e:
                why = _why(e)
                if self._logged.get(group) != why:
                    log.warning("aws-sm read of %s failed: %s", secret_id, why)
                    self._logged[group] = why
                self.last_error = why
                out[group] = ("absent" if _not_found(e) else "error", why, None)
        return out

    def _read(self, secret_id: str, pin: Pin) -> tuple[str, str, str | None]:
        if self._client is None:
            self._client = self._make_client()
        kw: dict[str, str] = {"SecretId": secret_id}
        if pin is not None:
            kw["VersionStage" if pin[0] == "stage" else "VersionId"] = pin[1]
        resp = self._client.get_secret_value(**kw)
        text = resp.get("SecretString")
        if text is None:
            blob = resp.get("SecretBinary") or b""
            try:
                text = blob.decode("utf-8")
            except UnicodeDecodeError:
                return ("error", "the secret is binary, not UTF-8 text", None)
        return ("data", text, resp.get("VersionId"))

    def _make_client(self) -> Any:
        import botocore.session
        from botocore.config import Config

        t = self.settings.timeout
        session = botocore.session.get_session()
        return session.create_client(
            "secretsmanager", region_name=self.region, endpoint_url=self.settings.endpoint_url,
            config=Config(connect_timeout=t, read_timeout=t,
                          # One quick retry: the background loop is the real retry.
                          retries={"max_attempts": 2, "mode": "standard"}))
