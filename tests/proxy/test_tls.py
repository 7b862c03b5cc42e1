"""https upstreams: verification on by default, ca_bundle, explicit verify = false."""

from __future__ import annotations

import ssl

import pytest
from aiohttp import web

from tests.support.tls import make_cert
from tests.support.upstream import serve


@pytest.fixture
async def tls_upstream(tmp_path):
    ca, cert, key = make_cert(tmp_path / "certs")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def hello(request):
        return web.Response(text="secure")
    app = web.Application()
    app.router.add_get("/{t:.*}", hello)
    runner, port = await serve(app, ssl_context=ctx)
    yield f"https://127.0.0.1:{port}", ca
    await runner.cleanup()


async def test_unknown_ca_is_a_502_tls_error(sidecar_factory, client, tls_upstream):
    url, _ = tls_upstream
    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{url}"\n'})
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 502
        assert r.headers["X-Sidecar-Error"] == "upstream_tls_error"
        assert (await r.json())["error"]["code"] == "upstream_tls_error"


async def test_ca_bundle_verifies(sidecar_factory, client, tls_upstream):
    url, ca = tls_upstream
    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{url}"\n[tls]\nca_bundle = "{ca}"\n'})
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 200
        assert await r.text() == "secure"


async def test_verify_false_is_explicit(sidecar_factory, client, tls_upstream):
    url, _ = tls_upstream
    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{url}"\n[tls]\nverify = false\n'})
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 200


async def test_ssl_cert_file_is_honoured(sidecar_factory, client, tls_upstream, monkeypatch):
    url, ca = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{url}"\n'})
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 200
