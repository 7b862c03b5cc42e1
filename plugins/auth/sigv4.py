"""auth ``type = "aws_sigv4"``: sign each request with AWS Signature Version 4 (issue 15).

Built on botocore's own signer (``SigV4Auth`` / ``S3SigV4Auth`` on an
``AWSRequest``), not a hand-written signature, the way Envoy's
``aws_request_signing`` filter uses the AWS C SDK. The request is signed as
it will reach the upstream: its ``Host`` (the upstream's authority), the
upstream base path plus the rest of the path, and the canonical query. The
client's own ``Authorization``, ``X-Amz-Date``, ``X-Amz-Security-Token`` and
``X-Amz-Content-Sha256`` are dropped (a service using boto3 with dummy
credentials and ``endpoint_url`` at the sidecar works unchanged), as are the
``X-Amz-*`` parameters of a presigned query, which would be a second
authentication the upstream refuses.

Signed headers: ``host``, ``content-type``, ``content-md5`` and every
``x-amz-*`` header (what AWS requires, plus the two whose integrity matters).
Other headers travel unsigned, so a hop that rewrites ``User-Agent`` or
``Accept-Encoding`` cannot break the signature.

Credentials: ``access_key_id`` / ``secret_access_key`` / ``session_token``
secret references, or botocore's standard credential chain when they are
absent. The chain is resolved in a dedicated thread (it may call STS or the
instance metadata service) and re-read in the background, so temporary
credentials (IRSA, instance roles: botocore ``RefreshableCredentials``)
rotate without a restart and the data plane only reads a frozen copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, unquote_plus

from botocore.auth import EMPTY_SHA256_HASH, UNSIGNED_PAYLOAD, S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from proxy.chain import Exchange
from proxy.errors import SidecarError
from proxy.secrets import SecretUnavailable, stop_background

if TYPE_CHECKING:
    from .inject import Secret

log = logging.getLogger("sidecar.aws")
# SECURITY: at DEBUG botocore logs each canonical request (X-Amz-Security-Token
# included) and each response body (Secrets Manager values): never below INFO,
# whatever level the sidecar's logging runs at.
logging.getLogger("botocore").setLevel(logging.INFO)

TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
DROPPED = ("Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-Sha256")
_SIGNED_PLAIN = frozenset({"host", "content-type", "content-md5"})
_PRESIGN_PARAMS = frozenset({"x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-expires",
                             "x-amz-signedheaders", "x-amz-signature", "x-amz-security-token"})
# A path needing no re-encoding: RFC 3986 unreserved characters and '/' only.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9\-._~/]*")
# Hash a signed body off the loop past this size (hashlib releases the GIL).
_HASH_INLINE = 256 * 1024


class SignedChunksUnsupported(SidecarError):
    status, code = 400, "aws_chunked_signed_unsupported"
    message = ("the client signed its body in aws-chunked frames (STREAMING-AWS4-HMAC-SHA256-PAYLOAD), "
               "which only its own key can sign; send UNSIGNED-PAYLOAD or a plain body through the sidecar")


class _Payload:
    """botocore's signer with the payload hash given by the filter: it knows
    whether the body streams unsigned, was buffered and hashed, or is framed
    with an unsigned trailer (botocore would otherwise decide from the URL
    scheme and a client config the sidecar has no use for)."""

    def payload(self, request: AWSRequest) -> str:
        return request.context["sidecar_payload"]


class _S3Auth(_Payload, S3SigV4Auth):
    pass


class _Auth(_Payload, SigV4Auth):
    pass


def canonical_path(path: str) -> str:
    """Each segment percent-encoded the way AWS canonicalizes it (RFC 3986
    unreserved characters kept), so the path sent is the path signed."""
    if _PLAIN_PATH.fullmatch(path):
        return path
    return "/".join(quote(unquote(seg), safe="-_.~") for seg in path.split("/"))


def canonical_query(query: str) -> str:
    """The query re-encoded the AWS way (keys and values percent-encoded,
    unreserved characters kept), without presigned-URL parameters. A '+' is a
    space, as AWS services decode queries (form encoding); a plus is sent as
    %2B. Order is kept: the signer sorts its own copy."""
    out = []
    for part in query.split("&"):
        if not part:
            continue
        k, eq, v = part.partition("=")
        k = unquote_plus(k)
        if k.lower() in _PRESIGN_PARAMS:
            continue
        k = quote(k, safe="-_.~")
        out.append(f"{k}={quote(unquote_plus(v), safe='-_.~')}" if eq else k)
    return "&".join(out)


class ChainCredentials:
    """botocore's standard credential chain for one runtime, read in a thread.

    ``get()`` returns the last frozen credentials; a background task asks
    botocore for them again every ``refresh`` seconds (a RefreshableCredentials
    renews itself 15 minutes before expiry when asked), so the data plane never
    triggers a blocking STS or metadata call.
    """

    def __init__(self, refresh: float, startup_wait: float) -> None:
        self.refresh = refresh
        self.startup_wait = startup_wait
        self.frozen: ReadOnlyCredentials | None = None
        self.method: str | None = None
        self.error: str | None = "not resolved yet"
        self.tried = False
        self._creds: Any = None     # botocore Credentials, touched only in the thread
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def get(self) -> ReadOnlyCredentials:
        f = self.frozen
        if f is None:
            raise SecretUnavailable("no AWS credentials from the standard chain")
        return f

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._loop(), name="sidecar-aws-credentials")

    async def first_read(self) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.startup_wait
        # Polled (at most startup_wait, once at start): an Event would have to be set on every exit path of _loop.
        while not self.tried and loop.time() < end and self._task is not None and not self._task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def resolve(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidecar-aws-creds")
        try:
            frozen, method = await asyncio.get_running_loop().run_in_executor(self._executor, self._read)
        except Exception as e:
            why = f"the standard credential chain failed ({type(e).__name__})"
            if why != self.error:
                log.warning("aws credentials: %s", why)
            self.error = why
        else:
            if frozen is None:
                self.error = "the standard credential chain found no AWS credentials"
            else:
                if self.frozen is not None and frozen.access_key != self.frozen.access_key:
                    log.info("aws credentials rotated (%s)", method)
                self.frozen, self.method, self.error = frozen, method, None
        self.tried = True

    async def _loop(self) -> None:
        while True:
            await self.resolve()
            await asyncio.sleep(self.refresh if self.error is None else min(self.refresh, 5.0))

    def _read(self) -> tuple[ReadOnlyCredentials | None, str | None]:
        if self._creds is None:
            import botocore.session

            self._creds = botocore.session.get_session().get_credentials()
            if self._creds is None:
                return None, None
        return self._creds.get_frozen_credentials(), getattr(self._creds, "method", None)

    async def close(self) -> None:
        self._closed = True
        await stop_background(self._task, self._executor)

    def describe(self) -> dict[str, Any]:
        """Never a key: where the credentials came from and whether there are any."""
        return {"available": self.frozen is not None, "method": self.method, "error": self.error}


class Signer:
    """Signs one route's requests (one credential set: the default or a tenant's)."""

    __slots__ = ("service", "region", "signed_payload", "s3", "keys", "chain", "_auth", "_for")

    def __init__(self, service: str, region: str, signed_payload: bool,
                 keys: "tuple[Secret, Secret, Secret | None] | None", chain: ChainCredentials | None) -> None:
        self.service, self.region = service, region
        self.signed_payload = signed_payload
        self.s3 = service.startswith("s3")
        self.keys = keys
        self.chain = chain
        self._auth: SigV4Auth | None = None
        self._for: ReadOnlyCredentials | None = None

    def _credentials(self) -> ReadOnlyCredentials:
        if self.keys is None:
            assert self.chain is not None
            return self.chain.get()
        key_id, secret, token = self.keys
        a, s = key_id.get(), secret.get()
        if a is None or s is None:
            raise SecretUnavailable("the AWS access key id or secret access key is not set")
        return ReadOnlyCredentials(a, s, token.get() if token is not None else None)

    def _signer(self) -> SigV4Auth:
        creds = self._credentials()
        if creds != self._for or self._auth is None:   # one signer object per rotation
            cls = _S3Auth if self.s3 else _Auth
            self._auth, self._for = cls(creds, self.service, self.region), creds
        return self._auth

    async def sign(self, ex: Exchange) -> None:
        headers = ex.headers
        marker = headers.get("X-Amz-Content-Sha256", "")
        for name in DROPPED:
            headers.popall(name, None)
        if marker.startswith("STREAMING-") and marker != TRAILER:
            raise SignedChunksUnsupported()
        auth = self._signer()
        if marker == TRAILER:
            # aws-chunked body with an unsigned trailing checksum (boto3's
            # default over TLS): the frames carry no signature of their own.
            payload = TRAILER
        elif self.signed_payload:
            body = await ex.read_body()
            if not body:
                payload = EMPTY_SHA256_HASH
            elif len(body) <= _HASH_INLINE:
                payload = hashlib.sha256(body).hexdigest()
            else:
                payload = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: hashlib.sha256(body).hexdigest())
        else:
            payload = UNSIGNED_PAYLOAD
        ex.path = path = canonical_path(ex.path)
        if ex.query:
            ex.query = canonical_query(ex.query)
        up = ex.route.upstream
        assert up is not None
        url = f"https://{up.authority}{up.base_path}{path}"
        if ex.query:
            url += "?" + ex.query
        to_sign = [("host", up.authority)]
        for name, value in headers.items():
            low = name.lower()
            if low.startswith("x-amz-") or (low in _SIGNED_PLAIN and low != "host"):
                to_sign.append((low, value))
        req = AWSRequest(method=ex.method, url=url)
        for name, value in to_sign:
            req.headers[name] = value   # HTTPHeaders appends: repeated names are all signed
        req.context["sidecar_payload"] = payload
        auth.add_auth(req)
        h = req.headers
        headers["Authorization"] = h["Authorization"]
        headers["X-Amz-Date"] = h["X-Amz-Date"]
        token = h.get("X-Amz-Security-Token")
        if token:
            headers["X-Amz-Security-Token"] = token
        if self.s3:
            headers["X-Amz-Content-Sha256"] = payload

    def describe(self) -> dict[str, Any]:
        return {"service": self.service, "region": self.region,
                "payload": "signed" if self.signed_payload else "unsigned",
                "credentials": "chain" if self.keys is None else "references"}
