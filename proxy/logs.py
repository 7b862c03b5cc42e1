"""Application logs: one JSON object per line (or text for humans), the
start-up summary, and keyed hashes of client identities for audit-safe
access logs.

The access log (proxy/accesslog.py) is separate: one JSON line per request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from yarl import URL

from .errors import ConfigError
from .secrets import SecretUnavailable

if TYPE_CHECKING:
    from .config import LoggingSettings, Settings
    from .runtime import Runtime
    from .secrets import SecretStore

log = logging.getLogger("sidecar")

# LogRecord attributes that are not extras a caller passed.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extras, "error"}`` on one line.

    An exception becomes its type and message (``error``); the traceback is
    kept for ``level = "debug"`` only (a traceback can carry request data).
    """

    def __init__(self, tracebacks: bool = False) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            out["error"] = f"{type(e).__name__}: {e}"
            if self.tracebacks:
                out["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self, tracebacks: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.tracebacks = tracebacks

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        if self.tracebacks:
            return super().formatException(ei)
        return f"  {type(ei[1]).__name__}: {ei[1]}"


def setup_logging(settings: "LoggingSettings", stream: Any = None) -> None:
    """Configure the root logger from ``[logging]`` (level, format)."""
    debug = settings.level == "debug"
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(debug) if settings.format == "json" else TextFormatter(debug))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, settings.level.upper()))


def mask_url(url: str) -> str:
    """A URL fit for a log: the password (and a user that is a token) masked."""
    try:
        u = URL(url)
    except ValueError:
        return "(unparseable URL)"
    if u.password is not None:
        u = u.with_password("***")
    return str(u)


# ---- identities in access-log lines ---------------------------------------

class Identity(str):
    """A value in ``ex.log`` that names a client (a tenant, a token's subject):
    written as is, or as its keyed hash under ``[logging] hash_identifiers``,
    like the line's own ``tenant`` and ``client`` fields."""

    __slots__ = ()


def identity_hider(h: Callable[[str | None], str | None]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The ``decisions`` render under hash_identifiers: each Identity (at the
    top or one table down, as ``{"jwt": {"sub": ...}}``) becomes its hash."""
    def one(v: Any) -> Any:
        if isinstance(v, Identity):
            return h(v)
        if isinstance(v, dict):
            return {k: h(x) if isinstance(x, Identity) else x for k, x in v.items()}
        return v

    def hide(decisions: dict[str, Any]) -> dict[str, Any]:
        return {k: one(v) for k, v in decisions.items()}

    return hide


def identifier_hasher(secrets: "SecretStore", settings: "Settings") -> Callable[[str | None], str | None]:
    """A client address or tenant as HMAC-SHA256(hash_key, value) hex truncated
    to 16 characters: stable across restarts and sidecars sharing the key, so
    an audit trail correlates a client without holding its identity (a plain
    hash of an IPv4 address is reversed by trying all 2^32). Applied when the
    access log is flushed (its ``render``), not on the request path."""
    ref_text = settings.logging.hash_key
    assert ref_text is not None
    ref = secrets.ref(ref_text)
    try:
        key = ref.get().encode()
    except SecretUnavailable:
        where = settings.path or "config"
        raise ConfigError([f"{where}: logging.hash_key: {ref_text} does not resolve "
                           f"({ref.error or 'unavailable'}); refusing to log identities in clear"]) from None
    memo: dict[str, str] = {}

    def h(value: str | None) -> str | None:
        if value is None:
            return None
        got = memo.get(value)
        if got is None:
            got = hmac.new(key, value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]
            if len(memo) >= 16384:
                memo.clear()
            memo[value] = got
        return got

    return h


# ---- start-up summary ------------------------------------------------------

async def log_startup(rt: "Runtime", ports: dict[str, int]) -> None:
    """What an operator reads first: listeners, routes, secrets not resolvable
    yet, and the state backend's reachability (its URL with the password masked)."""
    s = rt.settings
    hosts = {"outbound": s.outbound.host, "admin": s.admin.host}
    for name in ports:
        extra = rt.extra_settings.get(name)     # a plugin's listener ([inbound])
        if name not in hosts and extra is not None and hasattr(extra, "host"):
            hosts[name] = extra.host
    log.info("listening", extra={"worker": rt.worker_id,
                                 "listeners": {name: f"{hosts.get(name, '?')}:{port}" for name, port in ports.items()}})
    if rt.worker_id != 0:
        return   # with workers > 1 the rest is the same for every worker: said once
    for r in sorted(rt.table.routes, key=lambda r: r.prefix):
        log.info("route %s -> %s", r.prefix, r.upstream.url if r.upstream is not None else "(terminal)",
                 extra={"route": r.name, "prefix": r.prefix, "file": str(r.policy.file),
                        "enabled": r.policy.core.enabled, "plugins": [f.name for f in r.filters]})
    for warning in rt.secrets.check():
        log.warning("secret reference not resolvable yet: %s", warning)
    if rt.state.kind == "redis":
        t0 = time.monotonic()
        try:
            ok = await rt.state.ping()
            error = None if ok else "no PONG"
        except Exception as e:  # the client's own error types vary by version
            ok, error = False, f"{type(e).__name__}: {e}"
        if not ok:
            log.error("state backend unreachable: redis at %s (%s)", mask_url(s.state.url), error,
                      extra={"latency_ms": round((time.monotonic() - t0) * 1000, 1)})
