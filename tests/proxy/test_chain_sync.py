"""The fused layer of sync filters (proxy/chain.py compile_chain).

The fused chain must behave exactly like the onion of each filter's steps
nested one by one; a differential test checks that over every combination of
a few behaviours, against a reference onion written here independently.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from multidict import CIMultiDict

from proxy.chain import Again, Defer, Exchange, Filter, ProxyResponse, compile_chain
from proxy.errors import SidecarError, UpstreamUnavailable


class Boom(SidecarError):
    status, code, message = 500, "boom", "boom"


def make_ex() -> Exchange:
    return Exchange(None, "GET", "/x", "", CIMultiDict(), request_id="r1", started=0.0,  # type: ignore[arg-type]
                    max_body=1 << 20)


class Rec(Filter):
    """A sync filter recording its steps in ``events``; ``mode`` picks what
    its before does (go on, answer, raise, defer) and whether after raises."""

    sync = True

    def __init__(self, tag: str, events: list, before: str = "go", after: str = "ok",
                 has_after: bool = True, has_error: bool = True, has_before: bool = True) -> None:
        self.tag, self.events, self.mode, self.after_mode = tag, events, before, after
        if not has_before:
            self.before = None  # type: ignore[assignment]
        if not has_after:
            self.after = None  # type: ignore[assignment]
        if not has_error:
            self.after_error = None  # type: ignore[assignment]

    def before(self, ex):  # type: ignore[override]
        self.events.append(f"{self.tag}.before")
        ex.headers.add("X-Path", self.tag)
        if self.mode == "answer":
            return ProxyResponse(203, CIMultiDict({"X-By": self.tag}), b"early")
        if self.mode == "raise":
            raise Boom(f"{self.tag} refused")
        if self.mode == "defer":
            return Defer(self.deferred)
        return None

    async def deferred(self, ex, call_next):
        self.events.append(f"{self.tag}.deferred")
        await asyncio.sleep(0)   # really suspends
        resp = await call_next(ex)
        self.events.append(f"{self.tag}.deferred-done")
        return resp

    def after(self, ex, resp):
        self.events.append(f"{self.tag}.after")
        resp.headers.add("X-After", self.tag)
        if self.after_mode == "raise":
            raise Boom(f"{self.tag} after failed")

    def after_error(self, ex, exc):
        self.events.append(f"{self.tag}.error:{exc}")


class Async(Filter):
    """A plain onion filter that really suspends."""

    def __init__(self, tag: str, events: list) -> None:
        self.tag, self.events = tag, events

    async def handle(self, ex, call_next):
        self.events.append(f"{self.tag}.in")
        ex.headers.add("X-Path", self.tag)
        await asyncio.sleep(0)
        try:
            resp = await call_next(ex)
        except SidecarError as e:
            self.events.append(f"{self.tag}.caught:{e}")
            raise
        self.events.append(f"{self.tag}.out")
        return resp


class Terminal:
    def __init__(self, events: list, fail: bool = False) -> None:
        self.events, self.fail = events, fail
        self.released: list[bool] = []

    async def __call__(self, ex):
        self.events.append("terminal:" + ",".join(ex.headers.getall("X-Path", [])))
        await asyncio.sleep(0)
        if self.fail:
            raise UpstreamUnavailable("down")
        return ProxyResponse(200, CIMultiDict(), b"up", release=self.released.append, upstream=True)


async def reference(filters: list[Filter], terminal, ex):
    """The onion, nested by hand: each sync filter's steps as one handle()."""

    def layer(f, nxt):
        async def call(ex):
            if not getattr(f, "sync", False):
                return await f.handle(ex, nxt)
            before = getattr(f, "before", None)
            r = before(ex) if before is not None else None
            if isinstance(r, ProxyResponse):
                return r
            if isinstance(r, Defer):
                return await r.run(ex, nxt)
            try:
                resp = await nxt(ex)
            except BaseException as e:
                if getattr(f, "after_error", None) is not None:
                    f.after_error(ex, e)
                raise
            if getattr(f, "after", None) is not None:
                try:
                    f.after(ex, resp)
                except BaseException:
                    resp.close()
                    raise
            return resp
        return call

    h = terminal
    for f in reversed(filters):
        h = layer(f, h)
    return await h(ex)


async def outcome(run):
    try:
        resp = await run
    except Exception as e:  # noqa: BLE001 - compared as data
        return ("raised", type(e).__name__, str(e))
    return ("answered", resp.status, list(resp.headers.items()))


async def test_order_of_before_and_after_across_sync_and_async():
    ev: list[str] = []
    filters = [Rec("a", ev), Rec("b", ev), Async("c", ev), Rec("d", ev), Rec("e", ev)]
    handler = compile_chain(filters, Terminal(ev))
    resp = await handler(make_ex())
    assert ev == ["a.before", "b.before", "c.in", "d.before", "e.before", "terminal:a,b,c,d,e",
                  "e.after", "d.after", "c.out", "b.after", "a.after"]
    assert resp.headers.getall("X-After") == ["e", "d", "b", "a"]


async def test_sync_filter_answering_early_skips_inner_and_own_after():
    ev: list[str] = []
    term = Terminal(ev)
    handler = compile_chain([Rec("a", ev), Rec("b", ev, before="answer"), Rec("c", ev)], term)
    resp = await handler(make_ex())
    assert resp.status == 203 and resp.body == b"early"
    assert ev == ["a.before", "b.before", "a.after"]
    assert resp.headers.getall("X-After") == ["a"]


async def test_exception_in_after_closes_the_response_and_reaches_outer_filters():
    ev: list[str] = []
    term = Terminal(ev)
    handler = compile_chain([Rec("a", ev), Rec("b", ev, after="raise"), Rec("c", ev)], term)
    with pytest.raises(Boom, match="b after failed"):
        await handler(make_ex())
    assert ev == ["a.before", "b.before", "c.before", "terminal:a,b,c", "c.after", "b.after",
                  "a.error:b after failed"]
    assert term.released == [False]   # the dropped upstream response is closed, not pooled


async def test_upstream_error_reaches_every_entered_filter_inner_to_outer():
    ev: list[str] = []
    handler = compile_chain([Rec("a", ev), Async("m", ev), Rec("b", ev)], Terminal(ev, fail=True))
    with pytest.raises(UpstreamUnavailable):
        await handler(make_ex())
    assert ev == ["a.before", "m.in", "b.before", "terminal:a,m,b", "b.error:down",
                  "m.caught:down", "a.error:down"]


async def test_before_raising_is_raised_on_await_not_on_call():
    ev: list[str] = []
    handler = compile_chain([Rec("a", ev), Rec("b", ev, before="raise"), Rec("c", ev)], Terminal(ev))
    pending = handler(make_ex())          # the contract: an awaitable, never a synchronous raise
    assert ev == ["a.before", "b.before", "a.error:b refused"]
    with pytest.raises(Boom, match="b refused"):
        await pending


async def test_defer_runs_the_rest_of_the_chain_inside_the_filters_own_path():
    ev: list[str] = []
    handler = compile_chain([Rec("a", ev), Rec("b", ev, before="defer"), Rec("c", ev), Async("d", ev)],
                            Terminal(ev))
    resp = await handler(make_ex())
    assert ev == ["a.before", "b.before", "b.deferred", "c.before", "d.in", "terminal:a,b,c,d", "d.out",
                  "c.after", "b.deferred-done", "a.after"]
    assert resp.headers.getall("X-After") == ["c", "a"]


async def test_all_sync_without_after_costs_only_the_terminals_coroutine():
    ev: list[str] = []
    term = Terminal(ev)

    async def terminal(ex):
        return await term(ex)

    handler = compile_chain([Rec(t, ev, has_after=False, has_error=False) for t in "abcd"], terminal)
    coro = handler(make_ex())
    assert coro.cr_code is terminal.__code__       # no layer of the chain's own
    assert (await coro).status == 200
    # With afters: one coroutine for the whole run of sync filters, around the terminal's.
    handler = compile_chain([Rec(t, ev) for t in "abcd"], terminal)
    coro = handler(make_ex())
    coro.send(None)                                  # suspends inside the terminal
    assert coro.cr_await.cr_code is terminal.__code__
    coro.close()


BEHAVIOURS = [
    ("sync", {}), ("sync", {"before": "answer"}), ("sync", {"before": "raise"}),
    ("sync", {"before": "defer"}), ("sync", {"after": "raise"}),
    ("sync", {"has_before": False}), ("sync", {"has_after": False, "has_error": False}),
    ("async", {}),
]


@pytest.mark.parametrize("fail", [False, True])
async def test_fused_chain_matches_the_onion(fail):
    """Every chain of up to three filters from the behaviours above: the fused
    chain and the hand-nested onion record the same events and end alike."""
    checked = 0
    for n in range(0, 4):
        for combo in itertools.product(range(len(BEHAVIOURS)), repeat=n):
            results = []
            for build in ("fused", "onion"):
                ev: list[str] = []
                filters = []
                for i, k in enumerate(combo):
                    kind, kw = BEHAVIOURS[k]
                    filters.append(Async(f"f{i}", ev) if kind == "async" else Rec(f"f{i}", ev, **kw))
                term = Terminal(ev, fail=fail)
                run = (compile_chain(filters, term)(make_ex()) if build == "fused"
                       else reference(filters, term, make_ex()))
                results.append((await outcome(run), ev, term.released))
            assert results[0] == results[1], [BEHAVIOURS[k] for k in combo]
            checked += 1
    assert checked == sum(len(BEHAVIOURS) ** n for n in range(4))


async def test_filter_handle_is_the_sync_form_as_one_layer():
    """A sync filter called outside a compiled chain (as some tests and
    plugins do) behaves as its before/after."""
    ev: list[str] = []
    f = Rec("a", ev)
    resp = await f.handle(make_ex(), Terminal(ev))
    assert ev == ["a.before", "terminal:a", "a.after"] and resp.status == 200


async def test_before_returning_something_else_is_a_clear_error():
    class Bad(Filter):
        sync = True
        name = "bad"

        def before(self, ex):  # type: ignore[override]
            return "yes"

    with pytest.raises(TypeError, match="filter bad: before\\(\\) returned str"):
        await compile_chain([Bad()], Terminal([]))(make_ex())


class Redo(Filter):
    """A sync filter whose after / after_error answer Again once: the rest
    of the chain runs again (retry's shape)."""

    sync = True

    def __init__(self, events: list, on_error: bool = False) -> None:
        self.events, self.on_error, self.done = events, on_error, False

    def after(self, ex, resp):
        self.events.append(f"redo.after:{resp.status}")
        if self.done or self.on_error:
            return None
        self.done = True
        return Again(self.again)

    def after_error(self, ex, exc):
        self.events.append(f"redo.error:{exc}")
        if self.done or not self.on_error:
            return None
        self.done = True
        return Again(self.again)

    async def again(self, ex, outcome, call_next):
        self.events.append(f"redo.again:{outcome.status if isinstance(outcome, ProxyResponse) else outcome}")
        if isinstance(outcome, ProxyResponse):
            outcome.close()
        return await call_next(ex)


async def test_again_from_after_runs_the_rest_again_and_outer_filters_see_the_last_answer():
    ev: list[str] = []
    term = Terminal(ev)
    handler = compile_chain([Rec("a", ev, has_before=False), Redo(ev), Rec("b", ev, has_before=False)], term)
    resp = await handler(make_ex())
    assert resp.status == 200
    assert ev == ["terminal:", "b.after", "redo.after:200", "redo.again:200",
                  "terminal:", "b.after", "a.after"]   # a sees one answer, after the second try
    assert resp.headers.getall("X-After") == ["b", "a"]
    assert term.released == [False]                    # the first answer was closed, not reused


async def test_again_from_after_error_and_a_failing_again_reaches_the_outer_filters():
    ev: list[str] = []
    handler = compile_chain([Rec("a", ev, has_before=False), Redo(ev, on_error=True)], Terminal(ev, fail=True))
    with pytest.raises(UpstreamUnavailable):
        await handler(make_ex())
    assert ev == ["terminal:", "redo.error:down", "redo.again:down", "terminal:", "a.error:down"]
