"""The ``sidecar`` command as an operator runs it: real subprocesses, real files."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import aiohttp
import jsonschema

from tests.support.sidecar import REPO, free_port, write_config

ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def sidecar(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd or REPO, env=env or ENV,
                          capture_output=True, text=True, timeout=60)


def test_version():
    from proxy import __version__, compiled

    r = sidecar("--version")
    assert r.returncode == 0
    built = " (request path compiled with mypyc)" if compiled() else ""
    assert r.stdout.strip() == f"sidecar {__version__}{built}"


# ---- validate ------------------------------------------------------------------

BROKEN_CONFIG = """\
[outbound]
listen = "127.0.0.1:notaport"
[logging]
levle = "info"
[inboud]
x = 1
"""


def broken_tree(tmp: Path) -> Path:
    pol = tmp / "policies"
    pol.mkdir()
    (tmp / "config.toml").write_text(BROKEN_CONFIG)
    (pol / "a.toml").write_text(textwrap.dedent("""\
        route = "/a"
        upstream = "http://127.0.0.1:9000"
        [retry]
        attemps = 3
        [auth]
        type = "bearer"
        secret = "sk-live-DO-NOT-PRINT"
        """))
    (pol / "b.toml").write_text(textwrap.dedent("""\
        route = "/a/"
        upstream = "http://127.0.0.1:9000"
        [rate_limit]
        limits = [{ requests = "many", per = "1s", burts = 2 }]
        [cache]
        ttl = "forever"
        """))
    (pol / "c.toml").write_text(textwrap.dedent("""\
        [webhook]
        path = "/hooks/x"
        scheme = "github"
        secrets = ["env:X"]
        """))
    (pol / "d.toml").write_text(textwrap.dedent("""\
        [webhook]
        path = "/hooks/x"
        scheme = "stripe"
        secrets = ["env:Y"]
        [headers]
        request = { sett = { "X-A" = "1" } }
        """))
    (pol / "e.toml").write_text("route = /e\n")   # TOML syntax error
    return tmp / "config.toml"


def test_validate_lists_every_problem_of_every_file_in_one_run(tmp_path):
    config = broken_tree(tmp_path)
    r = sidecar("validate", "--config", str(config))
    assert r.returncode == 1
    pol = tmp_path / "policies"
    lines = r.stderr.splitlines()
    expected = [
        # config.toml problems do not hide the policies' ones
        f"{config}: outbound.listen: listen must be \"host:port\", got '127.0.0.1:notaport'",
        f"{config}: logging.levle: unknown key (did you mean 'level'?)",
        f"{config}: inboud: unknown table (did you mean 'inbound'?)",
        # did-you-mean at any depth, dotted paths, list indexes
        f"{pol / 'a.toml'}: retry.attemps: unknown key (did you mean 'attempts'?)",
        f"{pol / 'b.toml'}: rate_limit.limits.0.burts: unknown key (did you mean 'burst'?)",
        f"{pol / 'd.toml'}: headers.request.sett: unknown key (did you mean 'set'?)",
        # the bad value echoed
        f"{pol / 'b.toml'}: rate_limit.limits.0.requests: Input should be a valid integer, unable to parse "
        "string as an integer (got 'many')",
        f"{pol / 'b.toml'}: cache.ttl: invalid duration 'forever': use e.g. \"250ms\", \"2s\", \"1m\", \"1h\" or seconds",
        # a build problem of a policy that has other problems too, as a dotted path
        f"{pol / 'a.toml'}: auth.secret: must be a secret reference (env:NAME, file:/path, vault:path#key or aws-sm:id#key), "
        "never the credential itself",
        # whole-set checks over the files that had problems of their own
        f"{pol / 'b.toml'}: route: '/a' is already the route of {pol / 'a.toml'}",
        f"{pol / 'd.toml'}: webhook.path: '/hooks/x' is already the webhook path of {pol / 'c.toml'}",
    ]
    for line in expected:
        assert line in lines, f"missing: {line}\n--- got:\n{r.stderr}"
    assert any(line.startswith(f"{pol / 'e.toml'}: (syntax): ") for line in lines)
    problems = [line for line in lines if not line.startswith("warning: ")]
    assert lines[-1] == f"{len(problems) - 1} problem(s) in 5 file(s)"
    assert "sk-live-DO-NOT-PRINT" not in r.stderr + r.stdout


def test_validate_never_echoes_a_value_under_a_secret_name(tmp_path):
    path = write_config(tmp_path, {"p": 'route = "/p"\nupstream = "http://127.0.0.1:1"\n'
                                        '[auth]\ntype = "bearer"\nsecret = 12345678\n'})
    r = sidecar("validate", "--config", str(path))
    assert r.returncode == 1
    assert "auth.secret: Input should be a valid string (got a value, not shown)" in r.stderr
    assert "12345678" not in r.stderr


def test_validate_ok_on_the_shipped_tree():
    r = sidecar("validate", "--config", "config.toml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok: config and policies are valid"


def test_run_refuses_a_broken_tree_listing_the_same_problems(tmp_path):
    config = broken_tree(tmp_path)
    run = sidecar("run", "--config", str(config))
    validate = sidecar("validate", "--config", str(config))
    assert run.returncode == 2
    # The same problems; validate's warnings (unset secrets) and its count line aside.
    problems = [line for line in validate.stderr.splitlines()[:-1] if not line.startswith("warning: ")]
    assert run.stderr.splitlines()[1:] == problems


def test_outbound_listener_open_to_a_network_is_refused_without_allowed_clients(tmp_path):
    path = write_config(tmp_path, {}, outbound_port=0)
    text = path.read_text().replace('listen = "127.0.0.1:0"', 'listen = "0.0.0.0:0"', 1)
    path.write_text(text)
    r = sidecar("validate", "--config", str(path))
    assert r.returncode == 1
    assert f"{path}: outbound.allowed_clients: required: listen '0.0.0.0:0' is not a loopback address" in r.stderr
    path.write_text(text.replace('listen = "0.0.0.0:0"', 'listen = "0.0.0.0:0"\nallowed_clients = ["10.0.0.0/8"]'))
    assert sidecar("validate", "--config", str(path)).returncode == 0
    path.write_text(text.replace('listen = "0.0.0.0:0"', 'listen = "0.0.0.0:0"\nallowed_clients = ["10.0.0.300/8"]'))
    r = sidecar("validate", "--config", str(path))
    assert "outbound.allowed_clients: '10.0.0.300/8' is not an IP address or CIDR" in r.stderr


# ---- schema --------------------------------------------------------------------

def _schema(kind: str, *extra: str) -> dict:
    r = sidecar("schema", kind, *extra)
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    return schema


def test_schema_validates_every_shipped_policy_and_refuses_a_typo():
    schema = _schema("policy")
    v = jsonschema.Draft202012Validator(schema)
    shipped = sorted((REPO / "policies").glob("*.toml"))
    assert len(shipped) >= 4
    for path in shipped:
        data = tomllib.loads(path.read_text())
        assert not list(v.iter_errors(data)), (path, [e.message for e in v.iter_errors(data)])
        # The same file with a typo in a nested key fails.
        for table, body in data.items():
            if isinstance(body, dict) and body:
                typo = {**data, table: {**body, "attemps": 3}}
                errors = list(v.iter_errors(typo))
                assert errors and any("attemps" in e.message for e in errors), (path, table)
                break
    assert list(v.iter_errors({"route": "/x", "upstream": "http://h", "retry": {"attempts": "three"}}))
    assert list(v.iter_errors({"route": "/x"}))           # route needs upstream
    assert list(v.iter_errors({"rate_limt": {}}))          # unknown plugin table
    # descriptions and defaults reach the editor
    retry = schema["$defs"]["plugin.retry"]
    assert retry["properties"]["attempts"]["default"] == 3
    assert schema["properties"]["enabled"]["description"]
    assert "description" in schema["properties"]["retry"]
    timeout = schema["$defs"]["core.Timeouts"]["properties"]["total"]
    assert not list(jsonschema.Draft202012Validator(timeout).iter_errors("30s"))
    assert list(jsonschema.Draft202012Validator(timeout).iter_errors("soon"))


def test_schema_config_validates_the_shipped_config():
    schema = _schema("config")
    v = jsonschema.Draft202012Validator(schema)
    data = tomllib.loads((REPO / "config.toml").read_text())
    assert not [e.message for e in v.iter_errors(data)]
    assert list(v.iter_errors({**data, "logging": {"levle": "info"}}))
    inbound = {"inbound": {"routes": {"/api": {"jwt": {"secret": "env:J", "issuer": "x"}}}}}
    assert not [e.message for e in v.iter_errors(inbound)]
    assert list(v.iter_errors({"inbound": {"routes": {"/api": {"jwt": {"issuerr": "x"}}}}}))
    assert list(v.iter_errors({"inbound": {"routes": {"/api": {"rate_limt": {}}}}}))
    desc = schema["$defs"]["config.outbound"]["properties"]["trusted_proxies"]["description"]
    assert "X-Forwarded" in desc      # from the comment above the field


def test_schema_includes_a_third_party_plugin(tmp_path):
    (tmp_path / "thirdparty_schema_plugin.py").write_text(textwrap.dedent('''\
        from pydantic import BaseModel, ConfigDict, Field
        from proxy.hookspecs import hookimpl
        from proxy.plugins import PluginSpec

        class Config(BaseModel):
            model_config = ConfigDict(extra="forbid")
            # How loud the plugin is.
            volume: int = Field(default=7, ge=0)

        @hookimpl
        def sidecar_plugins_register():
            return [PluginSpec("loudness", Config, 10, lambda c, ctx: None, description="turns it up")]
        '''))
    path = write_config(tmp_path, {}, sidecar='plugins = ["thirdparty_schema_plugin"]')
    env = {**ENV, "PYTHONPATH": ENV["PYTHONPATH"] + os.pathsep + str(tmp_path)}
    r = sidecar("schema", "--config", str(path), env=env)
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    prop = schema["$defs"]["plugin.loudness"]["properties"]["volume"]
    assert prop["default"] == 7 and prop["description"] == "How loud the plugin is."
    assert schema["properties"]["loudness"]["description"].startswith("turns it up")
    v = jsonschema.Draft202012Validator(schema)
    assert not list(v.iter_errors({"loudness": {"volume": 3}}))
    assert list(v.iter_errors({"loudness": {"volume": -1}}))


# ---- explain -------------------------------------------------------------------

def explain_tree(tmp: Path) -> Path:
    return write_config(tmp, {
        "openai": """\
            route = "/openai"
            upstream = "https://api.openai.com/base"
            [auth]
            type = "bearer"
            secret = "env:EXPLAIN_OPENAI_KEY"
            headers = { "OpenAI-Organization" = "env:EXPLAIN_ORG" }
            [rate_limit]
            key = "header:X-Team"
            limits = [{ requests = 60, per = "1m" }]
            [[rate_limit.overrides]]
            match = "POST /v1/embeddings*"
            limits = [{ requests = 300, per = "1m" }]
            [cache]
            ttl = "60s"
            [retry]
            attempts = 2
            """,
        "off": """\
            route = "/off"
            upstream = "http://127.0.0.1:9"
            enabled = false
            [retry]
            attempts = 2
            """,
        "hooks": """\
            [webhook]
            path = "/webhooks/gh"
            forward_to = "/hooks/gh"
            scheme = "github"
            secrets = ["env:GH_SECRET"]
            """,
    }, '[inbound]\nlisten = "127.0.0.1:18443"\nservice_url = "http://127.0.0.1:8000"\n', outbound_port=18080)


def test_explain_shows_route_upstream_and_chain_with_decisions(tmp_path):
    path = explain_tree(tmp_path)
    env = {**ENV, "EXPLAIN_OPENAI_KEY": "sk-explain-VALUE-NEVER-SHOWN"}
    r = sidecar("explain", "POST", "/openai/v1/embeddings?x=1", "--header", "X-Team: blue",
                "-H", "Authorization: Bearer client", "--config", str(path), "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "sk-explain-VALUE-NEVER-SHOWN" not in r.stdout
    assert out["listener"] == "outbound"
    assert out["route"]["name"] == "openai" and out["route"]["prefix"] == "/openai"
    assert out["route"]["file"] == str(tmp_path / "policies" / "openai.toml")
    assert out["upstream"] == "https://api.openai.com/base/v1/embeddings?x=1"
    assert out["request"]["headers"]["Authorization"] == "[redacted]"
    chain = {s["plugin"]: s for s in out["chain"]}
    assert [s["plugin"] for s in out["chain"]] == ["rate_limit", "cache", "retry", "auth"]
    rl = chain["rate_limit"]["would"]
    assert rl["key_value"] == "blue"
    assert rl["applies"] == "override 'POST /v1/embeddings*'"
    assert [lim["requests"] for lim in rl["limits"]] == [300]
    assert "unsafe method" in chain["cache"]["would"]["decision"]
    assert chain["retry"]["would"]["decision"].startswith("sent once: POST is not idempotent")
    auth = chain["auth"]
    assert auth["settings"]["secret"] == "env:EXPLAIN_OPENAI_KEY"
    assert auth["would"]["injects"] == {"Authorization": "Bearer <env:EXPLAIN_OPENAI_KEY>",
                                        "OpenAI-Organization": "<env:EXPLAIN_ORG>"}
    # a GET on the same route: the route's own limits, the cache rule
    r = sidecar("explain", "get", "/openai/v1/models", "--config", str(path), "--json")
    out = json.loads(r.stdout)
    chain = {s["plugin"]: s for s in out["chain"]}
    assert chain["rate_limit"]["would"]["applies"] == "route limits"
    assert chain["rate_limit"]["would"]["key_value"] == "-"
    assert chain["cache"]["would"]["ttl_seconds"] == 60.0
    assert chain["retry"]["would"]["decision"].startswith("up to 2 attempts")


def test_explain_text_and_disabled_route_and_webhook(tmp_path):
    path = explain_tree(tmp_path)
    r = sidecar("explain", "GET", "http://127.0.0.1:18080/off/x", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert "decision: 503 route_disabled" in r.stdout
    r = sidecar("explain", "GET", "/openai/v1/models", "--config", str(path))
    assert "upstream: https://api.openai.com/base/v1/models" in r.stdout
    assert "chain (outermost first):" in r.stdout and "  auth (priority 500)" in r.stdout
    r = sidecar("explain", "POST", "http://127.0.0.1:18443/webhooks/gh", "--config", str(path), "--json")
    out = json.loads(r.stdout)
    assert out["listener"] == "inbound"
    assert out["webhook"]["policy"] == "hooks"
    assert out["forwards_to"] == "http://127.0.0.1:8000/hooks/gh"



def test_explain_a_disabled_policys_webhook(tmp_path):
    path = write_config(tmp_path, {"hooks": """\
            enabled = false
            [webhook]
            path = "/webhooks/gh"
            scheme = "github"
            secrets = ["env:GH_SECRET"]
            """}, '[inbound]\nlisten = "127.0.0.1:18443"\nservice_url = "http://127.0.0.1:8000"\n')
    r = sidecar("explain", "POST", "http://127.0.0.1:18443/webhooks/gh", "--config", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["webhook"]["policy"] == "hooks"
    assert out["decision"].startswith("503 route_disabled") and "forwards_to" not in out
    r = sidecar("explain", "POST", "http://127.0.0.1:18443/webhooks/gh", "--config", str(path))
    assert "decision: 503 route_disabled" in r.stdout



def test_explain_a_service_account_route_names_where_its_token_comes_from(tmp_path):
    path = write_config(tmp_path, {"sheets": """\
            route = "/sheets"
            upstream = "https://sheets.googleapis.com"
            [auth]
            type = "oauth2_jwt_bearer"
            credentials = "env:EXPLAIN_SA_JSON"
            scopes = ["https://www.googleapis.com/auth/spreadsheets"]
            """})
    r = sidecar("explain", "GET", "/sheets/v4/spreadsheets/x", "--config", str(path), "--json")
    assert r.returncode == 0, r.stderr
    chain = {s["plugin"]: s for s in json.loads(r.stdout)["chain"]}
    injected = chain["auth"]["would"]["injects"]["Authorization"]
    assert injected == "Bearer <access token from the token_uri of env:EXPLAIN_SA_JSON (RFC 7523)>", injected


def test_explain_unmatched_url_exits_1_naming_the_nearest_prefixes(tmp_path):
    path = explain_tree(tmp_path)
    r = sidecar("explain", "GET", "/opnai/v1/models", "--config", str(path))
    assert r.returncode == 1
    assert "no route matches /opnai/v1/models on the outbound listener" in r.stderr
    assert "nearest route prefixes: /openai" in r.stderr
    r = sidecar("explain", "GET", "/openai2/x", "--config", str(path), "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["nearest"][0] == "/openai"


# ---- echo ----------------------------------------------------------------------

async def test_echo_answers_method_path_query_and_headers():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "echo", "--listen", f"127.0.0.1:{port}"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < end, "echo did not listen"
                await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/a/b?x=1&x=2&y=3", data=b"hi",
                              headers={"Authorization": "Bearer t", "X-One": "1"}) as r:
                assert r.status == 200
                body = await r.json()
        assert body["method"] == "POST" and body["path"] == "/a/b"
        assert body["query"] == {"x": ["1", "2"], "y": "3"}
        assert body["headers"]["Authorization"] == "Bearer t" and body["headers"]["X-One"] == "1"
        assert body["body"] == "hi"
    finally:
        proc.terminate()
        proc.wait(10)


def test_validate_suggests_keys_inside_inbound_route_plugins(tmp_path):
    path = write_config(tmp_path, {}, '[inbound]\nlisten = "127.0.0.1:0"\n'
                                      '[inbound.routes."/api".jwt]\nsecret = "env:J"\nissuerr = "x"\n')
    r = sidecar("validate", "--config", str(path))
    assert r.returncode == 1
    assert "/api: jwt.issuerr: unknown key (did you mean 'issuer'?)" in r.stderr


def test_explain_an_inbound_route(tmp_path):
    path = write_config(tmp_path, {}, '[inbound]\nlisten = "127.0.0.1:18444"\nservice_url = "http://127.0.0.1:8000"\n'
                                      '[inbound.routes."/api".jwt]\nsecret = "env:J"\n')
    r = sidecar("explain", "GET", "http://127.0.0.1:18444/api/orders?id=2", "--config", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["listener"] == "inbound" and out["route"]["prefix"] == "/api"
    assert out["upstream"] == "http://127.0.0.1:8000/api/orders?id=2"
    assert [s["plugin"] for s in out["chain"]] == ["jwt"]
    assert out["chain"][0]["settings"]["secret"] == "env:J"


def test_validate_hides_values_under_credential_header_names(tmp_path):
    from proxy.cli import check

    path = write_config(tmp_path, {"p": 'route = "/p"\nupstream = "http://127.0.0.1:1"\n'
                                        '[headers]\nrequest = { set = { "X-Api-Key" = 987654321, "X-Env" = 42 } }\n'})
    problems = check(str(path))
    pol = tmp_path / "policies" / "p.toml"
    assert f"{pol}: headers.request.set.X-Api-Key: Input should be a valid string (got a value, not shown)" in problems
    assert f"{pol}: headers.request.set.X-Env: Input should be a valid string (got 42)" in problems
    assert "987654321" not in "\n".join(problems)
