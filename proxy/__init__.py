"""sidecar: a sidecar reverse proxy for provider APIs and webhooks."""

__version__ = "0.1.0"
