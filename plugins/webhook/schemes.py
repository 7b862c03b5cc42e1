"""Webhook signature schemes (shared/specs/webhook-signatures.md).

Every check runs over the raw body bytes, compares MACs with
``hmac.compare_digest``, tries every configured secret (rotation) and never
puts a secret or an expected MAC into an error. A scheme is built once per
endpoint (templates and header names precomputed); ``verify`` runs per request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import orjson

from proxy.errors import SidecarError

log = logging.getLogger("sidecar.webhook")


class Rejected(SidecarError):
    """A webhook that failed verification: 401, nothing forwarded."""

    status, code, message = 401, "signature_invalid", "webhook signature verification failed"


class SignatureMissing(Rejected):
    code, message = "signature_missing", "webhook signature header missing"


class SignatureInvalid(Rejected):
    code, message = "signature_invalid", "webhook signature does not match"


class TimestampOutOfTolerance(Rejected):
    code, message = "timestamp_out_of_tolerance", "webhook timestamp outside the allowed tolerance"


class Incoming:
    """The parts of a webhook request a scheme looks at."""

    __slots__ = ("body", "headers", "query", "now", "_json")

    def __init__(self, body: bytes, headers: Mapping[str, str], query: str, now: float) -> None:
        self.body = body
        self.headers = headers
        self.query = query
        self.now = now
        self._json: Any = ...

    def json(self) -> Any:
        """The body as JSON (for ids and types only, never for verification); None if not JSON."""
        if self._json is ...:
            try:
                self._json = orjson.loads(self.body)
            except orjson.JSONDecodeError:
                self._json = None
        return self._json

    def json_str(self, *path: str) -> str | None:
        node = self.json()
        for p in path:
            if not isinstance(node, dict):
                return None
            node = node.get(p)
        return node if isinstance(node, str) and node else None


HASHES: dict[str, Callable[..., Any]] = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


def _unhex(value: str) -> bytes | None:
    try:
        return bytes.fromhex(value.strip())
    except ValueError:
        return None


def _unb64(value: str) -> bytes | None:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _matches(keys: list[bytes], message: bytes, given: list[bytes], algo: Callable[..., Any] = hashlib.sha256) -> bool:
    """True when any key's MAC equals any given signature. Every pair is compared
    (no early exit that would tell which secret or position matched)."""
    ok = False
    for key in keys:
        mac = hmac.new(key, message, algo).digest()
        for sig in given:
            ok |= hmac.compare_digest(mac, sig)
    return ok


def _check_timestamp(value: str, now: float, tolerance: float) -> None:
    try:
        ts = int(value.strip())
    except ValueError:
        raise SignatureInvalid("webhook timestamp is not a Unix time") from None
    # Future timestamps are refused too (Stripe's SDK accepts them; a clock
    # far ahead is as suspicious as one far behind).
    if abs(now - ts) > tolerance:
        raise TimestampOutOfTolerance()


def _header(inc: Incoming, name: str) -> str:
    value = inc.headers.get(name)
    if not value:
        raise SignatureMissing(f"{name} header missing")
    return value


class Scheme:
    """Base: ``verify`` raises Rejected; ``event_id``/``event_type`` name the event."""

    name = ""
    signature_headers: tuple[str, ...] = ()

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance

    def keys(self, secrets: list[str]) -> list[bytes]:
        return [s.encode() for s in secrets]

    def verify(self, inc: Incoming, secrets: list[str]) -> None:
        raise NotImplementedError

    def event_id(self, inc: Incoming) -> str | None:
        return None

    def event_type(self, inc: Incoming) -> str | None:
        return inc.json_str("type")


class Stripe(Scheme):
    """``Stripe-Signature: t=<unix>,v1=<hex>[,v1=...]`` over ``"{t}." + body``; the
    key is the whole ``whsec_...`` string."""

    name = "stripe"
    signature_headers = ("Stripe-Signature",)

    def verify(self, inc: Incoming, secrets: list[str]) -> None:
        header = _header(inc, "Stripe-Signature")
        t = None
        given: list[bytes] = []
        for item in header.split(","):
            k, _, v = item.strip().partition("=")
            if k == "t":
                t = v
            elif k == "v1":
                mac = _unhex(v)
                if mac is not None:
                    given.append(mac)
        if t is None or not given:
            raise SignatureInvalid("malformed Stripe-Signature header (needs t= and v1=)")
        if not _matches(self.keys(secrets), t.encode() + b"." + inc.body, given):
            raise SignatureInvalid()
        _check_timestamp(t, inc.now, self.tolerance)

    def event_id(self, inc: Incoming) -> str | None:
        return inc.json_str("id")


class GitHub(Scheme):
    """``X-Hub-Signature-256: sha256=<hex>`` over the body; no timestamp."""

    name = "github"
    signature_headers = ("X-Hub-Signature-256",)

    def verify(self, inc: Incoming, secrets: list[str]) -> None:
        header = _header(inc, "X-Hub-Signature-256")
        prefix, _, value = header.partition("=")
        mac = _unhex(value) if prefix == "sha256" else None
        if mac is None:
            raise SignatureInvalid("malformed X-Hub-Signature-256 header")
        if not _matches(self.keys(secrets), inc.body, [mac]):
            raise SignatureInvalid()

    def event_id(self, inc: Incoming) -> str | None:
        return inc.headers.get("X-GitHub-Delivery") or None

    def event_type(self, inc: Incoming) -> str | None:
        return inc.headers.get("X-GitHub-Event") or None


class Slack(Scheme):
    """``X-Slack-Signature: v0=<hex>`` over ``"v0:{ts}:" + body``."""

    name = "slack"
    signature_headers = ("X-Slack-Signature", "X-Slack-Request-Timestamp")

    def verify(self, inc: Incoming, secrets: list[str]) -> None:
        header = _header(inc, "X-Slack-Signature")
        ts = _header(inc, "X-Slack-Request-Timestamp")
        version, _, value = header.partition("=")
        mac = _unhex(value) if version == "v0" else None
        if mac is None:
            raise SignatureInvalid("malformed X-Slack-Signature header")
        if not _matches(self.keys(secrets), b"v0:" + ts.strip().encode() + b":" + inc.body, [mac]):
            raise SignatureInvalid()
        _check_timestamp(ts, inc.now, self.tolerance)

    def event_id(self, inc: Incoming) -> str | None:
        return inc.json_str("event_id")

    def event_type(self, inc: Incoming) -> str | None:
        return inc.json_str("event", "type") or inc.json_str("type")


class Shopify(Scheme):
    """``X-Shopify-Hmac-Sha256: <base64>`` over the body; no timestamp."""

    name = "shopify"
    signature_headers = ("X-Shopify-Hmac-Sha256",)

    def verify(self, inc: Incoming, secrets: list[str]) -> None:
        mac = _unb64(_header(inc, "X-Shopify-Hmac-Sha256"))
        if mac is None:
            raise SignatureInvalid("malformed X-Shopify-Hmac-Sha256 header")
        if not _matches(self.keys(secrets), inc.body, [mac]):
            raise SignatureInvalid()

    def event_id(self, inc: Incoming) -> str | None:
        h = inc.headers
        return h.get("X-Shopify-Webhook-Id") or h.get("X-Shopify-Event-Id") or None

    def event_type(self, inc: Incoming) -> str | None:
        return inc.headers.get("X-Shopify-Topic") or None


class StandardWebhooks(Scheme):
    """Standard Webhooks (and Svix's ``svix-*`` twin headers): ``v1,<base64>``
    entries over ``"{id}.{timestamp}." + body``; the key is base64 after ``whsec_``."""

    name = "standard-webhooks"
    prefixes = ("webhook-", "svix-")
    signature_headers = ("webhook-signature", "svix-signature")

    def keys(self, secrets: list[str]) -> list[bytes]:
        out = []
        for s in secrets:
            key = _unb64(s.removeprefix("whsec_"))
            if key:
                out.append(key)
        return out

    def _headers(self, inc: Incoming) -> tuple[str, str, str]:
        h = inc.headers
        for p in self.prefixes:
            sig = h.get(p + "signature")
            if sig:
                msg_id, ts = h.get(p + "id"), h.get(p + "timestamp")
                if not msg_id or not ts:
                    raise SignatureMissing(f"{p}id and {p}timestamp headers are required")
                return msg_id, ts, sig
        raise SignatureMissing(f"{self.prefixes[0]}signature header missing")

    def verify(self, inc: Incoming, secrets: list[str]) -> None:
        msg_id, ts, header = self._headers(inc)
        given = []
        for entry in header.split():
            version, _, value = entry.partition(",")
            if version == "v1":
                mac = _unb64(value)
                if mac is not None:
                    given.append(mac)
        if not given:
            raise SignatureInvalid("no v1 signature in the signature header")
        if not _matches(self.keys(secrets), f"{msg_id}.{ts.strip()}.".encode() + inc.body, given):
            raise SignatureInvalid()
        _check_timestamp(ts, inc.now, self.tolerance)

    def event_id(self, inc: Incoming) -> str | None:
        h = inc.headers
        for p in self.prefixes:
            if h.get(p + "id"):
                return h[p + "id"]
        return None


class Svix(StandardWebhooks):
    name = "svix"
    prefixes = ("svix-", "webhook-")
    signature_headers = ("svix-signature", "webhook-signature")


def _without_port(url: str) -> str:
    parts = urlsplit(url)
    if parts.port is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit(":", 1)[0]))


def _with_port(url: str) -> str:
    parts = urlsplit(url)
    if parts.port is not None:
        return url
    port = 443 if parts.scheme == "https" else 80
    return urlunsplit(parts._replace(netloc=f"{parts.netloc}:{port}"))


class Twilio(Scheme):
    """``X-Twilio-Signature: <base64>`` HMAC-SHA1 (or SHA256 when
    X-Twilio-Webhooks-Signature-Settings says so) over the public URL plus the
    sorted form parameters; JSON bodies are bound by the URL's ``bodySHA256``.
    Like Twilio's SDK, the URL is tried with and without its default port."""

    name = "twilio"
    signature_headers = ("X-Twilio-Signature",)

    def __init__(self, tolerance: float, public_url: str) -> None:
        super().__init__(tolerance)
        self.public_url = public_url

    def verify(self, inc: Incoming, secrets: list[str]) -> None:
        given = _unb64(_header(inc, "X-Twilio-Signature"))
        if given is None:
            raise SignatureInvalid("malformed X-Twilio-Signature header")
        algo: Callable[..., Any] = hashlib.sha1
        for part in (inc.headers.get("X-Twilio-Webhooks-Signature-Settings") or "").split(","):
            k, _, v = part.partition("=")
            if k.strip() == "algorithm" and v.strip():
                named = {"HMAC_SHA1": hashlib.sha1, "HMAC_SHA256": hashlib.sha256}.get(v.strip().upper())
                if named is None:
                    raise SignatureInvalid("unsupported Twilio signature algorithm")
                algo = named
        url = self.public_url + ("?" + inc.query if inc.query else "")
        query = dict(parse_qsl(inc.query, keep_blank_values=True))
        params = ""
        if "bodySHA256" in query:
            digest = hashlib.sha256(inc.body).hexdigest()
            if not hmac.compare_digest(digest.encode(), query["bodySHA256"].encode()):
                raise SignatureInvalid()
        else:
            try:
                pairs = parse_qsl(inc.body.decode(), keep_blank_values=True)
            except UnicodeDecodeError:
                raise SignatureInvalid("form body is not UTF-8") from None
            values: dict[str, set[str]] = {}
            for k, v in pairs:
                values.setdefault(k, set()).add(v)
            params = "".join(k + v for k in sorted(values) for v in sorted(values[k]))
        keys = self.keys(secrets)
        messages = {(_without_port(url) + params).encode(), (_with_port(url) + params).encode()}
        ok = False
        for message in messages:
            ok |= _matches(keys, message, [given], algo)
        if not ok:
            raise SignatureInvalid()

    def event_id(self, inc: Incoming) -> str | None:
        return inc.headers.get("I-Twilio-Idempotency-Token") or None

    def event_type(self, inc: Incoming) -> str | None:
        return None


class Square(Scheme):
    """``x-square-hmacsha256-signature: <base64>`` over the notification URL + body."""

    name = "square"
    signature_headers = ("x-square-hmacsha256-signature",)

    def __init__(self, tolerance: float, public_url: str) -> None:
        super().__init__(tolerance)
        self.url = public_url.encode()

    def verify(self, inc: Incoming, secrets: list[str]) -> None:
        mac = _unb64(_header(inc, "x-square-hmacsha256-signature"))
        if mac is None:
            raise SignatureInvalid("malformed x-square-hmacsha256-signature header")
        if not _matches(self.keys(secrets), self.url + inc.body, [mac]):
            raise SignatureInvalid()

    def event_id(self, inc: Incoming) -> str | None:
        return inc.json_str("event_id")


_PLACEHOLDER = re.compile(r"\{(body|timestamp|id)\}")


def compile_template(template: str) -> list[str | bytes]:
    """``"{timestamp}.{body}"`` -> [“timestamp”, b".", “body”]: literal parts are bytes."""
    parts: list[str | bytes] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        if m.start() > pos:
            parts.append(template[pos:m.start()].encode())
        parts.append(m.group(1))
        pos = m.end()
    if pos < len(template):
        parts.append(template[pos:].encode())
    return parts


class Generic(Scheme):
    """Configurable: header, prefix, algorithm, encoding, signed template,
    timestamp and id headers."""

    name = "generic"

    def __init__(self, tolerance: float, header: str, prefix: str, algorithm: str, encoding: str,
                 signed: str, timestamp_header: str | None, id_header: str | None,
                 type_header: str | None) -> None:
        super().__init__(tolerance)
        self.header = header
        self.signature_headers = (header,)
        self.prefix = prefix
        self.algo = HASHES[algorithm]
        self.decode = _unhex if encoding == "hex" else _unb64
        self.parts = compile_template(signed)
        self.timestamp_header = timestamp_header
        self.id_header = id_header
        self.type_header = type_header

    def verify(self, inc: Incoming, secrets: list[str]) -> None:
        header = _header(inc, self.header).strip()
        values = {"body": inc.body}
        ts = None
        if self.timestamp_header:
            ts = _header(inc, self.timestamp_header)
            values["timestamp"] = ts.strip().encode()
        if self.id_header:
            values["id"] = _header(inc, self.id_header).strip().encode()
        if self.prefix and not header.startswith(self.prefix):
            raise SignatureInvalid(f"{self.header} does not start with the expected prefix")
        mac = self.decode(header[len(self.prefix):])
        if mac is None:
            raise SignatureInvalid(f"malformed {self.header} header")
        message = b"".join(p if isinstance(p, bytes) else values[p] for p in self.parts)
        if not _matches(self.keys(secrets), message, [mac], self.algo):
            raise SignatureInvalid()
        if ts is not None and self.tolerance:
            _check_timestamp(ts, inc.now, self.tolerance)

    def event_id(self, inc: Incoming) -> str | None:
        return inc.headers.get(self.id_header) or None if self.id_header else None

    def event_type(self, inc: Incoming) -> str | None:
        if self.type_header:
            return inc.headers.get(self.type_header) or None
        return super().event_type(inc)


class SendGrid(Scheme):
    """SendGrid signed Event Webhook: ECDSA P-256 with SHA-256 over
    ``timestamp + body``, the DER signature base64 in
    ``X-Twilio-Email-Event-Webhook-Signature``, the timestamp in
    ``X-Twilio-Email-Event-Webhook-Timestamp``. ``secrets`` hold the
    verification *public* key as SendGrid shows it (base64 of the DER
    SubjectPublicKeyInfo) or as PEM; it is no secret, a literal is fine.
    Same check as the ``sendgrid`` package's ``EventWebhook.verify_signature``
    (docs.sendgrid.com "Getting Started with the Event Webhook Security Features"),
    plus the timestamp tolerance."""

    name = "sendgrid"
    SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
    TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
    signature_headers = (SIGNATURE, TIMESTAMP)

    def __init__(self, tolerance: float) -> None:
        super().__init__(tolerance)
        # Parsed keys by their text: a key is parsed once per rotation, not per request.
        self._parsed: dict[str, Any] = {}

    def public_keys(self, secrets: list[str]) -> list[Any]:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

        out = []
        for text in secrets:
            key = self._parsed.get(text)
            if key is None:
                try:
                    if "-----BEGIN" in text:
                        key = load_pem_public_key(text.encode())
                    else:
                        key = load_der_public_key(base64.b64decode("".join(text.split()), validate=True))
                except (ValueError, TypeError, binascii.Error):
                    key = False   # remembered as unusable
                if key is not False and not (isinstance(key, ec.EllipticCurvePublicKey)
                                             and key.curve.name == "secp256r1"):
                    key = False
                if key is False:
                    # Once per distinct value, and never the value itself.
                    log.warning("webhook scheme sendgrid: a configured key is not an ECDSA P-256 public key "
                                "(base64 DER or PEM); it is skipped")
                if len(self._parsed) > 64:
                    self._parsed.clear()
                self._parsed[text] = key
            if key is not False:
                out.append(key)
        return out

    def verify(self, inc: Incoming, secrets: list[str]) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        sig = _unb64(_header(inc, self.SIGNATURE))
        ts = _header(inc, self.TIMESTAMP).strip()
        if sig is None:
            raise SignatureInvalid(f"malformed {self.SIGNATURE} header")
        keys = self.public_keys(secrets)
        if not keys:
            # Misconfigured (logged when the key was parsed): the sender only learns "invalid".
            raise SignatureInvalid()
        message = ts.encode() + inc.body
        ok = False
        for key in keys:   # every key is tried (rotation), no early exit
            try:
                key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
                ok = True
            except InvalidSignature:
                pass
        if not ok:
            raise SignatureInvalid()
        if self.tolerance:
            _check_timestamp(ts, inc.now, self.tolerance)

    def event_id(self, inc: Incoming) -> str | None:
        # A batch of events (a JSON array, each with its sg_event_id); SendGrid
        # retries a batch as it was, so the body's digest names the delivery.
        return "sha256:" + hashlib.sha256(inc.body).hexdigest()

    def event_type(self, inc: Incoming) -> str | None:
        return "events"


SCHEMES = ("stripe", "github", "slack", "shopify", "standard-webhooks", "svix", "twilio", "square", "sendgrid",
           "generic")


def make_scheme(config: Any) -> Scheme:
    """The scheme object for a validated ``[webhook]`` Config."""
    name = config.scheme
    tol = config.tolerance
    if name == "stripe":
        return Stripe(tol)
    if name == "github":
        return GitHub(tol)
    if name == "slack":
        return Slack(tol)
    if name == "shopify":
        return Shopify(tol)
    if name == "standard-webhooks":
        return StandardWebhooks(tol)
    if name == "svix":
        return Svix(tol)
    if name == "twilio":
        return Twilio(tol, config.public_url)
    if name == "square":
        return Square(tol, config.public_url)
    if name == "sendgrid":
        return SendGrid(tol)
    return Generic(tol, config.header, config.prefix, config.algorithm, config.encoding, config.signed,
                   config.timestamp_header, config.id_header, config.type_header)
