"""The inbound listener: [inbound] settings, nested route plugin tables, start rules."""

from __future__ import annotations

import pytest

from proxy.config import load_settings
from proxy.errors import ConfigError
from proxy.runtime import Runtime
from tests.support.inbound import inbound_config
from tests.support.sidecar import write_config


def runtime_for(tmp_path, extra: str) -> Runtime:
    return Runtime(load_settings(write_config(tmp_path, {}, extra)))


@pytest.mark.parametrize("extra,fragment", [
    ('[inbound.routes."/api".nope]\nx = 1\n', "inbound.routes: /api: nope: no inbound plugin"),
    ('[inbound.routes."/api".retry]\n', "no inbound plugin"),
    ('[inbound.routes."/api".jwt]\nsecret = "a"\njwks_url = "http://x"\n', "/api: jwt"),
    ('[inbound.routes."/api".jwt]\nsecret = "a"\nbogus = 1\n', "jwt.bogus: unknown key"),
    ('[inbound.routes."api".jwt]\nsecret = "a"\n', "path prefix"),
    ('[inbound]\nservice_url = "ftp://x"\n', "service_url"),
    ('[inbound]\nlisten = "nope"\n', "listen"),
    ('[inbound]\nlisen = "127.0.0.1:1"\n', "inbound.lisen: unknown key"),
])
def test_bad_inbound_settings_name_the_field(tmp_path, extra, fragment):
    with pytest.raises(ConfigError) as e:
        runtime_for(tmp_path, extra)
    assert any(fragment in p for p in e.value.problems), e.value.problems


def test_route_plugins_are_validated_by_their_own_models(tmp_path):
    rt = runtime_for(tmp_path, inbound_config("http://127.0.0.1:1", extra="""
        [inbound.routes."/api/".jwt]
        secret = "env:X"
        leeway = "30s"
        """))
    conf = rt.extra_settings["inbound"].routes["/api"]["jwt"]
    assert type(conf).__module__ == "plugins.jwt" and conf.leeway == 30.0


async def test_no_inbound_table_and_no_webhook_means_no_listener(sidecar_factory):
    sc = await sidecar_factory({})
    assert "inbound" not in sc.sidecar.ports


async def test_inbound_listener_drains_with_the_worker(sidecar_factory, upstream, client):
    sc = await sidecar_factory({}, inbound_config(upstream.url, extra="""
        [inbound.routes."/"]
        """))
    port = sc.sidecar.ports["inbound"]
    async with client.get(f"http://127.0.0.1:{port}/anything?z=1") as r:
        assert r.status == 200
    assert upstream.seen[0].path_qs == "/anything?z=1"
    await sc.sidecar.stop()
    import aiohttp

    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/x"):
            pass


async def test_percent_encoded_unreserved_characters_are_normalised(sidecar_factory, upstream, client):
    """`/log%69n` is `/login` (RFC 3986 6.2.2.2) to the service: a per-path
    rate limit on an inbound route must count it as `/login`, and the service
    gets the normalised path."""
    from yarl import URL

    from tests.support.inbound import inbound_config, inbound_url

    sc = await sidecar_factory({}, inbound_config(upstream.url, extra='''
        [inbound.routes."/".rate_limit]
        key = "const"
        [[inbound.routes."/".rate_limit.overrides]]
        match = "POST /login"
        limits = [{ requests = 1, per = "1h" }]
        '''))
    got = []
    for p in ["/login", "/log%69n", "/%6C%6Fgin"]:
        async with client.post(URL(inbound_url(sc) + p, encoded=True), data=b"x") as r:
            got.append(r.status)
    assert got == [200, 429, 429], got
    async with client.get(URL(inbound_url(sc) + "/a%7Eb/%41%2F%20?q=%61", encoded=True)) as r:
        assert r.status == 200
    assert upstream.seen[-1].path_qs == "/a~b/A%2F%20?q=%61"   # reserved escapes and the query untouched


async def test_per_path_rate_limit_counts_an_encoded_slash(sidecar_factory, upstream, client):
    """`/api%2Flogin` is routed decoded (proxy/admission.py), and many service
    frameworks decode it to `/api/login`: the `/api/login` override must count
    it, not fall back to the route's looser default."""
    from yarl import URL

    from tests.support.inbound import inbound_config, inbound_url

    sc = await sidecar_factory({}, inbound_config(upstream.url, extra='''
        [inbound.routes."/".rate_limit]
        key = "const"
        limits = [{ requests = 100, per = "1h" }]
        [[inbound.routes."/".rate_limit.overrides]]
        match = "POST /api/login"
        limits = [{ requests = 1, per = "1h" }]
        '''))
    got = []
    for p in ["/api/login", "/api%2Flogin", "/api%2flogin", "/api/other"]:
        async with client.post(URL(inbound_url(sc) + p, encoded=True), data=b"x") as r:
            got.append(r.status)
    assert got == [200, 429, 429, 200], got
