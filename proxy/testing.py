"""A test kit for the sidecar and its plugins, installed with the package.

The project's own tests use it, and a third-party plugin is tested the same
way: a fake upstream that records what it received, a sidecar started
in-process on free ports from policy strings, and helpers to send requests.

```python
from proxy.testing import FakeUpstream, start_sidecar

async def test_my_plugin(tmp_path):
    async with FakeUpstream() as up:
        async with await start_sidecar(tmp_path, f'''
                route = "/p"
                upstream = "{up.url}"
                [my_plugin]
                value = "x"
                ''') as sc:
            status, headers, body = await sc.request("GET", "/p/hello")
    assert status == 200 and up.seen[0].headers["X-My"] == "x"
```

With pytest, ``pytest_plugins = ["proxy.testing"]`` in a ``conftest.py``
adds the fixtures ``upstream`` (a started FakeUpstream), ``sidecar_factory``
(``await sidecar_factory({"name": policy_toml}, config_toml)``, stopped after
the test) and ``client`` (an aiohttp session that adds no headers of its own).
Async fixtures need pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import socket
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .config import load_settings
from .server import Sidecar

__all__ = ["FakeUpstream", "Seen", "Responder", "RunningSidecar", "echo", "free_port", "serve",
           "session", "start_sidecar", "wait_for", "write_config"]


# ---- fake upstreams ---------------------------------------------------------

@dataclass
class Seen:
    """One request as the fake upstream received it."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Responder = Callable[[web.Request, Seen], Awaitable[web.StreamResponse]]


async def serve(app: web.Application, port: int = 0, **site_kw: Any) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1 (port 0: a free one); returns the runner and the port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, **site_kw)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def echo(request: web.Request, seen: Seen) -> web.StreamResponse:
    """The default responder: what arrived, as JSON."""
    return web.json_response({"method": seen.method, "path": seen.path_qs,
                              "headers": dict(seen.headers), "body_len": len(seen.body)})


class FakeUpstream:
    """A small HTTP server on a free port that records every request (``seen``)
    and answers with ``responder`` (default: a JSON echo). Replace
    ``responder`` in a test to script failures, hangs, streams."""

    def __init__(self, responder: Responder = echo, *, read_body: bool = True) -> None:
        self.responder = responder
        self.read_body = read_body
        self.seen: list[Seen] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read() if self.read_body else b""
        seen = Seen(request.method, request.path_qs, CIMultiDict(request.headers), body,
                    list(request.raw_headers))
        self.seen.append(seen)
        return await self.responder(request, seen)

    async def start(self, port: int = 0) -> "FakeUpstream":
        app = web.Application(client_max_size=1024**4)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner, self.port = await serve(app, port)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def __aenter__(self) -> "FakeUpstream":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


async def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll until ``predicate()`` is truthy; AssertionError after ``timeout``
    (a deadline, not a fixed sleep, so a slow machine only waits longer)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


# ---- sidecars -----------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for listeners that must be known in advance)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session() -> aiohttp.ClientSession:
    """A client that sends exactly what the test says (no decompression, no cookies kept)."""
    return aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())


def write_config(tmp: Path, policies: dict[str, str] | str, config: str = "", *,
                 outbound_port: int = 0, admin_port: int = 0, workers: int = 1,
                 outbound: str = "", sidecar: str = "", admin: str = "", logging: str = "") -> Path:
    """Write config.toml and policies/<name>.toml under ``tmp``; returns config.toml's path.

    ``policies`` maps names to policy TOML (one string: a single policy named
    "policy"). ``config`` is extra TOML appended to config.toml (tables other
    than the ones written here); ``outbound``, ``sidecar``, ``admin`` and
    ``logging`` are extra lines for those tables. Port 0 picks a free port.
    """
    if isinstance(policies, str):
        policies = {"policy": policies}
    pol = tmp / "policies"
    pol.mkdir(parents=True, exist_ok=True)
    for name, text in policies.items():
        (pol / f"{name}.toml").write_text(textwrap.dedent(text))
    base = textwrap.dedent(f"""\
        [sidecar]
        service = "test"
        policies = "policies"
        workers = {workers}
        drain_timeout = "5s"
        watch = true
        {{sidecar}}
        [outbound]
        listen = "127.0.0.1:{outbound_port}"
        {{outbound}}

        [admin]
        listen = "127.0.0.1:{admin_port}"
        {{admin}}

        [logging]
        access_log = "{(tmp / 'access.log').as_posix()}"
        {{logging}}
        """)
    base = (base.replace("{sidecar}", sidecar).replace("{outbound}", outbound)
            .replace("{admin}", admin).replace("{logging}", logging))
    extra = textwrap.dedent(config)
    if "[sidecar]" in extra or "[outbound]" in extra or "[admin]" in extra or "[logging]" in extra:
        raise ValueError("pass those tables through the keyword arguments")
    path = tmp / "config.toml"
    path.write_text(base + "\n" + extra)
    return path


class RunningSidecar:
    """An in-process sidecar: ``url`` is the outbound listener, ``admin`` the
    admin one, ``inbound`` the inbound one (when it runs)."""

    def __init__(self, sidecar: Sidecar, config_path: Path) -> None:
        self.sidecar = sidecar
        self.config_path = config_path
        self.dir = config_path.parent
        self._client: aiohttp.ClientSession | None = None

    @property
    def runtime(self) -> Any:
        return self.sidecar.runtime

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.ports['outbound']}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.ports['admin']}"

    @property
    def inbound(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.ports['inbound']}"

    async def request(self, method: str, path: str, *, listener: str = "outbound",
                      **kw: Any) -> tuple[int, CIMultiDict[str], bytes]:
        """Send one request to a listener ("outbound", "inbound", "admin");
        returns (status, headers, body). Keyword arguments go to aiohttp
        (``headers=``, ``data=``, ``json=``)."""
        base = f"http://127.0.0.1:{self.sidecar.ports[listener]}"
        if self._client is None or self._client.closed:
            self._client = session()
        async with self._client.request(method, base + path, **kw) as r:
            return r.status, CIMultiDict(r.headers), await r.read()

    def access_lines(self) -> list[dict[str, Any]]:
        """The access-log lines written so far, as dicts."""
        import orjson

        self.runtime.accesslog.flush()
        path = self.dir / "access.log"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]

    async def wait_access_lines(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The access-log lines once there are at least ``n`` (a line is written
        just after the response's last byte, so a client can be ahead of it)."""
        end = time.monotonic() + timeout
        while True:
            lines = self.access_lines()
            if len(lines) >= n or time.monotonic() > end:
                return lines
            await asyncio.sleep(0.02)

    def write_policy(self, name: str, text: str) -> None:
        """Write (or replace) policies/<name>.toml; ``await sc.runtime.reload()`` applies it."""
        (self.dir / "policies" / f"{name}.toml").write_text(textwrap.dedent(text))

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        await self.sidecar.stop()

    async def __aenter__(self) -> "RunningSidecar":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


async def start_sidecar(tmp: Path, policies: dict[str, str] | str, config: str = "",
                        **kw: Any) -> RunningSidecar:
    """Write the config (see ``write_config``) under ``tmp`` and start a
    sidecar in this process on free ports. Stop it with ``await sc.stop()``
    or use it as ``async with await start_sidecar(...) as sc``."""
    path = write_config(tmp, policies, config, **kw)
    sc = Sidecar(load_settings(path))
    try:
        await sc.start()
    except BaseException:
        await sc.stop()
        raise
    return RunningSidecar(sc, path)


# ---- pytest fixtures (``pytest_plugins = ["proxy.testing"]``) -------------------

try:
    import pytest
except ImportError:  # the kit's functions work without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    try:
        from pytest_asyncio import fixture as _async_fixture
    except ImportError:  # pragma: no cover - async fixtures then need another plugin
        _async_fixture = pytest.fixture  # type: ignore[assignment]

    @_async_fixture
    async def upstream() -> AsyncIterator[FakeUpstream]:
        """A started FakeUpstream (JSON echo), stopped after the test."""
        up = await FakeUpstream().start()
        yield up
        await up.stop()

    @_async_fixture
    async def client() -> AsyncIterator[aiohttp.ClientSession]:
        """An aiohttp session that adds no headers of its own, closed after the test."""
        async with session() as s:
            yield s

    @_async_fixture
    async def sidecar_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RunningSidecar]]]:
        """``await sidecar_factory({"name": policy_toml}, config_toml, outbound="", sidecar="")``
        starts an in-process sidecar (see ``write_config``); all are stopped after the test."""
        started: list[RunningSidecar] = []
        n = 0

        async def make(policies: dict[str, str] | str, config: str = "", **kw: Any) -> RunningSidecar:
            nonlocal n
            n += 1
            sc = await start_sidecar(tmp_path / f"sc{n}", policies, config, **kw)
            started.append(sc)
            return sc

        yield make
        for sc in started:
            await sc.stop()
