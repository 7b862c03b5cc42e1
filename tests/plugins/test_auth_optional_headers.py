"""auth: optional [auth.headers] references ("env:NAME?"), as policies/openai.toml
uses for OpenAI-Organization: sent while set, left out (not 503) while unset."""

from __future__ import annotations

async def test_optional_header_reference_is_left_out_while_unset(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("API_KEY_T", "sk-test")
    monkeypatch.delenv("ORG_T", raising=False)
    text = (f'route = "/o"\nupstream = "{upstream.url}"\n[auth]\ntype = "bearer"\nsecret = "env:API_KEY_T"\n'
            'headers = { "OpenAI-Organization" = "env:ORG_T?" }\n')
    sc = await sidecar_factory({"o": text})
    async with client.get(f"{sc.url}/o/x") as r:
        assert r.status == 200
    assert "OpenAI-Organization" not in upstream.seen[-1].headers
    monkeypatch.setenv("ORG_T", "org-123")
    assert await sc.runtime.reload() == []   # env values are read at load and reload, not per request
    async with client.get(f"{sc.url}/o/x") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["OpenAI-Organization"] == "org-123"
    async with client.get(f"{sc.admin}/admin/secrets") as r:
        listed = {s["reference"]: s for s in (await r.json())["secrets"]}
    assert listed["env:ORG_T"]["optional"] is True and "env:ORG_T?" not in listed
