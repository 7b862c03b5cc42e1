"""Running a request's coroutine without an asyncio Task (issue 10).

An asyncio Task per request costs its creation, a ``call_soon`` before the
first step and the Task machinery on every resumption. ``Driven`` steps the
coroutine by hand instead: the first step runs at once from the protocol
callback, and whenever the coroutine waits on a future it continues from that
future's done-callback, inside the request's own ``contextvars`` context.

It stands in for the Task while it runs (``asyncio.current_task()`` returns
it, and it has the ``cancel`` / ``cancelling`` / ``uncancel`` that
``asyncio.timeout`` and aiohttp's client timers use), so a filter that awaits
Redis, Vault or a queue works unchanged.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from asyncio import tasks
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("sidecar.fastserver")

_enter = tasks._enter_task
_leave = tasks._leave_task
_current = tasks.current_task


class Driven:
    """One request's coroutine, stepped from callbacks (what connection_lost cancels)."""

    __slots__ = ("coro", "loop", "ctx", "waiting", "must_cancel", "cancels", "finished", "__weakref__")

    def __init__(self, coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop) -> None:
        self.coro = coro
        self.loop = loop
        self.ctx = contextvars.copy_context()
        self.waiting: asyncio.Future[Any] | None = None
        self.must_cancel = False
        self.cancels = 0
        self.finished = False

    # ---- the Task surface others use --------------------------------------

    def done(self) -> bool:
        return self.finished

    def cancel(self, msg: Any = None) -> bool:
        if self.finished:
            return False
        self.cancels += 1
        w = self.waiting
        if w is not None and w.cancel(msg=msg):
            return True  # the wake-up throws CancelledError into the coroutine
        self.must_cancel = True
        return True

    def cancelling(self) -> int:
        return self.cancels

    def uncancel(self) -> int:
        if self.cancels > 0:
            self.cancels -= 1
        return self.cancels

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def get_name(self) -> str:
        return f"request-{id(self):x}"

    def get_coro(self) -> Coroutine[Any, Any, None]:
        return self.coro

    # ---- stepping --------------------------------------------------------------

    def step(self, exc: BaseException | None = None) -> None:
        if self.must_cancel:
            self.must_cancel = False
            if not isinstance(exc, asyncio.CancelledError):
                exc = asyncio.CancelledError()
        loop = self.loop
        _enter(loop, self)  # type: ignore[arg-type]
        try:
            if exc is None:
                result = self.ctx.run(self.coro.send, None)
            else:
                result = self.ctx.run(self.coro.throw, exc)
        except StopIteration:
            self.finished = True
            return
        except asyncio.CancelledError:
            self.finished = True
            return
        except BaseException:
            # handle() catches everything but cancellation; this is a bug.
            self.finished = True
            log.exception("fast server: request coroutine failed")
            return
        finally:
            _leave(loop, self)  # type: ignore[arg-type]
        # (Callbacks below run outside the context: step() enters it, and a
        # context cannot be entered twice.)
        if getattr(result, "_asyncio_future_blocking", None):
            result._asyncio_future_blocking = False
            self.waiting = result
            result.add_done_callback(self._wakeup)
            if self.must_cancel and result.cancel():
                self.must_cancel = False
        elif result is None:
            # A bare yield (asyncio.sleep(0)): run again on the next loop pass.
            loop.call_soon(self.step)
        else:
            self.step(RuntimeError(f"the request coroutine yielded {result!r}, not a future"))

    def _wakeup(self, fut: asyncio.Future[Any]) -> None:
        self.waiting = None
        try:
            fut.result()
        except BaseException as e:
            self.step(e)
        else:
            self.step()


def drive(coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop) -> Driven:
    """Run ``coro`` now (up to its first wait); called from protocol callbacks."""
    d = Driven(coro, loop)
    if _current(loop) is None:
        d.step()
    else:
        # Inside another request's step (a pipelined request started as the
        # previous one finishes): one current task at a time.
        loop.call_soon(d.step)
    return d
