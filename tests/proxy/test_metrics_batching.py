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


def test_multiprocess_updates_are_batched_and_written_when_flushed(tmp_path):
    """workers > 1: prometheus-client's multiprocess values (one mmap'ed file
    per process) get the batched updates at a flush, not one write each.
    prometheus-client picks its value class at import, so this runs in a
    fresh interpreter with PROMETHEUS_MULTIPROC_DIR set, as a worker does."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import asyncio
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        from proxy.metrics import Metrics

        def shared(path):
            agg = CollectorRegistry()
            MultiProcessCollector(agg, path=path)
            return generate_latest(agg).decode()

        async def main(path):
            m = Metrics()
            inc = m.batched(m.requests.labels("p", "GET", "200")).inc
            obs = m.batched_histogram(m.duration.labels("p")).observe
            for _ in range(5):
                inc()
                obs(0.002)
            m.enter()
            line = 'sidecar_requests_total{method="GET",route="p",status="200"}'
            before = shared(path)
            assert line + " 0.0" in before, before          # nothing written per request
            m.start_flushing(0.05)
            for _ in range(200):                            # the timer writes them (poll, deadline 10 s)
                await asyncio.sleep(0.05)
                after = shared(path)
                if line + " 5.0" in after:
                    break
            assert line + " 5.0" in after, after
            assert 'sidecar_request_duration_seconds_bucket{le="0.0025",route="p"} 5.0' in after, after
            assert "sidecar_inflight_requests 1.0" in after, after
            inc()
            m.leave()
            m.stop_flushing()                                # shutdown writes what is pending
            final = shared(path)
            assert line + " 6.0" in final and "sidecar_inflight_requests 0.0" in final, final
            print("ok")

        import os
        asyncio.run(main(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    """)
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo,
                         env={**__import__("os").environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
                              "PYTHONPATH": str(repo)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
