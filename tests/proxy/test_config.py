"""Config and policy validation: every problem reported as file: field: reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import load_settings
from proxy.errors import ConfigError
from proxy.runtime import Runtime
from proxy.units import parse_duration, parse_size
from tests.support.sidecar import REPO, write_config


@pytest.mark.parametrize("text,seconds", [("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0),
                                          (5, 5.0), (0.5, 0.5), ("1.5s", 1.5), ("1d", 86400.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text,size", [("512KB", 512 * 1024), ("10MB", 10 * 1024**2), (1000, 1000),
                                       ("1GB", 1024**3), ("100B", 100), ("2kb", 2048)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["2 parsecs", "-1s", "s", True, "", [1]])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["10 MBs", -1, "lots", False, 1.5])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def problems_for(tmp_path: Path, policies: dict[str, str], config: str = "") -> list[str]:
    path = write_config(tmp_path, policies, config)
    try:
        rt = Runtime(load_settings(path))
        rt.compile(rt.load_policies())
    except ConfigError as e:
        return e.problems
    return []


GOOD = 'route = "/p"\nupstream = "http://127.0.0.1:9"\n'

POLICY_ERRORS = [
    # (policy text, field expected in the problem, words expected in the reason)
    (GOOD + '[timeouts]\nconnect = "2 parsecs"\n', "timeouts.connect", "invalid duration"),
    (GOOD + '[limits]\nmax_request_body = "lots"\n', "limits.max_request_body", "invalid size"),
    (GOOD + 'colour = "blue"\n', "colour", "unknown key"),
    (GOOD + '[header]\nrequest = {}\n', "header", "did you mean 'headers'"),
    ('route = "/p"\n', "(top level)", "route and upstream go together"),
    ('route = "p"\nupstream = "http://x"\n', "route", "must start with '/'"),
    ('route = "/p"\nupstream = "ftp://x"\n', "upstream", "http:// or https://"),
    ('route = "/p"\nupstream = "http://x?a=1"\n', "upstream", "query"),
    # Userinfo is never sent by the upstream clients, and would show in /admin/routes.
    ('route = "/p"\nupstream = "https://user:s3cret@x"\n', "upstream", "[auth]"),
    (GOOD + '[timeouts]\nconect = "1s"\n', "timeouts.conect", "unknown key"),
    (GOOD + '[headers]\nrequest = { set = { "Connection" = "x" } }\n', "headers.request.set", "hop-by-hop"),
    (GOOD + '[tls]\nverify = "nope"\n', "tls.verify", "boolean"),
    ('route = "/p"\nupstream = "http://x"\n[[[', "(syntax)", ""),
]


@pytest.mark.parametrize("text,field,reason", POLICY_ERRORS)
def test_policy_errors_name_file_field_and_reason(tmp_path, text, field, reason):
    problems = problems_for(tmp_path, {"bad": text})
    assert problems, "expected a problem"
    file = str(tmp_path / "policies" / "bad.toml")
    match = [p for p in problems if p.startswith(f"{file}: {field}: ")]
    assert match, problems
    assert reason in match[0], problems


def test_every_problem_in_every_file_is_listed(tmp_path):
    problems = problems_for(tmp_path, {
        "a": GOOD.replace("/p", "/a") + '[timeouts]\nconnect = "x"\ntotal = "y"\n',
        "b": 'route = "/b"\n',
        "c": GOOD.replace("/p", "/c"),
    })
    assert len([p for p in problems if "a.toml" in p]) == 2
    assert len([p for p in problems if "b.toml" in p]) == 1
    assert not [p for p in problems if "c.toml" in p]


def test_duplicate_routes_are_rejected(tmp_path):
    problems = problems_for(tmp_path, {"a": GOOD, "b": GOOD})
    assert any("b.toml: route: '/p' is already the route of" in p for p in problems), problems


def test_config_toml_errors(tmp_path):
    path = write_config(tmp_path, {"p": GOOD}, '[stat]\nx = 1\n')
    with pytest.raises(ConfigError) as e:
        Runtime(load_settings(path))
    text = "\n".join(e.value.problems)
    assert f"{path}: stat: unknown table (did you mean 'state'?)" in text
    with pytest.raises(ConfigError) as e:
        load_settings(write_config(tmp_path / "2", {"p": GOOD}, '[state]\nbackend = "etcd"\n'))
    assert any(": state.backend: " in p and "'memory' or 'redis'" in p for p in e.value.problems)


def test_bad_listen_address(tmp_path):
    path = write_config(tmp_path, {"p": GOOD})
    path.write_text(path.read_text().replace('listen = "127.0.0.1:0"', 'listen = "nowhere"', 1))
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert any("outbound.listen: listen must be" in p for p in e.value.problems)


def test_state_url_is_accepted_with_memory_backend(tmp_path):
    path = write_config(tmp_path, {"p": GOOD}, '[state]\nbackend = "memory"\nurl = "redis://nowhere:1/0"\n')
    assert load_settings(path).state.url == "redis://nowhere:1/0"


def test_policy_limits_override_global_per_key(tmp_path):
    path = write_config(tmp_path, {"p": GOOD + "[limits]\nmax_headers = 7\n"},
                        '[limits]\nmax_header_size = "8KB"\n')
    rt = Runtime(load_settings(path))
    (policy,) = rt.load_policies()
    assert policy.core.limits.max_headers == 7
    assert policy.core.limits.max_header_size == 8192
    assert policy.core.limits.max_request_body == 100 * 1024**2


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60)


def test_cli_validate_ok_on_shipped_config():
    r = run_cli("validate", "--config", str(REPO / "config.toml"))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_cli_validate_lists_every_problem(tmp_path):
    path = write_config(tmp_path, {"bad": GOOD + '[timeouts]\nconnect = "x"\n[limitz]\n', "ok": GOOD.replace("/p", "/q")})
    r = run_cli("validate", "--config", str(path))
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if "bad.toml" in line]
    assert len(lines) == 2
    assert any(": timeouts.connect: invalid duration" in line for line in lines)
    assert any(": limitz: unknown table" in line and "did you mean 'limits'" in line for line in lines)


def test_cli_run_refuses_a_bad_set(tmp_path):
    path = write_config(tmp_path, {"bad": 'route = "/p"\n'})
    r = run_cli("run", "--config", str(path))
    assert r.returncode == 2
    assert "route and upstream go together" in r.stderr


def test_shipped_policies_validate():
    """Every example in policies/ must validate."""
    rt = Runtime(load_settings(REPO / "config.toml"))
    policies = rt.load_policies()
    assert {p.name for p in policies} >= {"httpbin"}


def test_readme_quick_start_commands_exist():
    readme = (REPO / "README.md").read_text()
    assert "sidecar run --config config.toml" in readme
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert test_cmd.strip() in readme, "CI must run the README's test command verbatim"
    assert "SIDECAR_REQUIRE_REDIS=1" in ci


def test_a_both_ways_plugin_in_a_policy_without_any_route_is_refused(tmp_path):
    from proxy.cli import check
    from tests.support.sidecar import write_config

    path = write_config(tmp_path, {"p": '[headers]\nrequest = { set = { "X-A" = "1" } }\n'})
    assert check(str(path)) == [f"{tmp_path / 'policies' / 'p.toml'}: headers: this policy has no route to wrap "
                                "(set route and upstream, or add [webhook])"]
