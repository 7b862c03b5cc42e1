"""The public surface for plugin authors: import everything a plugin needs from here.

```python
from proxy.plugin import (BuildContext, Exchange, Filter, Handler, Model, PluginSpec,
                          ProxyResponse, SidecarError, hookimpl)
```

What is named in ``__all__`` is the stable API (docs/plugins.md); other
modules of ``proxy`` are internals that may move between releases. The
built-in plugins may use internals; a third-party plugin should not need to.
"""

from __future__ import annotations

from .body import read_limited
from .chain import Again, Defer, Exchange, Filter, Handler, ProxyResponse
from .client import HttpClient
from .config import Model, Policy
from .errors import (BadRequest, CircuitOpen, ConfigError, HeadersTooLarge, NoRoute, RequestBodyTooLarge,
                     SidecarError, UpstreamError, UpstreamTimeout, UpstreamTLSError, UpstreamUnavailable)
from .hookspecs import hookimpl
from .plugins import INJECTS_CREDENTIALS, MAKES_ROUTE, BuildContext, PluginSpec
from .secrets import SecretRef, SecretUnavailable
from .units import Duration, Size

__all__ = [
    # registering a plugin
    "hookimpl", "PluginSpec", "BuildContext", "INJECTS_CREDENTIALS", "MAKES_ROUTE",
    # its config model and value types ("250ms", "10MB")
    "Model", "Duration", "Size", "Policy",
    # the data plane
    "Filter", "Exchange", "ProxyResponse", "Handler", "Defer", "Again", "read_limited", "HttpClient",
    # secrets (``ctx.runtime.secrets.ref("env:NAME")``)
    "SecretRef", "SecretUnavailable",
    # errors: raise a SidecarError (or subclass) to answer with the sidecar's JSON error
    "SidecarError", "BadRequest", "NoRoute", "RequestBodyTooLarge", "HeadersTooLarge",
    "UpstreamError", "UpstreamUnavailable", "UpstreamTimeout", "UpstreamTLSError", "CircuitOpen",
    "ConfigError",
]
