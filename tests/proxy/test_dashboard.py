"""The dashboard in a real headless browser: Debian's chromium driven by
Playwright's Python client (no `playwright install`: .ci/run installs the
distribution's chromium). The page asks for the admin token, shows a route
that got traffic, a breaker opened by a failing upstream turns red, its
reset button closes it, and the retry button re-delivers a dead-lettered
webhook."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import orjson
import pytest
import stripe
from aiohttp import web

from tests.support.inbound import inbound_config, inbound_url, webhook_policy
from tests.support.upstream import FakeUpstream, wait_for

CHROMIUM = os.environ.get("SIDECAR_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
SECRET = "whsec_dashboard_test"
TOKEN = "dash-admin-token-1"
DOCS = Path(__file__).resolve().parents[2] / "docs"

if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
    if os.environ.get("SIDECAR_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"chromium not found at {CHROMIUM}; .ci/run installs it (apt-get install chromium)")
    pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def signed(event_id: str) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps({"id": event_id, "type": "charge.succeeded", "data": {}})
    return body, {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET),
                  "Content-Type": "application/json"}


async def test_dashboard_end_to_end(sidecar_factory, upstream, client, monkeypatch):
    from playwright.async_api import async_playwright, expect

    monkeypatch.setenv("WH_SECRET", SECRET)
    monkeypatch.setenv("DASH_ADMIN_TOKEN", TOKEN)
    failing = await FakeUpstream().start()
    service = {"status": 500}

    async def fail(request: web.Request, seen) -> web.Response:
        return web.Response(status=500)

    async def svc(request: web.Request, seen) -> web.Response:
        if request.path.startswith("/hooks/"):
            return web.Response(status=service["status"])
        return web.json_response({"ok": True})

    failing.responder = fail
    upstream.responder = svc
    try:
        sc = await sidecar_factory({
            "orders": f'route = "/orders"\nupstream = "{upstream.url}"\n[cache]\nttl = "10s"\n',
            "flaky": f'route = "/flaky"\nupstream = "{failing.url}"\n'
                     '[circuit_breaker]\nfailure_threshold = 2\nrecovery_timeout = "5m"\n',
            "stripe": webhook_policy("/webhooks/stripe", "stripe", ["env:WH_SECRET"], forward_to="/hooks/stripe",
                                     raw='retry = { attempts = 1, base = "10ms", max = "10ms" }'),
        }, inbound_config(upstream.url), admin='token = "env:DASH_ADMIN_TOKEN"')
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for _ in range(5):
            async with client.get(f"{sc.url}/orders/1") as r:
                assert r.status == 200
        for _ in range(2):
            async with client.get(f"{sc.url}/flaky/x") as r:
                assert r.status == 500
        body, headers = signed("evt_dash")
        async with client.post(inbound_url(sc) + "/webhooks/stripe", data=body, headers=headers) as r:
            assert r.status == 202
            event_id = r.headers["X-Sidecar-Event-Id"]

        async def event_status() -> str:
            async with client.get(f"{sc.admin}/admin/webhooks/events/{event_id}", headers=auth) as r:
                return (await r.json())["status"]

        async def wait_status(status: str, timeout: float = 10.0) -> None:
            end = asyncio.get_running_loop().time() + timeout
            while (now := await event_status()) != status:
                assert asyncio.get_running_loop().time() < end, f"event is {now}, never {status}"
                await asyncio.sleep(0.02)

        await wait_status("dead")

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 1100})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(sc.admin + "/")
                # The token is asked once and kept in sessionStorage.
                form = page.locator("#token-form")
                await expect(form).to_be_visible(timeout=10_000)
                await page.fill("#token-input", TOKEN)
                await page.click("#token-save")
                await expect(form).to_be_hidden()
                assert await page.evaluate("sessionStorage.getItem('sidecar-admin-token')") == TOKEN

                orders = page.locator('#routes tr[data-route="orders"]')
                await expect(orders.locator("td.requests")).to_have_text("5", timeout=10_000)
                await expect(page.locator('#cache tbody tr').first).to_contain_text("orders")
                await expect(page.locator('#cache tbody tr').first).to_contain_text("80.0%")

                flaky = page.locator('#breakers tr[data-route="flaky"]')
                await expect(flaky).to_have_class("open", timeout=10_000)
                color = await flaky.locator("td.state").evaluate("e => getComputedStyle(e).color")
                assert color == "rgb(197, 34, 31)"          # red

                dead_row = page.locator(f'#webhooks tr[data-event="{event_id}"]')
                await expect(dead_row).to_have_class("dead", timeout=10_000)
                await expect(page.locator("#webhook-counts")).to_contain_text("dead-lettered 1")
                if os.environ.get("SIDECAR_WRITE_SCREENSHOT") == "1":
                    await page.screenshot(path=str(DOCS / "dashboard.png"), full_page=True)

                await flaky.locator("button.reset").click()
                await expect(flaky).to_have_class("closed", timeout=10_000)
                async with client.get(f"{sc.admin}/admin/breakers", headers=auth) as r:
                    assert (await r.json())["flaky"]["state"] == "closed"

                service["status"] = 200
                seen_before = len([s for s in upstream.seen if s.path_qs == "/hooks/stripe"])
                await dead_row.locator("button.retry").click()
                await wait_for(lambda: len([s for s in upstream.seen if s.path_qs == "/hooks/stripe"])
                               == seen_before + 1)
                await wait_status("delivered")
                await expect(page.locator("#webhook-counts")).to_contain_text("dead-lettered 0", timeout=10_000)
                await expect(page.locator("#reload")).to_contain_text("no reload since start")
                await expect(page.locator("#status")).to_have_text("ok")
                assert errors == []
            finally:
                await browser.close()
    finally:
        await failing.stop()


async def test_dashboard_page_is_static_and_self_contained(sidecar_factory, upstream, client):
    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{upstream.url}"\n'})
    async with client.get(sc.admin + "/") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        html = await r.text()
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "http://" not in html and "https://" not in html      # no CDN
    async with client.get(sc.admin + "/dashboard/app.js") as r:
        js = await r.text()
    assert "innerHTML" not in js and "https://" not in js
    assert "setInterval(refresh, REFRESH_MS)" in js and "const REFRESH_MS = 2000" in js


async def test_dashboard_never_overlaps_its_refreshes(sidecar_factory, upstream, tmp_path, monkeypatch):
    """An admin endpoint slower than the 2 s refresh (a SCAN of a large Redis,
    a Vault probe) must not make the page pile up requests: a refresh starts
    only once the previous one ended."""
    from playwright.async_api import async_playwright

    (tmp_path / "slow_health_plugin.py").write_text(
        "import asyncio\n"
        "from proxy.hookspecs import hookimpl\n"
        "STATE = {'calls': 0, 'inside': 0, 'most': 0}\n"
        "@hookimpl\n"
        "def sidecar_health_checks(runtime):\n"
        "    async def slow():\n"
        "        STATE['calls'] += 1\n"
        "        STATE['inside'] += 1\n"
        "        STATE['most'] = max(STATE['most'], STATE['inside'])\n"
        "        try:\n"
        "            await asyncio.sleep(2.5)\n"
        "        finally:\n"
        "            STATE['inside'] -= 1\n"
        "        return {'status': 'ok'}\n"
        "    return {'slow': slow}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import slow_health_plugin

    sc = await sidecar_factory({"p": f'route = "/p"\nupstream = "{upstream.url}"\n'},
                               sidecar='plugins = ["slow_health_plugin"]')
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = await browser.new_page()
            await page.goto(sc.admin + "/")
            await wait_for(lambda: slow_health_plugin.STATE["calls"] >= 2, timeout=20)
        finally:
            await browser.close()
    assert slow_health_plugin.STATE["most"] == 1, slow_health_plugin.STATE
