"""An IPv6-literal upstream through both upstream clients: the request reaches
it and its Host header is bracketed (RFC 9110 7.2, RFC 3986 3.2.2)."""

from __future__ import annotations

import socket

import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.proxy.test_fastclient import start


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
async def v6_upstream():
    if not _has_ipv6_loopback():
        pytest.skip("SKIPPED: this machine has no IPv6 loopback (::1); the IPv6 Host test did not run")
    seen: list[CIMultiDict[str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(CIMultiDict(request.headers))
        return web.json_response({"path": request.path_qs})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "::1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port, seen
    await runner.cleanup()


@pytest.mark.parametrize("client", ["fast", "aiohttp"])
async def test_ipv6_upstream_gets_bracketed_host(tmp_path, v6_upstream, client):
    port, seen = v6_upstream
    policies = {"v6": f'route = "/up"\nupstream = "http://[::1]:{port}/v1"\n'}
    sc = await start(tmp_path, policies, outbound=f'client = "{client}"')
    try:
        status, _, body = await sc.request("GET", "/up/things?x=1")
        assert status == 200, body
        assert len(seen) == 1
        assert seen[0]["Host"] == f"[::1]:{port}"
    finally:
        await sc.sidecar.stop()
