"""One route's breaker: pybreaker's state machine plus what an event loop needs.

pybreaker 1.4.1 knows two outcomes and lets every concurrent call through
when half-open; this adds a neutral outcome (client gone, not the upstream's
doing), the half-open trial count the filter guards with, the failure-ratio
window, and the hooks the Registry uses to share transitions.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pybreaker import (STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker,
                       CircuitBreakerListener, CircuitMemoryStorage)

from .config import Config

if TYPE_CHECKING:
    from .shared import Registry

log = logging.getLogger("sidecar.circuit_breaker")

# The names the admin API and the docs use (pybreaker says "half-open").
STATE_NAMES = {STATE_CLOSED: "closed", STATE_OPEN: "open", STATE_HALF_OPEN: "half_open"}
STATE_VALUES = {STATE_CLOSED: 0, STATE_OPEN: 1, STATE_HALF_OPEN: 2}


class _Storage(CircuitMemoryStorage):
    """pybreaker's memory storage with a neutral switch.

    pybreaker knows two outcomes; a client that went away (CancelledError) or
    an error that is not the upstream's is neither. Such an outcome is passed
    to pybreaker as an excluded exception (which it counts as a success), with
    ``neutral`` set so that "success" changes no counter: the failure streak
    survives, and a half-open circuit stays half-open.
    """

    def __init__(self) -> None:
        super().__init__(STATE_CLOSED)
        self.neutral = False

    def reset_counter(self) -> None:
        if not self.neutral:
            super().reset_counter()

    def increment_success_counter(self) -> None:
        if not self.neutral:
            super().increment_success_counter()


class _Window:
    """Requests and failures over a sliding window, in ten buckets (O(1) per outcome)."""

    __slots__ = ("span", "buckets", "total", "failed")

    def __init__(self, window: float) -> None:
        self.span = window / 10
        self.buckets: deque[list[int]] = deque()  # [bucket index, total, failed]
        self.total = 0
        self.failed = 0

    def _expire(self, idx: int) -> None:
        b = self.buckets
        while b and b[0][0] <= idx - 10:
            _, t, f = b.popleft()
            self.total -= t
            self.failed -= f

    def add(self, failed: bool, now: float) -> None:
        idx = int(now / self.span)
        self._expire(idx)
        b = self.buckets
        if not b or b[-1][0] != idx:
            b.append([idx, 0, 0])
        last = b[-1]
        last[1] += 1
        self.total += 1
        if failed:
            last[2] += 1
            self.failed += 1

    def counts(self, now: float) -> tuple[int, int]:
        self._expire(int(now / self.span))
        return self.total, self.failed

    def clear(self) -> None:
        self.buckets.clear()
        self.total = self.failed = 0


class Breaker(CircuitBreakerListener):
    """One route's breaker: pybreaker's state machine plus the pieces above."""

    def __init__(self, route: str, config: Config, registry: "Registry") -> None:
        self.route = route
        self.config = config
        self.registry = registry
        self.storage = _Storage()
        self.cb = CircuitBreaker(fail_max=config.failure_threshold, reset_timeout=config.recovery_timeout,
                                 exclude=[self._neutral], listeners=[self], state_storage=self.storage,
                                 name=route, throw_new_error_on_trip=False)
        self.trials = 0            # half-open trial requests in flight
        self.remote = False        # applying a peer sidecar's transition
        self.changed_at = 0.0      # wall time of the last transition (orders peer messages)
        self.reason = ""
        self.window = _Window(config.window) if config.failure_ratio is not None else None

    def _neutral(self, exc: BaseException) -> bool:
        return self.storage.neutral

    @property
    def state(self) -> str:
        return self.storage.state

    def retry_in(self) -> float:
        """Seconds left before an open circuit lets a trial through."""
        opened = self.storage.opened_at
        if opened is None:
            return 0.0
        return opened.timestamp() + self.config.recovery_timeout - time.time()

    # pybreaker listener: called on every transition, on the loop's thread.
    def state_change(self, cb: CircuitBreaker, old_state: Any, new_state: Any) -> None:
        old = STATE_NAMES.get(old_state.name if old_state is not None else STATE_CLOSED, "closed")
        new = STATE_NAMES[new_state.name]
        if old == new:
            return
        self.changed_at = time.time()
        if new_state.name == STATE_CLOSED and self.window is not None:
            self.window.clear()
        reason = self.reason or ("from a peer sidecar" if self.remote else "")
        self.reason = ""
        (log.warning if new == "open" else log.info)(
            "circuit breaker %s: %s -> %s%s", self.route, old, new, f" ({reason})" if reason else "")
        self.registry.transitioned(self, new_state.name)

    def open(self, reason: str) -> None:
        self.reason = reason
        self.cb.open()

    def close(self, reason: str) -> None:
        self.reason = reason
        self.cb.close()

    def apply_remote(self, state: str, opened_at: float | None, at: float) -> None:
        """Take a peer's transition (open or closed) unless ours is newer."""
        if at <= self.changed_at:
            return
        if state == self.state:
            if state == STATE_OPEN and opened_at:
                # A peer's trial failed and reopened: wait from its new opening time.
                self.storage.opened_at = datetime.fromtimestamp(opened_at, UTC)
            self.changed_at = at
            return
        self.remote = True
        try:
            if state == STATE_OPEN:
                self.storage.opened_at = datetime.fromtimestamp(opened_at or at, UTC)
                self.storage.state = STATE_OPEN
                self.cb.state = STATE_OPEN  # pybreaker's setter: new state object + listeners
            elif state == STATE_CLOSED:
                self.cb.close()
        finally:
            self.remote = False
        self.changed_at = at

    def snapshot(self) -> dict[str, Any]:
        state = self.state
        out: dict[str, Any] = {
            "route": self.route,
            "state": STATE_NAMES[state],
            "failures": self.storage.counter,
            "failure_threshold": self.config.failure_threshold,
            "retry_in": round(max(0.0, self.retry_in()), 3) if state == STATE_OPEN else 0.0,
            "half_open_trials": self.trials,
            "half_open_max": self.config.half_open_max,
        }
        if self.window is not None:
            total, failed = self.window.counts(time.monotonic())
            out["window"] = {"requests": total, "failures": failed,
                             "failure_ratio": self.config.failure_ratio,
                             "min_requests": self.config.min_requests, "seconds": self.config.window}
        return out
