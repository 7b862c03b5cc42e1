"""The plugin system: built-ins, entry points, dotted paths, ordering, hook documentation."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy import hookspecs
from proxy.plugins import PluginSpec, collect_specs, make_plugin_manager, ordered
from tests.support.sidecar import REPO

EXTERNAL_PLUGIN = '''
from proxy.chain import Filter
from proxy.config import Model
from proxy.hookspecs import hookimpl
from proxy.plugins import PluginSpec

SEEN = []


class Config(Model):
    tag: str = "ext"


class Tagger(Filter):
    def __init__(self, tag):
        self.tag = tag

    async def handle(self, ex, call_next):
        ex.headers["X-Tagged-By"] = self.tag
        resp = await call_next(ex)
        resp.headers["X-Tag-Response"] = self.tag
        return resp


@hookimpl
def sidecar_plugins_register():
    # makes_route: a [tagger] table alone makes its policy an inbound route (sidecar_routes_build).
    return [PluginSpec("tagger", Config, 450, lambda cfg, ctx: Tagger(cfg.tag), scope="both",
                       capabilities=frozenset({"makes_route"}), description="tags requests")]


@hookimpl
def sidecar_runtime_startup(runtime):
    SEEN.append(("startup", runtime.settings.sidecar.service))


@hookimpl
def sidecar_runtime_shutdown(runtime):
    SEEN.append(("shutdown", runtime.settings.sidecar.service))


@hookimpl
def sidecar_policies_loaded(runtime, policies):
    SEEN.append(("policies", sorted(p.name for p in policies)))


@hookimpl
def sidecar_admin_routes(runtime, app):
    from aiohttp import web

    async def hello(request):
        return web.json_response({"tagger": True})
    app.router.add_get("/admin/tagger", hello)


@hookimpl
def sidecar_settings_register():
    return {"tagger": Config}


@hookimpl
def sidecar_listeners_start(runtime, sidecar):
    SEEN.append(("listeners", sorted(sidecar.ports)))


@hookimpl
def sidecar_routes_build(runtime, policies, build):
    """An exact path on the inbound listener answered by a terminal handler,
    wrapped in the policy's tagger filter (the way webhook endpoints are built)."""
    from proxy.chain import ProxyResponse

    async def answer(ex):
        return ProxyResponse(200, body=b"pong " + ex.path.encode())

    routes = []
    for p in policies:
        if "tagger" in p.plugins and p.core.route is None:
            routes.append(build(p, p.plugins, prefix="/tagger/ping", scope="inbound", terminal=answer,
                                where=str(p.file), exact=True))
    return {"inbound": routes}


@hookimpl
def sidecar_policies_check(runtime, policies):
    return [f"{p.file}: tagger: the tag 'forbidden' is reserved"
            for p in policies if "tagger" in p.plugins and p.plugins["tagger"].tag == "forbidden"]
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """An external distribution 'sidecar-tagger' installed into a path entry, with an entry point."""
    site = tmp_path / "site"
    (site / "sidecar_tagger").mkdir(parents=True)
    (site / "sidecar_tagger" / "__init__.py").write_text(EXTERNAL_PLUGIN)
    dist = site / "sidecar_tagger-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sidecar-tagger\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[sidecar.plugins]\ntagger = sidecar_tagger\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("sidecar_tagger", None)


async def test_entry_point_plugin_is_loaded_and_runs(installed_plugin, sidecar_factory, upstream, client):
    specs = collect_specs(make_plugin_manager())
    assert specs["tagger"].origin == "entry point (sidecar-tagger 1.2.3)"
    assert specs["headers"].origin == "built-in"
    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{upstream.url}"\n[tagger]\ntag = "hello"\n'},
                               '[tagger]\ntag = "global"\n')
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.status == 200
        assert r.headers["X-Tag-Response"] == "hello"
    assert upstream.seen[-1].headers["X-Tagged-By"] == "hello"
    import sidecar_tagger
    assert ("startup", "test") in sidecar_tagger.SEEN
    assert ("policies", ["p"]) in sidecar_tagger.SEEN
    assert ("listeners", ["admin", "outbound"]) in sidecar_tagger.SEEN
    assert sc.runtime.extra_settings["tagger"].tag == "global"
    async with client.get(f"{sc.admin}/admin/tagger") as r:
        assert await r.json() == {"tagger": True}
    async with client.get(f"{sc.admin}/admin/routes") as r:
        chain = (await r.json())["routes"][0]["chain"]
        assert [c["plugin"] for c in chain] == ["tagger"]
    await sc.sidecar.stop()
    assert ("shutdown", "test") in sidecar_tagger.SEEN


def test_plugins_command_lists_origin(installed_plugin):
    env = {"PYTHONPATH": f"{installed_plugin}:{REPO}", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "proxy", "plugins"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert "entry point (sidecar-tagger 1.2.3)" in lines["tagger"]
    assert "450" in lines["tagger"]
    assert "built-in" in lines["headers"]


async def test_dotted_path_plugin_from_config(tmp_path, monkeypatch, sidecar_factory, upstream, client):
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "my_local_plugin.py").write_text(EXTERNAL_PLUGIN)
    monkeypatch.syspath_prepend(str(mod))
    try:
        sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{upstream.url}"\n[tagger]\n'},
                                   sidecar='plugins = ["my_local_plugin"]')
        async with client.get(f"{sc.url}/p/x") as r:
            assert r.headers["X-Tag-Response"] == "ext"
        assert sc.runtime.specs["tagger"].origin == "config"
    finally:
        sys.modules.pop("my_local_plugin", None)


def test_unimportable_dotted_plugin_is_a_config_error():
    from proxy.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        make_plugin_manager(["no_such_module_anywhere"])
    assert "cannot import 'no_such_module_anywhere'" in e.value.problems[0]


def test_order_is_priority_then_name():
    def spec(name, prio):
        return PluginSpec(name, object, prio, lambda c, x: None)
    got = ordered([spec("b", 10), spec("a", 10), spec("z", 100), spec("c", 1)])
    assert [s.name for s in got] == ["z", "a", "b", "c"]


async def test_chain_runs_outermost_first(tmp_path, monkeypatch, sidecar_factory, upstream, client):
    (tmp_path / "order_plugins.py").write_text(textwrap.dedent('''
        from proxy.chain import Filter
        from proxy.config import Model
        from proxy.hookspecs import hookimpl
        from proxy.plugins import PluginSpec

        class Config(Model):
            pass

        def make(tag):
            class F(Filter):
                async def handle(self, ex, call_next):
                    ex.headers.add("X-Order", tag)
                    resp = await call_next(ex)
                    resp.headers.add("X-Back", tag)
                    return resp
            return lambda cfg, ctx: F()

        @hookimpl
        def sidecar_plugins_register():
            return [PluginSpec("outer", Config, 990, make("outer")),
                    PluginSpec("inner", Config, 10, make("inner"))]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{upstream.url}"\n[inner]\n[outer]\n'},
                                   sidecar='plugins = ["order_plugins"]')
        async with client.get(f"{sc.url}/p/x") as r:
            assert r.headers.getall("X-Back") == ["inner", "outer"]
        assert upstream.seen[-1].headers.getall("X-Order") == ["outer", "inner"]
    finally:
        sys.modules.pop("order_plugins", None)


def _hookspec_names() -> list[str]:
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("sidecar_")]


def test_every_hook_has_a_docstring():
    names = _hookspec_names()
    assert names
    for name in names:
        doc = getattr(hookspecs, name).__doc__
        assert doc and len(doc.strip()) > 20, f"hook {name} needs a docstring"


def test_every_hook_is_exercised_by_a_test():
    tests = "\n".join(p.read_text() for p in Path(__file__).resolve().parents[1].rglob("test_*.py"))
    for name in _hookspec_names():
        assert f"def {name}(" in tests, f"hook {name} has no test implementing it"


async def test_policies_check_hook_rejects_a_set_and_reload_keeps_the_old(installed_plugin, sidecar_factory,
                                                                        upstream, client):
    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{upstream.url}"\n[tagger]\ntag = "a"\n'})
    (sc.dir / "policies" / "p.toml").write_text(f'route = "/p"\nupstream = "{upstream.url}"\n[tagger]\ntag = "forbidden"\n')
    problems = await sc.runtime.reload()
    assert problems == [f"{sc.dir / 'policies' / 'p.toml'}: tagger: the tag 'forbidden' is reserved"]
    async with client.get(f"{sc.url}/p/x") as r:
        assert r.headers["X-Tag-Response"] == "a"


async def test_routes_build_hook_adds_an_inbound_route_with_a_terminal(installed_plugin, sidecar_factory,
                                                                     upstream, client):
    from tests.support.inbound import inbound_config, inbound_url

    sc = await sidecar_factory({"t": '[tagger]\ntag = "in"\n'}, inbound_config(upstream.url, extra="""
        [inbound.routes."/tagger"]
        """))
    async with client.get(f"{inbound_url(sc)}/tagger/ping") as r:
        assert r.status == 200 and await r.read() == b"pong /tagger/ping"
        assert r.headers["X-Tag-Response"] == "in"
    # The exact path wins; its neighbours go to the prefix route (the service).
    async with client.get(f"{inbound_url(sc)}/tagger/pings") as r:
        assert r.status == 200
    assert upstream.seen[-1].path_qs == "/tagger/pings"
    line = (await sc.wait_access_lines(2))[0]
    assert line["route"] == "t" and line["path"] == "/tagger/ping"


async def test_two_policies_claiming_one_route_are_refused(sidecar_factory, upstream):
    sc = await sidecar_factory({"a": f'route = "/x"\nupstream = "{upstream.url}"\n'})
    (sc.dir / "policies" / "b.toml").write_text(f'route = "/x/"\nupstream = "{upstream.url}"\n')
    problems = await sc.runtime.reload()
    pol = sc.dir / "policies"
    assert problems == [f"{pol / 'b.toml'}: route: '/x' is already the route of {pol / 'a.toml'}"]
    assert [r.name for r in sc.runtime.table.routes] == ["a"]


async def test_a_filter_is_rebuilt_when_the_capabilities_of_its_route_change(sidecar_factory, upstream, client,
                                                                             monkeypatch):
    """A filter's build may read its route (``ctx.route_has``): the cache keys
    per tenant only when a plugin injects credentials. A reload that adds
    per-tenant [auth] to a route whose [cache] table is unchanged must not keep
    the cache filter built without it, or one tenant's answer (fetched with its
    key) is served to another tenant."""
    from aiohttp import web

    async def service(request, seen):
        return web.json_response({"auth": request.headers.get("Authorization")},
                                 headers={"Cache-Control": "max-age=60"})

    upstream.responder = service
    monkeypatch.setenv("T_KEY_ACME", "key-acme")
    monkeypatch.setenv("T_KEY_GLOBEX", "key-globex")
    cache = "[cache]\nauthorized = true\n"
    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{upstream.url}"\n{cache}'})
    sc.write_policy("p", f'route = "/p"\nupstream = "{upstream.url}"\n{cache}'
                         '[auth]\ntype = "bearer"\nsecret = "env:T_KEY_ACME"\nunknown_tenant = "reject"\n'
                         '[auth.tenants.acme]\nsecret = "env:T_KEY_ACME"\n'
                         '[auth.tenants.globex]\nsecret = "env:T_KEY_GLOBEX"\n')
    assert await sc.runtime.reload() == []
    got = {}
    for tenant in ("acme", "globex"):
        async with client.get(f"{sc.url}/p/report", headers={"X-Tenant-ID": tenant}) as r:
            assert r.status == 200
            got[tenant] = (await r.json())["auth"]
    assert got == {"acme": "Bearer key-acme", "globex": "Bearer key-globex"}
