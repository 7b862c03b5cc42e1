"""Benchmarks: ``python -m bench`` compares the sidecar with nginx, HAProxy and a naive Python proxy."""
