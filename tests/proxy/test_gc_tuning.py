"""proxy/server.py tune_gc: the collector stays off the request path, yet
cyclic garbage is still collected (issue 10)."""

from __future__ import annotations

import gc
import weakref

from proxy.server import GC_YOUNG_THRESHOLD, tune_gc


class _Node:
    def __init__(self) -> None:
        self.me = self   # a reference cycle: only the collector frees it


def test_tune_gc_freezes_startup_objects_and_still_collects_cycles() -> None:
    before = gc.get_threshold()
    runs: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "stop":
            runs.append(info["generation"])

    try:
        tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        gc.callbacks.append(count)
        # What a busy worker holds between access-log flushes: thousands of
        # live tracked objects, yet fewer than the threshold. No collection.
        held = [{"record": i} for i in range(GC_YOUNG_THRESHOLD // 2)]
        assert runs == []
        del held
        # Cyclic garbage (a closed connection's protocol and parser) is
        # collected once that many objects piled up.
        cycle = _Node()
        gone = weakref.ref(cycle)
        del cycle
        assert gone() is not None
        filler = [[] for _ in range(GC_YOUNG_THRESHOLD + 100)]
        assert runs and gone() is None
        del filler
    finally:
        if count in gc.callbacks:
            gc.callbacks.remove(count)
        gc.unfreeze()
        gc.set_threshold(*before)
