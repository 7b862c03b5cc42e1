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
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
        return self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"

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


class AdminSettings(Listener):
    listen: str = "127.0.0.1:9901"


class SidecarSection(Model):
    service: str = "sidecar"
    policies: str = "policies"
    workers: int = Field(default=1, ge=0)
    drain_timeout: Duration = 10.0
    # Dotted paths of third-party plugin modules to register beside entry points.
    plugins: list[str] = Field(default_factory=list)
    # Re-read policies/ when a file changes (watchfiles) and on SIGHUP.
    watch: bool = True


class StateSettings(Model):
    backend: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    # Redis connections per worker; past it, commands wait for a free one.
    max_connections: int = Field(default=64, ge=1)


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


CORE_POLICY_KEYS = {"route", "upstream", "timeouts", "limits", "tls", "tenant_header", "description"}


class PolicyCore(Model):
    """The core keys of one policy file; plugin tables are validated by their plugins."""

    route: str | None = None
    upstream: str | None = None
    description: str = ""
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    tls: TLS = TLS()
    tenant_header: str = "X-Tenant-ID"

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


def pydantic_problems(file: Path | str, err: ValidationError, prefix: str = "") -> list[str]:
    """One ``file: field: reason`` line per pydantic error."""
    out = []
    for e in err.errors(include_url=False):
        field = _loc(e["loc"])
        if prefix:
            field = f"{prefix}.{field}" if field != "(top level)" else prefix
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
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
        raise ConfigError(pydantic_problems(p, e)) from None


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
        problems += pydantic_problems(where, e, prefix=name)
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
                 plugin_configs: dict[str, type[BaseModel]]) -> tuple[Policy | None, list[str]]:
    """Validate one policy's tables; returns the policy or the problems found."""
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
        problems += pydantic_problems(path, e)
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
    if problems or core is None:
        return None, problems
    return Policy(path.stem, path, core, plugins, raw), []


def load_policies(settings: Settings, plugin_configs: dict[str, type[BaseModel]]) -> list[Policy]:
    """Read every policies/*.toml; raise ConfigError listing every problem in every file."""
    folder = settings.policies_dir
    if not folder.is_dir():
        raise ConfigError([f"{folder}: (folder): policies folder not found"])
    problems: list[str] = []
    policies: list[Policy] = []
    for path in sorted(folder.glob("*.toml")):
        try:
            raw = _read_toml(path)
        except ConfigError as e:
            problems += e.problems
            continue
        policy, found = parse_policy(path, raw, settings, plugin_configs)
        problems += found
        if policy is None:
            continue
        policies.append(policy)
    if problems:
        raise ConfigError(problems)
    return policies
