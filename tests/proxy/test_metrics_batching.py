"""Batched data-plane metrics: what the registry shows equals direct updates."""

from __future__ import annotations

from prometheus_client import generate_latest

from proxy.metrics import BUCKETS, Metrics


def _samples(m: Metrics, name: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in m.registry.collect() if fam.name == name for s in fam.samples
            if not s.name.endswith("_created")}


def test_batched_histogram_matches_observe_on_every_bucket_edge():
    direct, batched = Metrics(), Metrics()
    values = [0.0, *BUCKETS, *(b + 1e-9 for b in BUCKETS), 1e6]
    for v in values:
        direct.duration.labels("r").observe(v)
    obs = batched.batched_histogram(batched.duration.labels("r")).observe
    for v in values:
        obs(v)
    got, want = _samples(batched, "sidecar_request_duration_seconds"), \
        _samples(direct, "sidecar_request_duration_seconds")
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert abs(got[k] - v) < 1e-6, k
    # Flushed once: reading again shows the same numbers, not twice them.
    assert _samples(batched, "sidecar_request_duration_seconds") == got


def test_batched_counter_is_visible_in_the_exposition_and_shared_per_child():
    m = Metrics()
    a = m.batched(m.requests.labels("p", "GET", "200"))
    assert m.batched(m.requests.labels("p", "GET", "200")) is a
    for _ in range(3):
        a.inc()
    assert 'sidecar_requests_total{method="GET",route="p",status="200"} 3.0' in m.exposition().decode()
    a.inc()
    assert 'sidecar_requests_total{method="GET",route="p",status="200"} 4.0' in generate_latest(m.registry).decode()


def test_inflight_is_read_when_collected():
    m = Metrics()
    m.enter()
    m.enter()
    assert "sidecar_inflight_requests 2.0" in m.exposition().decode()
    m.leave()
    assert "sidecar_inflight_requests 1.0" in m.exposition().decode()


def test_multiprocess_updates_go_straight_to_the_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    m = Metrics()
    child = m.requests.labels("p", "GET", "200")
    assert m.batched(child) is child
    hchild = m.duration.labels("p")
    assert m.batched_histogram(hchild) is hchild
    assert m.enter == m.inflight.inc
