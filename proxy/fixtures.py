"""Record and simulate modes: the route's terminal handler (issue 13).

A policy's top-level ``mode`` picks what answers at the end of its chain:

- ``live`` (default): the upstream.
- ``record``: the upstream, and each exchange is written to the policy's
  ``fixtures`` folder as a cassette in vcrpy's YAML format (version 1), so the
  same files serve a service's own vcrpy tests. Credentials are never stored:
  every header the redactor knows (``Authorization``, what ``[auth]``
  injects, ``[logging] redact_headers``) and every redacted query parameter is
  removed. A streamed response is stored whole, with the sizes of the chunks
  it arrived in (``body.chunks``, which vcrpy ignores).
- ``simulate``: the upstream is never contacted. The request is answered from
  the cassettes, matched by method, path (after the route prefix) and query
  (and the body with ``match_body = true``: JSON compared by value); several
  matching interactions play in order, the last one repeating. No match is
  501 ``no_fixture`` naming what was asked. The filters before the terminal
  (auth, rate limits...) run as they do live.

Cassettes are read when the policy set is compiled (start-up, reload):
switching ``mode`` or editing a cassette is a reload, never a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import http
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson
import yaml
from multidict import CIMultiDict

from .chain import Exchange, Handler, ProxyResponse
from .errors import ConfigError, SidecarError
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from aiohttp import web

    from .config import Policy
    from .runtime import Runtime
    from .upstream import Upstream

log = logging.getLogger("sidecar.fixtures")

NAME = "fixtures"
# Simulated calls /admin/simulated keeps (the newest).
RECENT = 1000
# Per-exchange noise that would make every recording differ, or says who the client is.
_NOISE = frozenset({"x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                    "traceparent", "tracestate"})
# Framing the replaying server sets itself.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


class NoFixture(SidecarError):
    status, code, message = 501, "no_fixture", "no recorded fixture matches this request"


def fixtures_dir(policy: "Policy") -> Path:
    folder = policy.core.fixtures or f"fixtures/{policy.name}"
    return (policy.file.parent / folder).resolve()


class _Shared:
    """Per runtime: metrics and the recent simulated calls."""

    def __init__(self, runtime: "Runtime") -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.simulated = runtime.metrics.counter(
            "sidecar_simulated_requests", "Requests answered in simulate mode, by route and result "
            "(matched | no_fixture).", ["route", "result"])
        self.recorded = runtime.metrics.counter(
            "sidecar_recorded_exchanges", "Exchanges written as cassettes in record mode, by route.", ["route"])


def _shared(runtime: "Runtime") -> _Shared:
    return runtime.service(NAME, lambda: _Shared(runtime))


def terminal_for(runtime: "Runtime", policy: "Policy", upstream: "Upstream") -> Handler | None:
    """The terminal handler for the policy's mode (None: live, the default one)."""
    mode = policy.core.mode
    if mode == "live":
        return None
    shared = _shared(runtime)
    if mode == "record":
        return Recorder(runtime, policy, runtime._terminal(policy.name, upstream), shared).handle
    return Simulator(runtime, policy, shared).handle


# ---- matching ---------------------------------------------------------------

def _query_key(query: str, secret_params: frozenset[str]) -> tuple[tuple[str, str], ...]:
    pairs = parse_qsl(query, keep_blank_values=True)
    return tuple(sorted((k, v) for k, v in pairs if k.lower() not in secret_params))


def _body_key(body: bytes | str | None) -> bytes:
    if body is None:
        return b""
    raw = body.encode() if isinstance(body, str) else bytes(body)
    try:
        return orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        return raw


def _route_path(uri: str, base_path: str) -> tuple[str, str]:
    """(path after the upstream's own base path, query) of a recorded URI; the
    host is ignored, so cassettes recorded against the real provider replay
    with the upstream pointed elsewhere."""
    parts = urlsplit(uri)
    path = parts.path or "/"
    if base_path and (path == base_path or path.startswith(base_path + "/")):
        path = path[len(base_path):] or "/"
    return path, parts.query


def _describe(method: str, path: str, query: str) -> str:
    return f"{method} {path}" + (f"?{query}" if query else "")


# ---- simulate ---------------------------------------------------------------

class _Played:
    __slots__ = ("items", "next")

    def __init__(self) -> None:
        self.items: list[tuple[dict[str, Any], str]] = []   # (response, file name)
        self.next = 0


class Simulator:
    def __init__(self, runtime: "Runtime", policy: "Policy", shared: _Shared) -> None:
        self.route = policy.name
        self.redactor = runtime.redactor
        self.match_body = policy.core.match_body
        self.shared = shared
        self.matched = shared.simulated.labels(policy.name, "matched")
        self.unmatched = shared.simulated.labels(policy.name, "no_fixture")
        # Keys are made on first use: the redacted query parameters are known
        # once the route's filters (auth) are built, after this terminal.
        self._index: dict[tuple[Any, ...], _Played] | None = None
        self._entries: list[tuple[str, str, str, Any, dict[str, Any], str]] = []
        folder = fixtures_dir(policy)
        if not folder.is_dir():
            raise ConfigError([f"{policy.file}: fixtures: {folder} is not a folder (mode = \"simulate\" "
                               f"answers from its cassettes; record some with mode = \"record\")"])
        from yarl import URL

        base_path = URL(policy.core.upstream or "/").path.rstrip("/")
        problems: list[str] = []
        for path in sorted(folder.glob("*.y*ml")):
            try:
                self._load(path, base_path)
            except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as e:
                problems.append(f"{path}: (cassette): not a vcrpy cassette ({type(e).__name__}: {e})"[:400])
        if problems:
            raise ConfigError(problems)

    def _load(self, path: Path, base_path: str) -> None:
        data = yaml.safe_load(path.read_text())
        for it in data["interactions"]:
            req, resp = it["request"], it["response"]
            route_path, query = _route_path(req["uri"], base_path)
            int(resp["status"]["code"])
            self._entries.append((str(req["method"]).upper(), route_path, query, req.get("body"), resp, path.name))

    def _build_index(self) -> dict[tuple[Any, ...], _Played]:
        index: dict[tuple[Any, ...], _Played] = {}
        for method, path, query, body, resp, name in self._entries:
            index.setdefault(self._key(method, path, query, body), _Played()).items.append((resp, name))
        return index

    def _key(self, method: str, path: str, query: str, body: Any) -> tuple[Any, ...]:
        k: tuple[Any, ...] = (method, path, _query_key(query, self.redactor.query_params))
        if self.match_body:
            k += (_body_key(body),)
        return k

    async def handle(self, ex: Exchange) -> ProxyResponse:
        body = await ex.read_body() if self.match_body else None
        if self._index is None:
            self._index = self._build_index()
        played = self._index.get(self._key(ex.method, ex.path, ex.query, body))
        query = self.redactor.query(ex.query)
        entry = {"ts": round(time.time(), 3), "route": self.route, "request_id": ex.request_id,
                 "method": ex.method, "path": ex.path, "query": query}
        if played is None:
            self.unmatched.inc()
            entry.update(status=501, fixture=None)
            self.shared.recent.append(entry)
            ex.log["simulate"] = "no_fixture"
            asked = _describe(ex.method, ex.path, query)
            if self.match_body:
                asked += f" with a body of sha256 {hashlib.sha256(body or b'').hexdigest()[:16]}"
            raise NoFixture(f"no fixture for {asked} on route {self.route}")
        resp, name = played.items[min(played.next, len(played.items) - 1)]
        played.next += 1
        status = int(resp["status"]["code"])
        headers: CIMultiDict[str] = CIMultiDict()
        for k, values in (resp.get("headers") or {}).items():
            if k.lower() in _FRAMING:
                continue
            for v in values if isinstance(values, list) else [values]:
                headers.add(str(k), str(v))
        raw = (resp.get("body") or {}).get("string") or b""
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
        chunks = (resp.get("body") or {}).get("chunks")
        self.matched.inc()
        entry.update(status=status, fixture=name)
        self.shared.recent.append(entry)
        ex.log["simulate"] = name
        out: bytes | AsyncIterator[bytes] = data
        if chunks and len(chunks) > 1 and sum(chunks) == len(data) and ex.method != "HEAD":
            out = _replay(data, chunks)
        return ProxyResponse(status, headers, out, reason=resp["status"].get("message"), upstream=True)


async def _replay(data: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    pos = 0
    for n in sizes:
        yield data[pos:pos + n]
        pos += n
        # Let each chunk go out on its own, as it arrived.
        await asyncio.sleep(0)


# ---- record -----------------------------------------------------------------

def _headers_dict(pairs: Any, drop: frozenset[str] | set[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for k, v in pairs:
        lk = k.lower()
        if lk in drop:
            continue
        name = names.setdefault(lk, str(k))
        out.setdefault(name, []).append(str(v))
    return out


def _scrub_headers(headers: dict[str, list[str]], values: list[bytes]) -> dict[str, list[str]]:
    if not values:
        return headers
    texts = [v.decode("utf-8", "surrogateescape") for v in values]
    out = {}
    for k, vs in headers.items():
        clean = []
        for v in vs:
            for t in texts:
                v = v.replace(t, "[redacted]")
            clean.append(v)
        out[k] = clean
    return out


def _text_or_bytes(data: bytes) -> str | bytes:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def _scrub(data: bytes, values: list[bytes]) -> bytes:
    for v in values:
        if v in data:
            data = data.replace(v, b"[redacted]")
    return data


class Recorder:
    def __init__(self, runtime: "Runtime", policy: "Policy", live: Handler, shared: _Shared) -> None:
        self.route = policy.name
        self.live = live
        self.secrets = runtime.secrets
        self.redactor = runtime.redactor
        self.folder = fixtures_dir(policy)
        self.base = (policy.core.upstream or "").rstrip("/")
        self.match_body = policy.core.match_body
        self.counter = shared.recorded.labels(policy.name)

    async def handle(self, ex: Exchange) -> ProxyResponse:
        req_body = await ex.read_body()
        # What is sent, as sent: captured before the upstream call (auth ran already).
        secret = self.redactor.headers | _NOISE
        params = self.redactor.query_params
        # Values never stored, wherever they appear (an upstream echoing the
        # request, a body quoting a key): resolved secrets and the values of
        # the headers and parameters left out.
        hidden = {v for v in self.secrets.known_values() if len(v) >= 4}
        hidden |= {v for k, v in ex.headers.items() if k.lower() in self.redactor.headers and len(v) >= 4}
        pairs = parse_qsl(ex.query, keep_blank_values=True) if ex.query else []
        hidden |= {v for k, v in pairs if k.lower() in params and len(v) >= 4}
        scrub = sorted((v.encode("utf-8", "surrogateescape") for v in hidden), key=len, reverse=True)
        query = urlencode([(k, v) for k, v in pairs if k.lower() not in params])
        request = {"body": _text_or_bytes(_scrub(req_body, scrub)) if req_body else None,
                   "headers": _scrub_headers(_headers_dict(ex.headers.items(), secret), scrub),
                   "method": ex.method,
                   "uri": self.base + ex.path + (f"?{query}" if query else "")}
        name = self._file_name(ex.method, ex.path, query, req_body)
        resp = await self.live(ex)

        def save(parts: list[bytes]) -> None:
            clean = [_scrub(p, scrub) for p in parts]
            body = _scrub(b"".join(parts), scrub)
            reason = resp.reason
            if reason is None:
                try:
                    reason = http.HTTPStatus(resp.status).phrase
                except ValueError:
                    reason = ""
            response: dict[str, Any] = {
                "status": {"code": resp.status, "message": reason},
                "headers": _scrub_headers(_headers_dict(resp.headers.items(), self.redactor.headers | _FRAMING),
                                          scrub),
                "body": {"string": _text_or_bytes(body)}}
            # A secret cut across two chunks: the pieces no longer add up; store the body only.
            if len(parts) > 1 and b"".join(clean) == body:
                response["body"]["chunks"] = [len(p) for p in clean]
            cassette = {"interactions": [{"request": request, "response": response}], "version": 1}
            asyncio.get_running_loop().run_in_executor(None, self._write, name, cassette)
            ex.log["record"] = name

        body = resp.body
        if body is None or isinstance(body, bytes | bytearray):
            save([bytes(body or b"")])
        else:
            resp.body = _tee(body, save)
        return resp

    def _file_name(self, method: str, path: str, query: str, body: bytes) -> str:
        ident = hashlib.sha256(f"{method} {path}?{query}".encode())
        if self.match_body:
            ident.update(b"\0" + _body_key(body))
        slug = _SLUG.sub("-", path.strip("/")).strip("-")[:80] or "root"
        return f"{method}-{slug}-{ident.hexdigest()[:10]}.yaml"

    def _write(self, name: str, cassette: dict[str, Any]) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(cassette, sort_keys=False, allow_unicode=True)
            # A temporary file of this write's own: identical requests recorded
            # at once (executor threads, workers) must not write into one file.
            tmp = self.folder / f".{name}.{os.getpid()}-{threading.get_ident()}.tmp"
            try:
                tmp.write_text(text)
                tmp.replace(self.folder / name)   # readers never see half a cassette
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self.counter.inc()
        except OSError as e:
            log.error("route %s: writing cassette %s failed: %s", self.route, name, e.strerror)


async def _tee(body: AsyncIterator[bytes], save: Any) -> AsyncIterator[bytes]:
    """Pass the stream on, keeping its chunks; saved only once it ended (a
    stream the client left half-way is not a recording)."""
    parts: list[bytes] = []
    async for chunk in body:
        parts.append(bytes(chunk))
        yield chunk
    save(parts)


# ---- admin ------------------------------------------------------------------

async def admin_simulated(request: "web.Request") -> "web.Response":
    """GET /admin/simulated[?route=<name>]: the newest simulated calls (query redacted)."""
    from .admin import json_response, runtime_of

    rt = runtime_of(request)
    shared = rt.services.get(NAME)
    calls = list(shared.recent) if shared is not None else []
    route = request.query.get("route")
    if route is not None:
        calls = [c for c in calls if c["route"] == route]
    modes = {p.name: {"mode": p.core.mode, "fixtures": str(fixtures_dir(p)) if p.core.mode != "live" else None}
             for p in rt.policies if p.core.route is not None}
    return json_response({"routes": modes, "calls": calls[::-1]})


@hookimpl
def sidecar_admin_routes(runtime: "Runtime", app: "web.Application") -> None:
    app.router.add_get("/admin/simulated", admin_simulated)
