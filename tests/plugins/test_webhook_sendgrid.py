"""webhook scheme "sendgrid": SendGrid's signed Event Webhook (ECDSA P-256 over
timestamp + body), checked against SendGrid's own published verifier, the
``sendgrid`` package's ``EventWebhook.verify_signature``."""

from __future__ import annotations

import base64
import time

import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sendgrid.helpers.eventwebhook import EventWebhook
from sendgrid.helpers.eventwebhook.eventwebhook_header import EventWebhookHeader

from tests.support.inbound import inbound_config, inbound_url, webhook_policy

SIG = EventWebhookHeader.SIGNATURE
TS = EventWebhookHeader.TIMESTAMP


def keypair(curve: ec.EllipticCurve | None = None) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A private key and its public key as SendGrid's settings page shows it
    (base64 of the DER SubjectPublicKeyInfo, the PEM body on one line)."""
    private = ec.generate_private_key(curve or ec.SECP256R1())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(der).decode()


def sign(private: ec.EllipticCurvePrivateKey, body: bytes, ts: str) -> str:
    return base64.b64encode(private.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()


KEY, PUBLIC = keypair()
OLD_KEY, OLD_PUBLIC = keypair()

EVENTS = orjson.dumps([
    {"email": "a@example.com", "timestamp": 1700000000, "event": "delivered", "sg_event_id": "sg_1",
     "sg_message_id": "m1"},
    {"email": "b@example.com", "timestamp": 1700000001, "event": "open", "sg_event_id": "sg_2"},
])


@pytest.fixture
async def hook(monkeypatch, sidecar_factory, upstream):
    monkeypatch.setenv("SG_KEY", PUBLIC)
    monkeypatch.setenv("SG_KEY_OLD", OLD_PUBLIC)
    pem = KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    monkeypatch.setenv("SG_PEM", pem)
    policies = {
        "sendgrid": webhook_policy("/webhooks/sendgrid", "sendgrid", ["env:SG_KEY", "env:SG_KEY_OLD"],
                                   delivery="passthrough"),
        "pem": webhook_policy("/webhooks/pem", "sendgrid", ["env:SG_PEM"], delivery="passthrough"),
        "broken": webhook_policy("/webhooks/broken", "sendgrid", ["not-a-key"], delivery="passthrough"),
    }
    sc = await sidecar_factory(policies, inbound_config(upstream.url))
    return inbound_url(sc)


async def post(client, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    async with client.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as r:
        return r.status, dict(r.headers), await r.read()


def sendgrid_says(body: bytes, sig: str, ts: str, public: str = PUBLIC) -> bool:
    return EventWebhook(public).verify_signature(body.decode(), sig, ts)


async def test_signed_batch_accepted_as_sendgrid_verifies_it(hook, client, upstream):
    ts = str(int(time.time()))
    sig = sign(KEY, EVENTS, ts)
    assert sendgrid_says(EVENTS, sig, ts)
    status, headers, _ = await post(client, hook + "/webhooks/sendgrid", EVENTS, {SIG: sig, TS: ts})
    assert status == 200
    (seen,) = upstream.seen
    assert seen.body == EVENTS and seen.headers[SIG] == sig


async def test_key_rotation_and_pem_keys(hook, client, upstream):
    ts = str(int(time.time()))
    sig = sign(OLD_KEY, EVENTS, ts)
    assert sendgrid_says(EVENTS, sig, ts, OLD_PUBLIC)
    assert (await post(client, hook + "/webhooks/sendgrid", EVENTS, {SIG: sig, TS: ts}))[0] == 200
    sig = sign(KEY, EVENTS, ts)
    assert (await post(client, hook + "/webhooks/pem", EVENTS, {SIG: sig, TS: ts}))[0] == 200
    assert len(upstream.seen) == 2


@pytest.mark.parametrize("change", ["body", "timestamp", "key", "signature"])
async def test_what_sendgrid_refuses_the_sidecar_refuses(hook, client, upstream, change):
    ts = str(int(time.time()))
    body, sig, sent_ts = EVENTS, sign(KEY, EVENTS, ts), ts
    if change == "body":
        body = EVENTS.replace(b"delivered", b"bounce")
    elif change == "timestamp":
        sent_ts = str(int(ts) - 1)
    elif change == "key":
        sig = sign(keypair()[0], EVENTS, ts)
    else:
        sig = base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode()
    assert not sendgrid_says(body, sig, sent_ts)
    status, headers, raw = await post(client, hook + "/webhooks/sendgrid", body, {SIG: sig, TS: sent_ts})
    assert status == 401 and headers["X-Sidecar-Error"] == "signature_invalid"
    assert PUBLIC.encode() not in raw
    assert upstream.seen == []


async def test_stale_timestamp_and_missing_headers(hook, client, upstream):
    old = str(int(time.time()) - 600)
    sig = sign(KEY, EVENTS, old)
    assert sendgrid_says(EVENTS, sig, old)     # SendGrid's helper checks no age; the sidecar does
    status, headers, _ = await post(client, hook + "/webhooks/sendgrid", EVENTS, {SIG: sig, TS: old})
    assert status == 401 and headers["X-Sidecar-Error"] == "timestamp_out_of_tolerance"
    status, headers, _ = await post(client, hook + "/webhooks/sendgrid", EVENTS, {TS: old})
    assert status == 401 and headers["X-Sidecar-Error"] == "signature_missing"
    status, headers, _ = await post(client, hook + "/webhooks/sendgrid", EVENTS, {SIG: "%%%", TS: old})
    assert status == 401 and headers["X-Sidecar-Error"] == "signature_invalid"
    assert upstream.seen == []


async def test_an_unusable_configured_key_refuses_without_a_crash(hook, client, upstream):
    ts = str(int(time.time()))
    status, headers, raw = await post(client, hook + "/webhooks/broken", EVENTS, {SIG: sign(KEY, EVENTS, ts), TS: ts})
    assert status == 401 and headers["X-Sidecar-Error"] == "signature_invalid"
    assert b"not-a-key" not in raw
    assert upstream.seen == []


def test_p384_keys_are_not_p256():
    from plugins.webhook.schemes import SendGrid

    _, p384 = keypair(ec.SECP384R1())
    assert SendGrid(300).public_keys([p384]) == []
    assert len(SendGrid(300).public_keys([PUBLIC, OLD_PUBLIC])) == 2


def test_an_unusable_key_is_logged_once_without_its_value(caplog):
    from plugins.webhook.schemes import SendGrid

    scheme = SendGrid(300)
    with caplog.at_level("WARNING", logger="sidecar.webhook"):
        assert scheme.public_keys(["bm90LWEta2V5"]) == []
        assert scheme.public_keys(["bm90LWEta2V5"]) == []
    (record,) = caplog.records
    assert "not an ECDSA P-256 public key" in record.getMessage()
    assert "bm90LWEta2V5" not in record.getMessage()
