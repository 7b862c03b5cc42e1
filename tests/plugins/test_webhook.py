"""Webhook verification on the inbound listener, signed with the providers' own libraries.

Each test sends real HTTP to the sidecar's inbound listener; the fake service
(``upstream``) records what reached it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest
import stripe
from slack_sdk.signature import SignatureVerifier
from standardwebhooks.webhooks import Webhook as StdWebhook
from svix.webhooks import Webhook as SvixWebhook
from twilio.request_validator import RequestValidator

from plugins.webhook.config import Config
from plugins.webhook.schemes import compile_template
from tests.support.inbound import inbound_config, inbound_url, webhook_policy

STRIPE_SECRET = "whsec_test_current_secret"
STRIPE_OLD = "whsec_test_old_secret"
STD_SECRET = "whsec_" + base64.b64encode(b"standard-webhooks-key-0123456789").decode()
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
TWILIO_TOKEN = "12345678901234567890123456789012"
GITHUB_SECRET = "It's a Secret to Everybody"
SHOPIFY_SECRET = "shpss_shopify_secret"
SQUARE_KEY = "square-signature-key"
PUBLIC = "https://hooks.example.com"

POLICIES = {
    "stripe": webhook_policy("/webhooks/stripe", "stripe", ["env:WH_STRIPE", "env:WH_STRIPE_OLD"],
                             forward_to="/hooks/stripe", delivery="passthrough"),
    "github": webhook_policy("/webhooks/github", "github", ["env:WH_GITHUB"], delivery="passthrough"),
    "slack": webhook_policy("/webhooks/slack", "slack", ["env:WH_SLACK"], delivery="passthrough"),
    "std": webhook_policy("/webhooks/std", "standard-webhooks", ["env:WH_STD"], delivery="passthrough"),
    "svix": webhook_policy("/webhooks/svix", "svix", ["env:WH_STD"], delivery="passthrough"),
    "shopify": webhook_policy("/webhooks/shopify", "shopify", ["env:WH_SHOPIFY"], delivery="passthrough"),
    "twilio": webhook_policy("/webhooks/twilio", "twilio", ["env:WH_TWILIO"], delivery="passthrough",
                             public_url=PUBLIC + "/webhooks/twilio"),
    "square": webhook_policy("/webhooks/square", "square", ["env:WH_SQUARE"], delivery="passthrough",
                             public_url=PUBLIC + "/webhooks/square"),
    "generic": webhook_policy("/webhooks/generic", "generic", ["env:WH_GENERIC"], delivery="passthrough",
                              header="X-Signature", prefix="sha512=", algorithm="sha512",
                              encoding="base64", signed="{timestamp}:{id}:{body}",
                              timestamp_header="X-Timestamp", id_header="X-Event-Id"),
    "small": webhook_policy("/webhooks/small", "github", ["env:WH_GITHUB"], delivery="passthrough",
                            max_body="64B"),
}


@pytest.fixture
async def hooks(monkeypatch, sidecar_factory, upstream):
    for name, value in {"WH_STRIPE": STRIPE_SECRET, "WH_STRIPE_OLD": STRIPE_OLD, "WH_GITHUB": GITHUB_SECRET,
                        "WH_SLACK": SLACK_SECRET, "WH_STD": STD_SECRET, "WH_SHOPIFY": SHOPIFY_SECRET,
                        "WH_TWILIO": TWILIO_TOKEN, "WH_SQUARE": SQUARE_KEY, "WH_GENERIC": "generic-key"}.items():
        monkeypatch.setenv(name, value)
    sc = await sidecar_factory(POLICIES, inbound_config(upstream.url))
    return inbound_url(sc), sc


def stripe_body(event_id: str = "evt_1") -> bytes:
    return orjson.dumps({"id": event_id, "type": "payment_intent.succeeded", "data": {"object": {"amount": 42}}})


async def post(client, url, body: bytes, headers: dict[str, str]):
    async with client.post(url, data=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def assert_rejected(client, url, body, headers, upstream, code, status=401):
    st, h, raw = await post(client, url, body, headers)
    assert st == status, raw
    assert h["X-Sidecar-Error"] == code
    assert orjson.loads(raw)["error"]["code"] == code
    assert upstream.seen == []
    return raw


# ---- each scheme, signed by its provider's library ----------------------------

async def test_stripe_signed_by_the_stripe_sdk_is_forwarded_byte_for_byte(hooks, client, upstream):
    url, _ = hooks
    body = stripe_body() + b"  \n"  # trailing bytes: verification must use the raw body
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_SECRET)
    st, h, _ = await post(client, url + "/webhooks/stripe", body,
                          {"Stripe-Signature": header, "Content-Type": "application/json"})
    assert st == 200
    seen = upstream.seen[0]
    assert seen.path_qs == "/hooks/stripe"
    assert seen.body == body
    assert seen.headers["Stripe-Signature"] == header
    assert seen.headers["X-Sidecar-Event-Id"] == h["X-Sidecar-Event-Id"]
    assert seen.headers["X-Sidecar-Attempt"] == "1"


async def test_stripe_rotation_accepts_the_old_secret(hooks, client, upstream):
    url, _ = hooks
    body = stripe_body("evt_old")
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_OLD)
    st, _, _ = await post(client, url + "/webhooks/stripe", body, {"Stripe-Signature": header})
    assert st == 200 and len(upstream.seen) == 1


async def test_stripe_wrong_secret_is_rejected_without_echoing_secret_or_mac(hooks, client, upstream):
    url, _ = hooks
    body = stripe_body()
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), "whsec_wrong")
    raw = await assert_rejected(client, url + "/webhooks/stripe", body, {"Stripe-Signature": header},
                                upstream, "signature_invalid")
    t = header.split(",")[0][2:]
    expected = hmac.new(STRIPE_SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    assert STRIPE_SECRET.encode() not in raw and expected.encode() not in raw


async def test_stripe_tampered_body_is_rejected(hooks, client, upstream):
    url, _ = hooks
    body = stripe_body()
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_SECRET)
    await assert_rejected(client, url + "/webhooks/stripe", body.replace(b"42", b"43"),
                          {"Stripe-Signature": header}, upstream, "signature_invalid")


@pytest.mark.parametrize("offset", [-301, 301])
async def test_stripe_stale_and_future_timestamps_are_rejected(hooks, client, upstream, offset):
    url, _ = hooks
    body = stripe_body()
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_SECRET,
                                                               timestamp=int(time.time()) + offset)
    await assert_rejected(client, url + "/webhooks/stripe", body, {"Stripe-Signature": header},
                          upstream, "timestamp_out_of_tolerance")


@pytest.mark.parametrize("header", [None, "", "garbage", "t=123", "v1=abcd"])
async def test_stripe_missing_or_malformed_header(hooks, client, upstream, header):
    url, _ = hooks
    headers = {} if header is None else {"Stripe-Signature": header}
    code = "signature_missing" if not header else "signature_invalid"
    await assert_rejected(client, url + "/webhooks/stripe", stripe_body(), headers, upstream, code)


async def test_github_published_test_vector(hooks, client, upstream):
    url, _ = hooks
    sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    st, _, _ = await post(client, url + "/webhooks/github", b"Hello, World!",
                          {"X-Hub-Signature-256": sig, "X-GitHub-Delivery": "d-1", "X-GitHub-Event": "ping"})
    assert st == 200
    assert upstream.seen[0].body == b"Hello, World!"
    await assert_rejected_after(client, url + "/webhooks/github", b"Hello, World?", {"X-Hub-Signature-256": sig},
                                upstream, "signature_invalid")
    await assert_rejected_after(client, url + "/webhooks/github", b"Hello, World!", {}, upstream,
                                "signature_missing")


async def assert_rejected_after(client, url, body, headers, upstream, code):
    before = len(upstream.seen)
    st, h, _ = await post(client, url, body, headers)
    assert st == 401 and h["X-Sidecar-Error"] == code
    assert len(upstream.seen) == before


async def test_slack_signed_by_slack_sdk(hooks, client, upstream):
    url, _ = hooks
    body = b'{"type":"event_callback","event_id":"Ev1","event":{"type":"app_mention"}}'
    ts = str(int(time.time()))
    sig = SignatureVerifier(SLACK_SECRET).generate_signature(timestamp=ts, body=body)
    st, _, _ = await post(client, url + "/webhooks/slack", body,
                          {"X-Slack-Signature": sig, "X-Slack-Request-Timestamp": ts})
    assert st == 200 and upstream.seen[0].body == body
    old = str(int(time.time()) - 400)
    sig_old = SignatureVerifier(SLACK_SECRET).generate_signature(timestamp=old, body=body)
    await assert_rejected_after(client, url + "/webhooks/slack", body,
                                {"X-Slack-Signature": sig_old, "X-Slack-Request-Timestamp": old},
                                upstream, "timestamp_out_of_tolerance")
    await assert_rejected_after(client, url + "/webhooks/slack", body, {"X-Slack-Signature": sig},
                                upstream, "signature_missing")
    sig_wrong = SignatureVerifier("another-secret").generate_signature(timestamp=ts, body=body)
    await assert_rejected_after(client, url + "/webhooks/slack", body,
                                {"X-Slack-Signature": sig_wrong, "X-Slack-Request-Timestamp": ts},
                                upstream, "signature_invalid")


@pytest.mark.parametrize("lib,path,prefix", [(StdWebhook, "/webhooks/std", "webhook-"),
                                             (SvixWebhook, "/webhooks/svix", "svix-"),
                                             (StdWebhook, "/webhooks/svix", "webhook-")])
async def test_standard_webhooks_and_svix_signed_by_their_libraries(hooks, client, upstream, lib, path, prefix):
    url, _ = hooks
    body = b'{"type":"invoice.paid","data":{}}'
    now = datetime.now(tz=timezone.utc)
    sig = lib(STD_SECRET).sign("msg_1", now, body.decode())
    headers = {prefix + "id": "msg_1", prefix + "timestamp": str(int(now.timestamp())), prefix + "signature": sig}
    st, _, _ = await post(client, url + path, body, headers)
    assert st == 200 and upstream.seen[0].body == body
    # Rotation as the sender does it: a space-separated list with an unknown key's signature first.
    other = "whsec_" + base64.b64encode(b"some-other-key-for-rotation-0000").decode()
    both = lib(other).sign("msg_2", now, body.decode()) + " " + lib(STD_SECRET).sign("msg_2", now, body.decode())
    st, _, _ = await post(client, url + path, body, {**headers, prefix + "id": "msg_2", prefix + "signature": both})
    assert st == 200
    stale = now - timedelta(minutes=6)
    old = lib(STD_SECRET).sign("msg_3", stale, body.decode())
    await assert_rejected_after(client, url + path, body,
                                {prefix + "id": "msg_3", prefix + "timestamp": str(int(stale.timestamp())),
                                 prefix + "signature": old}, upstream, "timestamp_out_of_tolerance")
    future = now + timedelta(minutes=6)
    fut = lib(STD_SECRET).sign("msg_4", future, body.decode())
    await assert_rejected_after(client, url + path, body,
                                {prefix + "id": "msg_4", prefix + "timestamp": str(int(future.timestamp())),
                                 prefix + "signature": fut}, upstream, "timestamp_out_of_tolerance")
    await assert_rejected_after(client, url + path, body, {**headers, prefix + "id": "msg_other"},
                                upstream, "signature_invalid")


async def test_shopify_base64_hmac(hooks, client, upstream):
    url, _ = hooks
    body = b'{"id":1}'
    sig = base64.b64encode(hmac.new(SHOPIFY_SECRET.encode(), body, hashlib.sha256).digest()).decode()
    st, _, _ = await post(client, url + "/webhooks/shopify", body,
                          {"X-Shopify-Hmac-Sha256": sig, "X-Shopify-Webhook-Id": "w1"})
    assert st == 200
    await assert_rejected_after(client, url + "/webhooks/shopify", body + b" ", {"X-Shopify-Hmac-Sha256": sig},
                                upstream, "signature_invalid")


async def test_twilio_form_and_json_signed_by_twilio_sdk(hooks, client, upstream):
    url, _ = hooks
    public = PUBLIC + "/webhooks/twilio"
    params = {"From": "+15550001", "Body": "hello there", "MessageSid": "SM1"}
    body = "&".join(f"{k}={v.replace(' ', '+').replace('+1', '%2B1')}" for k, v in params.items()).encode()
    sig = RequestValidator(TWILIO_TOKEN).compute_signature(public, params)
    st, _, raw = await post(client, url + "/webhooks/twilio", body,
                            {"X-Twilio-Signature": sig, "Content-Type": "application/x-www-form-urlencoded"})
    assert st == 200, raw
    # JSON bodies: the URL carries bodySHA256 and the signature covers the URL alone.
    jbody = b'{"event":"x"}'
    query = "bodySHA256=" + hashlib.sha256(jbody).hexdigest()
    jsig = RequestValidator(TWILIO_TOKEN).compute_signature(f"{public}?{query}", {})
    st, _, raw = await post(client, f"{url}/webhooks/twilio?{query}", jbody,
                            {"X-Twilio-Signature": jsig, "Content-Type": "application/json"})
    assert st == 200, raw
    assert upstream.seen[-1].path_qs == f"/webhooks/twilio?{query}"
    await assert_rejected_after(client, f"{url}/webhooks/twilio?{query}", b'{"event":"y"}',
                                {"X-Twilio-Signature": jsig}, upstream, "signature_invalid")
    wrong = RequestValidator("wrong-token-wrong-token-wrong-tok").compute_signature(public, params)
    await assert_rejected_after(client, url + "/webhooks/twilio", body,
                                {"X-Twilio-Signature": wrong, "Content-Type": "application/x-www-form-urlencoded"},
                                upstream, "signature_invalid")


async def test_square_signs_url_and_body(hooks, client, upstream):
    url, _ = hooks
    body = b'{"event_id":"sq-1","type":"payment.updated"}'
    sig = base64.b64encode(hmac.new(SQUARE_KEY.encode(), (PUBLIC + "/webhooks/square").encode() + body,
                                    hashlib.sha256).digest()).decode()
    st, _, _ = await post(client, url + "/webhooks/square", body, {"x-square-hmacsha256-signature": sig})
    assert st == 200
    await assert_rejected_after(client, url + "/webhooks/square", body, {}, upstream, "signature_missing")


async def test_generic_template_timestamp_and_id(hooks, client, upstream):
    url, _ = hooks
    body = b'{"hello":"world"}'
    ts = str(int(time.time()))
    mac = hmac.new(b"generic-key", f"{ts}:e-1:".encode() + body, hashlib.sha512).digest()
    headers = {"X-Signature": "sha512=" + base64.b64encode(mac).decode(), "X-Timestamp": ts, "X-Event-Id": "e-1"}
    st, _, _ = await post(client, url + "/webhooks/generic", body, headers)
    assert st == 200
    await assert_rejected_after(client, url + "/webhooks/generic", body, {**headers, "X-Event-Id": "e-2"},
                                upstream, "signature_invalid")
    await assert_rejected_after(client, url + "/webhooks/generic", body,
                                {k: v for k, v in headers.items() if k != "X-Timestamp"},
                                upstream, "signature_missing")


# ---- limits, duplicates, secrets, metrics ----------------------------------

async def test_body_over_max_body_is_413_and_not_forwarded(hooks, client, upstream):
    url, _ = hooks
    st, h, _ = await post(client, url + "/webhooks/small", b"x" * 65, {"X-Hub-Signature-256": "sha256=00"})
    assert st == 413 and h["X-Sidecar-Error"] == "request_body_too_large"

    async def chunks():
        for _ in range(10):
            yield b"y" * 10

    async with client.post(url + "/webhooks/small", data=chunks(), headers={"X-Hub-Signature-256": "sha256=00"}) as r:
        assert r.status == 413
    assert upstream.seen == []


async def test_duplicate_is_answered_200_and_not_forwarded_again(hooks, client, upstream):
    url, sc = hooks
    body = stripe_body("evt_dup")
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_SECRET)
    st, h, _ = await post(client, url + "/webhooks/stripe", body, {"Stripe-Signature": header})
    assert st == 200 and "X-Sidecar-Duplicate" not in h
    st, h, _ = await post(client, url + "/webhooks/stripe", body, {"Stripe-Signature": header})
    assert st == 200 and h["X-Sidecar-Duplicate"] == "1"
    assert len(upstream.seen) == 1
    async with client.get(sc.admin + "/metrics") as r:
        text = await r.text()
    assert 'sidecar_webhook_duplicates_total{source="stripe"} 1.0' in text
    assert 'sidecar_webhook_received_total{source="stripe"} 2.0' in text


async def test_rejections_are_counted_by_reason(hooks, client, upstream):
    url, sc = hooks
    await post(client, url + "/webhooks/github", b"x", {})
    await post(client, url + "/webhooks/github", b"x", {"X-Hub-Signature-256": "sha256=00"})
    async with client.get(sc.admin + "/metrics") as r:
        text = await r.text()
    assert 'sidecar_webhook_rejected_total{reason="signature_missing",source="github"} 1.0' in text
    assert 'sidecar_webhook_rejected_total{reason="signature_invalid",source="github"} 1.0' in text


async def test_passthrough_relays_service_failure_and_lets_the_provider_retry(hooks, client, upstream):
    from aiohttp import web

    url, _ = hooks
    statuses = [503, 200]

    async def flaky(request, seen):
        return web.Response(status=statuses.pop(0), text="svc")

    upstream.responder = flaky
    body = stripe_body("evt_retry")
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_SECRET)
    st, h, raw = await post(client, url + "/webhooks/stripe", body, {"Stripe-Signature": header})
    assert st == 503 and raw == b"svc"
    # The provider's retry is not a duplicate: the first try was not accepted.
    st, h, _ = await post(client, url + "/webhooks/stripe", body, {"Stripe-Signature": header})
    assert st == 200 and "X-Sidecar-Duplicate" not in h
    assert len(upstream.seen) == 2


async def test_unset_secret_is_503_and_get_is_405(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.delenv("WH_UNSET", raising=False)
    sc = await sidecar_factory({"gh": webhook_policy("/gh", "github", ["env:WH_UNSET"])},
                               inbound_config(upstream.url))
    url = inbound_url(sc)
    st, h, raw = await post(client, url + "/gh", b"x", {"X-Hub-Signature-256": "sha256=00"})
    assert st == 503 and h["X-Sidecar-Error"] == "secret_unavailable"
    async with client.get(url + "/gh") as r:
        assert r.status == 405
    assert upstream.seen == []


# ---- configuration ----------------------------------------------------------

@pytest.mark.parametrize("table,fragment", [
    ({"path": "/x", "scheme": "nope", "secrets": ["a"]}, "scheme"),
    ({"path": "x", "scheme": "github", "secrets": ["a"]}, "path"),
    ({"path": "/x", "scheme": "github", "secrets": []}, "secrets"),
    ({"path": "/x", "scheme": "twilio", "secrets": ["a"]}, "public_url"),
    ({"path": "/x", "scheme": "generic", "secrets": ["a"]}, "header"),
    ({"path": "/x", "scheme": "generic", "secrets": ["a"], "header": "X-S", "signed": "{timestamp}.{body}"},
     "timestamp_header"),
    ({"path": "/x", "scheme": "generic", "secrets": ["a"], "header": "X-S", "signed": "{nonce}{body}"}, "signed"),
    ({"path": "/x", "scheme": "github", "secrets": ["a"], "retry": {"attempts": 0}}, "attempts"),
    ({"path": "/x", "scheme": "github", "secrets": ["a"], "header": "X-S"}, "generic"),
])
def test_config_errors(table, fragment):
    with pytest.raises(ValueError) as e:
        Config(**table)
    assert fragment in str(e.value)


def test_template_compiles_once_into_parts():
    assert compile_template("{timestamp}.{body}") == ["timestamp", b".", "body"]


async def test_policy_with_only_webhook_and_unset_env_validates(tmp_path, monkeypatch):
    from proxy.cli import check
    from tests.support.sidecar import write_config

    monkeypatch.delenv("NEVER_SET_SECRET", raising=False)
    path = write_config(tmp_path, {"stripe": webhook_policy("/webhooks/stripe", "stripe", ["env:NEVER_SET_SECRET"])},
                        inbound_config("http://127.0.0.1:1"))
    import asyncio

    assert await asyncio.to_thread(check, str(path)) == []


async def test_repository_config_and_example_policies_validate_without_secrets(monkeypatch):
    import asyncio
    from pathlib import Path

    from proxy.cli import check

    monkeypatch.delenv("GITHUB_WEBHOOK_SECRET", raising=False)
    repo = Path(__file__).resolve().parents[2]
    assert await asyncio.to_thread(check, str(repo / "config.toml")) == []


async def test_duplicate_while_the_original_is_in_flight_is_409_not_200(hooks, client, upstream):
    """A provider retry that arrives while the first delivery is still running
    must not be acknowledged: if the first then fails, a 200 to the retry would
    tell the provider the event was delivered and it would never send it again
    (draft-ietf-httpapi-idempotency-key-header: 409 while in progress)."""
    import asyncio

    from aiohttp import web

    url, _ = hooks
    release = asyncio.Event()
    statuses = [503, 200]

    async def slow_then_failing(request, seen):
        await release.wait()
        return web.Response(status=statuses.pop(0), text="svc")

    upstream.responder = slow_then_failing
    body = stripe_body("evt_inflight")
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_SECRET)
    first = asyncio.ensure_future(post(client, url + "/webhooks/stripe", body, {"Stripe-Signature": header}))
    from tests.support.upstream import wait_for
    await wait_for(lambda: len(upstream.seen) == 1)
    st, h, raw = await post(client, url + "/webhooks/stripe", body, {"Stripe-Signature": header})
    assert st == 409, raw
    assert h["X-Sidecar-Error"] == "webhook_in_progress"
    assert "Retry-After" in h
    release.set()
    st, _, _ = await first
    assert st == 503
    # The provider's next retry is delivered, not taken for a duplicate.
    st, h, _ = await post(client, url + "/webhooks/stripe", body, {"Stripe-Signature": header})
    assert st == 200 and "X-Sidecar-Duplicate" not in h
    assert len(upstream.seen) == 2


async def test_passthrough_relays_a_chunked_service_answer_whole(hooks, client, upstream):
    """Slack and others read the answer's body (a message): all of it comes back,
    not only the chunks that had arrived at the first read."""
    from tests.support.upstream import dribble

    url, _ = hooks
    answer = b'{"text": "' + b"t" * 3000 + b'"}'
    upstream.responder = dribble(answer)
    body = stripe_body("evt_chunked_answer")
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_SECRET)
    st, h, raw = await post(client, url + "/webhooks/stripe", body, {"Stripe-Signature": header})
    assert st == 200
    assert raw == answer


@pytest.mark.parametrize("path,headers", [
    ("/webhooks/stripe", b"Stripe-Signature: t=\xe9,v1=00\r\n"),
    ("/webhooks/slack", b"X-Slack-Signature: v0=00\r\nX-Slack-Request-Timestamp: \xe9\r\n"),
    ("/webhooks/std", b"webhook-id: \xe9\r\nwebhook-timestamp: 1\r\nwebhook-signature: v1,AA==\r\n"),
], ids=["stripe", "slack", "standard-webhooks"])
async def test_non_utf8_signature_header_is_401_not_500(hooks, upstream, path, headers):
    """Header bytes that are not UTF-8 (decoded with surrogateescape) cannot
    carry a valid signature: a 401 like any bad one, never a 500 and a traceback."""
    import asyncio

    url, _ = hooks
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n".encode() + headers + b"\r\n{}")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b"X-Sidecar-Error: signature_invalid" in head
    assert upstream.seen == []


# ---- a webhook endpoint is a route: plugins wrap it, reloads keep their state ----

def _github_signed(body: bytes) -> dict[str, str]:
    mac = hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={mac}", "X-GitHub-Event": "push"}


GH_WITH_PLUGINS = webhook_policy("/webhooks/gh", "github", ["env:WH_GITHUB"], delivery="passthrough") + """
[headers]
response = { set = { "X-Served-By" = "sidecar" } }

[rate_limit]
key = "const"
limits = [{ requests = 2, per = "1h" }]
"""


async def test_plugins_of_a_webhook_policy_wrap_its_endpoint_and_keep_state_across_reloads(
        sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("WH_GITHUB", GITHUB_SECRET)
    sc = await sidecar_factory({"gh": GH_WITH_PLUGINS}, inbound_config(upstream.url))
    url = inbound_url(sc) + "/webhooks/gh"
    st, h, _ = await post(client, url, b'{"n":1}', _github_signed(b'{"n":1}'))
    assert st == 200 and h["X-Served-By"] == "sidecar" and "RateLimit" in h
    route = sc.runtime.tables["inbound"].match("/webhooks/gh")[0]
    assert route.exact and [f.name for f in route.filters] == ["headers", "rate_limit"]
    # A reload that leaves [webhook] and [rate_limit] alone keeps the same
    # filter (its bucket: one request left) and the same endpoint.
    sc.write_policy("other", f'route = "/o"\nupstream = "{upstream.url}"\n')
    assert await sc.runtime.reload() == []
    again = sc.runtime.tables["inbound"].match("/webhooks/gh")[0]
    assert again is not route and again.filters[1] is route.filters[1]
    st, _, _ = await post(client, url, b'{"n":2}', _github_signed(b'{"n":2}'))
    assert st == 200
    st, h, raw = await post(client, url, b'{"n":3}', _github_signed(b'{"n":3}'))
    assert st == 429 and h["X-Sidecar-Error"] == "rate_limited"
    assert len(upstream.seen) == 2
    lines = await sc.wait_access_lines(3)
    assert [ln["route"] for ln in lines[-3:]] == ["webhook:gh"] * 3
    assert lines[-1]["status"] == 429 and lines[-1]["error"] == "rate_limited"


async def test_a_mixed_policy_keeps_both_way_plugins_on_its_outbound_route(sidecar_factory, upstream, client,
                                                                         monkeypatch):
    monkeypatch.setenv("WH_GITHUB", GITHUB_SECRET)
    policy = f'route = "/gh"\nupstream = "{upstream.url}"\n' + GH_WITH_PLUGINS
    sc = await sidecar_factory({"gh": policy}, inbound_config(upstream.url))
    assert [f.name for f in sc.runtime.table.match("/gh")[0].filters] == ["headers", "rate_limit"]
    assert sc.runtime.tables["inbound"].match("/webhooks/gh")[0].filters == []


async def test_two_policies_claiming_one_webhook_path_are_refused(sidecar_factory, upstream, monkeypatch):
    sc = await sidecar_factory({"a": webhook_policy("/wh", "github", ["x"])}, inbound_config(upstream.url))
    sc.write_policy("b", webhook_policy("/wh", "github", ["y"]))
    problems = await sc.runtime.reload()
    pol = sc.dir / "policies"
    assert problems == [f"{pol / 'b.toml'}: webhook.path: '/wh' is already the webhook path of {pol / 'a.toml'}"]


async def test_exact_webhook_path_wins_over_an_inbound_route_prefix(sidecar_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("WH_GITHUB", GITHUB_SECRET)
    sc = await sidecar_factory({"gh": webhook_policy("/hooks/gh", "github", ["env:WH_GITHUB"])},
                               inbound_config(upstream.url, extra='[inbound.routes."/hooks"]\n'))
    url = inbound_url(sc)
    st, h, _ = await post(client, url + "/hooks/gh", b"{}", {})
    assert st == 401 and h["X-Sidecar-Error"] == "signature_missing"
    async with client.post(url + "/hooks/gh/x", data=b"{}") as r:   # not the exact path: the service
        assert r.status == 200
    assert [s.path_qs for s in upstream.seen] == ["/hooks/gh/x"]


async def test_webhook_data_dir_in_its_own_table_and_in_inbound(sidecar_factory, upstream, tmp_path):
    own = await sidecar_factory({"gh": webhook_policy("/gh", "github", ["x"])},
                                inbound_config(upstream.url) + '\n[webhook]\ndata_dir = "q1"\nretention = "1d"\n')
    svc = own.runtime.services["webhook"]
    assert svc.data_dir == (own.dir / "q1").resolve() and svc.retention == 86400.0
    assert (own.dir / "q1" / "webhooks.sqlite3").exists()
    legacy = await sidecar_factory({"gh": webhook_policy("/gh", "github", ["x"])},
                                   inbound_config(upstream.url, data_dir="q2") + 'retention = "2h"\n')
    svc = legacy.runtime.services["webhook"]
    assert svc.data_dir == (legacy.dir / "q2").resolve() and svc.retention == 7200.0


async def test_jwt_on_a_webhook_path_refuses_before_the_signature_is_checked(sidecar_factory, upstream, client,
                                                                          monkeypatch):
    import jwt as pyjwt

    monkeypatch.setenv("WH_GITHUB", GITHUB_SECRET)
    key = "relay-signing-key-0123456789abcdef"
    policy = webhook_policy("/webhooks/gh", "github", ["env:WH_GITHUB"], delivery="passthrough") + f"""
[jwt]
secret = "{key}"
"""
    sc = await sidecar_factory({"gh": policy}, inbound_config(upstream.url))
    url = inbound_url(sc) + "/webhooks/gh"
    st, h, _ = await post(client, url, b"{}", _github_signed(b"{}"))
    assert st == 401 and h["X-Sidecar-Error"] == "token_invalid"
    good = pyjwt.encode({"sub": "relay", "exp": int(time.time()) + 60}, key, algorithm="HS256")
    st, h, _ = await post(client, url, b"{}", {**_github_signed(b"{}"), "Authorization": f"Bearer {good}"})
    assert st == 200 and len(upstream.seen) == 1
    st, h, _ = await post(client, url, b"{}", {"Authorization": f"Bearer {good}"})
    assert st == 401 and h["X-Sidecar-Error"] == "signature_missing"


async def test_a_disabled_policy_turns_its_webhook_off_too(monkeypatch, sidecar_factory, upstream, client):
    """enabled = false turns the whole policy off, as removing its file would:
    its webhook endpoint answers 503 route_disabled (the provider retries
    later) and nothing reaches the service; enabled again by a reload."""
    monkeypatch.setenv("WH_STRIPE", STRIPE_SECRET)
    hook = webhook_policy("/webhooks/stripe", "stripe", ["env:WH_STRIPE"], delivery="passthrough")
    both = f'route = "/stripe"\nupstream = "{upstream.url}"\n' + hook
    sc = await sidecar_factory({"stripe": "enabled = false\n" + both}, inbound_config(upstream.url))
    body = orjson.dumps({"id": "evt_off", "type": "charge.succeeded", "data": {}})
    headers = {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body.decode(), STRIPE_SECRET),
               "Content-Type": "application/json"}
    async with client.post(inbound_url(sc) + "/webhooks/stripe", data=body, headers=headers) as r:
        assert r.status == 503 and r.headers["X-Sidecar-Error"] == "route_disabled"
    assert upstream.seen == []
    sc.write_policy("stripe", both)
    assert await sc.runtime.reload() == []
    async with client.post(inbound_url(sc) + "/webhooks/stripe", data=body, headers=headers) as r:
        assert r.status == 200
    assert [s.path_qs for s in upstream.seen] == ["/webhooks/stripe"]
