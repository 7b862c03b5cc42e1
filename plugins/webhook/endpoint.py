"""One webhook endpoint on the inbound listener: verify, de-duplicate, then queue or pass through."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict, istr

from proxy.chain import Exchange, ProxyResponse
from proxy.errors import SidecarError, UpstreamUnavailable
from proxy.secrets import SecretRef, SecretUnavailable

from .config import Config
from .queue import Event, new_event_id
from .schemes import Incoming, Rejected, SignatureInvalid, make_scheme

if TYPE_CHECKING:
    from .service import WebhookService

log = logging.getLogger("sidecar.webhook")

# Not stored with an event: the service gets its own Host and framing. (The
# listener already removed hop-by-hop headers.)
_DROP = frozenset({istr("Host"), istr("Content-Length")})


class QueueUnavailable(SidecarError):
    status, code, message = 503, "queue_unavailable", "the webhook could not be stored; retry later"


class InProgress(SidecarError):
    status, code, message = 409, "webhook_in_progress", "this event is being delivered; retry later"


# How long a delivery in progress holds its de-duplication key before the
# event is accepted: past it (a crash mid-delivery), a provider retry goes
# through rather than being refused until dedupe_ttl ends.
_PENDING_TTL = 300.0
_PENDING = "pending:"


class MethodNotAllowed(SidecarError):
    status, code, message = 405, "method_not_allowed", "webhooks are delivered with POST"


_JSON = "application/json"


def _json(status: int, data: dict[str, Any], **headers: str) -> ProxyResponse:
    return ProxyResponse(status, CIMultiDict({"Content-Type": _JSON, **headers}), orjson.dumps(data))


class WebhookEndpoint:
    """The terminal handler of one webhook route (``Exchange -> ProxyResponse``).

    Built once per policy and kept across reloads that leave ``[webhook]``
    unchanged. Errors are raised as SidecarError: the listener answers them
    with the sidecar's one JSON error form and logs the request under the
    route's name, like every other route.
    """

    def __init__(self, service: "WebhookService", source: str, config: Config, digest: str) -> None:
        self.service = service
        self.source = source
        self.config = config
        self.digest = digest
        self.scheme = make_scheme(config)
        self.durable = config.delivery == "durable"
        # Made now, with the policies (raises ValueError for a bad reference):
        # remote sources (vault:, aws-sm:) then read them at start-up with the
        # others, and ``sidecar validate`` resolves them.
        self._refs: list[SecretRef] = [service.rt.secrets.ref(s) for s in config.secrets]
        m = service.m
        self.m_received = m.received.labels(source)
        self.m_duplicates = m.duplicates.labels(source)
        self.m_rejected = {code: m.rejected.labels(source, code) for code in (
            "signature_invalid", "signature_missing", "timestamp_out_of_tolerance",
            "request_body_too_large", "secret_unavailable", "method_not_allowed", "queue_unavailable")}

    def secrets(self) -> list[str]:
        """Every secret that resolves now; 503 when none does."""
        out = []
        for ref in self._refs:
            try:
                out.append(ref.get())
            except SecretUnavailable:
                continue
        if not out:
            raise SecretUnavailable(f"no secret of webhook {self.source} resolves")
        return out

    async def __call__(self, ex: Exchange) -> ProxyResponse:
        try:
            return await self._handle(ex)
        except SidecarError as e:
            counter = self.m_rejected.get(e.code)
            if counter is not None:
                counter.inc()
            if isinstance(e, Rejected):
                # The reason, never the secret or the expected MAC.
                log.warning("webhook %s rejected: %s (%s) from %s", self.source, e.code, e.message, ex.client_ip)
            raise

    async def _handle(self, ex: Exchange) -> ProxyResponse:
        if ex.method != "POST":
            raise MethodNotAllowed(headers={"Allow": "POST"})
        # Bounded by the route's max_request_body, which is this webhook's max_body.
        body = await ex.read_body()
        inc = Incoming(body, ex.headers, ex.query, time.time())
        try:
            self.scheme.verify(inc, self.secrets())
        except UnicodeEncodeError:
            # A header byte that is not UTF-8 (aiohttp keeps it as a
            # surrogate) cannot be part of a valid signature.
            raise SignatureInvalid("a signature header is not valid UTF-8") from None
        self.m_received.inc()
        svc = self.service
        event = Event(id=new_event_id(), source=self.source, type=self.scheme.event_type(inc) or "event",
                      provider_id=self.scheme.event_id(inc), method=ex.method, query=ex.query,
                      headers=[(k, v) for k, v in ex.headers.items() if k not in _DROP],
                      body=body, received_at=time.time())
        dedupe_key = None
        if event.provider_id and self.config.dedupe_ttl:
            # The queue's hash tag: a service's webhooks live on one Redis Cluster master.
            dedupe_key = svc.rt.state.tagged("webhooks", "webhooks", "seen", self.source, event.provider_id)
            try:
                fresh = await svc.rt.state.set_nx(dedupe_key, _PENDING + event.id,
                                                  min(self.config.dedupe_ttl, _PENDING_TTL))
                raw = None if fresh else await svc.rt.state.get(dedupe_key)
            except Exception as e:
                log.error("webhook %s: de-duplication check failed: %s", self.source, type(e).__name__)
                raise QueueUnavailable("the state backend is unavailable; retry later") from None
            seen = None if raw is None else raw.decode("utf-8", "replace")
            if not fresh and (seen is None or seen.startswith(_PENDING)):
                # The first delivery may still fail: acknowledging this one
                # would make the provider stop retrying a lost event. (None:
                # the claim was released between the two calls, the first failed.)
                raise InProgress(headers={"Retry-After": "5"})
            if not fresh:
                self.m_duplicates.inc()
                return _json(200, {"status": "duplicate"}, **{"X-Sidecar-Duplicate": "1"})
        if self.durable:
            # Shielded, the de-dup claim settled inside: a provider hanging up
            # must neither cancel a commit half-way nor release the claim of
            # an event that is then stored (its retry would be queued twice).
            await asyncio.shield(self._store(event, dedupe_key))
            return _json(202, {"status": "accepted", "event_id": event.id},
                         **{"X-Sidecar-Event-Id": event.id})
        try:
            resp = await self._passthrough(event)
        except BaseException:
            if dedupe_key is not None:
                await _forget(svc, dedupe_key)
            raise
        if dedupe_key is not None:
            if 200 <= resp.status < 300:
                await _accepted(svc, dedupe_key, event.id, self.config.dedupe_ttl)
            else:
                # The provider will retry; that retry must not be taken for a duplicate.
                await _forget(svc, dedupe_key)
        return resp

    async def _store(self, event: Event, dedupe_key: str | None) -> None:
        svc = self.service
        try:
            await svc.enqueue(event)
        except BaseException as e:
            if dedupe_key is not None:
                await _forget(svc, dedupe_key)
            if isinstance(e, Exception):
                log.error("webhook %s: storing event %s failed: %s", self.source, event.id, type(e).__name__)
                raise QueueUnavailable() from None
            raise
        if dedupe_key is not None:
            await _accepted(svc, dedupe_key, event.id, self.config.dedupe_ttl)

    async def _passthrough(self, event: Event) -> ProxyResponse:
        try:
            status, headers, body = await self.service.send(self, event, 1)
        except SidecarError:
            raise
        except Exception as e:
            raise UpstreamUnavailable(f"service unreachable: {type(e).__name__}") from None
        out: CIMultiDict[str] = CIMultiDict()
        if "Content-Type" in headers:
            out["Content-Type"] = headers["Content-Type"]
        out["X-Sidecar-Event-Id"] = event.id
        (self.service.m.delivered if 200 <= status < 300 else self.service.m.failed).labels(self.source).inc()
        return ProxyResponse(status, out, body)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"source": self.source, "path": c.path, "forward_to": c.target, "scheme": c.scheme,
                "delivery": c.delivery, "secrets": len(c.secrets), "tolerance": c.tolerance,
                "max_body": c.max_body, "dedupe_ttl": c.dedupe_ttl, "retry": c.retry.model_dump(),
                "publish": c.publish}


async def _accepted(svc: "WebhookService", key: str, event_id: str, ttl: float) -> None:
    """The event is delivered or stored: later copies are duplicates for ``ttl``."""
    try:
        await svc.rt.state.set(key, event_id, ttl)
    except Exception as e:
        # The pending mark expires on its own; until then copies get 409.
        log.error("webhook %s: recording event %s as accepted failed: %s", key, event_id, type(e).__name__)


async def _forget(svc: "WebhookService", key: str) -> None:
    try:
        await svc.rt.state.delete(key)
    except Exception:
        log.exception("could not clear the de-duplication key of a failed webhook")
