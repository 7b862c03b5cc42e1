"""The official stripe SDK through the sidecar: only the API base changed, a dummy key."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl

import pytest
import stripe
from aiohttp import web

REAL_KEY = "sk_test_real_0123456789"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("STRIPE_API_KEY", REAL_KEY)


def client(sc) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_dummy", base_addresses={"api": f"{sc.url}/stripe"}, max_network_retries=0)


async def test_create_customer(env, provider, behind_sidecar):
    @provider.route("POST", "/v1/customers")
    async def customers(request, seen):
        form = dict(parse_qsl(seen.body.decode()))
        return web.json_response({"id": "cus_1", "object": "customer", "email": form["email"], "livemode": False},
                                 headers={"Request-Id": "req_stripe_1"})

    sc = await behind_sidecar("stripe")
    cus = await asyncio.to_thread(lambda: client(sc).v1.customers.create(params={"email": "a@example.com"}))
    assert cus.id == "cus_1" and cus.email == "a@example.com"
    assert cus.last_response.request_id == "req_stripe_1"
    (seen,) = provider.seen
    assert seen.headers["Authorization"] == f"Bearer {REAL_KEY}"
    assert seen.headers["Idempotency-Key"]          # added by the sidecar (or the SDK) for safe retries


async def test_rate_limit_error_as_the_sdk_shows_it(env, provider, behind_sidecar):
    @provider.route("POST", "/v1/customers")
    async def customers(request, seen):
        return web.json_response({"error": {"type": "invalid_request_error", "code": "rate_limit",
                                            "message": "Too many requests hit the API too quickly."}},
                                 status=429, headers={"Retry-After": "1"})

    sc = await behind_sidecar("stripe")
    with pytest.raises(stripe.RateLimitError) as e:
        await asyncio.to_thread(lambda: client(sc).v1.customers.create(params={"email": "a@example.com"}))
    assert e.value.http_status == 429 and e.value.json_body["error"]["code"] == "rate_limit"
    assert e.value.user_message == "Too many requests hit the API too quickly."
    assert e.value.headers["Retry-After"] == "1"
    # policies/stripe.toml retries 429s (3 attempts) under one Idempotency-Key.
    assert len(provider.seen) == 3
    assert len({s.headers["Idempotency-Key"] for s in provider.seen}) == 1
