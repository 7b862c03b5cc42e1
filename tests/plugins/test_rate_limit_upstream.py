"""rate_limit [rate_limit.upstream]: pacing to the quota the provider announces (issue 13)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from email.utils import format_datetime

import pytest
from aiohttp import web
from multidict import CIMultiDict

from plugins.rate_limit.config import Config
from plugins.rate_limit.quota_headers import Signals, parse_duration, parse_ratelimit_field
from plugins.rate_limit.upstream import UpstreamQuota
from tests.support.upstream import FakeUpstream, wait_for

# ---- config -------------------------------------------------------------------


def test_upstream_alone_is_a_valid_rate_limit():
    c = Config.model_validate({"upstream": {"preset": "openai"}})
    assert c.limits == [] and c.upstream is not None and c.upstream.reserve == 0


def test_nothing_at_all_is_still_refused():
    with pytest.raises(ValueError, match=r"\[rate_limit.upstream\]"):
        Config.model_validate({})


@pytest.mark.parametrize("table, message", [
    ({"preset": "custom", "remaining": "x-left"}, "needs reset, reset_format"),
    ({"preset": "openai", "remaining": "x-left"}, "only for preset = \"custom\""),
    ({"preset": "azure"}, "Input should be"),
    ({"preset": "github", "reserve": -1}, "greater than or equal to 0"),
    ({"preset": "custom", "remaining": "a", "reset": "b", "reset_format": "julian"}, "Input should be"),
])
def test_bad_upstream_tables(table, message):
    with pytest.raises(ValueError, match=message):
        Config.model_validate({"upstream": table})


# ---- reading the provider's headers -------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("6m0s", 360.0), ("1s", 1.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5s", 0.5), ("17", 17.0),
    ("", None), ("soon", None), ("5x", None), ("1s junk", None),
])
def test_go_durations_as_openai_sends_them(text, seconds):
    got = parse_duration(text)
    assert got == (pytest.approx(seconds) if seconds is not None else None)


def signals(**table) -> Signals:
    return Signals(UpstreamQuota.model_validate(table))


def h(**kw: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in kw.items()})


NOW = 1_800_000_000.0


def test_openai_preset_takes_the_longest_exhausted_quota():
    s = signals(preset="openai")
    # Tokens exhausted for 6 minutes, requests still left: the tokens decide.
    got = s.block(200, h(x_ratelimit_remaining_requests="59", x_ratelimit_reset_requests="1s",
                        x_ratelimit_remaining_tokens="0", x_ratelimit_reset_tokens="6m0s"), NOW)
    assert got[0] == 360.0 and "tokens" in got[1]
    assert s.block(200, h(x_ratelimit_remaining_requests="3", x_ratelimit_reset_requests="20ms"), NOW)[0] == 0


def test_reserve_holds_back_before_zero():
    s = signals(preset="openai", reserve=5)
    assert s.block(200, h(x_ratelimit_remaining_requests="5", x_ratelimit_reset_requests="2s"), NOW)[0] == 2.0
    assert s.block(200, h(x_ratelimit_remaining_requests="6", x_ratelimit_reset_requests="2s"), NOW)[0] == 0


def test_anthropic_preset_reads_rfc3339():
    reset = datetime.fromtimestamp(NOW + 30, timezone.utc).isoformat().replace("+00:00", "Z")
    s = signals(preset="anthropic")
    got = s.block(200, CIMultiDict({"anthropic-ratelimit-input-tokens-remaining": "0",
                                    "anthropic-ratelimit-input-tokens-reset": reset}), NOW)
    assert got[0] == pytest.approx(30.0)


def test_github_preset_reads_epoch_and_secondary_403():
    s = signals(preset="github")
    assert s.block(403, h(x_ratelimit_remaining="0", x_ratelimit_reset=str(int(NOW) + 120)), NOW)[0] == 120.0
    # Secondary limit: 403 with Retry-After.
    assert s.block(403, h(retry_after="60"), NOW)[0] == 60.0
    # Elsewhere a 403 with Retry-After is not a quota signal.
    assert signals(preset="openai").block(403, h(retry_after="60"), NOW)[0] == 0


def test_ietf_preset_reads_the_field_the_sidecar_sends():
    assert parse_ratelimit_field('"default";r=0;t=10, "day, ok";r=50;t=3600') == [(0.0, 10.0), (50.0, 3600.0)]
    assert parse_ratelimit_field("limit=10, remaining=0, reset=7") == [(0.0, 7.0)]
    s = signals(preset="ietf")
    assert s.block(200, CIMultiDict({"RateLimit": '"a";r=0;t=4, "b";r=0;t=9'}), NOW)[0] == 9.0
    assert s.block(200, CIMultiDict({"RateLimit": '"a";r=3;t=4'}), NOW)[0] == 0


def test_custom_preset_and_max_block():
    s = signals(preset="custom", remaining="X-Left", reset="X-Reset-At", reset_format="epoch", max_block="1m")
    # A reset read as a year away is capped.
    assert s.block(200, CIMultiDict({"X-Left": "0", "X-Reset-At": str(NOW + 3e7)}), NOW)[0] == 60.0
    assert s.block(200, CIMultiDict({"X-Left": "zero", "X-Reset-At": "1"}), NOW)[0] == 0


def test_retry_after_http_date_and_garbage():
    s = signals(preset="openai")
    date = format_datetime(datetime.fromtimestamp(NOW + 42, timezone.utc), usegmt=True)
    assert s.block(429, h(retry_after=date), NOW)[0] == pytest.approx(42.0)
    assert s.block(429, h(retry_after="whenever"), NOW)[0] == 0
    assert s.block(429, h(retry_after="-5"), NOW)[0] == 0


# ---- end to end ---------------------------------------------------------------


class Provider:
    """A fake provider that announces its quota; ``arrivals`` are monotonic times."""

    def __init__(self, left: int = 0, reset: float = 2.0) -> None:
        self.left = left
        self.reset_at = 0.0
        self.reset = reset
        self.arrivals: list[float] = []
        self.status = 200
        self.up = FakeUpstream(self.respond)

    async def respond(self, request: web.Request, seen) -> web.Response:
        now = time.monotonic()
        self.arrivals.append(now)
        if now >= self.reset_at:
            self.reset_at = now + self.reset
        headers = {"x-ratelimit-remaining-requests": str(self.left),
                   "x-ratelimit-reset-requests": f"{int((self.reset_at - now) * 1000)}ms"}
        if self.status == 429:
            headers = {"Retry-After": str(int(self.reset))}
        return web.json_response({"n": len(self.arrivals)}, status=self.status, headers=headers)


@pytest.fixture
async def provider():
    p = Provider()
    await p.up.start()
    yield p
    await p.up.stop()


def policy(url: str, table: str = "") -> str:
    return f'route = "/ai"\nupstream = "{url}"\n\n[rate_limit]\n{table}\n[rate_limit.upstream]\npreset = "openai"\n'


async def test_remaining_zero_blocks_until_the_reset(sidecar_factory, client, provider):
    sc = await sidecar_factory({"ai": policy(provider.up.url)})
    async with client.post(f"{sc.url}/ai/v1/chat") as r:
        assert r.status == 200            # the response that announced remaining = 0
    first = provider.arrivals[0]
    refused = 0
    while time.monotonic() < first + 1.5:
        async with client.post(f"{sc.url}/ai/v1/chat") as r:
            if len(provider.arrivals) > 1:
                break
            assert r.status == 429 and r.headers["X-Sidecar-Error"] == "upstream_quota_exhausted"
            assert 1 <= int(r.headers["Retry-After"]) <= 2
            body = await r.json()
            assert body["error"]["type"] == "upstream_quota_exhausted"
            refused += 1
    assert refused >= 1 and len(provider.arrivals) == 1
    # After the reset the provider is asked again.
    provider.left = 10
    await wait_for(lambda: time.monotonic() >= first + 2.05, timeout=5)
    async with client.post(f"{sc.url}/ai/v1/chat") as r:
        assert r.status == 200
    assert len(provider.arrivals) == 2 and provider.arrivals[1] >= first + 1.9
    lines = await sc.wait_access_lines(refused + 2)
    assert any(line.get("decisions", {}).get("upstream_quota", {}).get("result") == "rejected" for line in lines)


async def test_queue_mode_waits_for_the_reset(sidecar_factory, client, provider):
    sc = await sidecar_factory({"ai": policy(provider.up.url, 'on_limit = "queue"\nmax_wait = "5s"')})
    async with client.get(f"{sc.url}/ai/v1/models") as r:
        assert r.status == 200
    provider.left = 10
    t0 = time.monotonic()
    async with client.get(f"{sc.url}/ai/v1/models") as r:
        assert r.status == 200
    assert len(provider.arrivals) == 2
    assert provider.arrivals[1] >= provider.arrivals[0] + 1.9
    assert time.monotonic() - t0 >= 1.5


async def test_queue_mode_refuses_past_max_wait(sidecar_factory, client, provider):
    provider.reset = 30.0
    sc = await sidecar_factory({"ai": policy(provider.up.url, 'on_limit = "queue"\nmax_wait = "1s"')})
    async with client.get(f"{sc.url}/ai/x") as r:
        assert r.status == 200
    t0 = time.monotonic()
    async with client.get(f"{sc.url}/ai/x") as r:
        assert r.status == 429 and r.headers["X-Sidecar-Error"] == "upstream_quota_exhausted"
        assert 28 <= int(r.headers["Retry-After"]) <= 30
    assert time.monotonic() - t0 < 1.0      # no point waiting: the reset is past max_wait
    assert len(provider.arrivals) == 1


async def test_providers_own_429_passes_then_the_sidecar_answers(sidecar_factory, client, provider):
    provider.status = 429
    sc = await sidecar_factory({"ai": policy(provider.up.url)})
    async with client.post(f"{sc.url}/ai/v1/chat") as r:
        assert r.status == 429 and "X-Sidecar-Error" not in r.headers
        assert r.headers["Retry-After"] == "2" and (await r.json()) == {"n": 1}
    async with client.post(f"{sc.url}/ai/v1/chat") as r:
        assert r.status == 429 and r.headers["X-Sidecar-Error"] == "upstream_quota_exhausted"
    assert len(provider.arrivals) == 1


async def test_blocks_are_per_key_when_key_is_set(sidecar_factory, client, provider):
    sc = await sidecar_factory({"ai": policy(provider.up.url, 'key = "header:X-Org"')})
    async with client.get(f"{sc.url}/ai/x", headers={"X-Org": "a"}) as r:
        assert r.status == 200
    async with client.get(f"{sc.url}/ai/x", headers={"X-Org": "a"}) as r:
        assert r.status == 429
    async with client.get(f"{sc.url}/ai/x", headers={"X-Org": "b"}) as r:
        assert r.status == 200           # b's own quota (as far as we know) is not exhausted
    assert len(provider.arrivals) == 2
    async with client.get(f"{sc.admin}/admin/rate_limits?route=ai") as r:
        view = await r.json()
    learned = {b["key"]: b for b in view["upstream"]["learned"]}
    assert set(learned) == {"a", "b"}
    assert 0 < learned["a"]["blocked_for_seconds"] <= 2
    assert learned["a"]["reason"].startswith("x-ratelimit-remaining-requests")


async def test_admin_shows_the_learned_state(sidecar_factory, client, provider):
    sc = await sidecar_factory({"ai": policy(provider.up.url)})
    async with client.get(f"{sc.admin}/admin/rate_limits") as r:
        (route,) = (await r.json())["routes"]
    assert route["upstream"]["preset"] == "openai" and route["upstream"]["learned"] == []
    async with client.get(f"{sc.url}/ai/x") as r:
        assert r.status == 200
    async with client.get(f"{sc.admin}/admin/rate_limits") as r:
        (route,) = (await r.json())["routes"]
    (block,) = route["upstream"]["learned"]
    assert block["key"] == "-" and 0 < block["blocked_for_seconds"] <= 2
    assert block["until"] == pytest.approx(time.time() + block["blocked_for_seconds"], abs=1)
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    assert 'sidecar_rate_limit_upstream_decisions_total{result="learned",route="ai"}' in text


async def test_two_sidecars_sharing_redis_learn_at_once(sidecar_factory, client, provider, redis_url):
    state = f'[state]\nbackend = "redis"\nurl = "{redis_url}"\n'
    a = await sidecar_factory({"ai": policy(provider.up.url)}, state)
    b = await sidecar_factory({"ai": policy(provider.up.url)}, state)
    async with client.post(f"{a.url}/ai/v1/chat") as r:
        assert r.status == 200
    first = provider.arrivals[0]
    # b never saw the provider's answer; it learns from Redis.
    async with client.post(f"{b.url}/ai/v1/chat") as r:
        assert r.status == 429 and r.headers["X-Sidecar-Error"] == "upstream_quota_exhausted"
    assert len(provider.arrivals) == 1
    async with client.get(f"{b.admin}/admin/rate_limits?route=ai") as r:
        view = await r.json()
    assert view["upstream"]["shared"] is True
    (block,) = view["upstream"]["learned"]
    assert block["key"] == "-" and 0 < block["blocked_for_seconds"] <= 2
    provider.left = 10
    await wait_for(lambda: time.monotonic() >= first + 2.05, timeout=5)
    async with client.post(f"{b.url}/ai/v1/chat") as r:
        assert r.status == 200
    assert len(provider.arrivals) == 2 and provider.arrivals[1] >= first + 1.9


async def test_queue_mode_across_two_sidecars(sidecar_factory, client, provider, redis_url):
    state = f'[state]\nbackend = "redis"\nurl = "{redis_url}"\n'
    table = 'on_limit = "queue"\nmax_wait = "5s"'
    a = await sidecar_factory({"ai": policy(provider.up.url, table)}, state)
    b = await sidecar_factory({"ai": policy(provider.up.url, table)}, state)
    async with client.get(f"{a.url}/ai/x") as r:
        assert r.status == 200
    provider.left = 10
    async with client.get(f"{b.url}/ai/x") as r:
        assert r.status == 200
    assert len(provider.arrivals) == 2 and provider.arrivals[1] >= provider.arrivals[0] + 1.9


async def test_shadow_mode_counts_but_lets_through(sidecar_factory, client, provider):
    sc = await sidecar_factory({"ai": policy(provider.up.url, "enforce = false")})
    for _ in range(3):
        async with client.get(f"{sc.url}/ai/x") as r:
            assert r.status == 200
    assert len(provider.arrivals) == 3
    lines = await sc.wait_access_lines(3)
    assert lines[-1]["decisions"]["upstream_quota"]["result"] == "shadow_rejected"


async def test_pacing_beside_local_limits(sidecar_factory, client, provider):
    table = 'limits = [{ requests = 100, per = "1m" }]'
    sc = await sidecar_factory({"ai": policy(provider.up.url, table)})
    async with client.get(f"{sc.url}/ai/x") as r:
        assert r.status == 200 and r.headers["X-RateLimit-Limit"] == "100"
    async with client.get(f"{sc.url}/ai/x") as r:
        assert r.status == 429 and r.headers["X-Sidecar-Error"] == "upstream_quota_exhausted"
        assert "RateLimit" in r.headers       # the local limit's headers still go out
    assert len(provider.arrivals) == 1


def test_retry_after_preset_reads_only_a_429():
    s = signals(preset="retry_after")
    assert s.block(200, h(x_ratelimit_remaining="0", x_ratelimit_reset=str(int(NOW) + 60)), NOW)[0] == 0
    assert s.block(429, h(retry_after="7"), NOW)[0] == 7.0


async def test_ietf_preset_paces_to_another_sidecars_headers(sidecar_factory, client, upstream):
    """The RateLimit field the sidecar itself sends (draft-ietf-httpapi-ratelimit-headers)
    is what preset "ietf" reads: a sidecar in front of another one paces to it."""
    inner = await sidecar_factory({"prov": f'route = "/prov"\nupstream = "{upstream.url}"\n[rate_limit]\n'
                                           'limits = [{ requests = 1, per = "3s" }]\n'})
    outer = await sidecar_factory({"ai": f'route = "/ai"\nupstream = "{inner.url}/prov"\n[rate_limit]\n'
                                         '[rate_limit.upstream]\npreset = "ietf"\n'})
    async with client.get(f"{outer.url}/ai/x") as r:
        assert r.status == 200
        assert r.headers["RateLimit"].endswith(";r=0;t=3")     # the inner sidecar's own header
    async with client.get(f"{outer.url}/ai/x") as r:
        assert r.status == 429 and r.headers["X-Sidecar-Error"] == "upstream_quota_exhausted"
        assert 1 <= int(r.headers["Retry-After"]) <= 3
    assert len(upstream.seen) == 1
    assert len(await inner.wait_access_lines(1)) == 1     # the inner sidecar never saw the second


async def test_redis_down_paces_on_what_this_sidecar_learned(sidecar_factory, client, provider):
    from tests.support.sidecar import free_port

    dead = f'[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:{free_port()}/0"\n'
    sc = await sidecar_factory({"ai": policy(provider.up.url)}, dead)
    async with client.get(f"{sc.url}/ai/x") as r:
        assert r.status == 200          # Redis unreachable: the request still goes
    async with client.get(f"{sc.url}/ai/x") as r:
        assert r.status == 429 and r.headers["X-Sidecar-Error"] == "upstream_quota_exhausted"
    assert len(provider.arrivals) == 1
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith('sidecar_rate_limit_backend_errors_total{route="ai"}')]
    assert float(line.split()[-1]) >= 2      # the read before and the write after the first request
    async with client.get(f"{sc.admin}/admin/rate_limits?route=ai") as r:
        view = await r.json()
    assert "shared_error" in view["upstream"] and len(view["upstream"]["learned"]) == 1


async def test_admin_listing_costs_the_same_in_a_full_redis(sidecar_factory, client, provider):
    """/admin/rate_limits (polled every 2 s by the dashboard) reads the learned
    blocks without walking the whole keyspace: its Redis commands do not grow
    with the keys other plugins keep (a shared Redis holds millions)."""
    import redis

    from tests.support.redis import ThrowawayRedis

    server = ThrowawayRedis().start()
    try:
        r = redis.Redis(port=server.port)
        pipe = r.pipeline(transaction=False)
        for i in range(20000):
            pipe.set(f"sidecar:test:{{test/k{i % 97}}}:cache:{i}", b"v")
        pipe.execute()
        state = f'[state]\nbackend = "redis"\nurl = "{server.url}"\n'
        sc = await sidecar_factory({"ai": policy(provider.up.url, 'key = "header:X-Org"')}, state)
        for org in ("a", "b"):
            async with client.get(f"{sc.url}/ai/x", headers={"X-Org": org}) as resp:
                assert resp.status == 200
        before = r.info("stats")["total_commands_processed"]
        async with client.get(f"{sc.admin}/admin/rate_limits?route=ai") as resp:
            view = await resp.json()
        spent = r.info("stats")["total_commands_processed"] - before - 1   # less this INFO
        assert sorted(b["key"] for b in view["upstream"]["learned"]) == ["a", "b"]
        assert all(0 < b["blocked_for_seconds"] <= 2 for b in view["upstream"]["learned"])
        assert spent <= 10, spent
        r.close()
    finally:
        server.cleanup()


@pytest.mark.parametrize("skew", [300.0, -300.0], ids=["provider-clock-ahead", "provider-clock-behind"])
async def test_absolute_resets_are_read_on_the_providers_clock(sidecar_factory, client, skew):
    """An epoch or RFC 3339 reset is a moment on the provider's clock: measured
    against its Date header, a host clock minutes off neither blocks the route
    for those minutes nor misses the block altogether."""
    async def github(request: web.Request, seen) -> web.Response:
        provider_now = time.time() + skew
        return web.json_response({}, headers={
            "Date": format_datetime(datetime.fromtimestamp(provider_now, timezone.utc), usegmt=True),
            "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(provider_now) + 3)})

    async with FakeUpstream(github) as up:
        sc = await sidecar_factory({"gh": f'route = "/gh"\nupstream = "{up.url}"\n[rate_limit]\n'
                                          '[rate_limit.upstream]\npreset = "github"\n'})
        async with client.get(f"{sc.url}/gh/x") as r:
            assert r.status == 200
        async with client.get(f"{sc.admin}/admin/rate_limits?route=gh") as r:
            learned = (await r.json())["upstream"]["learned"]
        assert len(learned) == 1, learned
        assert 1 <= learned[0]["blocked_for_seconds"] <= 4, learned


def test_a_response_served_from_a_cache_on_the_way_counts_its_age():
    """RFC 9111 4.2.3: a response a shared cache kept for Age seconds carries
    the Date of when it was made; the provider's 'now' is Date + Age."""
    made = NOW - 600
    headers = h(date=format_datetime(datetime.fromtimestamp(made, timezone.utc), usegmt=True), age="600",
                x_ratelimit_remaining="0", x_ratelimit_reset=str(int(NOW) + 30))
    assert signals(preset="github").block(200, headers, NOW)[0] == pytest.approx(30.0, abs=1.0)


# ---- GitHub: one quota per resource -------------------------------------------------


class GitHub:
    """A fake GitHub whose search quota is spent (reset 2 s ahead) while core,
    code_search and graphql still have room; records the paths it answered."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.up = FakeUpstream(self.respond)

    async def respond(self, request: web.Request, seen) -> web.Response:
        self.paths.append(request.path)
        if request.path.startswith("/search/") and request.path != "/search/code":
            resource, left = "search", 0
        else:
            resource = {"/search/code": "code_search", "/graphql": "graphql"}.get(request.path, "core")
            left = 4999
        return web.json_response({}, headers={
            "x-ratelimit-resource": resource, "x-ratelimit-remaining": str(left),
            "x-ratelimit-reset": str(int(time.time() + 2.5))})


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_github_spent_search_quota_leaves_core_open(sidecar_factory, client, redis_url, backend):
    gh = GitHub()
    async with gh.up:
        pol = {"gh": f'route = "/gh"\nupstream = "{gh.up.url}"\n[rate_limit]\n[rate_limit.upstream]\npreset = "github"\n'}
        state = f'[state]\nbackend = "redis"\nurl = "{redis_url}"\n' if backend == "redis" else ""
        a = await sidecar_factory(pol, state)
        # With Redis a second sidecar, which never saw the answer, paces by what a learned.
        b = await sidecar_factory(pol, state) if backend == "redis" else a
        async with client.get(f"{a.url}/gh/search/issues?q=x") as r:
            assert r.status == 200                      # announced search remaining = 0
        async with client.get(f"{b.url}/gh/search/repositories?q=y") as r:
            assert r.status == 429 and r.headers["X-Sidecar-Error"] == "upstream_quota_exhausted"
            assert 1 <= int(r.headers["Retry-After"]) <= 3
        # Same window: core, code search and GraphQL are other quotas and reach GitHub.
        for path in ("/repos/o/r", "/search/code", "/graphql"):
            async with client.request("POST" if path == "/graphql" else "GET", f"{b.url}/gh{path}") as r:
                assert r.status == 200, path
        async with client.get(f"{b.url}/gh/search/commits?q=z") as r:
            assert r.status == 429 and r.headers["X-Sidecar-Error"] == "upstream_quota_exhausted"
        assert gh.paths == ["/search/issues", "/repos/o/r", "/search/code", "/graphql"]
        async with client.get(f"{b.admin}/admin/rate_limits?route=gh") as r:
            (block,) = (await r.json())["upstream"]["learned"]
        assert block["key"] == "search/-" and block["reason"].startswith("x-ratelimit-remaining")


async def test_github_queue_mode_waits_only_for_the_spent_resource(sidecar_factory, client):
    gh = GitHub()
    async with gh.up:
        sc = await sidecar_factory({"gh": f'route = "/gh"\nupstream = "{gh.up.url}"\n[rate_limit]\n'
                                          'on_limit = "queue"\nmax_wait = "5s"\n'
                                          '[rate_limit.upstream]\npreset = "github"\n'})
        async with client.get(f"{sc.url}/gh/search/issues") as r:
            assert r.status == 200
        t0 = time.monotonic()
        async with client.get(f"{sc.url}/gh/user") as r:
            assert r.status == 200
        assert time.monotonic() - t0 < 1.0             # core is not waiting for search's reset
        async with client.get(f"{sc.url}/gh/search/issues") as r:
            assert r.status == 200
        assert time.monotonic() - t0 >= 1.0            # search waited for its reset
        assert gh.paths == ["/search/issues", "/user", "/search/issues"]


def test_github_resource_by_path_and_secondary_limits_hold_for_all():
    from plugins.rate_limit.quota_headers import github_resource
    assert [github_resource(p) for p in ("/search/code", "/search/issues", "/graphql", "/repos/o/r",
                                         "/api/v3/search/code", "/api/graphql", "/searchx")] == \
        ["code_search", "search", "graphql", "core", "code_search", "graphql", "core"]
    s = signals(preset="github")
    reset = str(int(NOW) + 60)
    assert s.block_scoped(200, h(x_ratelimit_remaining="0", x_ratelimit_reset=reset,
                                 x_ratelimit_resource="search"), NOW) == (60.0, "x-ratelimit-remaining: 0", "search")
    assert s.block_scoped(200, h(x_ratelimit_remaining="0", x_ratelimit_reset=reset), NOW)[2] == "*"
    assert s.block_scoped(200, h(x_ratelimit_remaining="0", x_ratelimit_reset=reset,
                                 x_ratelimit_resource="a/b"), NOW)[2] == "*"
    assert s.block_scoped(403, h(retry_after="90", x_ratelimit_resource="core"), NOW)[2] == "*"
    assert signals(preset="openai").block_scoped(200, h(x_ratelimit_remaining_requests="0",
                                                        x_ratelimit_reset_requests="1s",
                                                        x_ratelimit_resource="search"), NOW)[2] == "*"
