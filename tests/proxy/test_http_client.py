"""runtime.http: the one client for the sidecar's own requests, with [http_client]'s TLS settings."""

from __future__ import annotations

import ssl

import pytest
from aiohttp import web

from proxy.testing import serve
from tests.support.tls import make_cert


@pytest.fixture
async def tls_identity(tmp_path):
    """An identity service over https, its certificate signed by a throwaway CA."""
    ca, cert, key = make_cert(tmp_path / "certs")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    seen = []

    async def validate(request):
        seen.append(request.headers.get("Authorization"))
        return web.Response(status=200, headers={"X-User-Id": "u1"})
    app = web.Application()
    app.router.add_get("/auth", validate)
    runner, port = await serve(app, ssl_context=ctx)
    yield f"https://127.0.0.1:{port}/auth", ca, seen
    await runner.cleanup()


def policy(upstream: str, auth_url: str) -> str:
    return f'route = "/p"\nupstream = "{upstream}"\n[forward_auth]\nurl = "{auth_url}"\n'


async def test_plugin_requests_verify_against_the_system_store_by_default(sidecar_factory, upstream, client,
                                                                         tls_identity):
    url, _, seen = tls_identity
    sc = await sidecar_factory({"p": policy(upstream.url, url)})
    async with client.get(f"{sc.url}/p/x", headers={"Authorization": "Bearer t"}) as r:
        assert r.status == 503 and r.headers["X-Sidecar-Error"] == "auth_unavailable"
    assert seen == [] and upstream.seen == []


async def test_http_client_ca_bundle_is_used_and_the_session_is_shared_and_closed(sidecar_factory, upstream,
                                                                                 client, tls_identity):
    url, ca, seen = tls_identity
    sc = await sidecar_factory({"p": policy(upstream.url, url), "q": policy(upstream.url, url).replace("/p", "/q")},
                               f'[http_client]\nca_bundle = "{ca}"\n')
    for route in ("p", "q"):
        async with client.get(f"{sc.url}/{route}/x", headers={"Authorization": "Bearer t"}) as r:
            assert r.status == 200
    assert seen == ["Bearer t", "Bearer t"]
    assert upstream.seen[-1].headers["X-User-Id"] == "u1"
    session = sc.runtime.http._session
    assert session is not None and not session.closed
    # One pool for both routes' filters: both answers came through one connection.
    assert len(session.connector._conns) == 1
    await sc.sidecar.stop()
    assert session.closed


async def test_verify_false(sidecar_factory, upstream, client, tls_identity):
    url, _, _ = tls_identity
    sc = await sidecar_factory({"p": policy(upstream.url, url)}, "[http_client]\nverify = false\n")
    async with client.get(f"{sc.url}/p/x", headers={"Authorization": "Bearer t"}) as r:
        assert r.status == 200


@pytest.mark.parametrize("content", [None, "not a certificate\n"])
def test_unreadable_ca_bundle_is_a_config_error(tmp_path, content):
    """A ca_bundle that is missing or holds no certificate is refused at load
    (file: field: reason), not found out by the first token fetch or webhook
    delivery (which then fail, or retry, with an OSError)."""
    from proxy.cli import check
    from tests.support.sidecar import write_config

    if content is not None:
        (tmp_path / "bad.pem").write_text(content)
    path = write_config(tmp_path, {}, '[http_client]\nca_bundle = "bad.pem"\n')
    problems = check(str(path))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: http_client.ca_bundle: cannot load {tmp_path / 'bad.pem'}"), problems


def test_unreadable_policy_ca_bundle_is_a_config_error(tmp_path):
    """A policy's [tls] ca_bundle that cannot be loaded is a problem line of
    `sidecar validate` (and a refused start or reload), not a traceback."""
    from proxy.cli import check
    from tests.support.sidecar import write_config

    missing = tmp_path / "nowhere.pem"
    path = write_config(tmp_path, {"p": f'route = "/p"\nupstream = "https://api.example.com"\n'
                                        f'[tls]\nca_bundle = "{missing}"\n'})
    problems = check(str(path))
    assert problems == [f"{path.parent / 'policies' / 'p.toml'}: tls.ca_bundle: cannot load {missing}: "
                        "No such file or directory"], problems
