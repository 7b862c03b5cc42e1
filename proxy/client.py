"""The sidecar's own HTTP client, shared by every plugin of a runtime.

OAuth2 token fetches, JWKS downloads, forward_auth questions and webhook
deliveries are requests the sidecar makes for itself, not proxied ones: they
share one connection pool per runtime (owned by the runtime, closed at stop)
with the TLS settings of config.toml's ``[http_client]`` table:

```toml
[http_client]
verify = true                          # false: no certificate checks (tests only)
ca_bundle = "/etc/ssl/internal-ca.pem" # extra trust anchors (an internal IdP); relative to config.toml
max_connections = 100                  # per worker, every host together
```

Requests are sent as written: no redirects followed, no cookies kept, no
proxy from the environment, no automatic ``Accept``/``User-Agent``/
``Accept-Encoding``/``Content-Type`` headers and no decompression (a webhook
is delivered byte for byte). Read answers with ``proxy.body.read_limited``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import Field

from .config import Model
from .errors import ConfigError
from .hookspecs import hookimpl

TABLE = "http_client"

_SKIP_AUTO = ("Accept-Encoding", "User-Agent", "Accept", "Content-Type")


class ClientSettings(Model):
    """config.toml ``[http_client]``."""

    verify: bool = True
    ca_bundle: str | None = None
    max_connections: int = Field(default=100, ge=1)


class HttpClient:
    """One aiohttp session per runtime, made on first use (inside the loop)."""

    def __init__(self, settings: ClientSettings, base_dir: Path, where: str = "config") -> None:
        self.settings = settings
        self.ca_bundle = str((base_dir / settings.ca_bundle).resolve()) if settings.ca_bundle else None
        self._session: aiohttp.ClientSession | None = None
        if self.ca_bundle and settings.verify:
            # Loaded once now so a bad file is a config error, not an OSError
            # in the first token fetch or webhook delivery.
            try:
                self.ssl_context()
            except (OSError, ssl.SSLError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else "no certificate in it"
                raise ConfigError([f"{where}: {TABLE}.ca_bundle: cannot load {self.ca_bundle}: {reason}"]) from None

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.settings.verify:
            return False
        # The system store (SSL_CERT_FILE honoured) plus ca_bundle.
        ctx = ssl.create_default_context()
        if self.ca_bundle:
            ctx.load_verify_locations(cafile=self.ca_bundle)
        return ctx

    @property
    def session(self) -> aiohttp.ClientSession:
        s = self._session
        if s is None or s.closed:
            connector = aiohttp.TCPConnector(limit=self.settings.max_connections, ssl=self.ssl_context(),
                                             ttl_dns_cache=60)
            s = self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=_SKIP_AUTO)
        return s

    def request(self, method: str, url: Any, **kw: Any) -> Any:
        """``session.request`` with redirects off (use as ``async with``)."""
        kw.setdefault("allow_redirects", False)
        return self.session.request(method, url, **kw)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@hookimpl
def sidecar_settings_register() -> dict[str, type[Any]]:
    return {TABLE: ClientSettings}
