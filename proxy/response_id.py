"""Which request id the client sees: the provider's own, else the sidecar's.

Providers put a support id on every response (OpenAI's ``x-request-id``,
which its SDK shows in errors; Anthropic's ``request-id``). A proxy that
overwrote it would hand the service an id the provider's support cannot find
(issue 13), so the upstream's ``X-Request-ID`` reaches the client unchanged
and the sidecar's id is set only when the upstream sent none (or the sidecar
answered itself). Both ids are logged: ``request_id`` and
``upstream_request_id``. Envoy does the same with ``preserve_external_request_id``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from .chain import Exchange


def set_response_request_id(headers: "CIMultiDict[str]", rid: str, ex: "Exchange | None") -> None:
    """Finish the response's ``X-Request-ID`` and note the provider's id for the access log."""
    upstream_id = headers.get("X-Request-ID")
    if upstream_id is None:
        headers["X-Request-ID"] = rid
        # Anthropic names its id ``request-id``: logged, left as it is.
        upstream_id = headers.get("Request-Id")
    if upstream_id is not None and ex is not None:
        ex.vars["upstream_request_id"] = upstream_id
