"""The external plugin package of docs/plugins.md: built, installed, and its own test run.

It lives as real files in docs/examples/sidecar-example-plugin; docs/plugins.md
quotes them, and this test checks both that the quotes are verbatim and that
the package installs (pip, its entry point) and passes its test written with
proxy.testing, the way its author would run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import proxy.plugin
from tests.support.sidecar import REPO

EXAMPLE = REPO / "docs" / "examples" / "sidecar-example-plugin"
FILES = ("pyproject.toml", "sidecar_stamp/__init__.py", "tests/test_stamp.py")


def test_the_public_plugin_api_names_exist():
    for name in ("hookimpl", "PluginSpec", "BuildContext", "Filter", "Exchange", "ProxyResponse", "Handler",
                 "Model", "Duration", "Size", "INJECTS_CREDENTIALS", "SidecarError", "UpstreamError",
                 "UpstreamUnavailable", "UpstreamTimeout", "CircuitOpen", "RequestBodyTooLarge", "read_limited"):
        assert name in proxy.plugin.__all__ and getattr(proxy.plugin, name) is not None, name
    assert set(proxy.plugin.__all__) <= set(dir(proxy.plugin))


def test_docs_quote_the_example_package_verbatim():
    doc = (REPO / "docs" / "plugins.md").read_text()
    for rel in FILES:
        assert (EXAMPLE / rel).read_text().strip() in doc, f"docs/plugins.md does not show {rel} as it is"
    module = (EXAMPLE / "sidecar_stamp" / "__init__.py").read_text()
    imports = [line for line in module.splitlines() if line.startswith(("from proxy", "import proxy"))]
    assert imports == ["from proxy.plugin import (BuildContext, Duration, Exchange, Filter, Handler, Model, "
                       "PluginSpec,"], imports


def test_example_plugin_installs_and_its_own_test_passes(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    site = tmp_path / "site"
    # --no-deps: sidecar-proxy (its dependency) is this checkout, already installed.
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(src)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (site / "sidecar_stamp" / "__init__.py").exists()
    # The test must use the installed copy, found through its entry point.
    shutil.rmtree(src / "sidecar_stamp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                       cwd=src, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 passed" in r.stdout
