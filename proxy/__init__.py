"""sidecar: a sidecar reverse proxy for provider APIs and webhooks."""

__version__ = "0.1.0"


def compiled() -> bool:
    """Whether the request path runs as mypyc extensions (setup.py,
    ``SIDECAR_COMPILE=1``): Python imports an extension module before the
    ``.py`` file of the same name."""
    from importlib.machinery import EXTENSION_SUFFIXES
    from pathlib import Path

    here = Path(__file__).parent / "fastserver"
    return any((here / f"express{suffix}").exists() for suffix in EXTENSION_SUFFIXES)
