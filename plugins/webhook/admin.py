"""Admin endpoints for the webhook queue."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.admin import json_error, json_response

from .queue import STATUSES, Event

if TYPE_CHECKING:
    from .service import WebhookService


def _detail(svc: "WebhookService", ev: Event) -> dict[str, Any]:
    out = ev.summary()
    out["headers"] = svc.rt.redactor.headers_dict(dict(ev.headers))
    out["query"] = ev.query
    try:
        out["body"] = ev.body.decode()
    except UnicodeDecodeError:
        out["body_base64"] = base64.b64encode(ev.body).decode()
    return out


def add_routes(app: web.Application, service: Callable[[], "WebhookService"]) -> None:
    async def events(request: web.Request) -> web.Response:
        svc = service()
        status = request.query.get("status") or None
        if status is not None and status not in STATUSES:
            return json_error(400, "bad_request", f"status must be one of {', '.join(STATUSES)}")
        try:
            limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        except ValueError:
            return json_error(400, "bad_request", "limit must be a number")
        if svc.queue is None:
            return json_response({"events": []})
        found = await svc.queue.list(status, request.query.get("source") or None, limit)
        return json_response({"events": [e.summary() for e in found]})

    async def event(request: web.Request) -> web.Response:
        svc = service()
        ev = None if svc.queue is None else await svc.queue.get(request.match_info["id"])
        if ev is None:
            return json_error(404, "not_found", "no such webhook event")
        return json_response(_detail(svc, ev))

    async def retry(request: web.Request) -> web.Response:
        svc = service()
        event_id = request.match_info["id"]
        if svc.queue is None or await svc.queue.get(event_id) is None:
            return json_error(404, "not_found", "no such webhook event")
        ev = await svc.queue.retry(event_id)
        if ev is None:
            return json_error(409, "not_dead", "only a dead event can be retried")
        w = svc.wake.get(ev.source)
        if w is not None:
            w.set()
        return json_response({"retried": True, "event": ev.summary()})

    async def endpoints(request: web.Request) -> web.Response:
        return json_response(service().describe())

    app.router.add_get("/admin/webhooks", endpoints)
    app.router.add_get("/admin/webhooks/events", events)
    app.router.add_get("/admin/webhooks/events/{id}", event)
    app.router.add_post("/admin/webhooks/events/{id}/retry", retry)
