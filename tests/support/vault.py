"""A small Vault server for tests: the HTTP API paths the sidecar's hvac calls use.

KV v2 (data read/write with versions, metadata), token lookup-self and
renew-self, AppRole and Kubernetes login. Tokens are random, expire after
their TTL and renew up to their max TTL; errors use Vault's
``{"errors": [...]}`` bodies and status codes, so hvac raises the same
exceptions it raises against a real Vault. ``sealed = True`` answers 503 as
a sealed Vault does; ``stop()``/``start(port)`` make it unreachable and back.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from tests.support.upstream import serve


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Token:
    ttl: float                  # 0: never expires
    renewable: bool
    max_ttl: float = 0
    created: float = field(default_factory=time.monotonic)
    expires: float | None = None

    def __post_init__(self) -> None:
        self.expires = None if self.ttl <= 0 else self.created + self.ttl

    def remaining(self) -> int:
        return 0 if self.expires is None else max(0, int(round(self.expires - time.monotonic())))

    def valid(self) -> bool:
        return self.expires is None or time.monotonic() < self.expires


class FakeVault:
    def __init__(self, mount: str = "secret") -> None:
        self.mount = mount
        self.root_token = "hvs." + os.urandom(12).hex()
        self.tokens: dict[str, Token] = {self.root_token: Token(0, False)}
        self.kv: dict[str, dict[str, Any]] = {}
        self.approles: dict[str, dict[str, Any]] = {}
        self.k8s_roles: dict[str, dict[str, Any]] = {}
        self.sealed = False
        self.delay = 0.0            # seconds every answer waits (a slow Vault)
        self.calls: list[tuple[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- test-side helpers ------------------------------------------------

    def write(self, path: str, data: dict[str, str]) -> int:
        """A new version of ``path``; returns its number."""
        entry = self.kv.setdefault(path, {"versions": {}, "current": 0, "created": _now_iso()})
        entry["current"] += 1
        entry["versions"][entry["current"]] = {"data": dict(data), "created_time": _now_iso(),
                                               "deletion_time": "", "destroyed": False}
        return entry["current"]

    def destroy(self, path: str, version: int) -> None:
        v = self.kv[path]["versions"][version]
        v["destroyed"], v["data"] = True, None

    def add_approle(self, role: str, ttl: float = 60, renewable: bool = True, max_ttl: float = 0) -> tuple[str, str]:
        role_id, secret_id = os.urandom(8).hex(), os.urandom(16).hex()
        self.approles[role_id] = {"role": role, "secret_id": secret_id, "ttl": ttl,
                                  "renewable": renewable, "max_ttl": max_ttl}
        return role_id, secret_id

    def add_k8s_role(self, role: str, jwt: str, ttl: float = 60) -> None:
        self.k8s_roles[role] = {"jwt": jwt, "ttl": ttl}

    def new_token(self, ttl: float = 60, renewable: bool = True, max_ttl: float = 0) -> str:
        tok = "hvs." + os.urandom(12).hex()
        self.tokens[tok] = Token(ttl, renewable, max_ttl)
        return tok

    def count(self, suffix: str) -> int:
        return sum(1 for _, p in self.calls if p.endswith(suffix))

    # ---- server --------------------------------------------------------------

    async def start(self, port: int = 0) -> "FakeVault":
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/v1/sys/health", self._health)
        r.add_post("/v1/auth/token/renew-self", self._renew_self)
        r.add_get("/v1/auth/token/lookup-self", self._lookup_self)
        r.add_post("/v1/auth/{mount}/login", self._login)
        r.add_get("/v1/{mount}/data/{path:.+}", self._read)
        r.add_route("POST", "/v1/{mount}/data/{path:.+}", self._write)
        r.add_route("PUT", "/v1/{mount}/data/{path:.+}", self._write)
        r.add_get("/v1/{mount}/metadata/{path:.+}", self._metadata)
        self.runner, self.port = await serve(app, port, reuse_address=True)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append((request.method, request.path))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.sealed:
            return _err(503, "Vault is sealed")
        return await handler(request)

    def _caller(self, request: web.Request) -> tuple[str, Token] | None:
        tok = request.headers.get("X-Vault-Token", "")
        t = self.tokens.get(tok)
        if t is None or not t.valid():
            return None
        return tok, t

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"initialized": True, "sealed": False, "standby": False})

    async def _lookup_self(self, request: web.Request) -> web.Response:
        c = self._caller(request)
        if c is None:
            return _err(403, "permission denied")
        tok, t = c
        # A real Vault returns the token itself as "id": the sidecar must never show it.
        return web.json_response({"data": {"id": tok, "ttl": t.remaining(), "renewable": t.renewable,
                                           "creation_ttl": int(t.ttl), "policies": ["default"]}})

    async def _renew_self(self, request: web.Request) -> web.Response:
        c = self._caller(request)
        if c is None:
            return _err(403, "permission denied")
        tok, t = c
        if not t.renewable:
            return _err(400, "lease is not renewable")
        now = time.monotonic()
        new_exp = now + t.ttl
        if t.max_ttl:
            new_exp = min(new_exp, t.created + t.max_ttl)
        t.expires = new_exp
        return web.json_response({"auth": {"client_token": tok, "lease_duration": t.remaining(),
                                           "renewable": t.renewable, "policies": ["default"]}})

    def _issue(self, ttl: float, renewable: bool = True, max_ttl: float = 0) -> web.Response:
        tok = self.new_token(ttl, renewable, max_ttl)
        return web.json_response({"auth": {"client_token": tok, "accessor": os.urandom(6).hex(),
                                           "policies": ["default"], "lease_duration": int(ttl),
                                           "renewable": renewable}})

    async def _login(self, request: web.Request) -> web.Response:
        body = await request.json()
        mount = request.match_info["mount"]
        if mount == "approle":
            role = self.approles.get(body.get("role_id", ""))
            if role is None or role["secret_id"] != body.get("secret_id"):
                return _err(400, "invalid role or secret ID")
            return self._issue(role["ttl"], role["renewable"], role["max_ttl"])
        if mount == "kubernetes":
            role = self.k8s_roles.get(body.get("role", ""))
            if role is None or role["jwt"] != body.get("jwt"):
                return _err(403, "permission denied")
            return self._issue(role["ttl"])
        return _err(400, f"no handler for route \"auth/{mount}/login\"")

    def _entry(self, request: web.Request) -> tuple[str, dict[str, Any] | None] | web.Response:
        if self._caller(request) is None:
            return _err(403, "permission denied")
        if request.match_info["mount"] != self.mount:
            return _err(404, "no handler for route")
        path = request.match_info["path"]
        return path, self.kv.get(path)

    async def _read(self, request: web.Request) -> web.Response:
        got = self._entry(request)
        if isinstance(got, web.Response):
            return got
        _, entry = got
        if entry is None:
            return web.json_response({"errors": []}, status=404)
        version = int(request.query.get("version") or entry["current"] or 0) or entry["current"]
        v = entry["versions"].get(version)
        if v is None:
            return web.json_response({"errors": []}, status=404)
        meta = {"created_time": v["created_time"], "custom_metadata": None,
                "deletion_time": v["deletion_time"], "destroyed": v["destroyed"], "version": version}
        if v["destroyed"] or v["deletion_time"]:
            return web.json_response({"data": {"data": None, "metadata": meta}}, status=404)
        return web.json_response({"request_id": os.urandom(8).hex(), "lease_id": "", "renewable": False,
                                  "lease_duration": 0, "data": {"data": v["data"], "metadata": meta},
                                  "wrap_info": None, "warnings": None, "auth": None})

    async def _write(self, request: web.Request) -> web.Response:
        got = self._entry(request)
        if isinstance(got, web.Response):
            return got
        path, _ = got
        body = await request.json()
        version = self.write(path, body["data"])
        return web.json_response({"data": {"version": version, "created_time": _now_iso(),
                                           "deletion_time": "", "destroyed": False}})

    async def _metadata(self, request: web.Request) -> web.Response:
        got = self._entry(request)
        if isinstance(got, web.Response):
            return got
        _, entry = got
        if entry is None:
            return web.json_response({"errors": []}, status=404)
        versions = {str(n): {"created_time": v["created_time"], "deletion_time": v["deletion_time"],
                             "destroyed": v["destroyed"]} for n, v in entry["versions"].items()}
        return web.json_response({"data": {"cas_required": False, "created_time": entry["created"],
                                           "current_version": entry["current"], "max_versions": 0,
                                           "oldest_version": 1, "updated_time": _now_iso(),
                                           "versions": versions}})


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"errors": [message]}, status=status)
