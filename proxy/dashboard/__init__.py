"""The dashboard: a static page on the admin listener (GET /).

Plain HTML + JS + CSS shipped as package data: no build step, no CDN, no
data in the page itself. The script reads the admin JSON endpoints every
2 s, with the admin token (asked once, kept in sessionStorage) when one is
configured.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

_TYPES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# The page runs only its own script and talks only to this listener.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _load() -> dict[str, bytes]:
    root = resources.files(__name__)
    return {name: (root / name).read_bytes() for name in _TYPES}


def add_dashboard(app: web.Application) -> None:
    files = _load()

    def serve(name: str):
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=files[name], content_type=_TYPES[name], charset="utf-8",
                                headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP,
                                         "X-Content-Type-Options": "nosniff"})
        return handler

    app.router.add_get("/", serve("index.html"))
    app.router.add_get("/dashboard/app.js", serve("app.js"))
    app.router.add_get("/dashboard/style.css", serve("style.css"))
