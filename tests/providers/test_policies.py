"""The shipped policy library (policies/): documented, valid, and safe to run
with no secret set (every route answers 503 secret_unavailable until set)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from proxy.cli import main as cli_main
from proxy.config import load_settings
from proxy.server import Sidecar
from tests.support.inbound import inbound_url
from tests.support.sidecar import REPO, RunningSidecar

POLICIES = sorted((REPO / "policies").glob("*.toml"))
PROVIDERS = {"openai", "anthropic", "stripe", "github", "slack", "notion", "sendgrid", "twilio",
             "google-sheets", "google-calendar"}


def test_the_library_has_every_provider():
    assert PROVIDERS <= {p.stem for p in POLICIES}
    assert (REPO / "policies" / "generic.toml.example").is_file()


@pytest.mark.parametrize("path", [p for p in POLICIES if p.stem in PROVIDERS], ids=lambda p: p.stem)
def test_each_policy_says_base_url_secrets_and_limits(path: Path):
    head = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    for part in ("Service:", "Secrets:", "Limits:"):
        assert part in head, f"{path.name}: header comment lacks {part!r}"
    assert re.search(r"127\.0\.0\.1:8080/" + re.escape(path.stem.split("-")[0]), head), path.name
    # Every limit cites the provider's documentation.
    assert re.search(r"\b[a-z]+\.[a-z.]+\.(com|io)\b|docs\.", head.split("Limits:")[1]), path.name


def shipped_copy(tmp: Path) -> Path:
    """config.toml and policies/ as shipped, on free ports and a private data dir."""
    shutil.copytree(REPO / "policies", tmp / "policies")
    text = (REPO / "config.toml").read_text()
    text = re.sub(r'listen = "127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:0"', text)
    text = text.replace('access_log = "stdout"', f'access_log = "{tmp / "access.log"}"')
    path = tmp / "config.toml"
    path.write_text(text)
    return path


def env_refs() -> set[str]:
    names = set()
    for p in POLICIES:
        names |= set(re.findall(r'"env:([A-Z0-9_]+)\??"', p.read_text()))
    return names


async def test_shipped_config_runs_with_no_secret_set(tmp_path, monkeypatch, client):
    for name in env_refs():
        monkeypatch.delenv(name, raising=False)
    sc = Sidecar(load_settings(shipped_copy(tmp_path)))
    await sc.start()
    run = RunningSidecar(sc, tmp_path / "config.toml")
    try:
        routes = {r.name: r.prefix for r in sc.runtime.table.routes}
        assert PROVIDERS <= set(routes)
        for name, prefix in sorted(routes.items()):
            async with client.get(f"{run.url}{prefix}/v1/ping") as r:
                assert r.status == 503, name
                assert r.headers["X-Sidecar-Error"] == "secret_unavailable", name
        hooks = inbound_url(run)
        for path in ("/webhooks/stripe", "/webhooks/github", "/webhooks/slack", "/webhooks/sendgrid",
                     "/webhooks/twilio"):
            async with client.post(hooks + path, data=b"{}") as r:
                assert r.status == 503, path
                assert r.headers["X-Sidecar-Error"] == "secret_unavailable", path
    finally:
        await sc.stop()


def test_shipped_config_validates():
    assert cli_main(["validate", "--config", str(REPO / "config.toml")]) == 0


def test_generic_example_validates_once_copied(tmp_path):
    path = shipped_copy(tmp_path)
    for p in (tmp_path / "policies").glob("*.toml"):
        p.unlink()
    text = (REPO / "policies" / "generic.toml.example").read_text()
    # Its commented mode keys are valid too.
    text = re.sub(r"^# (mode|fixtures|match_body) = ", r"\1 = ", text, flags=re.M)
    (tmp_path / "policies" / "acme.toml").write_text(text)
    assert cli_main(["validate", "--config", str(path)]) == 0
