"""config.toml and policies/*.toml: models, loading and file: field: reason errors.

Validation happens here, once, at load time (control plane). Nothing in this
module runs per request.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import tomllib
from pathlib import Path
from collections.abc import Mapping
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import orjson
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .errors import ConfigError
from .units import Duration, Size


class Model(BaseModel):
    """Base for every config model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen must be \"host:port\", got {value!r}")
    return value


class Listener(Model):
    listen: str
    # Client-connection limits of this listener; unset: [limits]'s value.
    header_timeout: Duration | None = None
    keepalive_timeout: Duration | None = None
    max_connections: int | None = Field(default=None, ge=1)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _check_listen(v)

    @property
    def host(self) -> str:
        # `listen = ":8080"` is the operator asking for every interface.
        return self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"  # noqa: S104

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class OutboundSettings(Listener):
    listen: str = "127.0.0.1:8080"
    # Addresses whose X-Forwarded-* headers are trusted and extended (Envoy's
    # xff_num_trusted_hops by address); from anyone else they are replaced.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Upstream connection pool per upstream origin.
    pool_size: int = Field(default=100, ge=1)
    pool_idle_timeout: Duration = 60.0
    # Upstream HTTP client: "fast" (asyncio protocol + llhttp, proxy/fastclient/)
    # or "aiohttp" (ClientSession; the reference the fast one is tested against).
    client: Literal["fast", "aiohttp"] = "fast"
    # Listener: "fast" (asyncio protocol + llhttp, proxy/fastserver/) or
    # "aiohttp" (aiohttp's server; the reference the fast one is tested against).
    server: Literal["fast", "aiohttp"] = "fast"
    # Peers (CIDRs) allowed to use the outbound listener; None = loopback only
    # by position (the listener must then bind a loopback address).
    allowed_clients: list[str] | None = Field(default=None, validate_default=True)

    @field_validator("allowed_clients")
    @classmethod
    def _allowed_clients(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        from .clients import is_loopback, parse_networks

        if v is not None:
            parse_networks(v)
            return v
        listen = info.data.get("listen")
        host = listen.rpartition(":")[0].strip("[]") if listen else "127.0.0.1"
        # An outbound listener reachable from a network is an open proxy that
        # injects credentials: refuse it unless the operator lists who may call.
        if not is_loopback(host):
            raise ValueError(f"required: listen {listen!r} is not a loopback address, and an outbound "
                             "listener open to a network injects credentials for anyone; list the peers "
                             "allowed (allowed_clients = [\"10.0.0.0/8\"]) or listen on 127.0.0.1")
        return v


class AdminSettings(Listener):
    listen: str = "127.0.0.1:9901"
    # A secret reference ("env:SIDECAR_ADMIN_TOKEN"): when set, every /admin/*
    # endpoint needs "Authorization: Bearer <token>"; /health*, /ready,
    # /metrics and the dashboard page stay open.
    token: str | None = None

    @field_validator("token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        from .secrets import is_reference

        if v is not None and not is_reference(v):
            raise ValueError("must be a secret reference (\"env:SIDECAR_ADMIN_TOKEN\", file:/path or "
                             "vault:path#key), never the token itself")
        return v


class SidecarSection(Model):
    service: str = "sidecar"
    policies: str = "policies"
    workers: int = Field(default=1, ge=0)
    # With workers > 1, pin each worker to one CPU (proxy/server.py
    # worker_cpus): "auto" when the sidecar may run on exactly as many CPUs
    # as it has workers, "on" always (round robin), "off" never.
    cpu_affinity: Literal["auto", "on", "off"] = "auto"
    drain_timeout: Duration = 10.0
    # Dotted paths of third-party plugin modules to register beside entry points.
    plugins: list[str] = Field(default_factory=list)
    # Re-read policies/ when a file changes (watchfiles) and on SIGHUP.
    watch: bool = True


class StateSettings(Model):
    backend: Literal["memory", "redis"] = "memory"
    # redis:// or rediss:// for one Redis; redis+cluster:// (or cluster = true)
    # for a Redis Cluster, given any one of its nodes (docs/scaling.md).
    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    # Redis connections per worker (per node in a cluster); past it, commands
    # wait for a free one (one Redis) or fail at once (cluster).
    max_connections: int = Field(default=64, ge=1)
    # Connecting to Redis and each reply wait at most this long (a free pooled
    # connection up to 4 times it). Issue 11: a frozen Redis put 2 s on every
    # request.
    timeout: Duration = Field(default=0.25, gt=0)
    # After 3 consecutive failures to reach a Redis node, commands to it fail
    # at once for this long (each plugin answers per its fail-open setting).
    backoff: Duration = Field(default=1.0, ge=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")):
            raise ValueError(f"url must start with redis://, rediss://, unix://, redis+cluster:// or "
                             f"rediss+cluster://, got {v.split('://')[0]!r}")
        return v


class Limits(Model):
    max_request_body: Size = 100 * 1024 * 1024
    max_header_size: Size = 64 * 1024
    max_headers: int = Field(default=100, ge=1)


class ServerLimits(Limits):
    """config.toml ``[limits]``: the per-route limits (a policy's ``[limits]``
    overrides those) and the client-connection limits of every listener
    (a listener section may override these; issue 11 item 3)."""

    # The whole request head must arrive within this; else 408 and close
    # (nginx client_header_timeout, HAProxy timeout http-request).
    header_timeout: Duration = Field(default=10.0, gt=0)
    # Idle keep-alive client connections are closed after this (nginx's 75 s).
    keepalive_timeout: Duration = Field(default=75.0, gt=0)
    # Open client connections per worker and listener; past it new ones wait
    # in the listen backlog.
    max_connections: int = Field(default=10000, ge=1)

    def route_limits(self) -> dict[str, Any]:
        """The keys a policy's [limits] may override."""
        return {k: getattr(self, k) for k in Limits.model_fields}

    def for_listener(self, section: "Listener") -> tuple[float, float, int]:
        """(header_timeout, keepalive_timeout, max_connections) for one listener."""
        return (section.header_timeout if section.header_timeout is not None else self.header_timeout,
                section.keepalive_timeout if section.keepalive_timeout is not None else self.keepalive_timeout,
                section.max_connections if section.max_connections is not None else self.max_connections)


class LoggingSettings(Model):
    # "stdout", "stderr", "off" or a file path.
    access_log: str = "stdout"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Extra header names redacted wherever headers are logged.
    redact_headers: list[str] = Field(default_factory=list)
    # Request headers copied (redacted) into each access-log line.
    log_headers: list[str] = Field(default_factory=list)
    # Application log lines (not the access log): one JSON object per line,
    # or "text" for humans at a terminal.
    format: Literal["json", "text"] = "json"
    # Replace the client IP and the tenant in access-log lines with
    # HMAC-SHA256(hash_key, value) hex truncated to 16 characters.
    hash_identifiers: bool = False
    hash_key: str | None = None

    @model_validator(mode="after")
    def _hash(self) -> "LoggingSettings":
        from .secrets import is_reference

        if self.hash_identifiers and not self.hash_key:
            raise ValueError('hash_identifiers = true needs hash_key (e.g. "env:SIDECAR_LOG_HASH_KEY")')
        if self.hash_key is not None and not is_reference(self.hash_key):
            raise ValueError("hash_key must be a secret reference (env:NAME, file:/path or vault:path#key)")
        return self


class Settings(Model):
    """config.toml: the sidecar process settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sidecar: SidecarSection = SidecarSection()
    outbound: OutboundSettings = OutboundSettings()
    admin: AdminSettings = AdminSettings()
    state: StateSettings = StateSettings()
    limits: ServerLimits = ServerLimits()
    logging: LoggingSettings = LoggingSettings()

    # Where config.toml lives: relative paths in it resolve against this folder.
    base_dir: Path = Path(".")
    path: Path | None = None
    # Top-level tables owned by plugins (sidecar_settings_register), validated
    # by validate_extra_settings once the plugin manager exists.
    extra_tables: dict[str, Any] = Field(default_factory=dict)

    @property
    def policies_dir(self) -> Path:
        return (self.base_dir / self.sidecar.policies).resolve()


class Timeouts(Model):
    connect: Duration = 5.0
    # Deadline for the whole exchange, until the last response byte (Envoy's
    # route timeout); 0 disables it (long streams). Retries are inside it.
    total: Duration = 30.0
    # Longest silence while reading from the upstream (Envoy's idle timeout).
    idle: Duration = 60.0


class TLS(Model):
    verify: bool = True
    ca_bundle: str | None = None


CORE_POLICY_KEYS = {"route", "upstream", "timeouts", "limits", "tls", "tenant_header", "description",
                    "mode", "fixtures", "match_body", "enabled"}


class PolicyCore(Model):
    """The core keys of one policy file; plugin tables are validated by their plugins."""

    route: str | None = Field(default=None, description="Path prefix on the outbound listener, "
                              "stripped before forwarding (\"/openai\").")
    upstream: str | None = Field(default=None, description="Base URL requests are sent to; may carry a path.")
    description: str = ""
    # false: the route stays in the table and answers 503 route_disabled.
    enabled: bool = Field(default=True, description="false turns the route off: it answers "
                          "503 route_disabled until set back to true.")
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    tls: TLS = TLS()
    tenant_header: str = "X-Tenant-ID"
    # live | simulate | record (proxy/fixtures.py); fixtures: the cassette
    # folder, relative to the policy file (default fixtures/<policy name>).
    mode: Literal["live", "simulate", "record"] = "live"
    fixtures: str | None = None
    match_body: bool = False

    @field_validator("route")
    @classmethod
    def _route(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("/"):
            raise ValueError("route must start with '/'")
        if any(c in v for c in "?#* \t"):
            raise ValueError("route is a plain path prefix: no '?', '#', '*' or spaces")
        if "/../" in v + "/" or "/./" in v + "/":
            raise ValueError("route must not contain '.' or '..' segments")
        return v.rstrip("/") or "/"

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from yarl import URL

        try:
            url = URL(v)
        except ValueError as e:  # pragma: no cover - yarl rarely refuses
            raise ValueError(f"invalid URL: {e}") from None
        if url.scheme not in ("http", "https"):
            raise ValueError("upstream must be an http:// or https:// URL")
        if not url.host:
            raise ValueError("upstream must name a host")
        if url.query_string or url.fragment:
            raise ValueError("upstream must not carry a query or fragment")
        if url.user is not None or url.password is not None:
            # Neither upstream client sends URL userinfo, and the URL is shown
            # in /admin/routes: a credential here would leak and do nothing.
            raise ValueError("upstream must not carry user:password; use [auth] (type = \"basic\")")
        return v

    @model_validator(mode="after")
    def _pair(self) -> "PolicyCore":
        if (self.route is None) != (self.upstream is None):
            raise ValueError("route and upstream go together: set both or neither")
        if self.route is None and (self.mode != "live" or self.fixtures is not None or self.match_body):
            raise ValueError("mode, fixtures and match_body are for a policy with a route and upstream")
        return self


class Policy:
    """One validated policy file: core keys plus each plugin's validated Config."""

    __slots__ = ("name", "file", "core", "plugins", "raw", "digest")

    def __init__(self, name: str, file: Path, core: PolicyCore,
                 plugins: dict[str, BaseModel], raw: dict[str, Any]) -> None:
        self.name = name
        self.file = file
        self.core = core
        self.plugins = plugins
        self.raw = raw
        self.digest = config_digest(raw)

    def __repr__(self) -> str:
        return f"Policy({self.name!r}, route={self.core.route!r})"


def config_digest(data: Any) -> str:
    """A stable digest of a config table: equal digests mean the same config."""
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after", "function-before")) or "(top level)"


# Values under these names are never echoed back in a problem line.
_SECRETISH = ("secret", "token", "password", "credential", "private", "api_key", "api-key", "apikey",
              "hash_key", "authorization", "cookie")


def _members(t: Any) -> list[Any]:
    """The annotations an annotation stands for (Annotated, Optional, unions unwrapped)."""
    origin = get_origin(t)
    if origin is Annotated:
        return _members(get_args(t)[0])
    if origin in (Union, UnionType):
        return [m for a in get_args(t) for m in _members(a)]
    return [t]


def known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> set[str]:
    """The keys allowed in the table at ``loc`` of ``model`` (for did-you-mean)."""
    current: list[Any] = [model]
    for part in loc:
        nxt: list[Any] = []
        for t in (m for c in current for m in _members(c)):
            origin = get_origin(t)
            if isinstance(t, type) and issubclass(t, BaseModel):
                f = t.model_fields.get(part) if isinstance(part, str) else None
                if f is not None:
                    nxt.append(f.annotation)
            elif origin in (dict, Mapping) and isinstance(part, str):
                nxt.append(get_args(t)[1] if get_args(t) else Any)
            elif origin in (list, tuple, set, frozenset) and isinstance(part, int):
                args = [a for a in get_args(t) if a is not Ellipsis]
                nxt.extend(args[:1])
        # A tag of a tagged union or a validator step: stay where we are.
        current = nxt or current
    keys: set[str] = set()
    for t in (m for c in current for m in _members(c)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            for name, f in t.model_fields.items():
                keys.add(f.alias or name)
    return keys


def _echo(loc: tuple[Any, ...], value: Any) -> str:
    if not isinstance(value, (str, int, float, bool)):
        return ""
    if any(isinstance(p, str) and any(w in p.lower() for w in _SECRETISH) for p in loc):
        return " (got a value, not shown)"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f" (got {text})"


def pydantic_problems(file: Path | str, err: ValidationError, prefix: str = "",
                      model: type[BaseModel] | None = None) -> list[str]:
    """One ``file: field: reason`` line per pydantic error: dotted field paths,
    the bad value echoed (never under a secret-like name), and a did-you-mean
    for an unknown key when ``model`` is given."""
    out = []
    for e in err.errors(include_url=False):
        loc = e["loc"]
        field = _loc(loc)
        if prefix:
            field = f"{prefix}.{field}" if field != "(top level)" else prefix
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            if model is not None and loc:
                msg += suggest(str(loc[-1]), known_keys(model, tuple(loc[:-1])))
        elif e["type"] != "missing" and loc:
            value = e.get("input")
            if not (isinstance(value, str) and repr(value) in msg):
                msg += _echo(tuple(loc), value)
        out.append(f"{file}: {field}: {msg}")
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: (file): not found"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: (syntax): {e}"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: (file): {e.strerror}"]) from None


def load_settings(path: str | os.PathLike[str] | None) -> Settings:
    """Read and validate config.toml; ``None`` gives the embedded defaults."""
    if path is None:
        return Settings(base_dir=Path.cwd())
    p = Path(path).resolve()
    raw = _read_toml(p)
    core = {k: v for k, v in raw.items() if k in _SETTINGS_TABLES}
    extra = {k: v for k, v in raw.items() if k not in _SETTINGS_TABLES}
    try:
        return Settings(**core, base_dir=p.parent, path=p, extra_tables=extra)
    except ValidationError as e:
        raise ConfigError(pydantic_problems(p, e, model=Settings)) from None


_SETTINGS_TABLES = {"sidecar", "outbound", "admin", "state", "limits", "logging"}


def validate_table(where: Path | str, name: str, table: Any, model: type[BaseModel],
                   problems: list[str], context: dict[str, Any] | None = None) -> BaseModel | None:
    """Validate one TOML table with its model; problems are appended as file: field: reason."""
    if not isinstance(table, dict):
        problems.append(f"{where}: {name}: expected a table [{name}]")
        return None
    try:
        return model.model_validate(table, context=context)
    except ValidationError as e:
        problems += pydantic_problems(where, e, prefix=name, model=model)
        return None


def validate_extra_settings(settings: Settings, models: dict[str, type[BaseModel]],
                            context: dict[str, Any] | None = None) -> dict[str, BaseModel]:
    """Validate the plugin-owned tables of config.toml; unknown tables are errors.

    ``context`` reaches the models' validators (``info.context``): the runtime
    passes ``{"plugin_specs": ...}`` so a table may nest plugin tables
    (``[inbound.routes."/api".jwt]``) and validate them with their plugin's model.
    """
    where = settings.path or "config"
    problems: list[str] = []
    out: dict[str, BaseModel] = {}
    for name, model in models.items():
        value = validate_table(where, name, settings.extra_tables.get(name, {}), model, problems, context)
        if value is not None:
            out[name] = value
    for name in settings.extra_tables:
        if name not in models:
            problems.append(f"{where}: {name}: unknown table{suggest(name, _SETTINGS_TABLES | set(models))}")
    if problems:
        raise ConfigError(problems)
    return out


def suggest(name: str, options: list[str] | set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_policy(path: Path, raw: dict[str, Any], settings: Settings,
                 plugin_configs: dict[str, type[BaseModel]], partial: bool = False) -> tuple[Policy | None, list[str]]:
    """Validate one policy's tables; returns the policy or the problems found.

    ``partial``: with problems, still return the policy made of its valid
    tables (when its core keys are valid), so ``sidecar validate`` can build
    and set-check it too and report every problem in one run."""
    problems: list[str] = []
    core_raw = {k: v for k, v in raw.items() if k in CORE_POLICY_KEYS}
    # A policy's [limits] overrides config.toml's per key.
    if "limits" in core_raw and isinstance(core_raw["limits"], dict):
        core_raw["limits"] = {**settings.limits.route_limits(), **core_raw["limits"]}
    else:
        core_raw["limits"] = settings.limits.route_limits()
    core: PolicyCore | None = None
    try:
        core = PolicyCore(**core_raw)
    except ValidationError as e:
        problems += pydantic_problems(path, e, model=PolicyCore)
    plugins: dict[str, BaseModel] = {}
    for key, table in raw.items():
        if key in CORE_POLICY_KEYS:
            continue
        model = plugin_configs.get(key)
        if model is None:
            kind = "table" if isinstance(table, dict) else "key"
            problems.append(f"{path}: {key}: unknown {kind}: no plugin or core setting of that name"
                            f"{suggest(key, set(plugin_configs) | CORE_POLICY_KEYS)}")
            continue
        value = validate_table(path, key, table, model, problems)
        if value is not None:
            plugins[key] = value
    if core is None or (problems and not partial):
        return None, problems
    if problems:
        raw = {k: v for k, v in raw.items() if k in CORE_POLICY_KEYS or k in plugins}
    return Policy(path.stem, path, core, plugins, raw), problems


def load_policies(settings: Settings, plugin_configs: dict[str, type[BaseModel]]) -> list[Policy]:
    """Read every policies/*.toml; raise ConfigError listing every problem in every file."""
    policies, problems = read_policies(settings, plugin_configs)
    if problems:
        raise ConfigError(problems)
    return policies


def read_policies(settings: Settings, plugin_configs: dict[str, type[BaseModel]],
                  partial: bool = False) -> tuple[list[Policy], list[str]]:
    """Every valid policy of policies/*.toml and every problem of the others
    (``partial``: see parse_policy)."""
    folder = settings.policies_dir
    if not folder.is_dir():
        return [], [f"{folder}: (folder): policies folder not found"]
    problems: list[str] = []
    policies: list[Policy] = []
    for path in sorted(folder.glob("*.toml")):
        try:
            raw = _read_toml(path)
        except ConfigError as e:
            problems += e.problems
            continue
        policy, found = parse_policy(path, raw, settings, plugin_configs, partial)
        problems += found
        if policy is None:
            continue
        policies.append(policy)
    return policies, problems
