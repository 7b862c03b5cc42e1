"""One optional build step; everything else about the package is in pyproject.toml.

``SIDECAR_COMPILE=1`` compiles the request path's modules with mypyc (issue 10;
docs/performance.md "Compiled request path"): the same Python source, typed as
mypy checks it, turned into C extensions (a plain request: 27% fewer
instructions). mypyc type-checks against the installed dependencies, so they
and the ``compile`` extra (mypy, stubs, setuptools) come first, as in the
README and the Dockerfile (which builds a wheel with ``pip wheel`` the same way):

    pip install '.[compile]'
    SIDECAR_COMPILE=1 pip install --no-build-isolation --no-deps --force-reinstall .

Without it (the default, and what an editable install gives) the package is
pure Python. ``sidecar --version`` says which one runs. CI runs the test suite
on both (.ci/run builds the extensions in place, then removes them: a stale
in-place extension would shadow edits to its .py file).
"""

import os

from setuptools import setup

#: The modules compiled: what a request runs through on the fast server and
#: the fast client. Left out (docs/performance.md "Compiled request path"):
#: proxy/chain.py and proxy/rawexchange.py (plugins and interpreted code
#: subclass their classes), proxy/fastclient/pool.py (an ssl.SSLContext
#: subclass: mypyc 2.4 fails on it), proxy/fastserver/body.py (subclasses a
#: builtin), proxy/routes.py (its annotations name types imported only for
#: type checking, which a compiled class evaluates), proxy/fastclient/send.py
#: (compiled, a body over the limit ended as a TypeError instead of a 413).
COMPILED = [
    "proxy/admission.py",
    "proxy/http.py",
    "proxy/metrics.py",
    "proxy/record.py",
    "proxy/writebatch.py",
    "proxy/fastserver/head.py",
    "proxy/fastserver/protocol.py",
    "proxy/fastserver/drive.py",
    "proxy/fastserver/express.py",
    "proxy/fastserver/exchange.py",
    "proxy/fastserver/response.py",
    "proxy/fastclient/conn.py",
    "proxy/fastclient/request.py",
]

ext_modules = []
if os.environ.get("SIDECAR_COMPILE") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
